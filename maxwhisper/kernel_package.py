"""maxwhisper's Mojo kernels (kernels/) precompiled once into a `.mojoc` package in the
cache, which the CPU graphs load (the tiled precisions' products, the decoder's
cross-attention).

Given a folder of Mojo sources, MAX precompiles it anew for every graph that names it
(seconds each, on every load); given a package it only reads it. The package is named
by a hash of the sources and the MAX version, so an edited kernel or another MAX builds
a new one, and the name enters the graphs' text and with it the compiled files' names
(compiled.py).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

from .compiled import max_version
from .registry import cache_dir

log = logging.getLogger("maxwhisper")
KERNELS = Path(__file__).resolve().parent / "kernels"


class KernelBuildError(RuntimeError):
    """The Mojo compiler refused the kernels' sources."""


def sources_hash(source: Path) -> str:
    digest = hashlib.sha256(max_version().encode())
    for path in sorted(source.rglob("*.mojo")):
        digest.update(str(path.relative_to(source)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def kernels_dir() -> Path:
    """Where precompiled packages are kept: `$MAXWHISPER_KERNELS`, else the cache's
    `kernels/`. The graphs name their package by path, and MAX's own compile cache keys
    on the graphs' text: a folder that stays put lets it serve them again, while a
    package's name, made by its sources, keeps it from serving stale code (tests keep
    their cache in a new folder each run, the kernels in one that stays)."""
    folder = os.environ.get("MAXWHISPER_KERNELS")
    return Path(folder) if folder else cache_dir() / "kernels"


def kernel_package(source: Path = KERNELS) -> Path:
    """The precompiled package of the kernels in `source`, built on first use. Where the
    folder cannot be written, the source folder itself (MAX then precompiles it per graph)."""
    return _package(Path(source), kernels_dir())


@functools.cache
def _package(source: Path, folder: Path) -> Path:
    path = folder / f"kernels_{sources_hash(source)[:20]}.mojoc"
    if path.is_file():
        return path
    from mojo.run import subprocess_run_mojo

    try:
        # Built under a folder of this process's own, with the final file name (the
        # compiler names the package's module after it), then renamed into place: a
        # concurrent reader never sees half a file.
        staging = path.parent / f".staging.{os.getpid()}"
        staging.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("maxwhisper: could not keep the precompiled kernels in %s (%s)", path.parent, e)
        return source
    out = staging / path.name
    try:
        done = subprocess_run_mojo(["precompile", str(source), "-o", str(out)], capture_output=True, text=True)
        if done.returncode != 0:
            raise KernelBuildError(f"maxwhisper: the Mojo compiler refused the kernels in {source}:\n"
                                   f"{_errors(done.stderr or done.stdout)}")
        os.replace(out, path)
    finally:
        out.unlink(missing_ok=True)
        try:
            staging.rmdir()
        except OSError:
            pass
    return path


def _errors(output: str, limit: int = 3000) -> str:
    """The compiler's error lines, each with the two lines after it (the source and its
    marker); its warnings, which can run to many kilobytes, left out. Its last lines
    where it names no error."""
    lines = output.splitlines()
    picked = [i + k for i, line in enumerate(lines) if ": error:" in line for k in range(3) if i + k < len(lines)]
    text = "\n".join(lines[i] for i in dict.fromkeys(picked)) if picked else output
    return text[:limit] if picked else text[-limit:]
