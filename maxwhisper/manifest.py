"""The one place that says which tensors a spec's model has: name, shape, kind.

Names are openai-whisper's `state_dict()` names; converters write them, the builder
declares graph weights under them, and the loader checks files against them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .spec import SUBLAYER_PREFIX, ModelSpec


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]


def _linear(prefix: str, n_out: int, n_in: int, bias: bool = True) -> list[TensorInfo]:
    out = [TensorInfo(f"{prefix}.weight", (n_out, n_in))]
    return out + [TensorInfo(f"{prefix}.bias", (n_out,))] if bias else out


def _norm(prefix: str, n: int) -> list[TensorInfo]:
    return [TensorInfo(f"{prefix}.weight", (n,)), TensorInfo(f"{prefix}.bias", (n,))]


def _sublayer(kind: str, prefix: str, n: int, n_mlp: int) -> list[TensorInfo]:
    p = f"{prefix}.{SUBLAYER_PREFIX[kind]}"
    if kind == "mlp":
        body = _linear(f"{p}.0", n_mlp, n) + _linear(f"{p}.2", n, n_mlp)
    else:  # attention: the key projection has no bias in Whisper
        body = (_linear(f"{p}.query", n, n) + _linear(f"{p}.key", n, n, bias=False)
                + _linear(f"{p}.value", n, n) + _linear(f"{p}.out", n, n))
    return body + _norm(f"{p}_ln", n)


def manifest(spec: ModelSpec) -> dict[str, TensorInfo]:
    """Every tensor of the model, in checkpoint order."""
    enc, dec = spec.encoder, spec.decoder
    t: list[TensorInfo] = [TensorInfo("encoder.positional_embedding", (enc.n_ctx, enc.n_state))]
    n_in = spec.audio.n_mels
    for c in enc.stem:
        t += [TensorInfo(f"encoder.{c.name}.weight", (enc.n_state, n_in, c.kernel)),
              TensorInfo(f"encoder.{c.name}.bias", (enc.n_state,))]
        n_in = enc.n_state
    for i in range(enc.n_layer):
        for kind in enc.block:
            t += _sublayer(kind, f"encoder.blocks.{i}", enc.n_state, enc.n_mlp)
    t += _norm(f"encoder.{enc.final_norm}", enc.n_state)
    t += [TensorInfo("decoder.positional_embedding", (dec.n_ctx, dec.n_state)),
          TensorInfo("decoder.token_embedding.weight", (spec.vocab.n_vocab, dec.n_state))]
    for i in range(dec.n_layer):
        for kind in dec.block:
            t += _sublayer(kind, f"decoder.blocks.{i}", dec.n_state, dec.n_mlp)
    t += _norm(f"decoder.{dec.final_norm}", dec.n_state)
    return {x.name: x for x in t}


def parameter_count(spec: ModelSpec) -> int:
    """Trainable parameters (the sinusoidal table is derived, not learned)."""
    total = 0
    for info in manifest(spec).values():
        if info.name != "encoder.positional_embedding":
            n = 1
            for d in info.shape:
                n *= d
            total += n
    return total
