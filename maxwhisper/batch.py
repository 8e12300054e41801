"""Batch jobs: find the audio files behind directories and manifests, keep a results
table that a rerun resumes from, and transcribe in one process with audio decoded ahead.

Every stage streams: discovery walks directories with `os.scandir` and reads manifests
line by line, and the table is appended a row at a time, so a job holds the files in
flight, never the list of all files. What a job remembers across files is the set of
keys already in the table (one short string per file)."""

from __future__ import annotations

import csv
import dataclasses
import datetime
import hashlib
import io
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .writers import write_atomic

AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aac", ".wma",
                              ".aif", ".aiff", ".webm", ".mp4", ".mkv", ".mov"})
TEXT_MANIFESTS = frozenset({".txt", ".lst", ".list"})
JSONL_MANIFESTS = frozenset({".jsonl", ".ndjson"})
CSV_MANIFESTS = frozenset({".csv"})
TABLE_NAME = "results.jsonl"
TABLES = ("jsonl", "parquet")


@dataclass(frozen=True)
class Source:
    """One file to transcribe. `subdir`: where its outputs go under the output
    directory (a directory input's tree is mirrored). `problem`: why an input names no
    file it could read (a manifest line without a path), recorded as an error."""
    path: str
    subdir: str = ""
    problem: str | None = None


def discover(inputs: Iterable[str | Path]) -> Iterator[Source]:
    """Audio files, directories (recursive, audio extensions only) and manifests: text
    (one path per line, `#` comments), JSONL (a "path" key per line) or CSV (a "path"
    column). A manifest's relative paths are relative to the manifest's directory.
    Outputs mirror the tree below a directory input, or below a manifest's directory."""
    for given in inputs:
        path = Path(given)
        suffix = path.suffix.lower()
        if path.is_dir():
            yield from _walk(str(path), "")
        elif not path.exists():
            yield Source(os.path.abspath(path), problem=f"{path}: input not found")
        elif suffix in TEXT_MANIFESTS | JSONL_MANIFESTS | CSV_MANIFESTS:
            yield from _manifest(path)
        else:
            yield Source(os.path.abspath(path))


def _walk(root: str, subdir: str) -> Iterator[Source]:
    """Depth first, one directory's entries open at a time per level."""
    with os.scandir(os.path.join(root, subdir) if subdir else root) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                yield from _walk(root, os.path.join(subdir, entry.name))
            elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in AUDIO_EXTENSIONS:
                yield Source(os.path.abspath(entry.path), subdir)


def _manifest(path: Path) -> Iterator[Source]:
    base = path.parent
    suffix = path.suffix.lower()

    def entry(value, where: str) -> Source:
        if not isinstance(value, str) or not value.strip():
            return Source(where, problem=f"{where}: expected a path, found {value!r}")
        path = os.path.abspath(base / value.strip())
        # Outputs mirror the tree below the manifest; files elsewhere go to the top.
        subdir = os.path.relpath(os.path.dirname(path), os.path.abspath(base))
        return Source(path, "" if subdir == "." or subdir.startswith("..") else subdir)

    with open(path, encoding="utf-8", newline="") as f:
        if suffix in CSV_MANIFESTS:
            rows = csv.DictReader(f)
            if rows.fieldnames is None or "path" not in rows.fieldnames:
                yield Source(str(path), problem=f"{path}: a CSV manifest needs a 'path' column, "
                                                f"found columns {rows.fieldnames or []}")
                return
            for n, row in enumerate(rows, start=2):
                yield entry(row["path"], f"{path}:{n}")
            return
        for n, line in enumerate(f, start=1):
            line = line.strip()
            if not line or (suffix in TEXT_MANIFESTS and line.startswith("#")):
                continue
            if suffix in TEXT_MANIFESTS:
                yield entry(line, f"{path}:{n}")
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield Source(f"{path}:{n}", problem=f"{path}:{n}: not JSON ({e.msg})")
                continue
            if not isinstance(obj, dict) or "path" not in obj:
                yield Source(f"{path}:{n}", problem=f"{path}:{n}: a JSONL manifest line needs a \"path\" key")
                continue
            yield entry(obj["path"], f"{path}:{n}")


# --- what a job is, and which files it has done -------------------------------------

@dataclass(frozen=True)
class Job:
    """What decides a transcript besides the audio: the model as asked for, the
    decoding options and the output formats. Its fingerprint is part of every file's
    key, so a rerun with other options transcribes again."""
    model: str
    precision: str
    options: object  # TranscribeOptions
    formats: tuple[str, ...]

    @property
    def fingerprint(self) -> str:
        described = dict(model=self.model, precision=self.precision, formats=list(self.formats),
                         options=dataclasses.asdict(self.options))
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def content_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def file_key(path: str, sha256: str | None, fingerprint: str) -> str:
    return hashlib.sha256(f"{path}\0{sha256}\0{fingerprint}".encode()).hexdigest()[:32]


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def ok_row(source: Source, sha256: str, key: str, job: Job, duration: float, result: dict,
           outputs: list[str]) -> dict:
    return dict(path=source.path, sha256=sha256, key=key, status="ok", error=None, duration=round(duration, 3),
                language=result.get("language"), text=result["text"], segments=result["segments"],
                model=job.model, outputs=outputs, time=now())


def error_row(source: Source, sha256: str | None, key: str, job: Job, error: str,
              duration: float | None = None) -> dict:
    return dict(path=source.path, sha256=sha256, key=key, status="error", error=error, duration=duration,
                language=None, text=None, segments=None, model=job.model, outputs=[], time=now())


def describe(e: BaseException) -> str:
    from .audio import AudioError

    return str(e) if isinstance(e, AudioError) else f"{type(e).__name__}: {e}"


class ResultsTable:
    """`results.jsonl` in the output directory: one row per file, appended as each
    finishes. A row is one write of one line, flushed at once; a crash can leave at most
    a partial last line, which opening the table cuts off. `retry_errors` drops the
    error rows first (the table is rewritten to a temporary file and renamed), so that
    those files are tried again and every key still has one row."""

    def __init__(self, output_dir: str | Path, retry_errors: bool = False):
        self.path = Path(output_dir) / TABLE_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: set[str] = set()
        if self.path.exists():
            self._repair(retry_errors)
        self._file = open(self.path, "a", encoding="utf-8")

    def _repair(self, retry_errors: bool) -> None:
        _cut_partial_line(self.path)
        if not retry_errors:
            with open(self.path, encoding="utf-8") as f:
                self.done.update(json.loads(line)["key"] for line in f)
            return
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(self.path, encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as dst:
            for line in src:
                row = json.loads(line)
                if row["status"] != "error":
                    self.done.add(row["key"])
                    dst.write(line)
        os.replace(tmp, self.path)

    def append(self, row: dict) -> bool:
        """False (and nothing written) when the file's key already has its row."""
        if row["key"] in self.done:
            return False
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()
        self.done.add(row["key"])
        return True

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _cut_partial_line(path: Path, chunk: int = 1 << 16) -> None:
    """Truncate after the last newline (a crash mid-write leaves a partial line)."""
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            block = f.read(pos - start)
            if (i := block.rfind(b"\n")) >= 0:
                if start + i + 1 < end:
                    f.truncate(start + i + 1)
                return
            pos = start
        f.truncate(0)


def write_parquet(table_path: Path, rows_per_group: int = 1000) -> Path:
    """The JSONL table as `results.parquet` beside it, read and written a row group at
    a time (pyarrow: installed with the `ray` extra)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    word = pa.struct([("word", pa.string()), ("start", pa.float64()), ("end", pa.float64()),
                      ("probability", pa.float64())])
    segment = pa.struct([("id", pa.int64()), ("seek", pa.int64()), ("start", pa.float64()), ("end", pa.float64()),
                         ("text", pa.string()), ("tokens", pa.list_(pa.int64())), ("temperature", pa.float64()),
                         ("avg_logprob", pa.float64()), ("compression_ratio", pa.float64()),
                         ("no_speech_prob", pa.float64()), ("words", pa.list_(word))])
    schema = pa.schema([("path", pa.string()), ("sha256", pa.string()), ("key", pa.string()),
                        ("status", pa.string()), ("error", pa.string()), ("duration", pa.float64()),
                        ("language", pa.string()), ("text", pa.string()), ("segments", pa.list_(segment)),
                        ("model", pa.string()), ("outputs", pa.list_(pa.string())), ("time", pa.string())])
    out = table_path.with_suffix(".parquet")
    buffer = io.BytesIO()
    with pq.ParquetWriter(buffer, schema) as writer, open(table_path, encoding="utf-8") as f:
        rows: list[dict] = []
        for line in f:
            rows.append(json.loads(line))
            if len(rows) == rows_per_group:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                rows = []
        if rows:
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
    write_atomic(out, buffer.getvalue())
    return out


# --- transcribing, shared by both engines ---------------------------------------------

@dataclass
class Loaded:
    """A file read, hashed and decoded (or the reason it could not be)."""
    source: Source
    sha256: str | None
    key: str
    samples: np.ndarray | None = None
    error: str | None = None
    duration: float | None = None


def load(source: Source, job: Job, sample_rate: int, done: set[str] | frozenset[str]) -> Loaded | None:
    """Hash and decode one file; None when its key is already done."""
    from .audio import load_audio

    if source.problem is not None:
        key = file_key(source.path, None, job.fingerprint)
        return None if key in done else Loaded(source, None, key, error=source.problem)
    try:
        sha = content_hash(source.path)
    except OSError as e:
        key = file_key(source.path, None, job.fingerprint)
        return None if key in done else Loaded(source, None, key, error=f"{source.path}: cannot read ({e.strerror})")
    key = file_key(source.path, sha, job.fingerprint)
    if key in done:
        return None
    try:
        samples = load_audio(source.path, sample_rate)
    except Exception as e:  # recorded in the table; the job goes on
        return Loaded(source, sha, key, error=describe(e))
    return Loaded(source, sha, key, samples=samples, duration=len(samples) / sample_rate)


def transcribe_loaded(model, items: Iterable[Loaded], options, batch_size: int
                      ) -> Iterator[tuple[Loaded, dict | None, str | None]]:
    """(item, result, None) or (item, None, error) for each decoded item, `batch_size`
    decoded side by side. Should a batch fail, the files it held are transcribed alone,
    so that only the file at fault is recorded as failed."""
    from .transcribe import transcribe, transcribe_batch

    items = iter(items)
    while True:
        in_flight: dict[int, Loaded] = {}

        def feed():
            for n, item in enumerate(items):
                in_flight[n] = item
                yield item.samples

        try:
            for n, result in transcribe_batch(model, feed(), options, batch_size=batch_size):
                yield in_flight.pop(n), result, None
            return
        except Exception:
            if not in_flight:  # not a file's fault (the options, the model)
                raise
        for item in in_flight.values():
            try:
                result = transcribe(model, item.samples, options)
            except Exception as e:
                yield item, None, describe(e)
            else:
                yield item, result, None


def write_outputs(result: dict, source: Source, output_dir: str | Path, formats: tuple[str, ...]) -> list[str]:
    from .writers import write

    out = Path(output_dir) / source.subdir
    return [str(p) for fmt in formats for p in write(result, source.path, out, fmt)]


@dataclass
class Tally:
    """What a job did: files transcribed, failed, skipped as done, and audio seconds."""
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    audio_s: float = 0.0
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def count(self, row: dict) -> None:
        if row["status"] == "ok":
            self.ok += 1
            self.audio_s += row["duration"]
        else:
            self.failed += 1

    @property
    def hours_per_hour(self) -> float:
        return self.audio_s / max(time.perf_counter() - self.started, 1e-9)

    def postfix(self) -> str:
        return f"{self.audio_s / 3600:.3f} h audio, {self.hours_per_hour:.1f} h/h, {self.failed} failed"

    def summary(self) -> str:
        took = time.perf_counter() - self.started
        return (f"{self.ok} transcribed, {self.failed} failed, {self.skipped} already done; "
                f"{self.audio_s / 3600:.3f} h of audio in {took:.1f} s ({self.hours_per_hour:.1f} hours per hour)")


def progress_bar(quiet: bool):
    from tqdm import tqdm

    return tqdm(unit="file", desc="batch", disable=quiet or not sys.stderr.isatty())


_END = object()


def decode_ahead(sources: Iterable[Source], job: Job, sample_rate: int, done: set[str], depth: int,
                 tally: Tally) -> Iterator[Loaded]:
    """`load` on a background thread, at most `depth` files ahead (soundfile, soxr and
    hashing release the GIL while the model runs). `done` is the table's growing key
    set: a file listed twice is skipped once its first copy is recorded."""
    ready: queue.Queue = queue.Queue(maxsize=depth)

    def work():
        try:
            for source in sources:
                item = load(source, job, sample_rate, done)
                if item is None:
                    tally.skipped += 1
                else:
                    ready.put(item)
        except BaseException as e:  # handed to the consumer, raised there
            ready.put(e)
        ready.put(_END)

    threading.Thread(target=work, name="maxwhisper-decode", daemon=True).start()
    while (item := ready.get()) is not _END:
        if isinstance(item, BaseException):
            raise item
        yield item


def run_local(model, inputs: Iterable[str | Path], output_dir: str | Path, job: Job, *, batch_size: int = 8,
              table: ResultsTable, quiet: bool = False) -> Tally:
    """Transcribe in this process: decoding ahead on a thread, `batch_size` files
    decoded side by side; each result's files written and its row appended as it
    finishes."""
    tally = Tally()
    rate = model.spec.audio.sample_rate
    items = decode_ahead(discover(inputs), job, rate, table.done, depth=2 * batch_size, tally=tally)
    with progress_bar(quiet) as bar:
        def record(row: dict) -> None:
            if table.append(row):
                tally.count(row)
                bar.update(1)
                bar.set_postfix_str(tally.postfix(), refresh=False)

        def good():
            for item in items:
                if item.error is None:
                    yield item
                else:
                    record(error_row(item.source, item.sha256, item.key, job, item.error))

        for item, result, error in transcribe_loaded(model, good(), job.options, batch_size):
            if error is None:
                try:
                    outputs = write_outputs(result, item.source, output_dir, job.formats)
                except OSError as e:
                    error = f"{item.source.path}: cannot write its output ({e})"
            if error is None:
                record(ok_row(item.source, item.sha256, item.key, job, item.duration, result, outputs))
            else:
                record(error_row(item.source, item.sha256, item.key, job, error, item.duration))
    return tally
