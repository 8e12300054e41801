"""Side-by-side benchmark: maxwhisper and its peers in one run, same machine, same inputs.

    python -m benchmarks.bench --model tiny.en --device cpu --workload forced --batch 1 --tokens 128
    python -m benchmarks.bench --model tiny.en --workload speech --seconds 30 --out bench.json --chart bench.png

Workloads:
- forced: N windows of a 30 s speech log-mel, exactly --tokens greedy tokens each, the
  end-of-text token never taken: every system does the same work whatever its weights
  say. Timed from log-mel to tokens (encoder + prompt + steps).
- speech: transcribe --seconds of real speech (the committed clips joined), greedy or
  --beam-size N, temperature 0, timestamps on; each system's own long-form loop.
- startup: a new Python process that imports, loads the model (MAX: from its compile
  cache) and transcribes --seconds of speech; wall time, as a user waits for it.

Peers (test/benchmark dependencies; a peer that cannot run is listed with the reason):
openai-whisper (PyTorch), Hugging Face transformers (eager, SDPA; and
"transformers-compiled": its static KV cache with the decoder step under torch.compile,
CUDA graphs on a GPU, compile time in the load column), faster-whisper (CTranslate2;
float32 and int8), whisper.cpp (named in --peers; pywhispercpp's wheel, CPU;
--whispercpp-types, float16 its top precision). All run the same weights: the CTranslate2 package our
model is converted from, loaded into each peer (written as whisper.cpp's model file for
it, benchmarks/ggml.py); or, with --weights random (forced
workload; any spec, e.g. small, whose weights no package carries), openai-whisper's seeded
random initialisation. With --device gpu the PyTorch peers run on CUDA in float16.
Warm-up, then the median of --repeats; load and compile are reported apart. Ratios
compare with the peers of this same run.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from maxwhisper.builder import ATTENTION
from maxwhisper.precision import PRECISIONS

from benchmarks import whispercpp
from benchmarks.peers import (converted_weights, ct2_model, forced_ct2, forced_hf, forced_hf_static, forced_maxwhisper,
                              forced_openai, hf_compiled_model, hf_model, openai_model, random_model,
                              random_weights, torch_input)

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Row:
    system: str
    median_s: float | None = None
    times: list[float] = field(default_factory=list)
    load_s: float | None = None
    tokens: int | None = None
    text: str | None = None
    skipped: str | None = None


def speech_audio(seconds: float) -> np.ndarray:
    """The committed speech clips joined with 1 s gaps, cut to `seconds`."""
    from maxwhisper.audio import load_audio

    clips = sorted((ROOT / "tests" / "data" / "speech").glob("*.wav"))
    if not clips:
        raise FileNotFoundError(f"{ROOT / 'tests/data/speech'}: no speech clips (run from a source checkout)")
    parts: list[np.ndarray] = []
    while sum(len(p) for p in parts) < seconds * 16000:
        for c in clips:
            parts += [load_audio(c), np.zeros(16000, np.float32)]
    return np.concatenate(parts)[: int(seconds * 16000)]


def _timed(fn, repeats: int) -> tuple[float, list[float], object]:
    out = fn()  # warm-up: first-call allocations and lazy compiles stay out of the figure
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times, out


def _attempt(system: str, fn) -> Row:
    try:
        return fn()
    except ImportError as e:
        return Row(system, skipped=f"not installed ({e.name}); pip install -e '.[test]'")
    except Exception as e:  # a peer that fails must not sink the others' figures
        return Row(system, skipped=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")


_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def run(model: str = "tiny.en", device: str = "cpu", workload: str = "forced", batch: int = 1,
        tokens: int = 128, seconds: float = 30.0, repeats: int = 3, threads: int | None = None,
        peers: tuple[str, ...] = ("openai-whisper", "transformers", "transformers-compiled", "faster-whisper"),
        beam_size: int = 1,
        precision: str | tuple[str, ...] = "auto", greedy: str = "auto", weights: str = "package",
        tokenizer: str | None = None, attention: str | tuple[str, ...] = "unfused",
        whispercpp_types: tuple[str, ...] = ("float16", "q4_0")) -> dict:
    """`precision`: one of our precisions, or several: one row each, the first the baseline
    of the ratio column; `attention` likewise ('unfused', 'fused'), a row for each pair.
    `weights`: 'package' (the named model's installed weights) or
    'random' (openai-whisper's seeded initialisation of the spec; forced workload only),
    with `tokenizer`, a tokenizer.json for machines without the weight packages.
    `whispercpp_types`: whisper.cpp's model types, a row each (peer "whisper.cpp")."""
    from maxwhisper import load_model
    from maxwhisper.audio import log_mel_spectrogram
    from maxwhisper.spec import load_spec

    if weights not in ("package", "random"):
        raise ValueError(f"weights must be 'package' or 'random', found {weights!r}")
    if weights == "random" and workload != "forced":
        raise ValueError(f"--weights random fits the forced workload only: the {workload} workload transcribes "
                         "speech, which random weights cannot")
    if tokenizer is not None and weights != "random":
        raise ValueError("--tokenizer goes with --weights random: a package brings its own tokenizer.json")
    threads = threads or os.cpu_count()
    # Drawn once: every row of ours and every PyTorch peer binds the same arrays.
    drawn = random_weights(load_spec(model)) if weights == "random" else None
    ours_all = []  # (row name, model, load seconds)
    kernels = [attention] if isinstance(attention, str) else list(attention)
    for d in ([precision] if isinstance(precision, str) else list(precision)):
        for a in kernels:
            t = time.perf_counter()
            placed = None if greedy == "auto" else greedy == "device"
            m = load_model(model, device=device, precision=d, attention=a, greedy_on_device=placed) \
                if drawn is None else random_model(load_spec(model), drawn, device, d, tokenizer, a, placed)
            load = time.perf_counter() - t
            loop = "device loop" if m.runtime.greedy_on_device else "host loop"
            fused = ", fused attention" if a == "fused" else ""
            ours_all.append((f"maxwhisper ({m.device}, {_SHORT.get(m.precision, m.precision)}, {loop}{fused})", m, load))
    ours = ours_all[0][1]
    if drawn is not None:
        weights, spec, ct2_dir = drawn, ours.spec, None
    else:
        weights, spec, ct2_dir = converted_weights(model)
    device = ours.device
    torch_kind = "cuda, fp16" if device == "gpu" else "cpu, fp32"
    tok = ours.tokenizer
    # Text tokens only: no timestamp rules, which the systems implement differently.
    prompt = (tok.sot_sequence if not tok.multilingual else tok.with_language("en").sot_sequence) + [tok.no_timestamps]
    eot = tok.eot
    rows: list[Row] = []
    if workload == "forced":
        audio = speech_audio(30.0)
        mel = np.repeat(log_mel_spectrogram(audio, spec.audio)[None, :, : spec.audio.n_frames], batch, 0)
        mel = np.ascontiguousarray(mel, np.float32)
        duration = 30.0 * batch
        for us, m, load in ours_all:
            median, times, out = _timed(lambda: forced_maxwhisper(m, mel, prompt, tokens, eot), repeats)
            rows.append(Row(us, median, times, load, int(out.size)))

        def peer(system, make, forced, *make_args):
            def go():
                t = time.perf_counter()
                m, lib = make(*make_args)
                loaded = time.perf_counter() - t
                arg = mel if forced in (forced_ct2, whispercpp.forced) else torch_input(lib, mel, device)
                med, ts, o = _timed(lambda: forced(m, lib, arg, prompt, tokens, eot), repeats)
                if np.asarray(o).shape != (batch, tokens):
                    return Row(system, skipped=f"generated {np.asarray(o).shape} tokens, not {(batch, tokens)}")
                return Row(system, med, ts, loaded, int(np.asarray(o).size))
            rows.append(_attempt(system, go))

        if "openai-whisper" in peers:
            peer(f"openai-whisper (PyTorch, {torch_kind})", openai_model, forced_openai, weights, spec, device)
        if "transformers" in peers:
            peer(f"transformers (eager, SDPA, {torch_kind})", hf_model, forced_hf, weights, spec, device)
        if "transformers-compiled" in peers:
            peer(f"transformers (static cache, torch.compile, {torch_kind})", hf_compiled_model, forced_hf_static,
                 weights, spec, device, mel, prompt, tokens, eot)
        if "faster-whisper" in peers and ct2_dir is None:
            rows.append(Row("CTranslate2", skipped="runs converted checkpoints only; random weights have none"))
        elif "faster-whisper" in peers:
            for ct in ("float32", "int8"):
                peer(f"CTranslate2 ({ct}, {threads} threads, cpu)", ct2_model, forced_ct2, ct2_dir, ct, threads)
        if "whisper.cpp" in peers and ct2_dir is None:
            rows.append(Row("whisper.cpp", skipped="runs a named model's weights only here; random weights have none"))
        elif "whisper.cpp" in peers:
            for t in whispercpp_types:
                peer(whispercpp.label(t, threads, ", windows in turn" if batch > 1 else ""), whispercpp.forced_model,
                     whispercpp.forced, model, t, threads)
    elif workload == "speech":
        audio = speech_audio(seconds)
        duration = len(audio) / 16000
        beam = beam_size if beam_size > 1 else None
        for us, m, load in ours_all:
            median, times, out = _timed(lambda: m.transcribe(audio, temperature=0.0, beam_size=beam), repeats)
            rows.append(Row(us, median, times, load, text=out["text"].strip()))
        if "openai-whisper" in peers:
            def openai_speech():
                import whisper

                t = time.perf_counter()
                m, _ = openai_model(weights, spec, device)
                loaded = time.perf_counter() - t
                med, ts, o = _timed(lambda: whisper.transcribe(m, audio, temperature=0.0, fp16=device == "gpu",
                                                               beam_size=beam, language="en", verbose=None), repeats)
                return Row(f"openai-whisper (PyTorch, {torch_kind})", med, ts, loaded, text=o["text"].strip())
            rows.append(_attempt(f"openai-whisper (PyTorch, {torch_kind})", openai_speech))
        for name in ("transformers", "transformers-compiled"):
            if name in peers:
                rows.append(Row(name, skipped="long-form generate() needs the checkpoint's Hub "
                                              "generation_config, which is not reachable here"))
        if "faster-whisper" in peers:
            for ct in ("float32", "int8"):
                def fw_speech(ct=ct):
                    from faster_whisper import WhisperModel

                    t = time.perf_counter()
                    m = WhisperModel(str(ct2_dir), device="cpu", compute_type=ct, cpu_threads=threads)
                    loaded = time.perf_counter() - t

                    def go():
                        segments, _ = m.transcribe(audio, beam_size=beam_size, temperature=0.0,
                                                   vad_filter=False, language="en")
                        return "".join(s.text for s in segments).strip()
                    med, ts, text = _timed(go, repeats)
                    return Row(f"faster-whisper ({ct}, {threads} threads)", med, ts, loaded, text=text)
                rows.append(_attempt(f"faster-whisper ({ct})", fw_speech))
        if "whisper.cpp" in peers:
            for t in whispercpp_types:
                def wc_speech(t=t):
                    start = time.perf_counter()
                    go = whispercpp.transcriber(model, t, threads, beam_size)
                    loaded = time.perf_counter() - start
                    med, ts, text = _timed(lambda: go(audio), repeats)
                    return Row(whispercpp.label(t, threads), med, ts, loaded, text=text)
                rows.append(_attempt(whispercpp.label(t, threads), wc_speech))
    elif workload == "startup":
        duration = seconds
        kinds = [(m.precision, m.runtime.attention) for _, m, _ in ours_all]
        for system, code in _startup_scripts(model, device, kinds, seconds, ct2_dir, threads, peers):
            rows.append(_attempt(system, lambda system=system, code=code: _startup_row(system, code, repeats)))
    else:
        raise ValueError(f"workload must be 'forced', 'speech' or 'startup', found {workload!r}")
    return dict(model=model, device=ours.device, precision=ours.precision, precisions=[m.precision for _, m, _ in ours_all],
                attention=[m.runtime.attention for _, m, _ in ours_all],
                greedy_loop="device loop" if ours.runtime.greedy_on_device else "host loop", workload=workload,
                batch=batch if workload == "forced" else 1,
                beam_size=beam_size if workload == "speech" else None,
                tokens=tokens if workload == "forced" else None, audio_s=duration, repeats=repeats, threads=threads,
                machine=f"{platform.machine()}, {os.cpu_count()} cores", date=str(date.today()),
                versions={p: _version(p) for p in ("max", "torch", "openai-whisper", "transformers",
                                                   "faster-whisper", "ctranslate2", "pywhispercpp")},
                whispercpp_build=_whispercpp_build() if "whisper.cpp" in peers else None,
                weights="random (openai-whisper init, seed 0)" if ct2_dir is None else "package",
                rows=[asdict(r) for r in rows])


def _startup_scripts(model, device, kinds, seconds, ct2_dir, threads, peers):
    """Python programs that load a model and transcribe `seconds` of speech, each run in
    a new process: what a user waits for (imports, load, compile cache, transcript).
    `kinds`: our (precision, attention) pairs, a program each."""
    clip = f"from benchmarks.bench import speech_audio; audio = speech_audio({seconds})"
    for precision, attention in kinds:
        fused = ", fused attention" if attention == "fused" else ""
        yield (f"maxwhisper ({device}, {precision}{fused})",
               f"{clip}\nimport maxwhisper\nm = maxwhisper.load_model({model!r}, device={device!r}, "
               f"precision={precision!r}, attention={attention!r})\nprint(m.transcribe(audio, temperature=0.0)['text'])")
    if "faster-whisper" in peers:
        yield (f"faster-whisper (int8, {threads} threads)",
               f"{clip}\nfrom faster_whisper import WhisperModel\n"
               f"m = WhisperModel({str(ct2_dir)!r}, device='cpu', compute_type='int8', "
               f"cpu_threads={threads})\nsegments, _ = m.transcribe(audio, beam_size=1, temperature=0.0, "
               f"vad_filter=False, language='en')\nprint(''.join(s.text for s in segments))")


def _startup_row(system: str, code: str, repeats: int) -> Row:
    import subprocess
    import sys

    times, text = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
        times.append(time.perf_counter() - t)
        if done.returncode:
            return Row(system, skipped=f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1][:160]}")
        text = done.stdout.strip()
    return Row(system, statistics.median(times), times, text=text)


def _whispercpp_build() -> str | None:
    try:
        return whispercpp.system_info()
    except ImportError:
        return None


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def table(report: dict) -> str:
    rows = report["rows"]
    ours = rows[0]["median_s"]
    head = (f"{report['model']}, {report['workload']}"
            + (f", batch {report['batch']} x {report['tokens']} tokens" if report["workload"] == "forced" else "")
            + (f", beam {report['beam_size']}" if report.get("beam_size") else "")
            + f", {report['audio_s']:.0f} s of audio; {report['machine']}; {report['date']}; median of "
            f"{report['repeats']} after a warm-up; "
            + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v))
    lines = [head, "", "| system | load + compile (s) | time (ms) | x real time | peer time / maxwhisper time |",
             "|---|---|---|---|---|"]
    for r in rows:
        if r["skipped"]:
            lines.append(f"| {r['system']} | - | - | - | could not run: {r['skipped']} |")
            continue
        load = "in the time" if r["load_s"] is None else f"{r['load_s']:.1f}"
        lines.append(f"| {r['system']} | {load} | {1000 * r['median_s']:.1f} | "
                     f"{report['audio_s'] / r['median_s']:.1f} | {r['median_s'] / ours:.2f} |")
    if report.get("whispercpp_build"):
        lines += ["", f"whisper.cpp build: {report['whispercpp_build']}"]
    texts = {r["text"] for r in rows if r.get("text") is not None}
    if texts:
        lines += ["", "transcripts: " + ("identical across systems" if len(texts) == 1 else
                                         f"{len(texts)} distinct (see the JSON)")]
    return "\n".join(lines)


def chart(report: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if not r["skipped"]]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.5))
    ax.barh([r["system"] for r in rows][::-1], [1000 * r["median_s"] for r in rows][::-1], color="#4477aa")
    ax.set_xlabel("milliseconds (lower is faster)")
    ax.set_title(f"{report['model']} {report['workload']} on {report['device']}, {report['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args) -> int:
    report = run(args.model, args.device, args.workload, args.batch, args.tokens, args.seconds, args.repeats,
                 args.threads, tuple(args.peers), args.beam_size, tuple(args.precision), args.greedy, args.weights,
                 args.tokenizer, tuple(args.attention), tuple(args.whispercpp_types))
    print(table(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    if args.chart:
        chart(report, args.chart)
    return 0


def add_arguments(p) -> None:
    p.add_argument("--model", default="tiny.en")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu", "auto"])
    p.add_argument("--precision", nargs="+", default=["auto"], choices=["auto", *PRECISIONS],
                   help="our precision, or several (a row each; the first is the ratios' baseline). auto: "
                        "bfloat16 on a GPU, float32 on the CPU; q4_0: CPU, the decoder's matrices in 4 bits")
    p.add_argument("--attention", nargs="+", default=["unfused"], choices=ATTENTION,
                   help="our attention kernels, or both (a row each with each --precision). fused: MAX's "
                        "flash-attention kernel, GPU only")
    p.add_argument("--greedy", default="auto", choices=["auto", "device", "host"],
                   help="where our greedy loop runs (auto: the device's loop on a GPU, the host's on the CPU)")
    p.add_argument("--workload", default="forced", choices=["forced", "speech", "startup"])
    p.add_argument("--weights", default="package", choices=["package", "random"],
                   help="package: the named model's installed weights; random: openai-whisper's seeded "
                        "initialisation of any spec (forced workload), e.g. --model small")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json for --weights random (default: the installed tiny.en or base package's), "
                        "for a machine without the weight packages")
    p.add_argument("--batch", type=int, default=1, help="windows decoded together (forced workload)")
    p.add_argument("--tokens", type=int, default=128, help="tokens per window (forced workload)")
    p.add_argument("--seconds", type=float, default=30.0, help="speech length (speech workload)")
    p.add_argument("--beam-size", type=int, default=1, help="beams (speech workload; 1: greedy)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None,
                   help="CTranslate2's and whisper.cpp's threads (default: all cores)")
    p.add_argument("--peers", nargs="*", default=["openai-whisper", "transformers", "transformers-compiled",
                                                  "faster-whisper"],
                   help="transformers-compiled: static KV cache, decoder step under torch.compile (forced "
                        "workload); whisper.cpp: pywhispercpp's wheel, on our weights in its model file")
    p.add_argument("--whispercpp-types", nargs="+", default=["float16", "q4_0"],
                   choices=["float32", *whispercpp.TYPES],
                   help="whisper.cpp's model types, a row each (float32 is listed with the reason it cannot run)")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--chart", default=None, help="write a PNG bar chart here (needs matplotlib)")


if __name__ == "__main__":  # python -m benchmarks.bench, from the repository root
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
