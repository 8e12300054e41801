"""The decoder step's float32 matrix products of few rows on the CPU: maxwhisper's
kernel (kernels/rows_matmul.mojo) against MAX's matmul, alone and in whole steps,
alternating in one process.

    python -m benchmarks.rows_matmul --rows 1 5 20 40
    python -m benchmarks.rows_matmul --steps --windows 1 2 4 8 --beams 5

Alone: each product (tiny.en's vocabulary, a 384 x 384 projection, the MLP's two) as a
graph of its own, the kernel against `x @ W.T` (`(W @ x.T).T` for one row, as the
graphs choose). Steps: tiny.en float32 built twice, with the kernel and with MAX's
products (`builder._matmul` without it), each decoding --windows x --beams rows after
a 32-token prompt, on the 5-minute recording's first windows. Each form compiles first
(minutes with an empty cache); medians in milliseconds per round."""

from __future__ import annotations

import argparse
import time
from unittest import mock

import numpy as np
from max.driver import CPU, Buffer
from max.dtype import DType
from max.engine import InferenceSession
from max.graph import DeviceRef, Graph, TensorType, ops

from maxwhisper import builder
from maxwhisper.kernel_package import kernel_package

SHAPES = {"vocabulary 51864 x 384": (51864, 384), "projection 384 x 384": (384, 384),
          "MLP in 1536 x 384": (1536, 384), "MLP out 384 x 1536": (384, 1536)}


def graph(kind: str, rows: int, n_out: int, n_in: int) -> Graph:
    cpu = DeviceRef.CPU()
    types = [TensorType(DType.float32, shape, cpu) for shape in ((rows, n_in), (n_out, n_in))]
    with Graph(f"rows_{kind}_{rows}_{n_out}_{n_in}", input_types=types, custom_extensions=[kernel_package()]) as g:
        x, w = (v.tensor for v in g.inputs)
        if kind == "kernel":
            y = ops.custom(builder.ROWS_KERNEL, cpu, [x, w], [TensorType(DType.float32, [rows, n_out], cpu)])[0].tensor
        else:
            y = (w @ x.transpose(0, 1)).transpose(0, 1) if rows == 1 else x @ w.transpose(0, 1)
        g.output(y)
    return g


def _median_ms(run, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts) * 1000)


def alone(rows: list[int], repeats: int, rounds: int) -> None:
    session = InferenceSession(devices=[CPU()])
    rng = np.random.default_rng(0)
    for name, (n_out, n_in) in SHAPES.items():
        w = Buffer.from_numpy(rng.standard_normal((n_out, n_in)).astype(np.float32))
        for r in rows:
            x = Buffer.from_numpy(rng.standard_normal((r, n_in)).astype(np.float32))
            models = {kind: session.load(graph(kind, r, n_out, n_in), custom_extensions=[kernel_package()])
                      for kind in ("kernel", "max")}
            for _ in range(rounds):
                times = {kind: _median_ms(lambda m=m: m.execute(x, w), repeats) for kind, m in models.items()}
                print(f"{name}, {r} rows: kernel {times['kernel']:.3f} ms, MAX {times['max']:.3f} ms, "
                      f"kernel / MAX {times['kernel'] / times['max']:.2f}", flush=True)


def steps(windows: list[int], beams: int, repeats: int, rounds: int) -> None:
    import maxwhisper
    from maxwhisper.audio import log_mel_spectrogram, pad_or_trim

    from benchmarks.longform import RATE, recording

    kernel = maxwhisper.load_model("tiny.en", precision="float32").runtime
    plain = builder._matmul
    with mock.patch.object(builder, "_matmul", lambda x, w, single_row=True, rows_kernel=False:
                           plain(x, w, single_row, False)):
        without = maxwhisper.load_model("tiny.en", precision="float32").runtime
    audio, _ = recording(5)
    a = kernel.spec.audio
    mels = np.stack([pad_or_trim(log_mel_spectrogram(audio[i * 30 * RATE:(i + 1) * 30 * RATE], a), a.n_frames)
                     for i in range(max(windows))])
    _, cross_k, cross_v = kernel.encode(mels)[:3]

    def step_time(runtime, n: int) -> float:
        state = runtime.start(*runtime.select_pair((cross_k, cross_v), list(range(n))))
        prompt = np.tile(np.array([[50257, 50362] + [400] * 30], np.int64), (n, 1))
        _, state, _ = runtime.decode(prompt, state)
        rows = n * beams
        tokens = np.full((rows, 1), 300, np.int64)
        state = runtime.decode(tokens, state, order=np.repeat(np.arange(n), beams))[1]

        def one():
            nonlocal state
            state = runtime.decode(tokens, state, order=np.arange(rows))[1]
        return _median_ms(one, repeats)

    for n in windows:
        for _ in range(rounds):
            k, m = step_time(kernel, n), step_time(without, n)
            print(f"step of {n} windows x {beams} beams: kernel {k:.2f} ms, MAX {m:.2f} ms, "
                  f"kernel / MAX {k / m:.2f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 5, 20, 40])
    p.add_argument("--steps", action="store_true", help="whole decoder steps instead of the products alone")
    p.add_argument("--windows", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--beams", type=int, default=5)
    p.add_argument("--repeats", type=int, default=25)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    if args.steps:
        steps(args.windows, args.beams, args.repeats, args.rounds)
    else:
        alone(args.rows, args.repeats, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
