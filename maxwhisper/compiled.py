"""Compiled models as files: each module of graphs is compiled once per machine kind
and kept as a MEF file in maxwhisper's cache, loaded from there afterwards.

A cached file is named by a hash of everything its compile depends on: the module's
MLIR text (graph structure, shapes, weight names; no weight values), the MAX version and
the target it was compiled for (the CPU's model and instruction-set flags, or the
accelerator's name). A file compiled for another machine therefore has another name and
is never loaded where it may not run; there MAX compiles again. An unreadable file is
compiled again and replaced.

Prebuilt files ship in the package (`maxwhisper/prebuilt/`, with a JSON sidecar each
that records the module's hash, the MAX version and the target). One is used when
module and MAX version are the same and the target fits: the same accelerator, or a
CPU of the same architecture whose instruction-set flags include every flag of the CPU
it was built on. Anywhere else the module compiles as usual.

A cold compile can take minutes (docs/benchmarks.md, "Compile"), so it is announced
on the `maxwhisper` logger once it has run for a second, and its time is logged
when it ends; the CLI shows both on stderr.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import tempfile
import threading
import time
from pathlib import Path

from max.engine import InferenceSession, read
from max.graph import Module

from .cpuinfo import cpu_fields
from .registry import cache_dir

log = logging.getLogger("maxwhisper")
ANNOUNCE_AFTER_S = 1.0
PREBUILT = Path(__file__).resolve().parent / "prebuilt"


def target(device) -> dict:
    """The compile target of a MAX device."""
    if device.is_host:
        fields = cpu_fields()
        flags = (fields.get("flags") or fields.get("Features") or "").split()
        return {"kind": "cpu", "machine": platform.machine(), "model": fields.get("model name", platform.processor()),
                "flags": sorted(set(flags))}
    return {"kind": device.api, "arch": device.architecture_name}


def fits(built_for: dict, here: dict) -> bool:
    """Whether code compiled for target `built_for` runs on target `here`."""
    if built_for.get("kind") != here.get("kind"):
        return False
    if here["kind"] != "cpu":
        return built_for.get("arch") == here.get("arch")
    return (built_for.get("machine") == here["machine"] and bool(here["flags"])
            and set(built_for.get("flags", ["?"])) <= set(here["flags"]))


def max_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("max")
    except PackageNotFoundError:
        return "unknown"


def compiled_dir() -> Path:
    return cache_dir() / "compiled"


def module_hash(module: Module) -> str:
    """The module's MLIR text, hashed. The text numbers each graph's ops with a counter
    that runs on over the process (`{counter = N : i64}`): left out, so that one module
    has one hash whatever was built before it. It names the kernel packages its graphs
    load by path; only their file names count (kernel_package.py names a package by a
    hash of its sources), so that a module has one hash wherever the cache lies, and a
    prebuilt file (which holds the compiled kernels) serves every machine it fits."""
    text = re.sub(r"\{counter = \d+ : i64\}", "", str(module.mlir_module))
    text = re.sub(r"_kernel_library_paths = \[[^\]]*\]",
                  lambda m: re.sub(r'"[^"]*/([^"/]*)"', r'"\1"', m.group(0)), text)
    return hashlib.sha256(text.encode()).hexdigest()


def _about(module: Module, label: str, device) -> dict:
    """What a MEF file's JSON sidecar records, and what names the file."""
    return {"label": label, "max": max_version(), "module": module_hash(module), "target": target(device)}


def _path(about: dict) -> Path:
    key = hashlib.sha256(json.dumps([about["max"], about["target"], about["module"]]).encode()).hexdigest()
    return compiled_dir() / f"{about['label']}-{key[:20]}.mef"


def mef_path(module: Module, label: str, device) -> Path:
    return _path(_about(module, label, device))


def prebuilt(module: Module, label: str, device, directory: Path | None = None) -> Path | None:
    """A shipped MEF file for `module` (in `directory`, default PREBUILT) that fits this
    machine, if there is one."""
    return _prebuilt(_about(module, label, device), directory or PREBUILT)


def _prebuilt(want: dict, directory: Path) -> Path | None:
    for sidecar in sorted(directory.glob("*.json")):
        try:
            about = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            continue
        mef = sidecar.with_suffix(".mef")
        if (about.get("module") == want["module"] and about.get("max") == want["max"] and mef.is_file()
                and fits(about.get("target", {}), want["target"])):
            return mef
    return None


def compile_module(session: InferenceSession, module: Module, label: str, device, custom_extensions=()):
    """The compiled artifact of `module`: read from its MEF file, or compiled (MAX's own
    cache may still serve it) and written there. `label` names it in messages and the
    file name ("tiny.en-graphs-float32-unfused-cpu"); `custom_extensions`, the kernel
    packages its graphs call (their paths are in the module's text, so in its hash).
    The module is hashed once."""
    about = _about(module, label, device)
    path = _path(about)
    for found in (path, _prebuilt(about, PREBUILT)):
        if found is not None and found.is_file():
            try:
                return read(found)
            except Exception as e:  # a truncated or foreign file: the next source, or compile
                log.warning("maxwhisper: %s: unreadable compiled model (%s)", found, e)
    started = time.perf_counter()
    announced = threading.Event()

    def announce():
        announced.set()
        log.info("maxwhisper: compiling %s (once per machine; minutes on a small CPU, "
                 "then cached in %s) ...", label, compiled_dir())

    timer = threading.Timer(ANNOUNCE_AFTER_S, announce)
    timer.daemon = True
    timer.start()
    try:
        compiled = session.compile(module, custom_extensions=list(custom_extensions) or None)
    finally:
        timer.cancel()
    if announced.is_set():
        log.info("maxwhisper: compiled %s in %.0f s", label, time.perf_counter() - started)
    _export(compiled, path, about)
    return compiled


def _export(compiled, path: Path, about: dict) -> None:
    """Write the MEF beside its final name and rename it: a reader never sees half a
    file. A cache that cannot be written costs the next run a compile, nothing else."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            compiled.export_mef(tmp)
            path.with_suffix(".json").write_text(json.dumps(about, indent=1))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        log.warning("maxwhisper: could not keep the compiled model in %s (%s); the next run compiles again",
                    path.parent, e)
