"""Benchmark: maxwhisper against faster-whisper on the same clip, same threads, one run.

    python tools/bench.py --model tiny.en --device cpu --seconds 30 --repeats 3 --out bench.json

Warm-up, then the median of --repeats transcriptions; load + compile time is reported
separately. Real-time factor (RTF) = processing time / audio duration (lower is faster);
"x real time" is its inverse. Ratios are against peers measured in this same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def speech_clip(seconds: float) -> tuple[np.ndarray, str]:
    """The committed speech clips joined (1 s gaps) and cut to `seconds`: real speech."""
    from maxwhisper.audio import load_audio

    clips = sorted((ROOT / "tests" / "data" / "speech").glob("*.wav"))
    parts = []
    while sum(len(p) for p in parts) < seconds * 16000:
        for c in clips:
            parts += [load_audio(c), np.zeros(16000, np.float32)]
    audio = np.concatenate(parts)[: int(seconds * 16000)]
    return audio, f"{len(clips)} synthetic speech clips joined, {seconds:.0f} s"


def timed(fn, repeats: int) -> tuple[float, list[float], object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times, out


def bench_maxwhisper(model: str, device: str, audio, repeats: int) -> dict:
    import maxwhisper

    t = time.perf_counter()
    m = maxwhisper.load_model(model, device=device)
    load = time.perf_counter() - t
    median, times, result = timed(lambda: m.transcribe(audio, temperature=0.0), repeats)
    return dict(system=f"maxwhisper ({m.device}, fp32)", load_s=load, median_s=median, times=times,
                text=result["text"])


def bench_faster_whisper(model: str, compute_type: str, threads: int, audio, repeats: int) -> dict:
    from faster_whisper import WhisperModel

    from maxwhisper.registry import package_files

    parts, _ = package_files(model)
    if len(parts) != 1:
        raise SystemExit(f"faster-whisper needs a joined model.bin; {model} ships in parts")
    path = parts[0].parent
    t = time.perf_counter()
    m = WhisperModel(str(path), device="cpu", compute_type=compute_type, cpu_threads=threads)
    load = time.perf_counter() - t

    def run():
        segments, _ = m.transcribe(audio, beam_size=1, temperature=0.0, vad_filter=False, language="en")
        return "".join(s.text for s in segments)

    median, times, text = timed(run, repeats)
    return dict(system=f"faster-whisper (cpu, {compute_type}, {threads} threads)", load_s=load,
                median_s=median, times=times, text=text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny.en")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu", "auto"])
    p.add_argument("--seconds", type=float, default=30.0, help="length of the speech clip")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    audio, clip = speech_clip(args.seconds)
    duration = len(audio) / 16000
    rows = [bench_maxwhisper(args.model, args.device, audio, args.repeats)]
    for ct in ("float32", "int8"):
        rows.append(bench_faster_whisper(args.model, ct, args.threads, audio, args.repeats))
    ours = rows[0]["median_s"]
    from importlib.metadata import version

    print(f"\n{args.model}, {clip}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"max {version('max')}, faster-whisper {version('faster-whisper')}, ctranslate2 {version('ctranslate2')}; "
          f"{date.today()}; median of {args.repeats} after a warm-up\n")
    print("| system | load + compile (s) | transcribe (s) | RTF | x real time | time vs maxwhisper |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        r["rtf"] = r["median_s"] / duration
        print(f"| {r['system']} | {r['load_s']:.1f} | {r['median_s']:.2f} | {r['rtf']:.3f} | "
              f"{1 / r['rtf']:.1f} | {r['median_s'] / ours:.2f}x |")
    same = len({r["text"].strip() for r in rows})
    print(f"\ntranscripts: {'identical' if same == 1 else f'{same} distinct'} across systems")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(model=args.model, clip=clip, duration_s=duration,
                                                  date=str(date.today()), rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
