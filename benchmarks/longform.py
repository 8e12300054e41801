"""Long-form benchmark: one recording of several minutes, sequential and batched (VAD),
maxwhisper against faster-whisper (sequential, and its `BatchedInferencePipeline`) and
whisper.cpp (sequential; pywhispercpp's wheel) on the same weights (the CTranslate2
package; written as whisper.cpp's model file for it) and threads, time and word error
rate, in one run.

    python -m benchmarks.longform --minutes 5 --batch-size 8
    python -m benchmarks.longform --rss-hours 1      # peak memory of an hour, VAD + batching

The recording is the committed clips (tests/data/speech) in turn, with pauses of 0.6 to
3 s between them, so its text is known. Every system decodes at temperature 0 with
--beam-size beams, timestamps on (faster-whisper's batched pipeline decodes without
them, as it does by default), language English. Precision classes: float32 against
float32 (whisper.cpp: float16, its top precision on the CPU), and our --low-precision
(q4_0, or amx_bf16 or amx_q4_0 on CPUs with Intel AMX, avx512_bf16 or avx512_q4_0 on
CPUs with AVX-512 BF16) against faster-whisper's int8 and
whisper.cpp's --whispercpp-type. Each system transcribes a 30 s
clip first (warm-up), then the recording --repeats times (the median is its time), in a
process of its own; the load is not in the time.

`--rss-hours` writes that many hours of generated audio (silence with low noise, one
utterance a minute) as a 16-bit WAV file and transcribes it in a new process each: the
file with the VAD and batching, the file without the VAD, and the samples in memory
with the VAD; it reports each one's peak resident memory, and the peak before it began
(model, VAD and input loaded), as rows of the table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SPEECH = ROOT / "tests" / "data" / "speech"
RATE = 16000


def recording(minutes: float) -> tuple[np.ndarray, str]:
    """The committed clips in turn with pauses of 0.6-3 s, at least `minutes` long."""
    from maxwhisper.audio import load_audio

    texts = dict(line.split("\t", 1) for line in (SPEECH / "transcripts.tsv").read_text().splitlines())
    clips = [(load_audio(SPEECH / f"{name}.wav"), text) for name, text in sorted(texts.items())]
    rng = np.random.default_rng(0)
    parts, words = [np.zeros(RATE // 2, np.float32)], []
    while sum(p.size for p in parts) < minutes * 60 * RATE:
        for audio, text in clips:
            parts += [audio, np.zeros(int(rng.uniform(0.6, 3.0) * RATE), np.float32)]
            words.append(text)
    return np.concatenate(parts), " ".join(words)


def wer(reference: str, hypothesis: str) -> float:
    import jiwer
    from whisper.normalizers import EnglishTextNormalizer

    norm = EnglishTextNormalizer()
    return jiwer.wer(norm(reference), norm(hypothesis))


@dataclass
class Row:
    system: str
    cls: str  # precision class
    seconds: float | None = None
    wer: float | None = None
    skipped: str | None = None
    times: list[float] | None = None  # each repeat's seconds


def _ours(model: str, precision: str, batch: int | None, beam: int | None):
    import maxwhisper

    m = maxwhisper.load_model(model, device="cpu", precision=precision)
    kw = dict(temperature=0.0, beam_size=beam, language="en")
    if batch:
        return lambda audio: m.transcribe(audio, vad_filter=True, batch_size=batch, **kw)["text"]
    return lambda audio: m.transcribe(audio, **kw)["text"]


def _faster_whisper(model: str, compute_type: str, batch: int | None, beam: int, threads: int):
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    from maxwhisper.registry import ctranslate2_dir

    m = WhisperModel(str(ctranslate2_dir(model)), device="cpu", compute_type=compute_type, cpu_threads=threads)
    kw = dict(beam_size=beam, temperature=0.0, language="en")
    if batch:
        pipeline = BatchedInferencePipeline(model=m)
        return lambda audio: "".join(s.text for s in pipeline.transcribe(audio, batch_size=batch, **kw)[0])
    return lambda audio: "".join(s.text for s in m.transcribe(audio, vad_filter=False, **kw)[0])


def _whispercpp(model: str, ftype: str, beam: int, threads: int):
    from benchmarks.whispercpp import transcriber

    return transcriber(model, ftype, threads, beam)


def _transcriber(kind: str, model: str, precision: str, batch: int | None, beam: int, threads: int):
    if kind == "maxwhisper":
        return _ours(model, precision, batch, beam if beam > 1 else None)
    if kind == "faster-whisper":
        return _faster_whisper(model, precision, batch, beam, threads)
    return _whispercpp(model, precision, beam, threads)


def _time(kind: str, model: str, precision: str, batch: int | None, beam: int, threads: int, minutes: float,
          repeats: int) -> tuple[list[float], float]:
    """One system's times (after a warm-up on the recording's first 30 s) and WER."""
    audio, text = recording(minutes)
    go = _transcriber(kind, model, precision, batch, beam, threads)
    go(audio[: 30 * RATE])
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = go(audio)
        times.append(time.perf_counter() - t)
    return times, wer(text, out)


def run(model: str, minutes: float, batch: int, beam: int, threads: int, whispercpp: str = "q4_0",
        low: str = "q4_0", repeats: int = 1) -> dict:
    """`low`: our precision in the low-precision class (q4_0, or an amx_ or avx512_ one).
    Each system runs in a process of its own: a MAX model that has run in a process
    slows the next one there, even once it is deleted (docs/benchmarks.md)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    audio, text = recording(minutes)
    lows = f"{low} / int8"
    systems = [
        ("maxwhisper sequential", "float32", "maxwhisper", "float32", None),
        (f"maxwhisper batched (VAD, batch {batch})", "float32", "maxwhisper", "float32", batch),
        ("faster-whisper sequential", "float32", "faster-whisper", "float32", None),
        (f"faster-whisper BatchedInferencePipeline (batch {batch})", "float32", "faster-whisper", "float32", batch),
        ("whisper.cpp sequential (fp16)", "float32", "whisper.cpp", "float16", None),
        ("maxwhisper sequential", lows, "maxwhisper", low, None),
        (f"maxwhisper batched (VAD, batch {batch})", lows, "maxwhisper", low, batch),
        ("faster-whisper sequential", lows, "faster-whisper", "int8", None),
        (f"faster-whisper BatchedInferencePipeline (batch {batch})", lows, "faster-whisper", "int8", batch),
        (f"whisper.cpp sequential ({whispercpp})", lows, "whisper.cpp", whispercpp, None),
    ]
    rows = []
    for system, cls, kind, precision, batched in systems:
        try:
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                times, error = pool.submit(_time, kind, model, precision, batched, beam, threads, minutes,
                                           repeats).result()
            rows.append(Row(system, cls, float(np.median(times)), error, times=times))
        except Exception as e:  # a peer that fails must not sink the others' figures
            rows.append(Row(system, cls, skipped=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
        print(f"{system} [{cls}]: {rows[-1]}", file=sys.stderr, flush=True)
    return dict(model=model, audio_s=audio.size / RATE, words=len(text.split()), batch=batch, beam=beam,
                repeats=repeats,
                threads=threads, date=str(date.today()), machine=f"{os.cpu_count()} CPU cores",
                versions={p: _version(p) for p in ("max", "faster-whisper", "ctranslate2", "pywhispercpp")},
                rows=[r.__dict__ for r in rows])


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def table(report: dict) -> str:
    head = (f"{report['model']}, {report['audio_s'] / 60:.1f} min recording ({report['words']} words), "
            f"beam {report['beam']}, batch {report['batch']}, faster-whisper and whisper.cpp on {report['threads']} "
            f"threads; the median of {report.get('repeats', 1)} runs each; "
            f"{report['machine']}; {report['date']}; "
            + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v))
    lines = [head, "", "| class | system | time (s) | x real time | WER | time / our batched time |",
             "|---|---|---|---|---|---|"]
    for cls in dict.fromkeys(r["cls"] for r in report["rows"]):
        rows = [r for r in report["rows"] if r["cls"] == cls]
        ours = next((r["seconds"] for r in rows if r["system"].startswith("maxwhisper batched") and r["seconds"]),
                    None)
        for r in rows:
            if r["skipped"]:
                lines.append(f"| {cls} | {r['system']} | - | - | - | could not run: {r['skipped']} |")
                continue
            ratio = f"{r['seconds'] / ours:.2f}" if ours else "-"
            lines.append(f"| {cls} | {r['system']} | {r['seconds']:.1f} | {report['audio_s'] / r['seconds']:.1f} | "
                         f"{r['wer']:.1%} | {ratio} |")
    return "\n".join(lines)


RSS_CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
import maxwhisper
from maxwhisper.vad import detector
m = maxwhisper.load_model({model!r}, device="cpu")
detector()
if {source!r} == "array":
    from benchmarks.longform import hour_audio
    audio = hour_audio({hours!r})
else:
    audio = {path!r}
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
out = m.transcribe(audio, vad_filter={vad!r}, batch_size={batch!r}, language="en")
print(json.dumps(dict(seconds=time.perf_counter() - t, loaded_mib=loaded / 1024,
                      peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      segments=len(out["segments"]))))
"""
# (input, VAD): the file with the VAD, the same file without it, the samples with it.
RSS_RUNS = (("file", True), ("file", False), ("array", True))


def hour_audio(hours: float) -> np.ndarray:
    """Silence with noise at -60 dBFS and one committed clip a minute."""
    from maxwhisper.audio import load_audio

    clips = [load_audio(p) for p in sorted(SPEECH.glob("*.wav"))]
    n = int(hours * 3600 * RATE)
    audio = np.random.default_rng(1).standard_normal(n, dtype=np.float32)
    audio *= 10 ** (-60 / 20)
    for k, at in enumerate(range(20 * RATE, n - 15 * RATE, 60 * RATE)):
        clip = clips[k % len(clips)]
        audio[at: at + clip.size] += clip
    return audio


def rss(model: str, hours: float, batch: int) -> dict:
    """Peak resident memory of `hours` of `hour_audio`, each of `RSS_RUNS` in a new
    process, the file written as 16-bit PCM WAV."""
    import tempfile

    import soundfile as sf

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "hours.wav")
        audio = hour_audio(hours)
        sf.write(path, audio, RATE, subtype="PCM_16")
        report = dict(model=model, hours=hours, batch=batch, audio_s=audio.size / RATE,
                      samples_mib=audio.nbytes / 2 ** 20, file_mib=os.path.getsize(path) / 2 ** 20, runs=runs)
        del audio
        for source, vad in RSS_RUNS:
            code = RSS_CHILD.format(root=str(ROOT), model=model, hours=hours, batch=batch, source=source, path=path,
                                    vad=vad)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            runs.append(dict(source=source, vad=vad, **json.loads(out.stdout.strip().splitlines()[-1])))
            print(f"{model}, {hours:g} h, {source}, {'VAD, batch ' + str(batch) if vad else 'no VAD'}: peak RSS "
                  f"{runs[-1]['peak_mib']:.0f} MiB (before transcribing, model, VAD and input loaded: "
                  f"{runs[-1]['loaded_mib']:.0f} MiB), {runs[-1]['seconds']:.0f} s, "
                  f"{runs[-1]['segments']} segments", file=sys.stderr, flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny.en")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--beam-size", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="faster-whisper's and whisper.cpp's threads (default: all)")
    p.add_argument("--whispercpp-type", default="q4_0", choices=["q8_0", "q5_0", "q4_0"],
                   help="whisper.cpp's model type in the quantized class")
    p.add_argument("--low-precision", default="q4_0",
                   choices=["q4_0", "amx_bf16", "amx_q4_0", "avx512_bf16", "avx512_q4_0"],
                   help="our precision in the quantized class (amx_bf16, amx_q4_0: CPUs with Intel AMX; "
                        "avx512_bf16, avx512_q4_0: CPUs with AVX-512 BF16)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of the recording per system (median)")
    p.add_argument("--rss-hours", type=float, default=None,
                   help="instead: peak resident memory of this many hours with the VAD and batching")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    args = p.parse_args(argv)
    if args.rss_hours:
        report = rss(args.model, args.rss_hours, args.batch_size)
        for r in report["runs"]:
            print(f"| {report['audio_s'] / 60:.0f} min | {r['source']} | "
                  f"{'batch ' + str(report['batch']) if r['vad'] else 'no VAD'} | {r['loaded_mib']:.0f} MiB | "
                  f"{r['peak_mib']:.0f} MiB | {r['seconds']:.0f} s |")
    else:
        report = run(args.model, args.minutes, args.batch_size, args.beam_size, args.threads, args.whispercpp_type,
                     args.low_precision, args.repeats)
        print(table(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":  # python -m benchmarks.longform, from the repository root
    sys.exit(main())
