"""Voice activity detection: Silero VAD v6 (Silero Team, MIT) run by maxwhisper, and the
speech timestamps that faster-whisper's `VadOptions` describe.

The network scores each 32 ms window (512 samples at 16 kHz, read with the 64 samples
before it) for speech: a convolutional STFT, four conv1d layers with ReLU, an LSTM cell
carried from window to window, and a 1x1 convolution with a sigmoid. One MAX graph runs
a block of windows: everything before the LSTM sees one window only, so it runs over
the block at once (conv1d as im2col + matmul, as in builder.py); the LSTM, a (128 ->
512) product per window that depends on the window before, is maxwhisper's kernel
(kernels/vad_lstm.mojo), the windows in order; the head again over the block. The
weights ship in `maxwhisper/assets` with Silero's license (tools/silero_vad_weights.py
wrote them).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
WINDOW = 512
CONTEXT = 64
WEIGHTS = Path(__file__).resolve().parent / "assets" / "silero_vad_v6.safetensors"
# Windows per graph call: the memory a call takes stays small however long the audio.
BLOCK = 1024
_HOP, _N_FFT, _PAD = 128, 256, 128  # the STFT's hop and frame; the input is reflected by _PAD
_CONVS = (("conv1", 1), ("conv2", 2), ("conv3", 2), ("conv4", 1))  # kernel 3, padding 1
_HIDDEN = 128
# A pause this long may end a chunk that reached max_speech_duration_s.
_SPLIT_PAUSE_MS = 98


@dataclass(frozen=True)
class VadOptions:
    """faster-whisper's VAD options. A window whose speech probability is at least
    `threshold` is speech; speech goes on until the probability stays below
    `neg_threshold` (default: threshold - 0.15, at least 0.01) for
    `min_silence_duration_ms`. Speech shorter than `min_speech_duration_ms` is dropped;
    speech longer than `max_speech_duration_s` is split at its last pause of 98 ms or
    more, or else where it reaches the limit. Each span is widened by `speech_pad_ms` on
    both sides (by half the gap where two spans are closer than twice that)."""
    threshold: float = 0.5
    neg_threshold: float | None = None
    min_speech_duration_ms: int = 0
    max_speech_duration_s: float = float("inf")
    min_silence_duration_ms: int = 2000
    speech_pad_ms: int = 400

    def __post_init__(self):
        for name in ("threshold", "neg_threshold"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"VadOptions.{name} must lie in [0, 1], found {value!r}")
        for name in ("min_speech_duration_ms", "max_speech_duration_s", "min_silence_duration_ms", "speech_pad_ms"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value) or value < 0:
                raise ValueError(f"VadOptions.{name} must be a duration >= 0, found {value!r}")
        if self.max_speech_duration_s == 0:
            raise ValueError("VadOptions.max_speech_duration_s must be above 0, found 0")

    @property
    def silence_threshold(self) -> float:
        return self.neg_threshold if self.neg_threshold is not None else max(self.threshold - 0.15, 0.01)


def _conv(w: dict, name: str, x, stride: int):
    """Conv1d (kernel 3, padding 1) on (N, L, C) as im2col + one matmul, then ReLU."""
    from max.graph import ops

    n, length, c = x.shape
    out_len = (int(length) + 2 - 3) // stride + 1
    x = ops.pad(x, [0, 0, 1, 1, 0, 0])
    cols = ops.concat([x[:, k: k + stride * (out_len - 1) + 1: stride, :] for k in range(3)], axis=2)
    weight = w[f"{name}.weight"]  # (C_out, C_in, 3) -> column k * C_in + c
    weight = ops.permute(weight, [0, 2, 1]).reshape([int(weight.shape[0]), 3 * int(c)])
    return ops.relu(cols @ weight.transpose(0, 1) + w[f"{name}.bias"])


def vad_graph(shapes: dict[str, tuple[int, ...]], module):
    """Windows (N, 576 + 2 * 128), reflected at both ends, and the LSTM's state (2, 128):
    h and c before the first window -> each window's speech probability (N,) and the
    state after the last."""
    from max.dtype import DType
    from max.graph import DeviceRef, Graph, TensorType, Weight, ops

    from .kernel_package import kernel_package

    cpu = DeviceRef.CPU()
    width = WINDOW + CONTEXT + 2 * _PAD
    with Graph("silero_vad", input_types=[TensorType(DType.float32, ["windows", width], cpu),
                                          TensorType(DType.float32, [2, _HIDDEN], cpu)],
               module=module, custom_extensions=[kernel_package()]) as g:
        w = {name: g.add_weight(Weight(name, DType.float32, shape, cpu)).tensor for name, shape in shapes.items()}
        x, state = (v.tensor for v in g.inputs)
        # The STFT's first frame, centred on the reflection, is not used by the network.
        n_frames = (width - _N_FFT) // _HOP + 1
        frames = ops.stack([x[:, k * _HOP: k * _HOP + _N_FFT] for k in range(1, n_frames)], axis=1)
        basis = w["stft_conv.weight"].reshape([-1, _N_FFT])  # (2 * bins, N_FFT): real rows, then imaginary
        spectrum = frames @ basis.transpose(0, 1)
        bins = int(basis.shape[0]) // 2
        h = ops.sqrt(spectrum[:, :, :bins] ** 2 + spectrum[:, :, bins:] ** 2)
        for name, stride in _CONVS:
            h = _conv(w, name, h, stride)
        features = h.reshape([-1, _HIDDEN])  # the convolutions leave one frame per window
        gates = features @ w["lstm_cell.weight_ih"].transpose(0, 1) + (w["lstm_cell.bias_ih"] + w["lstm_cell.bias_hh"])
        steps = ops.custom("maxwhisper_vad_lstm", cpu, [gates, w["lstm_cell.weight_hh"].transpose(0, 1), state],
                           [TensorType(DType.float32, [gates.shape[0], 2 * _HIDDEN], cpu)])[0].tensor
        head = w["final_conv.weight"].reshape([_HIDDEN, 1])
        logits = ops.relu(steps[:, :_HIDDEN]) @ head + w["final_conv.bias"]
        g.output(ops.sigmoid(logits).reshape([-1]), steps[-1].reshape([2, _HIDDEN]))
    return g


def graph_shapes(weights: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """The weights the graph binds, by shape."""
    return {k: v.shape for k, v in weights.items()}


class SileroVad:
    """The network, compiled once (on the CPU: it is small and runs once per file)."""

    def __init__(self, weights: Path = WEIGHTS):
        from max.driver import CPU
        from max.engine import InferenceSession
        from max._mlir_context import ensure_default_mlir_context
        from max.graph import Module
        from safetensors.numpy import load_file

        from .compiled import compile_module
        from .kernel_package import kernel_package
        from .runtime import _BUILD_LOCK

        self.weights = {k: np.ascontiguousarray(v, np.float32) for k, v in load_file(str(weights)).items()}
        shapes = graph_shapes(self.weights)
        device = CPU()
        session = InferenceSession(devices=[device])
        with _BUILD_LOCK, ensure_default_mlir_context():
            module = Module()
            graph = vad_graph(shapes, module)
            models = session.init_all(compile_module(session, module, "silero-vad-v6-cpu", device,
                                                     [kernel_package()]), weights_registry=self.weights)
        self._model = models[graph.name]
        self._reflect = np.pad(np.arange(WINDOW + CONTEXT), _PAD, mode="reflect")

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        """Speech probability (float32) of each 512-sample window of 16 kHz mono `audio`,
        the last window padded with zeros."""
        audio = np.asarray(audio, np.float32).reshape(-1)
        stream = self.streaming()
        probs = [stream(audio[i: i + BLOCK * WINDOW]) for i in range(0, audio.size, BLOCK * WINDOW)]
        return np.concatenate([np.zeros(0, np.float32), *probs, stream.flush()])

    def streaming(self) -> VadStream:
        """A detector for audio that arrives in pieces: its state carries over."""
        return VadStream(self)

    def _score(self, block: np.ndarray, state: tuple[np.ndarray, np.ndarray]):
        """Probabilities of the windows of `block` (the 64 samples before its first window,
        then whole windows), and the LSTM state after them."""
        from max.driver import Buffer

        count = (block.size - CONTEXT) // WINDOW
        rows = block[np.arange(count)[:, None] * WINDOW + self._reflect[None, :]]
        probs, after = self._model.execute(Buffer.from_numpy(np.ascontiguousarray(rows)),
                                           Buffer.from_numpy(np.stack(state).astype(np.float32)))
        after = after.to_numpy()
        return probs.to_numpy().copy(), (after[0].copy(), after[1].copy())


class VadStream:
    """Silero VAD over audio fed in pieces of any size: each call returns the speech
    probabilities of the 512-sample windows it completed (the network's state, and the
    64 samples of context before each window, carry over), as the whole audio at once
    would give them."""

    def __init__(self, vad: SileroVad):
        self._vad = vad
        self._context = np.zeros(CONTEXT, np.float32)
        self._pending = np.zeros(0, np.float32)
        self._state = (np.zeros(_HIDDEN, np.float32), np.zeros(_HIDDEN, np.float32))

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        self._pending = np.concatenate([self._pending, np.asarray(samples, np.float32).reshape(-1)])
        out = []
        while self._pending.size >= WINDOW:
            count = min(BLOCK, self._pending.size // WINDOW)
            block = np.concatenate([self._context, self._pending[: count * WINDOW]])
            probs, self._state = self._vad._score(block, self._state)
            out.append(probs)
            self._context, self._pending = block[-CONTEXT:], self._pending[count * WINDOW:]
        return np.concatenate([np.zeros(0, np.float32), *out])

    def flush(self) -> np.ndarray:
        """The last, partial window's probability, padded with zeros (none if it is empty)."""
        if not self._pending.size:
            return np.zeros(0, np.float32)
        return self(np.zeros(WINDOW - self._pending.size, np.float32))


_DETECTOR: SileroVad | None = None
_LOCK = threading.Lock()


def detector() -> SileroVad:
    """The process's one compiled VAD."""
    global _DETECTOR
    with _LOCK:
        if _DETECTOR is None:
            _DETECTOR = SileroVad()
    return _DETECTOR


def speech_timestamps(probs: np.ndarray, n_samples: int, options: VadOptions = VadOptions(),
                      sample_rate: int = SAMPLE_RATE) -> list[tuple[int, int]]:
    """[(start, end)] samples of speech, from the windows' speech probabilities, by
    `VadOptions`' rules."""
    on, off = options.threshold, options.silence_threshold
    per_ms = sample_rate / 1000
    min_speech = options.min_speech_duration_ms * per_ms
    min_silence = options.min_silence_duration_ms * per_ms
    split_pause = _SPLIT_PAUSE_MS * per_ms
    pad = options.speech_pad_ms * per_ms
    longest = options.max_speech_duration_s * sample_rate - WINDOW - 2 * pad  # before padding

    spans: list[tuple[int, int]] = []
    start = None  # of the speech in progress
    quiet = None  # where the current run below `off` began
    pause = None  # the latest quiet run of split_pause or more: where an over-long span may end
    resume = None  # the first speech window after `pause`

    for i, p in enumerate(probs):
        at = i * WINDOW
        if start is None:
            if p >= on:
                start, quiet, pause, resume = at, None, None, None
            continue
        if p >= on and quiet is not None:
            quiet = None
            if pause is not None and resume is None:
                resume = at
        if at - start > longest:
            if pause is None:
                spans.append((start, at))
                start = None
                continue
            spans.append((start, pause))
            start, quiet, pause, resume = resume, None, None, None
            if start is None:
                continue
        if p < off:
            if quiet is None:
                quiet = at
            if at - quiet > split_pause and pause != quiet:
                pause, resume = quiet, None
            if at - quiet >= min_silence:
                if quiet - start > min_speech:
                    spans.append((start, quiet))
                start, quiet, pause, resume = None, None, None, None
    if start is not None and n_samples - start > min_speech:
        spans.append((start, n_samples))
    return _padded(spans, n_samples, pad)


def _padded(spans: list[tuple[int, int]], n_samples: int, pad: float) -> list[tuple[int, int]]:
    """Each span widened by `pad` on both sides, or by half the gap to its neighbour where
    the gap is narrower than two pads."""
    out = [list(s) for s in spans]
    for k, span in enumerate(out):
        if k == 0:
            span[0] = int(max(0, span[0] - pad))
        if k + 1 < len(out):
            gap = out[k + 1][0] - span[1]
            widen = gap // 2 if gap < 2 * pad else pad
            span[1] = int(min(n_samples, span[1] + widen))
            out[k + 1][0] = int(max(0, out[k + 1][0] - widen))
        else:
            span[1] = int(min(n_samples, span[1] + pad))
    return [(a, b) for a, b in out]
