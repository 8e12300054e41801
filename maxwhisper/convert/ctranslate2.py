"""CTranslate2 Whisper `model.bin` -> our names.

The container (binary version 6; this is our own reading of it, checked by consuming
each file to its last byte):
  u32 version, str spec name, u32 spec revision, u32 n_variables,
  n_variables x (str name, u8 rank, u32 dims[rank], u8 dtype, u32 n_bytes, data),
  u32 n_aliases, n_aliases x (str alias, str target)
where str is u16 length (terminating NUL included) + bytes.

CTranslate2 fuses Q/K/V (self-attention) and K/V (cross-attention) into one linear each
and ties the output projection to the token embedding by an alias; we split the former
and drop the latter (our graph reads `decoder.token_embedding.weight` twice).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from ..spec import ModelSpec
from ..weights import WeightsError

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


class _Reader:
    def __init__(self, data: memoryview, source: str):
        self.data, self.pos, self.source = data, 0, source

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise WeightsError(f"{self.source}: truncated CTranslate2 model.bin (needs byte {self.pos + n}, "
                               f"file has {len(self.data)}); a split file must be joined whole")
        out = self.data[self.pos: self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack("<H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def str(self) -> str:
        at = self.pos
        try:
            return bytes(self.take(self.u16())).rstrip(b"\0").decode()
        except UnicodeDecodeError:
            raise WeightsError(f"{self.source}: a name at byte {at} is not UTF-8; not a CTranslate2 model.bin") from None


def read_container(path: str | Path, parts: list[Path] | None = None) -> tuple[str, dict[str, np.ndarray], dict[str, str]]:
    """Returns (spec name, variables, aliases). `parts`: the pieces of a file that was
    split for distribution, read as their concatenation (then `path` only names it)."""
    path = Path(path)
    data = memoryview(b"".join(p.read_bytes() for p in parts) if parts else path.read_bytes())
    r = _Reader(data, str(path))
    version = r.u32()
    if version != 6:
        raise WeightsError(f"{path}: not a CTranslate2 model.bin of binary version 6 (found {version})")
    spec_name = r.str()
    r.u32()  # spec revision
    variables = {}
    for _ in range(r.u32()):
        name = r.str()
        shape = tuple(r.u32() for _ in range(r.u8()))
        dtype_id = r.u8()
        if dtype_id not in _DTYPES:
            raise WeightsError(f"{path}: variable {name!r} has unsupported CTranslate2 dtype id {dtype_id} "
                               "(convert the model with --quantization float16 or float32)")
        raw, dtype = r.take(r.u32()), np.dtype(_DTYPES[dtype_id])
        if len(raw) != dtype.itemsize * int(np.prod(shape)):
            raise WeightsError(f"{path}: variable {name!r} of shape {shape} and dtype {dtype} holds "
                               f"{len(raw)} bytes, expected {dtype.itemsize * int(np.prod(shape))}")
        variables[name] = np.frombuffer(raw, dtype=dtype).reshape(shape)
    aliases = {r.str(): r.str() for _ in range(r.u32())}
    if r.pos != len(data):
        raise WeightsError(f"{path}: {len(data) - r.pos} unexpected bytes after the last alias")
    return spec_name, variables, aliases


def _split(name: str, a: np.ndarray, parts: int, source: str) -> list[np.ndarray]:
    if a.shape[0] % parts:
        raise WeightsError(f"{source}: fused tensor {name!r} of shape {a.shape} does not split into {parts}")
    return np.split(a, parts, axis=0)


def read(src: str | Path, spec: ModelSpec, parts: list[Path] | None = None) -> dict[str, np.ndarray]:
    """A model directory (with model.bin), the model.bin itself, or its split `parts`."""
    src = Path(src)
    path = src / "model.bin" if src.is_dir() else src
    if not parts and not path.is_file():
        raise WeightsError(f"{src}: no CTranslate2 model.bin found")
    spec_name, v, _aliases = read_container(path, parts)
    if spec_name != "WhisperSpec":
        raise WeightsError(f"{path}: a CTranslate2 {spec_name}, not a WhisperSpec")
    for part in ("encoder", "decoder"):
        heads = int(v[f"{part}/num_heads"]) if f"{part}/num_heads" in v else None
        want = getattr(spec, part).n_head
        if heads is not None and heads != want:
            raise WeightsError(f"{path}: {part} has {heads} attention heads, spec {spec.name!r} expects {want}")
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def take(ct2: str) -> np.ndarray:
        if ct2 not in v:
            raise WeightsError(f"{path}: missing CTranslate2 variable {ct2!r} (is it a Whisper "
                               f"{spec.name} model?)")
        used.add(ct2)
        return v[ct2]

    def linear(ct2: str, ours: str, bias: bool = True):
        out[f"{ours}.weight"] = take(f"{ct2}/weight")
        if bias:
            out[f"{ours}.bias"] = take(f"{ct2}/bias")

    def norm(ct2: str, ours: str):
        out[f"{ours}.weight"], out[f"{ours}.bias"] = take(f"{ct2}/gamma"), take(f"{ct2}/beta")

    def fused(ct2: str, ours: list[str]):
        """Q/K/V or K/V in one linear; Whisper's key has no bias, so its slot must be 0."""
        ws = _split(f"{ct2}/weight", take(f"{ct2}/weight"), len(ours), str(path))
        bs = _split(f"{ct2}/bias", take(f"{ct2}/bias"), len(ours), str(path))
        for o, w, b in zip(ours, ws, bs):
            out[f"{o}.weight"] = w
            if o.endswith(".key"):
                if np.any(b != 0):
                    raise WeightsError(f"{path}: {ct2}/bias has a non-zero key bias, which Whisper lacks")
            else:
                out[f"{o}.bias"] = b

    def block(ct2: str, ours: str, kinds: list[str]):
        for kind in kinds:
            if kind == "self_attention":
                norm(f"{ct2}/self_attention/layer_norm", f"{ours}.attn_ln")
                fused(f"{ct2}/self_attention/linear_0", [f"{ours}.attn.{x}" for x in ("query", "key", "value")])
                linear(f"{ct2}/self_attention/linear_1", f"{ours}.attn.out")
            elif kind == "cross_attention":
                norm(f"{ct2}/attention/layer_norm", f"{ours}.cross_attn_ln")
                linear(f"{ct2}/attention/linear_0", f"{ours}.cross_attn.query")
                fused(f"{ct2}/attention/linear_1", [f"{ours}.cross_attn.{x}" for x in ("key", "value")])
                linear(f"{ct2}/attention/linear_2", f"{ours}.cross_attn.out")
            else:
                norm(f"{ct2}/ffn/layer_norm", f"{ours}.mlp_ln")
                linear(f"{ct2}/ffn/linear_0", f"{ours}.mlp.0")
                linear(f"{ct2}/ffn/linear_1", f"{ours}.mlp.2")

    enc, dec = spec.encoder, spec.decoder
    for c in enc.stem:
        linear(f"encoder/{c.name}", f"encoder.{c.name}")
    out["encoder.positional_embedding"] = take("encoder/position_encodings/encodings")
    for i in range(enc.n_layer):
        block(f"encoder/layer_{i}", f"encoder.blocks.{i}", enc.block)
    norm("encoder/layer_norm", f"encoder.{enc.final_norm}")
    out["decoder.token_embedding.weight"] = take("decoder/embeddings/weight")
    out["decoder.positional_embedding"] = take("decoder/position_encodings/encodings")
    for i in range(dec.n_layer):
        block(f"decoder/layer_{i}", f"decoder.blocks.{i}", dec.block)
    norm("decoder/layer_norm", f"decoder.{dec.final_norm}")
    extra = sorted(k for k, a in v.items() if k not in used and a.ndim > 0)
    if extra:  # e.g. a deeper model than the spec says: refuse rather than drop layers
        raise WeightsError(f"{path}: CTranslate2 tensors with no place in spec {spec.name!r}: {extra[:5]}")
    return out

