"""Compile a spec's graphs with bound weights and run them.

The decoder's KV cache stays in device buffers between steps; only tokens (and the row
order, for beams) go in and logits come out through the host. The encoder, decoder and
row-selection graphs are compiled together as one `max.graph.Module`; the alignment
decoder for word timestamps compiles, as its own module, on first use.

Graphs go to MAX as modules, never as a bare `Graph`: MAX 26.7 spends 2.5-3.5 s per
bare graph to find it in its compile cache, against 0.05-0.16 s for a module holding the
same graphs (docs/design.md, "Start-up").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from max.driver import CPU, Accelerator, Buffer, accelerator_count
from max.dtype import DType
from max.engine import InferenceSession
from max.graph import DeviceRef, Module

from .builder import (Q4_0_BLOCK, Q4_0_SUFFIX, check_attention, decoder_graph, encoder_graph, float_weights,
                      q4_0_rows, quantized_matrices, select_graph)
from .spec import ModelSpec
from .weights import check_arrays

DTYPES = {"float32": DType.float32, "float16": DType.float16, "bfloat16": DType.bfloat16}
# q4_0: the decoder's matrices in 4-bit blocks, everything else float32 (CPU only).
PRECISIONS = (*DTYPES, "q4_0")


def resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', found {device!r}")
    if device == "auto":
        return "gpu" if accelerator_count() > 0 else "cpu"
    if device == "gpu" and accelerator_count() == 0:
        raise RuntimeError("device='gpu' was asked for, but MAX sees no accelerator")
    return device


def resolve_dtype(dtype: str | DType | None, device_name: str) -> DType:
    """The activations' dtype. None or 'auto': bfloat16 on a GPU, float32 on the CPU,
    where MAX 26.7 has no fast bfloat16 kernels (docs/benchmarks.md). 'q4_0' computes
    in float32 and is for the CPU only: MAX's Q4_0 matmul is a CPU kernel."""
    if isinstance(dtype, DType) and dtype in DTYPES.values():
        return dtype
    if dtype in (None, "auto"):
        return DType.bfloat16 if device_name == "gpu" else DType.float32
    if dtype not in PRECISIONS:
        raise ValueError(f"dtype must be 'auto', {', '.join(map(repr, PRECISIONS))}, found {dtype!r}")
    if dtype == "q4_0" and device_name != "cpu":
        raise ValueError("dtype 'q4_0' runs on the CPU only (MAX's Q4_0 matmul is a CPU kernel); "
                         "use 'bfloat16' or 'float16' on a GPU")
    return DType.float32 if dtype == "q4_0" else DTYPES[dtype]


def bfloat16_bits(a: np.ndarray) -> np.ndarray:
    """numpy has no bfloat16: float32 rounded to its top 16 bits (to nearest, ties to
    even), as uint16, for MAX to read as bfloat16."""
    bits = np.ascontiguousarray(a, np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def weight_array(a: np.ndarray, dtype: DType) -> np.ndarray | Buffer:
    """A checkpoint tensor as the graph binds it: in its own layout, in `dtype`."""
    if dtype == DType.bfloat16:
        return Buffer.from_numpy(bfloat16_bits(a)).view(DType.bfloat16, list(a.shape))
    return np.ascontiguousarray(a, dtype=np.float16 if dtype == DType.float16 else np.float32)


def q4_0_blocks(name: str, a: np.ndarray) -> np.ndarray:
    """A checkpoint matrix (out, in) as MAX's Q4_0 matmul binds it: rows of 18-byte
    blocks (GGML's Q4_0, quantized by the gguf package), zero rows added up to a
    multiple of 32."""
    from gguf import GGMLQuantizationType, quants

    n_out, n_in = a.shape
    if n_in % Q4_0_BLOCK:
        raise ValueError(f"{name}: q4_0 needs the input width to be a multiple of {Q4_0_BLOCK}, "
                         f"found shape {a.shape}")
    padded = np.zeros((q4_0_rows(n_out), n_in), np.float32)
    padded[:n_out] = a
    return quants.quantize(padded, GGMLQuantizationType.Q4_0)


@dataclass
class DecoderState:
    """One batch's self-attention cache, (L, B, P, D) device buffers."""
    self_k: Buffer
    self_v: Buffer
    cross_k: Buffer
    cross_v: Buffer
    length: int


class CompiledWhisper:
    """A spec's graphs, compiled once, with weights bound by name in one dtype.
    `attention`: 'unfused' or 'fused' (MAX's flash-attention kernel, GPU only; not yet
    the GPU's default: no session has measured it on one, docs/benchmarks.md)."""

    def __init__(self, spec: ModelSpec, weights: dict[str, np.ndarray], device: str = "cpu",
                 dtype: str | DType | None = None, taps: bool = False, attention: str = "unfused"):
        self.spec = spec
        self.device_name = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device_name)
        self.quantized = dtype == "q4_0"
        self.precision = "q4_0" if self.quantized else next(k for k, v in DTYPES.items() if v == self.dtype)
        self.device = Accelerator() if self.device_name == "gpu" else CPU()
        self._ref = DeviceRef.GPU() if self.device_name == "gpu" else DeviceRef.CPU()
        self.attention = check_attention(attention, self._ref)
        check_arrays(spec, weights, "weights given to CompiledWhisper")
        self._registry = {k: weight_array(weights[k], self.dtype) for k in float_weights(spec, self.quantized)}
        if self.quantized:
            self._registry.update({k + Q4_0_SUFFIX: q4_0_blocks(k, weights[k]) for k in quantized_matrices(spec)})
        self._session = InferenceSession(devices=[self.device])
        outputs = {}

        def encoder(module):
            g, outputs["encoder"] = encoder_graph(spec, self.dtype, self._ref, taps, module=module,
                                                  attention=self.attention)
            return g

        def decoder(module):
            g, outputs["decoder"] = decoder_graph(spec, self.dtype, self._ref, taps, module=module,
                                                  quantized=self.quantized, attention=self.attention)
            return g

        self._encoder, self._decoder, self._selector = self._compile(
            encoder, decoder, lambda module: select_graph(self.dtype, self._ref, module))
        self.encoder_outputs, self.decoder_outputs = outputs["encoder"], outputs["decoder"]
        self._aligner = self._greedy = None
        # decoding.decode's switch for greedy decoding. On the CPU the device loop measured
        # about 1.2x slower than the host's (docs/benchmarks.md); it is for accelerators.
        self.greedy_on_device = self.device_name == "gpu"

    def _compile(self, *builders):
        """Build graphs into one module, compile (or find in MAX's cache) and bind weights."""
        module = Module()
        graphs = [build(module) for build in builders]
        models = self._session.load_all(module, weights_registry=self._registry)
        return [models[g.name] for g in graphs]

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
        empty = Buffer.zeros((L, b, 0, d), self.dtype, self.device)
        return DecoderState(empty, empty, cross_k, cross_v, 0)

    def select(self, x: Buffer, rows) -> Buffer:
        """Rows of a stacked (L, B, S, D) buffer, on the device: keep only the unfinished
        windows' cross K/V, or give each row its own when windows have unequal rows."""
        return self._selector.execute(x, self._put(np.asarray(rows, np.int64)))[0]

    def select_pair(self, pair: tuple[Buffer, Buffer], rows) -> tuple[Buffer, Buffer]:
        """`select` applied to K and V alike; all rows in order come back untouched."""
        rows = np.asarray(rows, np.int64)
        if np.array_equal(rows, np.arange(pair[0].shape[1])):
            return pair
        return self.select(pair[0], rows), self.select(pair[1], rows)

    def decode(self, tokens: np.ndarray, state: DecoderState, order=None,
               logits_at=None) -> tuple[np.ndarray, DecoderState, list[Buffer]]:
        """Feed tokens (B, T) after the cached ones; returns logits (B, K, V) at the
        positions `logits_at` (default: all T; negative ones count from the end), the
        grown state, and the tap outputs (empty unless compiled with taps). Row b
        continues cache row `order[b]` (default: row b), so beams reorder inside the step.
        The state's W cross K/V rows serve the B rows in order, B/W consecutive rows each
        (a window's beams)."""
        return self._step(self._decoder, tokens, state, order, logits_at)

    def align(self, tokens: np.ndarray, state: DecoderState) -> tuple[np.ndarray, np.ndarray]:
        """One pass of the alignment decoder: logits (B, T, V) and the alignment heads'
        scaled cross-attention scores (B, heads, T, S)."""
        if self._aligner is None:
            self._aligner, = self._compile(
                lambda module: decoder_graph(self.spec, self.dtype, self._ref, alignment=True, module=module,
                                             quantized=self.quantized, attention=self.attention)[0])
        logits, _, extra = self._step(self._aligner, tokens, state, None, None)
        return logits, extra[-1].to_numpy()

    def greedy(self, first_logits: np.ndarray, state: DecoderState, suppress: np.ndarray, begin: np.ndarray,
               max_new: int, eot: int, timestamp_begin: int) -> tuple[np.ndarray, np.ndarray]:
        """Greedy decoding to the end in one call (loop.py), after the prompt pass that
        gave `state` and the logits (B, V) for the first token. `suppress` and `begin`:
        additive (V,) masks for every step and for the first. Returns the sampled
        tokens (B, n) and their summed log-probabilities (B,)."""
        if state.length + max_new > self.spec.decoder.n_ctx or max_new < 1:
            raise ValueError(f"{state.length} prompt + {max_new} new tokens must fit the text context "
                             f"of {self.spec.decoder.n_ctx}")
        if self._greedy is None:
            from .loop import greedy_graph

            self._greedy, = self._compile(lambda module: greedy_graph(
                self.spec, eot, timestamp_begin, self.dtype, self._ref, module, self.quantized, self.attention))
        tokens, sum_logprob, n = self._greedy.execute(
            self._put(first_logits.astype(np.float32)), state.self_k, state.self_v, state.cross_k, state.cross_v,
            self._put(suppress.astype(np.float32)), self._put(begin.astype(np.float32)),
            Buffer.from_numpy(np.array(max_new, np.int64)))
        return tokens.to_numpy()[:, : int(n.to_numpy())], sum_logprob.to_numpy()

    def _step(self, graph, tokens: np.ndarray, state: DecoderState, order, logits_at):
        tokens = np.asarray(tokens, dtype=np.int64)
        n_ctx, rows = self.spec.decoder.n_ctx, state.self_k.shape[1]
        windows = state.cross_k.shape[1]
        if tokens.ndim != 2 or not windows or not tokens.shape[0] or tokens.shape[0] % windows:
            raise ValueError(f"tokens must have shape (batch, T), the batch a multiple of the {windows} windows' "
                             f"cross K/V rows, found {tokens.shape}")
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
        t = tokens.shape[1]
        at = np.arange(t, dtype=np.int64) if logits_at is None else np.asarray(logits_at, np.int64).reshape(-1)
        if at.size and (at.min() < -t or at.max() >= t):
            raise ValueError(f"logits_at must be positions of the {t} new tokens, found {at.tolist()}")
        logits, k, v, *taps = graph.execute(self._put(tokens), self._put(order), state.self_k, state.self_v,
                                            state.cross_k, state.cross_v, self._put(at % max(t, 1)))
        state = DecoderState(k, v, state.cross_k, state.cross_v, state.length + tokens.shape[1])
        return logits.to_numpy(), state, taps
