"""The decoder step's cross-attention alone, one layer on the CPU: maxwhisper's kernel
(kernels/cross_attention.mojo, the tiled precisions' step) against MAX's matmuls and
softmax (every other precision's), at a step's shapes, alternating in one process.

    python -m benchmarks.cross_attention --windows 1 6 8 --beams 5

Each form compiles first (tens of seconds with an empty cache), then runs --repeats
times per round; medians in milliseconds, and the kernel's largest difference from MAX's
form relative to its largest value."""

from __future__ import annotations

import argparse
import time

import numpy as np
from max.driver import CPU, Buffer
from max.dtype import DType
from max.engine import InferenceSession
from max.graph import DeviceRef, Graph, TensorType, ops

from maxwhisper import builder
from maxwhisper.kernel_package import kernel_package

S = 1500


def graph(kind: str, windows: int, queries: int, width: int, n_head: int) -> Graph:
    cpu = DeviceRef.CPU()
    types = [TensorType(DType.float32, [windows, n, width], cpu) for n in (queries, S, S)]
    with Graph(f"cross_{kind}_{windows}_{queries}_{width}", input_types=types,
               custom_extensions=[kernel_package()]) as g:
        q, k, v = (x.tensor for x in g.inputs)
        if kind == "kernel":
            out = ops.custom(builder.CROSS_KERNEL, cpu, [q, k, v], [TensorType(DType.float32, q.shape, cpu)],
                             parameters={"n_head": n_head})[0].tensor
        else:
            probs = ops.softmax(builder._scores(q, k, n_head))
            out = builder._bmm(probs, builder._heads(v, n_head), q.dtype).transpose(1, 2).reshape(
                [windows, queries, width])
        g.output(out)
    return g


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, nargs="+", default=[1, 6])
    p.add_argument("--beams", type=int, default=5, help="queries per window")
    p.add_argument("--width", type=int, default=384, help="the model's width (tiny 384, base 512)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    n_head = args.width // builder.CROSS_KERNEL_WIDTH
    session = InferenceSession(devices=[CPU()])
    rng = np.random.default_rng(0)
    for windows in args.windows:
        q, k, v = (rng.standard_normal((windows, n, args.width)).astype(np.float32) for n in (args.beams, S, S))
        inputs = [Buffer.from_numpy(a) for a in (q, k, v)]
        models = {kind: session.load(graph(kind, windows, args.beams, args.width, n_head),
                                     custom_extensions=[kernel_package()]) for kind in ("kernel", "max")}
        outs = {kind: m.execute(*inputs)[0].to_numpy() for kind, m in models.items()}
        err = np.abs(outs["kernel"] - outs["max"]).max() / np.abs(outs["max"]).max()
        for _ in range(args.rounds):
            times = {}
            for kind, m in models.items():
                ts = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    m.execute(*inputs)
                    ts.append(time.perf_counter() - t)
                times[kind] = np.median(ts) * 1000
            print(f"{windows} windows x {args.beams} queries, width {args.width}: kernel {times['kernel']:.2f} ms, "
                  f"MAX {times['max']:.2f} ms, kernel / MAX {times['kernel'] / times['max']:.2f} "
                  f"(difference {err:.1e})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
