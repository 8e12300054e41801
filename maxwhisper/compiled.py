"""Compiled models as files: each module of graphs is compiled once per machine kind
and kept as a MEF file in maxwhisper's cache, loaded from there afterwards.

A file is named by a hash of everything its compile depends on: the module's MLIR
text (graph structure, shapes, weight names; no weight values), the MAX version and
the target it was compiled for (the CPU's model and instruction-set flags, or the
accelerator's name). A file compiled for another machine therefore has another name
and is never loaded where it may not run; there MAX compiles again. An unreadable
file is compiled again and replaced.

A cold compile can take minutes (docs/benchmarks.md, "Compile"), so it is announced
on the `maxwhisper` logger once it has run for a second, and its time is logged
when it ends; the CLI shows both on stderr.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import tempfile
import threading
import time
from functools import cache
from pathlib import Path

from max.engine import InferenceSession, read
from max.graph import Module

from .registry import cache_dir

log = logging.getLogger("maxwhisper")
ANNOUNCE_AFTER_S = 1.0


@cache
def _cpu_target() -> str:
    """The host CPU as the compiler sees it: model name and instruction-set flags."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "flags", "Features", "CPU implementer", "CPU part") and key not in fields:
                fields[key] = value.strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} " + " ".join(f"{k}={v}" for k, v in sorted(fields.items()))


def target(device) -> str:
    """The compile target of a MAX device, as text."""
    if device.is_host:
        return "cpu " + _cpu_target()
    return f"{device.api} {device.architecture_name}"


def _max_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("max")
    except PackageNotFoundError:
        return "unknown"


def compiled_dir() -> Path:
    return cache_dir() / "compiled"


def mef_path(module: Module, label: str, device) -> Path:
    key = hashlib.sha256("\n".join([_max_version(), target(device), str(module.mlir_module)]).encode()).hexdigest()[:20]
    return compiled_dir() / f"{label}-{key}.mef"


def compile_module(session: InferenceSession, module: Module, label: str, device):
    """The compiled artifact of `module`: read from its MEF file, or compiled (MAX's own
    cache may still serve it) and written there. `label` names it in messages and the
    file name ("tiny.en-float32-cpu")."""
    path = mef_path(module, label, device)
    if path.is_file():
        try:
            return read(path)
        except Exception as e:  # a truncated or foreign file: compile again below
            log.warning("maxwhisper: %s: unreadable compiled model (%s); compiling again", path, e)
    started = time.perf_counter()
    announced = threading.Event()

    def announce():
        announced.set()
        log.info("maxwhisper: compiling %s (once per machine; on 2 CPU cores about 1-2 minutes, "
                 "then cached in %s) ...", label, compiled_dir())

    timer = threading.Timer(ANNOUNCE_AFTER_S, announce)
    timer.daemon = True
    timer.start()
    try:
        compiled = session.compile(module)
    finally:
        timer.cancel()
    if announced.is_set():
        log.info("maxwhisper: compiled %s in %.0f s", label, time.perf_counter() - started)
    _export(compiled, path)
    return compiled


def _export(compiled, path: Path) -> None:
    """Write the MEF beside its final name and rename it: a reader never sees half a
    file. A cache that cannot be written costs the next run a compile, nothing else."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            compiled.export_mef(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        log.warning("maxwhisper: could not keep the compiled model in %s (%s); the next run compiles again",
                    path.parent, e)
