"""A/B of a beam-search decoder step: a window's beams sharing its one cross K/V row,
against each beam reading its own copy, on one compiled model, interleaved.

    python -m benchmarks.cross_kv_ab --precision q4_0 --beams 5

Prints the median milliseconds per step of each and the largest logit difference
between them (float32: rounding; q4_0: its activation quantization too)."""

from __future__ import annotations

import argparse
import time

import numpy as np

import maxwhisper
from benchmarks.bench import speech_audio
from maxwhisper.audio import log_mel_spectrogram


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny.en")
    p.add_argument("--precision", default="float32")
    p.add_argument("--beams", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=6)
    args = p.parse_args()

    m = maxwhisper.load_model(args.model, device="cpu", precision=args.precision)
    rt, tok = m.runtime, m.tokenizer
    mel = log_mel_spectrogram(speech_audio(30.0), m.spec.audio)[None, :, : m.spec.audio.n_frames]
    _, ck, cv = rt.encode(np.ascontiguousarray(mel, np.float32))[:3]
    _, prompt, _ = rt.decode(np.array([tok.sot_sequence + [tok.no_timestamps]]), rt.start(ck, cv))
    shared, own = [0], [0] * args.beams  # the prompt's cross K/V and prefix rows

    def steps(rows):
        state = rt.windows(prompt, rows)
        order, tokens = np.zeros(args.beams, np.int64), np.full((args.beams, 1), tok.encode(" the")[0])
        t = time.perf_counter()
        for _ in range(args.steps):
            logits, state, _ = rt.decode(tokens, state, order=order)
            order = np.arange(args.beams)
        return (time.perf_counter() - t) / args.steps * 1000, logits

    times = {"shared": [], "own copy": []}
    for _ in range(args.repeats):
        for name, rows in (("shared", shared), ("own copy", own)):
            ms, _ = steps(rows)
            times[name].append(ms)
    diff = float(np.abs(steps(shared)[1] - steps(own)[1]).max())
    print(f"{args.model} {args.precision}, {args.beams} beams: ms per step " +
          ", ".join(f"{k} {np.median(v):.2f}" for k, v in times.items()) + f"; max logit difference {diff:.2e}")


if __name__ == "__main__":
    main()
