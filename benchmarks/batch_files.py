"""Many files, three ways, in one run: `maxwhisper batch`'s local engine, its Ray engine
on a local Ray cluster, and a plain loop of `model.transcribe`.

    python -m benchmarks.batch_files --files 42 --cpus 2 --out docs/bench/batch-files.json

The files are copies of the committed clips (tests/data/speech, 7 to 9 s each), in a
directory tree. Every system transcribes the same files with the same options (greedy,
temperature 0 unless --beam-size), writing txt transcripts. Times are wall clock: the
local engine and the loop share one model loaded before the clock starts; the Ray time
includes its actors loading the model (every Ray job does), and the cluster's start is
reported apart. Rates: files per hour and hours of audio per hour; ratios against the
loop of this same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from datetime import date
from importlib.metadata import version
from pathlib import Path

import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
SPEECH = ROOT / "tests" / "data" / "speech"


def make_files(root: Path, n: int) -> float:
    """n copies of the clips in folders of 10; their total duration in seconds."""
    clips = sorted(SPEECH.glob("*.wav"))
    total = 0.0
    for i in range(n):
        clip = clips[i % len(clips)]
        folder = root / f"{i // 10:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(clip, folder / f"{i:05d}-{clip.stem}.wav")
        total += sf.info(clip).duration
    return total


def run(files: int, cpus: int, batch_size: int, beam_size: int | None, workers: int, model_name: str) -> dict:
    import maxwhisper
    from maxwhisper.batch import Job, ResultsTable, discover, run_local
    from maxwhisper.transcribe import TranscribeOptions
    from maxwhisper.writers import write

    options = TranscribeOptions(temperature=0.0, beam_size=beam_size)
    job = Job(model=model_name, precision="float32", options=options, formats=("txt",))
    rows, texts = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        audio_s = make_files(tmp / "in", files)
        model = maxwhisper.load_model(model_name, device="cpu", precision="float32")
        model.transcribe(str(SPEECH / "01.wav"), options)  # warm

        start = time.perf_counter()
        for source in discover([tmp / "in"]):
            result = model.transcribe(source.path, options)
            write(result, source.path, tmp / "loop" / source.subdir, "txt")
            texts.setdefault("loop", {})[Path(source.path).name] = result["text"]
        rows.append(dict(system="loop of model.transcribe", seconds=time.perf_counter() - start))

        start = time.perf_counter()
        with ResultsTable(tmp / "local") as table:
            tally = run_local(model, [tmp / "in"], tmp / "local", job, batch_size=batch_size, table=table,
                              quiet=True)
        rows.append(dict(system=f"batch, local engine (batch {batch_size})", seconds=time.perf_counter() - start,
                         ok=tally.ok))
        texts["local"] = _texts(tmp / "local")

        import ray

        from maxwhisper.batch_ray import run_ray

        start = time.perf_counter()
        ray.init(num_cpus=cpus, include_dashboard=False,
                 runtime_env={"env_vars": {k: os.environ[k] for k in ("MAXWHISPER_CACHE",) if k in os.environ}
                              | {"PYTHONPATH": str(ROOT)}})
        cluster_s = time.perf_counter() - start
        start = time.perf_counter()
        try:
            with ResultsTable(tmp / "ray") as table:
                tally = run_ray([tmp / "in"], tmp / "ray", job, table=table, device="cpu", workers=workers,
                                batch_size=batch_size, quiet=True)
        finally:
            seconds = time.perf_counter() - start
            ray.shutdown()
        rows.append(dict(system=f"batch, Ray engine ({workers} actor, batch {batch_size})", seconds=seconds,
                         ok=tally.ok, cluster_start_s=cluster_s))
        texts["ray"] = _texts(tmp / "ray")
    for r in rows:
        r["files_per_hour"] = files / r["seconds"] * 3600
        r["audio_hours_per_hour"] = audio_s / r["seconds"]
    return dict(files=files, audio_s=audio_s, cpus=cpus, batch_size=batch_size, beam_size=beam_size,
                model=model_name, rows=rows, same_text=texts["loop"] == texts["local"] == texts["ray"],
                machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", date=str(date.today()),
                versions={p: version(p) for p in ("max", "ray")})


def _texts(output_dir: Path) -> dict[str, str]:
    rows = (json.loads(line) for line in (output_dir / "results.jsonl").read_text().splitlines())
    return {Path(r["path"]).name: r["text"] for r in rows}


def table(report: dict) -> str:
    loop = report["rows"][0]["seconds"]
    head = (f"{report['model']}, {report['files']} files, {report['audio_s'] / 60:.1f} min of audio, "
            f"{'beam ' + str(report['beam_size']) if report['beam_size'] else 'greedy'}; {report['machine']}; "
            f"{report['date']}; " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    lines = [head, "", "| system | wall (s) | files per hour | audio hours per hour | loop time / its time |",
             "|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['system']} | {r['seconds']:.1f} | {r['files_per_hour']:.0f} | "
                     f"{r['audio_hours_per_hour']:.2f} | {loop / r['seconds']:.2f} |")
    ray_row = report["rows"][-1]
    lines += ["", f"Ray cluster start (apart): {ray_row['cluster_start_s']:.1f} s; transcripts "
                  + ("identical across the three" if report["same_text"] else "DIFFER (see the JSON)")]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=42)
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--beam-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=1, help="model actors of the Ray engine")
    p.add_argument("--model", default="tiny.en")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    args = p.parse_args()
    report = run(args.files, args.cpus, args.batch_size, args.beam_size, args.workers, args.model)
    print(table(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
