"""Cold compile times: each model in a new process with empty caches (MAX's and ours),
timing the graphs a transcription needs (encoder, decoder, row select: one module) and
the alignment decoder word timestamps add.

    python -m benchmarks.compile_times --models tiny.en base small large-v3-turbo
    python -m benchmarks.compile_times --models tiny.en --checkout /path/to/other/checkout
    python -m benchmarks.compile_times --models tiny.en --parts   # where the time goes

Weights are zeros of the manifest's shapes: a compile depends on names and shapes only.
`--checkout` times another source tree of maxwhisper (its own API of `CompiledWhisper`
and `align`), for a before/after comparison on the same machine in the same run."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = """
import json, time, numpy as np
try:  # time the compile itself, not a shipped prebuilt file
    import maxwhisper.compiled, pathlib
    maxwhisper.compiled.PREBUILT = pathlib.Path("/nonexistent")
except ImportError:
    pass
from maxwhisper.spec import load_spec
from maxwhisper.manifest import manifest
from maxwhisper.runtime import CompiledWhisper
spec = load_spec({name!r})
weights = {{k: np.zeros(i.shape, np.float32) for k, i in manifest(spec).items()}}
t = time.perf_counter()
rt = CompiledWhisper(spec, weights, device="cpu")
graphs = time.perf_counter() - t
_, ck, cv = rt.encode(np.zeros((1, spec.audio.n_mels, spec.audio.n_frames), np.float32))[:3]
t = time.perf_counter()
rt.align(np.zeros((1, 4), np.int64), rt.start(ck, cv))
print(json.dumps(dict(model={name!r}, graphs_s=round(graphs, 1), alignment_s=round(time.perf_counter() - t, 1))))
"""


# One graph per module, each compiled cold on its own: which part costs what.
PART = """
import json, time
from max.driver import CPU
from max.engine import InferenceSession
from max.graph import Module
from maxwhisper.builder import GraphOptions, decoder_graph, encoder_graph, select_graph
from maxwhisper.spec import load_spec
spec, part, module = load_spec({name!r}), {part!r}, Module()
if part == "select":
    select_graph(GraphOptions(), module)
elif part == "encoder":
    encoder_graph(spec, GraphOptions(), module)
else:
    decoder_graph(spec, GraphOptions(single_row=part == "decoder"), module=module)
t = time.perf_counter()
InferenceSession(devices=[CPU()]).compile(module)
print(json.dumps(dict(model={name!r}, part=part, compile_s=round(time.perf_counter() - t, 1))))
"""
PARTS = ("select", "encoder", "decoder", "decoder without the single-row choice")


def cold(name: str, checkout: str | None, part: str | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "XDG_CACHE_HOME": tmp, "MAXWHISPER_CACHE": os.path.join(tmp, "maxwhisper")}
        if checkout:
            env["PYTHONPATH"] = checkout
        code = CHILD.format(name=name) if part is None else PART.format(name=name, part=part)
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              cwd=checkout or None)
        if done.returncode:
            return dict(model=name, error=done.stderr.strip().splitlines()[-1][:200])
        return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny.en", "base", "small", "large-v3-turbo"])
    p.add_argument("--checkout", default=None, help="another maxwhisper source tree to time instead")
    p.add_argument("--parts", action="store_true", help="each graph alone, cold: " + ", ".join(PARTS))
    p.add_argument("--out", default=None, help="append the rows as JSON lines here")
    args = p.parse_args()
    for name in args.models:
        for part in PARTS if args.parts else (None,):
            row = {**cold(name, args.checkout, part), "checkout": args.checkout or "this"}
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
