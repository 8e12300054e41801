"""OpenAI's `.pt` checkpoints ({"dims": ..., "model_state_dict": ...}) -> our safetensors.

Their tensor names are already ours; the work is checking that `dims` matches the spec.
torch is needed only here, at conversion time, never at run time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..spec import ModelSpec
from ..weights import WeightsError


def read(src: str | Path, spec: ModelSpec) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise WeightsError("converting an OpenAI .pt checkpoint needs torch: pip install torch") from None
    try:
        ckpt = torch.load(str(src), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{src}: not a loadable PyTorch checkpoint ({e})") from None
    if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        raise WeightsError(f"{src}: not an OpenAI Whisper checkpoint (expected keys 'dims' and "
                           f"'model_state_dict', found {sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt)})")
    wrong = {k: (v, ckpt["dims"].get(k)) for k, v in spec.dims.items() if ckpt["dims"].get(k) != v}
    if wrong:
        detail = ", ".join(f"{k}: spec {a}, checkpoint {b}" for k, (a, b) in wrong.items())
        raise WeightsError(f"{src}: checkpoint dims disagree with spec {spec.name!r} ({detail})")
    return {k: v.detach().cpu().numpy() for k, v in ckpt["model_state_dict"].items()}
