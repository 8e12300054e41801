"""The Ray engine: a Ray Data pipeline over the files of a batch job.

    pending lists (read_text) -> load: hash, skip if done, decode, resample (CPU tasks)
        -> Transcriber actors: the model loaded once each, batches decoded side by side
        -> write: per-file transcripts (CPU tasks) -> the driver appends results.jsonl

Discovery streams the paths into small list files under the output directory, which
Ray reads back in parallel, so neither the driver nor one task holds the whole list. The
log-mel is computed inside the model call (`transcribe_batch` slides its windows over
the samples). Actors are restarted when they die and their unfinished batches retried
(`max_restarts=-1`, `max_task_retries=-1`); the table takes one row per file key, so a batch
that ran twice is still recorded once. Ray Data's actor pools restart their actors
and retry their tasks without end by default; the engine relies on that. `ray` is an optional dependency
(`pip install 'maxwhisper[ray]'`); this module imports it when the engine runs."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .batch import (Job, Loaded, ResultsTable, Source, Tally, discover, error_row, load, ok_row, progress_bar,
                    transcribe_loaded, write_outputs)

SAMPLE_RATE = 16000  # every Whisper model's; the actors check theirs against it
FILES_PER_LIST = 32
BATCHES_PER_CALL = 4  # files per actor call, in batch_size units: the tail of a call runs part-full


def _write_lists(sources: Iterable[Source], directory: Path) -> int:
    """The sources as JSON lines, FILES_PER_LIST to a file; how many there were."""
    directory.mkdir(parents=True)
    count, out = 0, None
    try:
        for source in sources:
            if count % FILES_PER_LIST == 0:
                if out is not None:
                    out.close()
                out = open(directory / f"{count // FILES_PER_LIST:08d}.jsonl", "w", encoding="utf-8")
            out.write(json.dumps(dict(path=source.path, subdir=source.subdir, problem=source.problem)) + "\n")
            count += 1
    finally:
        if out is not None:
            out.close()
    return count


def _load_row(row: dict, job: Job, done: frozenset[str]) -> list[dict]:
    """A listed file, hashed and decoded; nothing when its key is done. Absent strings
    are empty, so that every block has the same column types."""
    source = Source(**json.loads(row["text"]))
    item = load(source, job, SAMPLE_RATE, done)
    if item is None:
        return []
    samples = b"" if item.samples is None else item.samples.tobytes()
    return [dict(path=source.path, subdir=source.subdir, sha256=item.sha256 or "", key=item.key,
                 samples=samples, duration=item.duration or 0.0, error=item.error or "")]


def _items(batch: dict[str, np.ndarray]) -> list[Loaded]:
    return [Loaded(Source(str(path), str(subdir)), str(sha) or None, str(key),
                   samples=np.frombuffer(samples, np.float32) if not error else None,
                   error=str(error) or None, duration=float(duration) if not error else None)
            for path, subdir, sha, key, samples, duration, error in zip(
                batch["path"], batch["subdir"], batch["sha256"], batch["key"], batch["samples"],
                batch["duration"], batch["error"])]


class Transcriber:
    """A model actor: loads (and, on a new machine, compiles) the model once, then
    transcribes batch after batch."""

    def __init__(self, job: Job, device: str, attention: str, batch_size: int):
        from .model import load_model

        self.job, self.batch_size = job, batch_size
        self.model = load_model(job.model, device=device, precision=job.precision, attention=attention)
        rate = self.model.spec.audio.sample_rate
        if rate != SAMPLE_RATE:
            raise ValueError(f"{job.model}: the Ray engine decodes audio at {SAMPLE_RATE} Hz, the model wants {rate}")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        items = _items(batch)
        out = dict(path=[], subdir=[], sha256=[], key=[], duration=[], error=[], result=[])

        def put(item: Loaded, result: dict | None, error: str | None) -> None:
            for name, value in (("path", item.source.path), ("subdir", item.source.subdir),
                                ("sha256", item.sha256 or ""), ("key", item.key),
                                ("duration", item.duration or 0.0), ("error", error or ""),
                                ("result", "" if result is None else json.dumps(result, ensure_ascii=False))):
                out[name].append(value)

        for item in items:
            if item.error is not None:
                put(item, None, item.error)
        good = [item for item in items if item.error is None]
        for item, result, error in transcribe_loaded(self.model, good, self.job.options, self.batch_size):
            put(item, result, error)
        return out


def _write_batch(batch: dict[str, np.ndarray], job: Job, output_dir: str) -> dict[str, list]:
    """Each result's transcripts, then its table row (as JSON, for the driver)."""
    rows = []
    for path, subdir, sha, key, duration, error, result in zip(
            batch["path"], batch["subdir"], batch["sha256"], batch["key"], batch["duration"], batch["error"],
            batch["result"]):
        source, sha = Source(str(path), str(subdir)), str(sha) or None
        error, duration = str(error) or None, float(duration) if sha else None
        if error is None:
            transcript = json.loads(str(result))
            try:
                outputs = write_outputs(transcript, source, output_dir, job.formats)
            except OSError as e:
                error = f"{source.path}: cannot write its output ({e})"
            else:
                rows.append(ok_row(source, sha, str(key), job, duration, transcript, outputs))
        if error is not None:
            rows.append(error_row(source, sha, str(key), job, error, duration or None))
    return dict(row=[json.dumps(r, ensure_ascii=False) for r in rows])


def run_ray(inputs: Iterable[str | Path], output_dir: str | Path, job: Job, *, table: ResultsTable,
            device: str = "auto", attention: str = "unfused", workers: int | None = None, batch_size: int = 8,
            address: str | None = None, quiet: bool = False) -> Tally:
    """Transcribe on a Ray cluster: the one this process is connected to, else the one
    at `address`, else a new one on this machine. `workers` model actors (default: one
    per GPU, or one on a cluster without GPUs), each holding one GPU where the cluster
    has them. On more than one node the inputs and `output_dir` must be on storage every
    node reads at the same paths."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise RuntimeError("--engine ray needs Ray Data: pip install 'maxwhisper[ray]'") from None

    if not ray.is_initialized():
        ray.init(address=address)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if device == "gpu" and not gpus:
        raise ValueError("--device gpu: the Ray cluster has no GPUs")
    on_gpu = device != "cpu" and gpus > 0
    workers = workers or (gpus if on_gpu else 1)
    actor_device = "gpu" if on_gpu else "cpu"

    tally = Tally()
    lists = Path(output_dir) / f".pending-{uuid.uuid4().hex[:12]}"
    try:
        count = _write_lists(discover(inputs), lists)
        if not count:
            return tally
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # one bar: ours
        ds = ray.data.read_text(str(lists))
        ds = ds.flat_map(_load_row, fn_kwargs=dict(job=job, done=frozenset(table.done)))
        ds = ds.map_batches(Transcriber, fn_constructor_kwargs=dict(job=job, device=actor_device, attention=attention,
                                                                    batch_size=batch_size),
                            batch_size=BATCHES_PER_CALL * batch_size, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=workers),
                            num_gpus=1 if on_gpu else 0, num_cpus=0 if on_gpu else 1)
        ds = ds.map_batches(_write_batch, fn_kwargs=dict(job=job, output_dir=str(output_dir)), batch_format="numpy")
        received = 0
        with progress_bar(quiet) as bar:
            for record in ds.iter_rows():
                received += 1
                row = json.loads(record["row"])
                if table.append(row):
                    tally.count(row)
                    bar.update(1)
                    bar.set_postfix_str(tally.postfix(), refresh=False)
        tally.skipped = count - received
    finally:
        shutil.rmtree(lists, ignore_errors=True)
    return tally
