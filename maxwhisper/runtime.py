"""Compile a spec's graphs with bound weights and run them.

The decoder's KV cache stays in device buffers between steps; only tokens (and the row
order, for beams) go in and logits come out through the host. Graphs that only some
calls need (row selection, the alignment decoder for word timestamps) compile on first
use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from max.driver import CPU, Accelerator, Buffer, accelerator_count
from max.dtype import DType
from max.engine import InferenceSession
from max.graph import DeviceRef

from .builder import bound_transposed, decoder_graph, encoder_graph, select_graph
from .spec import ModelSpec

_NUMPY = {DType.float32: np.float32, DType.float16: np.float16}


def resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', found {device!r}")
    if device == "auto":
        return "gpu" if accelerator_count() > 0 else "cpu"
    if device == "gpu" and accelerator_count() == 0:
        raise RuntimeError("device='gpu' was asked for, but MAX sees no accelerator")
    return device


@dataclass
class DecoderState:
    """One batch's self-attention cache, (L, B, P, D) device buffers."""
    self_k: Buffer
    self_v: Buffer
    cross_k: Buffer
    cross_v: Buffer
    length: int


class CompiledWhisper:
    """An encoder and a decoder graph, compiled once, with weights bound by name."""

    def __init__(self, spec: ModelSpec, weights: dict[str, np.ndarray], device: str = "cpu",
                 dtype: DType = DType.float32, taps: bool = False):
        self.spec, self.dtype = spec, dtype
        self.device_name = resolve_device(device)
        self.device = Accelerator() if self.device_name == "gpu" else CPU()
        ref = DeviceRef.GPU() if self.device_name == "gpu" else DeviceRef.CPU()
        self._ref = ref
        np_dtype = _NUMPY[dtype]
        self._registry = {k: np.ascontiguousarray(v.T if bound_transposed(k, v.shape) else v, dtype=np_dtype)
                          for k, v in weights.items()}
        self._session = InferenceSession(devices=[self.device])
        enc, self.encoder_outputs = encoder_graph(spec, dtype, ref, taps)
        dec, self.decoder_outputs = decoder_graph(spec, dtype, ref, taps)
        self._encoder = self._session.load(enc, weights_registry=self._registry)
        self._decoder = self._session.load(dec, weights_registry=self._registry)
        self._selector = self._aligner = None

    def _put(self, a: np.ndarray) -> Buffer:
        return Buffer.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def encode(self, mel: np.ndarray) -> list[Buffer]:
        """mel (B, n_mels, n_frames) float32 -> [features, cross_k, cross_v, *taps] on the device."""
        a = self.spec.audio
        if mel.ndim != 3 or mel.shape[1:] != (a.n_mels, a.n_frames):
            raise ValueError(f"mel must have shape (batch, {a.n_mels}, {a.n_frames}), found {mel.shape}")
        return self._encoder.execute(self._put(mel.astype(np.float32)))

    def start(self, cross_k: Buffer, cross_v: Buffer) -> DecoderState:
        """An empty self-attention cache for the batch that `cross_k` belongs to."""
        L, b, _, d = cross_k.shape
        empty = np.zeros((L, b, 0, d), _NUMPY[self.dtype])
        return DecoderState(self._put(empty), self._put(empty), cross_k, cross_v, 0)

    def select(self, x: Buffer, rows) -> Buffer:
        """Rows of a stacked (L, B, S, D) buffer, on the device: repeat a window's cross
        K/V for its beams, or keep only the unfinished windows."""
        if self._selector is None:
            self._selector = self._session.load(select_graph(self.dtype, self._ref))
        return self._selector.execute(x, self._put(np.asarray(rows, np.int64)))[0]

    def select_pair(self, pair: tuple[Buffer, Buffer], rows) -> tuple[Buffer, Buffer]:
        """`select` applied to K and V alike; all rows in order come back untouched."""
        rows = np.asarray(rows, np.int64)
        if np.array_equal(rows, np.arange(pair[0].shape[1])):
            return pair
        return self.select(pair[0], rows), self.select(pair[1], rows)

    def decode(self, tokens: np.ndarray, state: DecoderState, order=None) -> tuple[np.ndarray, DecoderState, list[Buffer]]:
        """Feed tokens (B, T) after the cached ones; returns logits (B, T, V), the grown
        state, and the tap outputs (empty unless compiled with taps). Row b continues
        cache row `order[b]` (default: row b), so beams reorder inside the step."""
        return self._step(self._decoder, tokens, state, order)

    def align(self, tokens: np.ndarray, state: DecoderState) -> tuple[np.ndarray, np.ndarray]:
        """One pass of the alignment decoder: logits (B, T, V) and the alignment heads'
        scaled cross-attention scores (B, heads, T, S)."""
        if self._aligner is None:
            dec, _ = decoder_graph(self.spec, self.dtype, self._ref, alignment=True)
            self._aligner = self._session.load(dec, weights_registry=self._registry)
        logits, _, extra = self._step(self._aligner, tokens, state, None)
        return logits, extra[-1].to_numpy()

    def _step(self, graph, tokens: np.ndarray, state: DecoderState, order):
        tokens = np.asarray(tokens, dtype=np.int64)
        n_ctx, rows = self.spec.decoder.n_ctx, state.self_k.shape[1]
        if tokens.ndim != 2 or tokens.shape[0] != state.cross_k.shape[1]:
            raise ValueError(f"tokens must have shape (batch={state.cross_k.shape[1]}, T), found {tokens.shape}")
        order = np.arange(tokens.shape[0], dtype=np.int64) if order is None else np.asarray(order, np.int64)
        if order.shape != (tokens.shape[0],) or (order.size and (order.min() < 0 or order.max() >= rows)):
            raise ValueError(f"order must be {tokens.shape[0]} row indices into a cache of {rows} rows, "
                             f"found {order.tolist()}")
        if state.length + tokens.shape[1] > n_ctx:
            raise ValueError(f"{state.length} cached + {tokens.shape[1]} new tokens exceed the "
                             f"text context of {n_ctx}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.spec.vocab.n_vocab):
            raise ValueError(f"token ids must lie in [0, {self.spec.vocab.n_vocab}), found "
                             f"{tokens.min()}..{tokens.max()}")
        logits, k, v, *taps = graph.execute(self._put(tokens), self._put(order),
                                            state.self_k, state.self_v, state.cross_k, state.cross_v)
        state = DecoderState(k, v, state.cross_k, state.cross_v, state.length + tokens.shape[1])
        return logits.to_numpy(), state, taps
