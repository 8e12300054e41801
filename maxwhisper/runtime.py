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

import copy
import threading
from dataclasses import dataclass, replace

import numpy as np
from max.driver import CPU, Accelerator, Buffer, accelerator_count
from max.engine import InferenceSession
from max._mlir_context import ensure_default_mlir_context
from max.graph import DeviceRef, Module

from .builder import GraphOptions, decoder_graph, encoder_graph, select_graph
from .compiled import compile_module
from .precision import Precision, bound_weights, compile_target, resolve_precision
from .spec import ModelSpec
from .weights import check_arrays


# MAX keeps one MLIR context, entered for the main thread only; graphs are built in it from
# any thread, one build at a time, and a lazily compiled graph is compiled once.
_BUILD_LOCK = threading.RLock()


def resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', found {device!r}")
    if device == "auto":
        return "gpu" if accelerator_count() > 0 else "cpu"
    if device == "gpu" and accelerator_count() == 0:
        raise RuntimeError("device='gpu' was asked for, but MAX sees no accelerator")
    return device


@dataclass(frozen=True)
class DecoderState:
    """One batch's decoder state on the device: the self-attention cache of each row,
    (L, B, P, D); per row of the cross K/V (L, W, S, D), the K/V of a prefix, (L, W, N, D),
    the positions before the cache's that a window's rows share (the prompt: a prompt
    pass from `start` keeps its K/V there when it has one row per window) and how many
    of its first positions are padding (pads, (W,) int64: prompts of unequal lengths,
    padded at the start); `length`, N + P."""
    self_k: Buffer
    self_v: Buffer
    cross_k: Buffer
    cross_v: Buffer
    length: int
    prefix_k: Buffer
    prefix_v: Buffer
    pads: np.ndarray


class CompiledWhisper:
    """A spec's graphs, compiled once, with weights bound by name in one precision.

    `precision`: a `precision.PRECISIONS` name or None for the device's default.
    `attention`: 'unfused' or 'fused' (MAX's flash-attention kernel, GPU only; not yet
    the GPU's default, docs/benchmarks.md). `greedy_on_device`: greedy decoding as one
    device loop (loop.py) instead of a host loop of steps; default on a GPU only, since
    on the CPU the device loop measured slower (docs/benchmarks.md)."""

    def __init__(self, spec: ModelSpec, weights: dict[str, np.ndarray], device: str = "cpu",
                 precision: str | Precision | None = None, taps: bool = False, attention: str = "unfused",
                 greedy_on_device: bool | None = None):
        self.spec = spec
        self.device_name = resolve_device(device)
        self.precision = resolve_precision(precision, self.device_name)
        self.device = Accelerator() if self.device_name == "gpu" else CPU()
        ref = DeviceRef.GPU() if self.device_name == "gpu" else DeviceRef.CPU()
        self.options = GraphOptions(self.precision, ref, attention, taps)
        self._greedy_on_device = self.device_name == "gpu" if greedy_on_device is None else bool(greedy_on_device)
        check_arrays(spec, weights, "weights given to CompiledWhisper")
        self._registry = bound_weights(spec, weights, self.precision)
        self._session = InferenceSession(devices=[self.device])
        outputs = {}

        def encoder(module):
            g, outputs["encoder"] = encoder_graph(spec, self.options, module)
            return g

        def decoder(module):
            g, outputs["decoder"] = decoder_graph(spec, self.options, module=module)
            return g

        self._encoder, self._decoder, self._selector = self._compile(
            "graphs", encoder, decoder, lambda module: select_graph(self.options, module))
        self.encoder_outputs, self.decoder_outputs = outputs["encoder"], outputs["decoder"]
        self._aligner = self._greedy = None

    @property
    def dtype(self):
        """The activations' MAX DType."""
        return self.precision.dtype

    @property
    def attention(self) -> str:
        return self.options.attention

    @property
    def greedy_on_device(self) -> bool:
        return self._greedy_on_device

    def placed(self, greedy_on_device: bool) -> CompiledWhisper:
        """This model, its compiled graphs shared, with greedy decoding placed on the
        device or the host."""
        other = copy.copy(self)
        other._greedy_on_device = bool(greedy_on_device)
        return other

    def warmup(self, word_timestamps: bool = True) -> None:
        """Compile now what would otherwise compile on first use: the alignment decoder
        (word timestamps) and, where greedy decoding runs on the device, its loop."""
        if word_timestamps:
            self._alignment_decoder()
        if self.greedy_on_device:
            self._greedy_loop()

    def _compile(self, what: str, *builders):
        """Build graphs into one module, load it compiled (compiled.py) and bind weights."""
        with _BUILD_LOCK, ensure_default_mlir_context():
            module = Module()
            graphs = [build(module) for build in builders]
            label = f"{self.spec.name}-{what}-{self.precision.name}-{self.options.attention}-{self.device_name}"
            with compile_target(self.precision.tiles):
                compiled = compile_module(self._session, module, label, self.device,
                                          self.options.kernels.get("custom_extensions", ()))
            models = self._session.init_all(compiled, weights_registry=self._registry)
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
        return DecoderState(empty, empty, cross_k, cross_v, 0, empty, empty, np.zeros(b, np.int64))

    def windows(self, state: DecoderState, rows, of: DecoderState | None = None) -> DecoderState:
        """`state` with the cross K/V and prefix rows `rows` of `of` (default: of
        `state`): the windows whose rows the next steps decode, one row each, or each
        row its window's when windows have unequal numbers of rows."""
        of = of or state
        ck, cv = self.select_pair((of.cross_k, of.cross_v), rows)
        pk, pv = self.select_pair((of.prefix_k, of.prefix_v), rows)
        return replace(state, cross_k=ck, cross_v=cv, prefix_k=pk, prefix_v=pv, pads=of.pads[np.asarray(rows)])

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

    def decode(self, tokens: np.ndarray, state: DecoderState, order=None, logits_at=None,
               pads=None) -> tuple[np.ndarray, DecoderState, list[Buffer]]:
        """Feed tokens (B, T) after the cached ones; returns logits (B, K, V) at the
        positions `logits_at` (default: all T; negative ones count from the end), the
        grown state, and the tap outputs (empty unless compiled with taps). Row b
        continues cache row `order[b]` (default: row b), so beams reorder inside the step.
        The state's W cross K/V rows serve the B rows in order, B/W consecutive rows each
        (a window's beams). `pads`, for a prompt pass from `start` with one row per
        window: how many of each row's first tokens are padding (prompts of unequal
        lengths, padded at the start to step together); they are never attended to."""
        logits, state, taps, _ = self._step(self._decoder, tokens, state, order, logits_at, pads)
        return logits, state, taps

    def decode_text(self, tokens: np.ndarray, state: DecoderState, text_mask: np.ndarray, order=None,
                    logits_at=None, pads=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, DecoderState]:
        """`decode`, and with its logits (B, K, V) the mass of their text tokens, from the
        step's graph (builder.text_mass): each row's maximum of `logits + text_mask` (B, K)
        and the sum of exp(entry - maximum) (B, K); `text_mask` (V,) is 0 where a token
        counts and -inf where not. Returns (logits, maximum, sum, state)."""
        text_mask = np.asarray(text_mask, np.float32)
        if text_mask.shape != (self.spec.vocab.n_vocab,):
            raise ValueError(f"text_mask must have shape ({self.spec.vocab.n_vocab},), found {text_mask.shape}")
        logits, state, _, (top, total) = self._step(self._decoder, tokens, state, order, logits_at, pads, text_mask)
        return logits, top, total, state

    def align(self, tokens: np.ndarray, state: DecoderState) -> tuple[np.ndarray, np.ndarray]:
        """One pass of the alignment decoder over a state from `start`: logits (B, T, V)
        and the alignment heads' scaled cross-attention scores (B, heads, T, S)."""
        logits, _, extra, _ = self._step(self._alignment_decoder(), tokens, state, None, None)
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
        # The loop keeps one cache per row: the prompt's (one row per window) or the rows'.
        if state.prefix_k.shape[2] and state.self_k.shape[2]:
            raise ValueError("greedy decoding continues a prompt pass, not a state with steps after it")
        if state.pads.any():
            raise ValueError("greedy decoding on the device takes prompts of one length, unpadded")
        k, v = (state.prefix_k, state.prefix_v) if state.prefix_k.shape[2] else (state.self_k, state.self_v)
        tokens, sum_logprob, n = self._greedy_loop(eot, timestamp_begin).execute(
            self._put(first_logits.astype(np.float32)), k, v, state.cross_k, state.cross_v,
            self._put(suppress.astype(np.float32)), self._put(begin.astype(np.float32)),
            Buffer.from_numpy(np.array(max_new, np.int64)))
        return tokens.to_numpy()[:, : int(n.to_numpy())], sum_logprob.to_numpy()

    def _alignment_decoder(self):
        with _BUILD_LOCK:
            if self._aligner is None:
                self._aligner, = self._compile("alignment", lambda module: decoder_graph(
                    self.spec, self.options, alignment=True, module=module)[0])
        return self._aligner

    def _greedy_loop(self, eot: int | None = None, timestamp_begin: int | None = None):
        with _BUILD_LOCK:
            if self._greedy is None:
                from .loop import greedy_graph
                from .tokenizer import special_ids

                if eot is None:
                    eot, timestamp_begin = special_ids(self.spec)
                self._greedy, = self._compile("greedy", lambda module: greedy_graph(
                    self.spec, eot, timestamp_begin, self.options, module))
        return self._greedy

    def _step(self, graph, tokens: np.ndarray, state: DecoderState, order, logits_at, pads=None, text_mask=None):
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
        if pads is not None:
            pads = np.asarray(pads, np.int64)
            if state.length or tokens.shape[0] != windows or pads.shape != (windows,) or \
                    (pads.size and (pads.min() < 0 or pads.max() >= t)):
                raise ValueError(f"pads are for a prompt pass from `start`, one per window, each below the "
                                 f"{t} tokens, found {pads.tolist()} for {tokens.shape[0]} rows")
            state = replace(state, pads=pads)
        if text_mask is None:
            text_mask = np.zeros(self.spec.vocab.n_vocab, np.float32)
        logits, k, v, *taps, top, total = graph.execute(
            self._put(tokens), self._put(order), state.self_k, state.self_v, state.cross_k, state.cross_v,
            state.prefix_k, state.prefix_v, self._put(state.pads),
            self._put(np.repeat(state.pads, tokens.shape[0] // windows)), self._put(at % max(t, 1)),
            self._put(text_mask))
        mass = (top.to_numpy(), total.to_numpy())
        length = state.length + tokens.shape[1]
        if state.length == 0 and tokens.shape[0] == windows and np.array_equal(order, np.arange(windows)):
            # A prompt pass, one row per window: its K/V become the prefix that the
            # window's rows (beams, samples) share from here on.
            empty = Buffer.zeros((k.shape[0], windows, 0, k.shape[3]), self.dtype, self.device)
            return logits.to_numpy(), replace(state, self_k=empty, self_v=empty, prefix_k=k, prefix_v=v,
                                              length=length), taps, mass
        return logits.to_numpy(), replace(state, self_k=k, self_v=v, length=length), taps, mass
