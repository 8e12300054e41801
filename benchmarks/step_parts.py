"""The parts of one beam-search decoder step, each compiled as a graph of its own at
the step's shapes, timed on the CPU: where a step's time goes, and what other ways of
doing a part would cost.

    python -m benchmarks.step_parts --windows 6 --beams 5 --cached 30 --prefix 100

Shapes are tiny.en's (384 wide, 6 heads, 4 layers, 1500 audio positions, 51864
tokens). Each part compiles first (tens of seconds each with an empty cache), then
runs --repeats times; the median is printed in milliseconds. Rows marked "per layer"
happen once per decoder layer in a step."""

from __future__ import annotations

import argparse
import time

import numpy as np
from max.driver import CPU, Buffer
from max.dtype import DType
from max.engine import InferenceSession
from max.graph import DeviceRef, Graph, TensorType, ops

from maxwhisper import builder

D, H, S, V, L = 384, 6, 1500, 51864, 4


def _t(*shape, dtype=DType.float32) -> TensorType:
    return TensorType(dtype, list(shape), DeviceRef.CPU())


def parts(w: int, beams: int, cached: int, prefix: int) -> dict[str, Graph]:
    b, p, n = w * beams, cached, prefix
    out = {}

    def graph(name: str, types, body):
        with Graph(name.replace(" ", "_").replace("/", "_")[:40] + str(len(out)), input_types=types) as g:
            g.output(*body(*(x.tensor for x in g.inputs)))
        out[name] = g

    graph("vocabulary product x @ w.T", [_t(b, D), _t(V, D)], lambda x, e: [x @ e.transpose(0, 1)])
    graph("cross-attention (per layer)", [_t(w, beams, D), _t(w, S, D), _t(w, S, D)],
          lambda q, k, v: [_cross(q, k, v, w, beams)])
    graph("self-attention after the prefix (per layer)",
          [_t(b, 1, D), _t(b, p + 1, D), _t(b, p + 1, D), _t(w, n, D), _t(w, n, D), _t(w, 1, 1, n + p + 1),
           _t(1, p + 1)],
          lambda q, k, v, pk, pv, pad, mask: [builder._attention_after_prefix(q, k, v, (pk, pv), H, mask, pad)])
    graph("mlp (per layer)", [_t(b, D), _t(4 * D, D), _t(D, 4 * D)],
          lambda x, a, c: [ops.gelu(x @ a.transpose(0, 1)) @ c.transpose(0, 1)])
    graph("one 384 x 384 projection", [_t(b, D), _t(D, D)], lambda x, a: [x @ a.transpose(0, 1)])
    order = _t(b, dtype=DType.int64)

    def grown(k, new, o):  # reorder, grow each layer by a concat on the positions' axis, stack
        k = ops.gather(k, o, axis=1)
        return ops.stack([ops.concat([k[i], new], axis=1) for i in range(L)])

    graph("cache K or V: the step's, each layer reordered and grown in one gather, stack",
          [_t(L, b, p, D), _t(b, 1, D), order],
          lambda k, new, o: [ops.stack([builder._grown(k[i], new, o) for i in range(L)])])
    graph("cache K or V: reorder, grow each layer, stack (L,B,P,D)", [_t(L, b, p, D), _t(b, 1, D), order],
          lambda k, new, o: [grown(k, new, o)])
    graph("  of which the reorder, gather on axis 1", [_t(L, b, p, D), order],
          lambda k, o: [ops.gather(k, o, axis=1)])
    graph("  of which growing one layer, concat", [_t(b, p, D), _t(b, 1, D)],
          lambda k, new: [ops.concat([k, new], axis=1)])
    graph("  of which the stack of the layers", [_t(b, p + 1, D)] * L, lambda *ks: [ops.stack(list(ks))])
    graph("cache K or V laid out (B,L,P,D): gather on axis 0, one concat", [_t(b, L, p, D), _t(b, L, 1, D), order],
          lambda k, new, o: [ops.concat([ops.gather(k, o, axis=0), new], axis=2)])
    return out


def _cross(q, k, v, w, beams):
    """A window's beams against its 1500 keys, as the step's unfused cross-attention."""
    scores = builder._scores(q, k, H)
    probs = ops.softmax(scores)
    return builder._bmm(probs, builder._heads(v, H), q.dtype).transpose(1, 2).reshape([w, beams, D])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=6)
    p.add_argument("--beams", type=int, default=5)
    p.add_argument("--cached", type=int, default=30, help="tokens decoded since the prompt")
    p.add_argument("--prefix", type=int, default=100, help="prompt tokens (the shared prefix)")
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args(argv)
    session = InferenceSession(devices=[CPU()])
    rng = np.random.default_rng(0)
    b = args.windows * args.beams
    print(f"{args.windows} windows x {args.beams} beams ({b} rows), {args.cached} cached tokens, "
          f"prefix {args.prefix}", flush=True)
    for name, g in parts(args.windows, args.beams, args.cached, args.prefix).items():
        model = session.load(g)
        inputs = []
        for x in g.inputs:
            shape = [int(d) for d in x.tensor.shape]
            a = (rng.permutation(shape[0]) if x.tensor.dtype == DType.int64
                 else rng.standard_normal(shape).astype(np.float32))
            inputs.append(Buffer.from_numpy(a))
        model.execute(*inputs)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            model.execute(*inputs)
            times.append(time.perf_counter() - t)
        print(f"{name}: {np.median(times) * 1000:.2f} ms", flush=True)
    x = rng.standard_normal((L, b, args.cached, D)).astype(np.float32)
    order, new = rng.permutation(b), rng.standard_normal((L, b, 1, D)).astype(np.float32)
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        np.concatenate([x[:, order], new], axis=2)
        times.append(time.perf_counter() - t)
    print(f"cache K or V (L,B,P,D) reordered and grown by numpy, for comparison: {np.median(times) * 1000:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
