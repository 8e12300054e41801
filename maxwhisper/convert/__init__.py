"""Checkpoint converters: each reads a foreign format into {checkpoint name: array};
`convert` checks the result against the spec and writes safetensors."""

from __future__ import annotations

from pathlib import Path

from ..spec import ModelSpec
from ..weights import WeightsError, save_weights


def detect_format(src: str | Path) -> str:
    p = Path(src)
    if not p.exists():
        raise WeightsError(f"{src}: checkpoint not found")
    if p.suffix == ".pt":
        return "openai"
    if p.name == "model.bin" or (p.is_dir() and (p / "model.bin").is_file()):
        return "ctranslate2"
    if p.is_dir() and (p / "config.json").is_file() and any(p.glob("model*.safetensors")):
        return "huggingface"
    raise WeightsError(f"{src}: unknown checkpoint format (known: OpenAI .pt, CTranslate2 model.bin "
                       "or its directory, Hugging Face save_pretrained directory)")


def read_checkpoint(src: str | Path, spec: ModelSpec, fmt: str | None = None):
    fmt = fmt or detect_format(src)
    if fmt == "openai":
        from . import openai_pt
        return openai_pt.read(src, spec)
    if fmt == "ctranslate2":
        from . import ctranslate2
        return ctranslate2.read(src, spec)
    if fmt == "huggingface":
        from . import huggingface
        return huggingface.read(src, spec)
    raise WeightsError(f"unknown checkpoint format {fmt!r}")


def convert(src: str | Path, spec: ModelSpec, out: str | Path, fmt: str | None = None) -> Path:
    fmt = fmt or detect_format(src)
    source, target = Path(src).resolve(), Path(out).resolve()
    if target == source or (source.is_dir() and target.parent == source and target.exists()):
        raise WeightsError(f"{out}: the output would replace the checkpoint being converted ({src})")
    for parent in target.parents:
        if parent.exists() and not parent.is_dir():
            raise WeightsError(f"{out}: cannot write there, {parent} is a file")
    tensors = read_checkpoint(src, spec, fmt)
    return save_weights(out, tensors, spec, str(src), **{"maxwhisper.source_format": fmt})
