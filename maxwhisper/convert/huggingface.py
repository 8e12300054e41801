"""Hugging Face transformers Whisper checkpoints (`save_pretrained` directories) -> our names.

HF names (`model.decoder.layers.3.encoder_attn.k_proj.weight`) map one-to-one onto
openai-whisper's (`decoder.blocks.3.cross_attn.key.weight`); the tied `proj_out` is
dropped after checking that it is the token embedding.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ..spec import ModelSpec
from ..weights import WeightsError

_LAYER = {
    "self_attn.q_proj": "attn.query", "self_attn.k_proj": "attn.key", "self_attn.v_proj": "attn.value",
    "self_attn.out_proj": "attn.out", "self_attn_layer_norm": "attn_ln",
    "encoder_attn.q_proj": "cross_attn.query", "encoder_attn.k_proj": "cross_attn.key",
    "encoder_attn.v_proj": "cross_attn.value", "encoder_attn.out_proj": "cross_attn.out",
    "encoder_attn_layer_norm": "cross_attn_ln", "fc1": "mlp.0", "fc2": "mlp.2", "final_layer_norm": "mlp_ln",
}
_TOP = {
    "model.encoder.conv1": "encoder.conv1", "model.encoder.conv2": "encoder.conv2",
    "model.encoder.embed_positions.weight": "encoder.positional_embedding",
    "model.encoder.layer_norm": "encoder.ln_post",
    "model.decoder.embed_tokens.weight": "decoder.token_embedding.weight",
    "model.decoder.embed_positions.weight": "decoder.positional_embedding",
    "model.decoder.layer_norm": "decoder.ln",
}
CONFIG_DIMS = {"num_mel_bins": "n_mels", "max_source_positions": "n_audio_ctx", "d_model": "n_audio_state",
           "encoder_attention_heads": "n_audio_head", "encoder_layers": "n_audio_layer",
           "vocab_size": "n_vocab", "max_target_positions": "n_text_ctx",
           "decoder_attention_heads": "n_text_head", "decoder_layers": "n_text_layer"}


def rename(hf: str) -> str | None:
    """Our name for an HF tensor name; None for the tied output projection."""
    if hf == "proj_out.weight":
        return None
    m = re.fullmatch(r"model\.(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)", hf)
    if m and m.group(3) in _LAYER:
        part, i, sub, kind = m.groups()
        return f"{part}.blocks.{i}.{_LAYER[sub]}.{kind}"
    for prefix, ours in _TOP.items():
        if hf == prefix or hf.startswith(prefix + "."):
            return ours + hf[len(prefix):]
    raise WeightsError(f"Hugging Face tensor {hf!r} has no place in a Whisper model")


def read(src: str | Path, spec: ModelSpec) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    src = Path(src)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise WeightsError(f"{src}: not a Hugging Face model directory (no config.json)")
    config = json.loads(config_path.read_text())
    wrong = {ours: (spec.dims[ours], config.get(hf)) for hf, ours in CONFIG_DIMS.items()
             if config.get(hf) != spec.dims[ours]}
    if wrong:
        detail = ", ".join(f"{k}: spec {a}, checkpoint {b}" for k, (a, b) in wrong.items())
        raise WeightsError(f"{config_path}: config disagrees with spec {spec.name!r} ({detail})")
    files = sorted(src.glob("model*.safetensors"))
    if not files:
        raise WeightsError(f"{src}: no model*.safetensors found (save with safe_serialization=True)")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    out = {}
    for hf, a in tensors.items():
        ours = rename(hf)
        if ours is None:
            emb = tensors.get("model.decoder.embed_tokens.weight")
            if emb is not None and not np.array_equal(a, emb):
                raise WeightsError(f"{src}: proj_out.weight is not tied to the token embedding; "
                                   "Whisper's output projection is")
            continue
        out[ours] = a
    return out
