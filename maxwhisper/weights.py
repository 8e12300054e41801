"""Safetensors files named by the manifest: checked before anything is compiled."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import yaml
from safetensors import safe_open
from safetensors.numpy import save_file

from .manifest import manifest
from .spec import ModelSpec, builtin_names, load_spec, parse_spec

FLOAT_DTYPES = {"F16": np.float16, "F32": np.float32}


class WeightsError(ValueError):
    """A checkpoint that does not fit its spec; the message names the tensor."""


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """The encoder's fixed positional table, as openai-whisper computes it."""
    # float64 arguments: in float32 the argument at position 1500 is only good to ~1e-4.
    increment = np.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp(-increment * np.arange(channels // 2, dtype=np.float64))
    t = np.arange(length, dtype=np.float64)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


def derived_tensors(spec: ModelSpec) -> dict[str, np.ndarray]:
    """Tensors a spec fully determines, for checkpoints that do not store them."""
    return {"encoder.positional_embedding": sinusoids(spec.encoder.n_ctx, spec.encoder.n_state)}


def check_tensors(spec: ModelSpec, shapes: Mapping[str, tuple[tuple[int, ...], str]], source: str) -> None:
    """`shapes` maps name -> (shape, dtype name). Raises on the first class of problem found."""
    expected = manifest(spec)
    missing = [n for n in expected if n not in shapes]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise WeightsError(f"{source}: missing tensor(s) for spec {spec.name!r}: {missing[:5]}{more}")
    unexpected = sorted(n for n in shapes if n not in expected)
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise WeightsError(f"{source}: unexpected tensor(s) for spec {spec.name!r}: {unexpected[:5]}{more}")
    for name, info in expected.items():
        shape, dtype = shapes[name]
        if tuple(shape) != info.shape:
            raise WeightsError(f"{source}: tensor {name!r} has shape {tuple(shape)}, "
                               f"spec {spec.name!r} expects {info.shape}")
        if dtype not in FLOAT_DTYPES:
            raise WeightsError(f"{source}: tensor {name!r} has dtype {dtype}, expected one of "
                               f"{sorted(FLOAT_DTYPES)}")


def check_arrays(spec: ModelSpec, tensors: Mapping[str, np.ndarray], source: str) -> None:
    """`check_tensors` for arrays in memory, and every value finite."""
    check_tensors(spec, {k: (tuple(v.shape), _dtype_name(v)) for k, v in tensors.items()}, source)
    check_finite(tensors, source)


def check_finite(tensors: Mapping[str, np.ndarray], source: str) -> None:
    """A NaN or infinity in a weight turns every transcript into noise ("!!!!"), so a
    checkpoint holding one is refused, naming the tensor."""
    for name, a in tensors.items():
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        if bad:
            raise WeightsError(f"{source}: tensor {name!r} holds {bad} NaN or infinite value(s) "
                               f"of {a.size}; the checkpoint is damaged")


def _open(path: str | Path):
    try:
        return safe_open(str(path), framework="numpy")
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None


def load_weights(path: str | Path, spec: ModelSpec) -> dict[str, np.ndarray]:
    """Read a safetensors file, refusing it unless it matches the spec's manifest."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    with _open(path) as f:
        shapes = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
        check_tensors(spec, shapes, str(path))
        tensors = {k: f.get_tensor(k) for k in shapes}
    check_finite(tensors, str(path))
    return tensors


def read_metadata(path: str | Path) -> dict[str, str]:
    with _open(path) as f:
        return dict(f.metadata() or {})


def save_weights(path: str | Path, tensors: Mapping[str, np.ndarray], spec: ModelSpec,
                 source: str, **metadata: str) -> Path:
    """Check against the spec, then write; the spec travels in the file's metadata."""
    tensors = {**{k: v for k, v in derived_tensors(spec).items() if k not in tensors}, **tensors}
    check_arrays(spec, tensors, source)
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"{path}: is a directory; name the .safetensors file to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WeightsError(f"{path.parent}: cannot make the output directory ({e.strerror})") from None
    meta = {"maxwhisper.spec": spec.name, "maxwhisper.spec_yaml": spec_yaml(spec),
            "maxwhisper.dims": json.dumps(spec.dims), **metadata}
    # Written beside the target and renamed: a crash never leaves half a checkpoint.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except OSError as e:
        raise WeightsError(f"{path}: cannot write the weights ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def spec_yaml(spec: ModelSpec) -> str:
    """The whole spec as YAML, so that a checkpoint of a custom spec loads on its own."""
    data = dataclasses.asdict(spec)
    data.pop("source")
    return yaml.safe_dump(data, sort_keys=False)


def embedded_spec(path: str | Path) -> ModelSpec | None:
    """The spec a checkpoint carries, else the built-in one it names (older files)."""
    meta = read_metadata(path)
    name = meta.get("maxwhisper.spec")
    if "maxwhisper.spec_yaml" in meta:
        try:
            data = yaml.safe_load(meta["maxwhisper.spec_yaml"])
        except yaml.YAMLError as e:
            raise WeightsError(f"{path}: the spec stored in the file is not valid YAML ({e})") from None
        return parse_spec(data, f"{path} (the spec stored in it)")
    if name in builtin_names():
        return load_spec(name)
    return None


def _dtype_name(a: np.ndarray) -> str:
    for key, t in FLOAT_DTYPES.items():
        if a.dtype == t:
            return key
    return str(a.dtype)
