"""Write maxwhisper/assets/silero_vad_v6.safetensors from the Silero VAD v6 ONNX model
that faster-whisper ships (faster_whisper/assets/silero_vad_v6.onnx; Silero Team, MIT).
Run once, by hand, when the shipped weights change: `python tools/silero_vad_weights.py
[ONNX]`. Needs the `onnx` package; maxwhisper itself reads only the safetensors file.

The names are those of Silero's own PyTorch checkpoint (stft_conv, conv1..4, lstm_cell,
final_conv). ONNX's LSTM orders its gates input, output, forget, cell; PyTorch's
LSTMCell (and maxwhisper.vad) input, forget, cell, output: they are reordered here."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "maxwhisper" / "assets" / "silero_vad_v6.safetensors"


def _default_onnx() -> Path:
    import faster_whisper

    return Path(faster_whisper.__file__).parent / "assets" / "silero_vad_v6.onnx"


def _gates_iofc_to_ifco(x: np.ndarray) -> np.ndarray:
    i, o, f, c = np.split(x, 4)
    return np.concatenate([i, f, c, o])


def convert(onnx_path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    init = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(onnx_path)).graph.initializer}
    lstm = [n for n in onnx.load(str(onnx_path)).graph.node if n.op_type == "LSTM"]
    if len(lstm) != 1:
        raise SystemExit(f"{onnx_path}: expected one LSTM node, found {len(lstm)}")
    w_name, r_name, b_name = lstm[0].input[1:4]
    bias = init[b_name][0]
    out = {"stft_conv.weight": init["encoder.feature_extractor.forward_basis_buffer"]}
    for k in range(4):
        out[f"conv{k + 1}.weight"] = init[f"encoder.conv_layers.{k}.weight"]
        out[f"conv{k + 1}.bias"] = init[f"encoder.conv_layers.{k}.bias"]
    out.update({
        "lstm_cell.weight_ih": _gates_iofc_to_ifco(init[w_name][0]),
        "lstm_cell.weight_hh": _gates_iofc_to_ifco(init[r_name][0]),
        "lstm_cell.bias_ih": _gates_iofc_to_ifco(bias[: bias.size // 2]),
        "lstm_cell.bias_hh": _gates_iofc_to_ifco(bias[bias.size // 2:]),
        "final_conv.weight": init["decoder.conv1d.weight"],
        "final_conv.bias": init["decoder.conv1d.bias"],
    })
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def main() -> None:
    from safetensors.numpy import save_file

    src = Path(sys.argv[1]) if len(sys.argv) > 1 else _default_onnx()
    weights = convert(src)
    save_file(weights, str(OUT), metadata={"source": "Silero VAD v6 (MIT), from faster-whisper's silero_vad_v6.onnx"})
    print(f"wrote {OUT}: {sum(v.size for v in weights.values()):,} parameters")


if __name__ == "__main__":
    main()
