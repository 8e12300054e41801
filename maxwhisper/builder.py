"""Walk a ModelSpec and emit MAX graphs: encoder, decoder step, row selection.

- encoder: log-mel (B, n_mels, n_frames) -> audio features (B, S, D) and every decoder
  layer's cross-attention K and V, stacked (L, B, S, D): computed once per window.
- decoder: tokens (B, T), the rows of the cache to continue (B,), self-attention cache
  K/V (L, B0, P, D), cross K/V (L, W, S, D) -> logits (B, K, V) at the asked positions
  and the grown cache (L, B, P+T, D). B, B0, W, T and P are symbolic, so one compiled
  graph serves the prompt, every step and every batch size; the row gather reorders
  beams and drops finished rows inside the same call. W windows with B/W rows each
  (beams) share their window's cross K/V row.
- select: rows of a stacked (L, B, S, D) tensor, to drop finished windows' cross K/V or
  give rows of unequal groups one each.

Encoder and decoder are `residual_block` repeated: the block is built once per graph
as a MAX subgraph and called once per layer with that layer's weight prefix, so MAX
compiles one block, not n_layer copies, and every weight keeps its one checkpoint
name. Every weight is a `max.graph.Weight` bound at load time. `GraphOptions.taps`
makes each stage's output a graph output (layer-by-layer parity for one compile);
`alignment=True` adds the alignment heads' cross-attention scores (B, heads, T, S),
which word timestamps align with dynamic time warping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from max.dtype import DType
from max.graph import DeviceRef, Graph, Module, StaticDim, TensorType, TensorValue, Weight, ops
from max.graph.quantization import QuantizationEncoding

from .kernel_package import kernel_package
from .manifest import manifest
from .precision import (FLOAT32, Q4_0_BLOCK, Q4_0_BYTES, Q4_0_SUFFIX, TILES_SUFFIX, Precision, q4_0_rows,
                        quantized_matrices, tile_shape, tiled_matrices)
from .spec import SUBLAYER_PREFIX, ModelSpec

# How attention is computed. "unfused": softmax(QK^T)V as matmuls and a softmax, on any
# device (MAX's CPU compiler fuses it itself). "fused": MAX's flash-attention kernel
# (`mo.mha.no_cache`), which exists for GPUs only.
ATTENTION = ("unfused", "fused")
# The decoder's cross-attention on the CPU with float32 activations
# (kernels/cross_attention.mojo), for up to this many queries per window; more (a prompt
# pass) go to MAX's matmuls, which are faster there. It takes heads 64 wide, as every
# Whisper size has.
CROSS_KERNEL, CROSS_KERNEL_QUERIES, CROSS_KERNEL_WIDTH = "maxwhisper_cross_attention", 16, 64
# Matrix products of a few rows (a decoder step's) on the CPU in float32
# (kernels/rows_matmul.mojo), from 2 rows to this many; one row and more rows go to MAX's
# matmul (`_matmul`). It takes inputs in multiples of 16, as every Whisper size has.
ROWS_KERNEL, ROWS_KERNEL_MAX, ROWS_KERNEL_STEP = "maxwhisper_rows_matmul", 64, 16


def check_attention(attention: str, device: DeviceRef) -> str:
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {', '.join(map(repr, ATTENTION))}, found {attention!r}")
    if attention == "fused" and device == DeviceRef.CPU():
        raise ValueError("attention 'fused' runs on a GPU only: MAX's flash-attention kernel has no CPU "
                         "implementation; use 'unfused' on the CPU")
    return attention


@dataclass(frozen=True)
class GraphOptions:
    """What every graph builder is told besides the spec. `single_row`: see `_matmul`."""
    precision: Precision = FLOAT32
    device: DeviceRef = field(default_factory=DeviceRef.CPU)
    attention: str = "unfused"
    taps: bool = False
    single_row: bool = True

    def __post_init__(self):
        check_attention(self.attention, self.device)

    @property
    def dtype(self) -> DType:
        return self.precision.dtype

    @property
    def float32_kernels(self) -> bool:
        """Whether the decoder step's cross-attention and its float32 matrix products of
        few rows are maxwhisper's kernels: on the CPU, where the activations are float32."""
        return self.device == DeviceRef.CPU() and self.dtype == DType.float32

    @property
    def kernels(self) -> dict:
        """The Graph keywords that load the custom kernels these graphs call (and that
        their compile is given)."""
        return {"custom_extensions": [kernel_package()]} if self.precision.tiled or self.float32_kernels else {}


class Weights:
    """Declares a graph's weights on first use, with the manifest's (the checkpoint's)
    shape, in the precision's dtype; under q4_0 the quantized matrices are bound as
    Q4_0 blocks under `name + ".q4_0"`, the tiled ones (the amx_ and avx512_ precisions)
    as bfloat16 tiles under `name + ".tiles"`; `matmul` uses them. Names are relative to
    `prefix` (a layer's, "decoder.blocks.3."). With `placeholder` (a block's subgraph)
    they are declared relative too, and each `ops.call` of the subgraph resolves them
    with its own layer's prefix."""

    def __init__(self, graph: Graph, spec: ModelSpec, options: GraphOptions, prefix: str = "",
                 placeholder: bool = False, declared: dict | None = None):
        self.graph, self.spec, self.options, self.prefix = graph, spec, options, prefix
        self.manifest, self.placeholder = manifest(spec), placeholder
        self.quantized = frozenset(quantized_matrices(spec)) if options.precision.quantized else frozenset()
        self.tiled = frozenset(tiled_matrices(spec, options.precision))
        self.declared: dict[str, TensorValue] = {} if declared is None else declared

    def at(self, prefix: str) -> Weights:
        """The same graph's weights, named relative to `prefix`."""
        return Weights(self.graph, self.spec, self.options, self.prefix + prefix, self.placeholder, self.declared)

    def _declare(self, name: str, dtype: DType, shape, encoding=None) -> TensorValue:
        name = name if self.placeholder else self.prefix + name
        if name not in self.declared:  # a tied weight is used twice but declared once
            self.declared[name] = self.graph.add_weight(Weight(
                name, dtype, shape, self.options.device, quantization_encoding=encoding,
                _placeholder=self.placeholder)).tensor
        return self.declared[name]

    def __call__(self, name: str) -> TensorValue:
        return self._declare(name, self.options.dtype, tuple(self.manifest[self.prefix + name].shape))

    def matmul(self, x: TensorValue, name: str) -> TensorValue:
        """x (..., in) @ the matrix `name`.T -> (..., out)."""
        if self.prefix + name in self.tiled:
            return self._tiled_matmul(x, name)
        if self.prefix + name not in self.quantized:
            return _matmul(x, self(name), self.options.single_row, self.options.float32_kernels)
        n_out, n_in = self.manifest[self.prefix + name].shape
        *lead, _ = x.shape
        blocks = self._declare(name + Q4_0_SUFFIX, DType.uint8, (q4_0_rows(n_out), n_in // Q4_0_BLOCK * Q4_0_BYTES),
                               QuantizationEncoding.Q4_0)
        y = ops.qmatmul(QuantizationEncoding.Q4_0, None, x.reshape([-1, n_in]), blocks)
        return (y if q4_0_rows(n_out) == n_out else y[:, :n_out]).reshape([*lead, n_out])

    def _tiled_matmul(self, x: TensorValue, name: str) -> TensorValue:
        n_out, n_in = self.manifest[self.prefix + name].shape
        shape = tile_shape(n_out, n_in)
        tiles = self._declare(name + TILES_SUFFIX, DType.uint16, shape)
        *lead, _ = x.shape
        x = x.reshape([-1, n_in])
        width = shape[0] * 16
        y = ops.custom(self.options.precision.tiles.matmul, x.device, [x, tiles], [TensorType(DType.float32, [x.shape[0], width], x.device)])[0].tensor
        return (y if width == n_out else y[:, :n_out]).reshape([*lead, n_out])


def _matmul(x: TensorValue, w: TensorValue, single_row: bool = True, rows_kernel: bool = False) -> TensorValue:
    """x (..., in) @ w.T for w (out, in), as one 2-D product. MAX 26.7's CPU matmul of a
    3-D activation with a symbolic batch, fed by fused ops (the conv stem's im2col),
    accumulated bfloat16 in bfloat16: conv1 strayed 2.7e-2 from float32 against 3.8e-3
    flattened (the rounding of its inputs), and the encoder 2.2e-1 by its last block.

    On the CPU the rows' count chooses the product where it is not known when the graph
    is built (a decoder step's): a single row (a greedy step of one window) goes through
    w @ x.T, MAX's matrix-vector kernel over w's contiguous rows, while for two rows or
    more that form is slower than x @ w.T. With `rows_kernel` (float32), 2 to
    ROWS_KERNEL_MAX rows go to maxwhisper's kernel, which reads w's rows as they lie,
    and more rows (a prompt pass) take w @ x.T too: MAX 26.7 loses a custom op's chain in
    a choice within a choice, so there are two branches, and the prompt's products are
    the ones where the slower form costs least. `single_row=False` leaves the choice out
    of the graph."""
    *lead, n_in = x.shape
    x = x.reshape([-1, n_in])
    n_out = w.shape[0]
    rows = x.shape[0]
    cpu = DeviceRef.CPU()
    if not single_row or x.device != cpu or any(isinstance(d, StaticDim) and int(d) > 1 for d in lead):
        return (x @ w.transpose(0, 1)).reshape([*lead, n_out])
    out = [TensorType(x.dtype, [rows, n_out], cpu)]
    count = ops.shape_to_tensor([rows]).reshape([])
    if rows_kernel and int(n_in) % ROWS_KERNEL_STEP == 0 and x.dtype == w.dtype == DType.float32:
        few = ops.logical_and(count > ops.constant(1, DType.int64, cpu),
                              count <= ops.constant(ROWS_KERNEL_MAX, DType.int64, cpu))
        y = ops.cond(few, out, lambda: ops.custom(ROWS_KERNEL, cpu, [x, w], out)[0].tensor,
                     lambda: (w @ x.transpose(0, 1)).transpose(0, 1))[0].tensor
    else:
        y = ops.cond(count == ops.constant(1, DType.int64, cpu), out,
                     lambda: (w @ x.transpose(0, 1)).transpose(0, 1), lambda: x @ w.transpose(0, 1))[0].tensor
    return y.reshape([*lead, n_out])


def _linear(w: Weights, prefix: str, x: TensorValue, bias: bool = True) -> TensorValue:
    y = w.matmul(x, f"{prefix}.weight")
    return y + w(f"{prefix}.bias") if bias else y


def _layer_norm(w: Weights, prefix: str, x: TensorValue, eps: float) -> TensorValue:
    # Statistics in fp32 as openai-whisper's LayerNorm does, whatever the model dtype.
    y = ops.layer_norm(x.cast(DType.float32), w(f"{prefix}.weight").cast(DType.float32),
                       w(f"{prefix}.bias").cast(DType.float32), eps)
    return y.cast(x.dtype)


def _heads(x: TensorValue, n_head: int) -> TensorValue:
    """(B, T, D) -> (B, H, T, D/H)."""
    b, t, d = x.shape
    return x.reshape([b, t, n_head, int(d) // n_head]).transpose(1, 2)


def _bmm(a: TensorValue, b: TensorValue, out: DType) -> TensorValue:
    """Batched a @ b, given in `out`. MAX 26.7's CPU batched matmul accumulates float16 in
    float16 (1500 keys: 5.4e-3 relative error against 2.0e-4 in float32), so on the CPU
    the attention products of a low-precision model run in float32, and the float32
    scores and probabilities go in and come out unrounded. GPU matmuls accumulate in
    float32: there the operands take the model dtype (`b`'s)."""
    if a.device == DeviceRef.CPU():
        return (a.cast(DType.float32) @ b.cast(DType.float32)).cast(out)
    return (a.cast(b.dtype) @ b).cast(out)


def _scores(q: TensorValue, k: TensorValue, n_head: int) -> TensorValue:
    """(B, H, T, S) float32 scaled dot products of (B, T, D) queries and (B, S, D) keys."""
    scale = 1.0 / math.sqrt(int(q.shape[2]) // n_head)
    return _bmm(_heads(q, n_head), ops.transpose(_heads(k, n_head), 2, 3), DType.float32) * scale


def _attention(w: Weights, q: TensorValue, k: TensorValue, v: TensorValue, n_head: int,
               mask: TensorValue | None = None) -> TensorValue:
    """Scaled dot-product attention over (B, T, D) queries and (B, S, D) keys/values,
    `mask` (T, S) or (1, S) added to the scores."""
    if w.options.attention == "fused":
        return _flash_attention(q, k, v, n_head, mask)
    b, t, d = q.shape
    # The AMX kernel packs a head's keys and values once per call, which pays where many
    # queries read them: the encoder's 1500, not a decoder step's few.
    tiles = w.options.precision.tiles
    if tiles and tiles.attention and mask is None and isinstance(t, StaticDim) and int(t) >= 32:
        return ops.custom(tiles.attention, q.device, [q, k, v], [TensorType(DType.float32, [b, t, d], q.device)],
                          parameters={"n_head": n_head})[0].tensor
    scores = _scores(q, k, n_head)
    if mask is not None:
        scores = scores + mask
    return _bmm(ops.softmax(scores), _heads(v, n_head), q.dtype).transpose(1, 2).reshape([b, t, d])


def _cross_attention(w: Weights, q: TensorValue, k: TensorValue, v: TensorValue, n_head: int) -> TensorValue:
    """The decoder's attention of each window's (W, G, D) queries over its (W, S, D) audio
    keys and values. A step's few queries per window (its beams) make it bound by
    reading the keys and values: on the CPU in float32, maxwhisper's cross-attention
    kernel reads them once, as they lie. A prompt pass's many queries go to MAX's
    matmuls, faster there."""
    if not w.options.float32_kernels or int(q.shape[2]) != CROSS_KERNEL_WIDTH * n_head:
        return _attention(w, q, k, v, n_head)
    out = [TensorType(DType.float32, q.shape, q.device)]

    def kernel():
        return ops.custom(CROSS_KERNEL, q.device, [q, k, v], out, parameters={"n_head": n_head})[0].tensor

    queries = q.shape[1]
    if isinstance(queries, StaticDim):  # the greedy loop's one query per window (no cond in its body)
        return kernel() if int(queries) <= CROSS_KERNEL_QUERIES else _attention(w, q, k, v, n_head)
    few = ops.shape_to_tensor([queries]).reshape([]) <= ops.constant(CROSS_KERNEL_QUERIES, DType.int64,
                                                                        DeviceRef.CPU())
    return ops.cond(few, out, kernel, lambda: _attention(w, q, k, v, n_head))[0].tensor


def _flash_attention(q: TensorValue, k: TensorValue, v: TensorValue, n_head: int,
                     mask: TensorValue | None) -> TensorValue:
    """`_attention` as one MAX flash-attention kernel (GPU only): heads split in place,
    (B, T, H, D/H), no transposes, no score matrix in memory. A mask goes to the kernel
    materialized per window, (B, T, S), as MAX's masked variant reads it."""
    from max.nn.attention import MHAMaskVariant
    from max.nn.kernels import flash_attention_gpu, masked_flash_attention_gpu

    b, t, d = q.shape
    width = int(d) // n_head
    q4, k4, v4 = (x.reshape([x.shape[0], x.shape[1], n_head, width]) for x in (q, k, v))
    scale = 1.0 / math.sqrt(width)
    if mask is None:
        out = flash_attention_gpu(q4, k4, v4, MHAMaskVariant.NULL_MASK, scale)
    else:
        out = masked_flash_attention_gpu(q4, k4, v4, ops.broadcast_to(mask, [b, t, k.shape[1]]), scale)
    return out.reshape([b, t, d])


def _conv1d(w: Weights, prefix: str, x: TensorValue, kernel: int, stride: int,
            padding: int) -> TensorValue:
    """Conv1d on (B, L, C) as im2col + one matmul: the same on CPU and GPU, and clear of
    the CPU conv2d padding bug (modular issue 6461)."""
    b, length, c = x.shape
    weight = w(f"{prefix}.weight")  # (C_out, C_in, K)
    c_out = weight.shape[0]
    out_len = (int(length) + 2 * padding - kernel) // stride + 1
    x = ops.pad(x, [0, 0, padding, padding, 0, 0])
    cols = [x[:, k: k + stride * (out_len - 1) + 1: stride, :] for k in range(kernel)]
    cols = ops.concat(cols, axis=2) if kernel > 1 else cols[0]
    # Column index k * C_in + c matches the weight laid out as (C_out, K, C_in).
    weight = ops.permute(weight, [0, 2, 1]).reshape([c_out, kernel * int(c)])
    return _matmul(cols, weight) + w(f"{prefix}.bias")


def _activation(name: str, x: TensorValue) -> TensorValue:
    assert name == "gelu", name  # the spec validator admits only known activations
    if x.dtype == DType.float32:
        return ops.gelu(x)
    # In float32 whatever the model dtype, like the layer norms and softmax.
    return ops.gelu(x.cast(DType.float32)).cast(x.dtype)


def _mlp(w: Weights, prefix: str, x: TensorValue) -> TensorValue:
    return _linear(w, f"{prefix}.2", _activation("gelu", _linear(w, f"{prefix}.0", x)))


def _causal_mask(t, p, device: DeviceRef) -> TensorValue:
    """(T, P+T) additive mask: new token i sees the P cached ones and new ones <= i."""
    neg = ops.broadcast_to(ops.constant(float("-inf"), DType.float32, device), [t, t])
    upper = ops.band_part(neg, num_lower=None, num_upper=0, exclude=True)
    past = ops.broadcast_to(ops.constant(0.0, DType.float32, device), [t, p])
    return ops.concat([past, upper], axis=1)


def _positions(start, t, row_pads: TensorValue, device: DeviceRef) -> TensorValue:
    """(B, T) positions of T new tokens after `start` in each row, counted after the
    row's padding (the padding's own positions, never attended to, clamp at 0)."""
    zero, one = (ops.constant(v, DType.int64, DeviceRef.CPU()) for v in (0, 1))  # range's bounds: on the host
    first = ops.shape_to_tensor([start]).reshape([]).to(device) - row_pads.reshape([-1, 1])
    steps = ops.range(zero, ops.shape_to_tensor([t]).reshape([]), one, out_dim=t, device=device,
                      dtype=DType.int64)
    return ops.max(first + steps.reshape([1, -1]), 0)


def _padding(pads: TensorValue, keys, device: DeviceRef) -> TensorValue:
    """(W, 1, 1, keys) additive mask of each window's first `pads` positions. Finite, not
    -inf: a padding query sees only padding keys, and a softmax over all -inf is NaN."""
    zero, one = (ops.constant(v, DType.int64, DeviceRef.CPU()) for v in (0, 1))  # range's bounds: on the host
    at = ops.range(zero, ops.shape_to_tensor([keys]).reshape([]), one, out_dim=keys, device=device,
                   dtype=DType.int64)
    blocked = at.reshape([1, -1]) < pads.reshape([-1, 1])
    mask = ops.where(blocked, ops.constant(-1e9, DType.float32, device), ops.constant(0.0, DType.float32, device))
    return mask.reshape([pads.shape[0], 1, 1, keys])


def alignment_heads(spec: ModelSpec) -> list[tuple[int, int]]:
    """The spec's [layer, head] pairs; without any, every head of the upper half of the
    decoder, as openai-whisper assumes for checkpoints that name none."""
    dec = spec.decoder
    if spec.alignment_heads:
        return [(int(l), int(h)) for l, h in spec.alignment_heads]
    return [(l, h) for l in range(dec.n_layer // 2, dec.n_layer) for h in range(dec.n_head)]


def _by_window(x: TensorValue, windows) -> TensorValue:
    """(B, T, ...) rows, grouped by window in equal runs, -> (W, B/W * T, ...): a window's
    rows (its beams) attend to its cross K/V together, which each step then reads once
    per window instead of once per row."""
    if x.shape[0] == windows:
        return x
    b, t, *rest = x.shape
    group = b // windows
    return x.rebind([group * windows, t, *rest]).reshape([windows, group * t, *rest])


def _by_row(x: TensorValue, b, t) -> TensorValue:
    """`_by_window`'s inverse, (W, B/W * T, ...) -> (B, T, ...)."""
    windows, *rest = x.shape
    if windows == b:
        return x
    return x.reshape([(b // windows) * windows, t, *rest[1:]]).rebind([b, t, *rest[1:]])


def _alignment_rows(scores: TensorValue, b, t) -> TensorValue:
    """(W, heads, B/W * T, S) scores of grouped rows -> (B, heads, T, S)."""
    if scores.shape[0] == b:
        return scores
    return _by_row(scores.permute([0, 2, 1, 3]), b, t).permute([0, 2, 1, 3])


def _window_heads(x: TensorValue, windows) -> TensorValue:
    """`_alignment_rows`' inverse: (B, heads, T, S) -> (W, heads, B/W * T, S)."""
    if x.shape[0] == windows:
        return x
    return _by_window(x.permute([0, 2, 1, 3]), windows).permute([0, 2, 1, 3])


def _attention_after_prefix(q: TensorValue, k: TensorValue, v: TensorValue, prefix, n_head: int,
                            mask: TensorValue, padding: TensorValue) -> TensorValue:
    """Self-attention of (B, T, D) queries over their window's prefix, (W, N, D) keys
    and values shared by the window's rows, then over the row's own (B, S, D) keys and
    values with `mask` (T, S): one softmax over both, `padding` (W, 1, 1, N + S) added
    (the padding before a window's shorter prompt). The prefix (the prompt) is the same
    for a window's beams, so it is read once per window and never copied to grow the
    cache or follow a beam's reordering; only the tokens decoded since move."""
    pk, pv = prefix
    b, t, d = q.shape
    windows = pk.shape[0]
    own = _window_heads(_scores(q, k, n_head) + mask, windows)             # (W, H, gT, S)
    scores = ops.concat([_scores(_by_window(q, windows), pk, n_head), own], axis=3)
    probs = ops.softmax(scores + padding.rebind([windows, 1, 1, pk.shape[1] + k.shape[1]]))
    n, s = pk.shape[1], k.shape[1]
    bounds = [ops.shape_to_tensor([x]).reshape([]) for x in (0 * n, n, n + s)]
    every = [slice(None)] * 3
    p_prefix = ops.slice_tensor(probs, [*every, (slice(bounds[0], bounds[1]), n)])
    p_own = ops.slice_tensor(probs, [*every, (slice(bounds[1], bounds[2]), s)])
    # MAX 26.7's CPU matmul leaves its output unwritten when the inner dimension is 0:
    # the prompt pass, whose prefix is empty, skips the product.
    heads = _heads(pv, n_head)
    shape = [windows, heads.shape[1], probs.shape[2], heads.shape[3]]
    zero = ops.broadcast_to(ops.constant(0.0, q.dtype, q.device), shape)
    out = ops.cond(bounds[1] > 0, [TensorType(q.dtype, shape, q.device)],
                   lambda: _bmm(p_prefix, heads, q.dtype), lambda: zero)[0].tensor
    out = out + _window_heads(_bmm(_alignment_rows(p_own, b, t), _heads(v, n_head), q.dtype), windows)
    return _by_row(out.transpose(1, 2).reshape([windows, out.shape[2], d]), b, t)


def residual_block(w: Weights, spec: ModelSpec, part: str, x: TensorValue, self_kv=None,
                   mask: TensorValue | None = None, cross: tuple[TensorValue, TensorValue] | None = None,
                   on_cross=None, prefix: tuple[TensorValue, TensorValue, TensorValue] | None = None) -> TensorValue:
    """One block of `part` ("encoder" or "decoder"): x + f(ln(x)) for each sublayer of
    its `block`, weights named from the layer's prefix. Self-attention attends over
    `self_kv(k, v)` of its new keys and values (how a cache is kept is the caller's;
    default: just them), `mask` added to its scores, after `prefix`, (W, N, D) keys and
    values that each window's rows share and their padding mask, if given.
    Cross-attention attends over
    `cross`, (W, S, D) K and V with one row per window, the B rows grouped by window
    in runs of B/W (one row each, or a window's beams); `on_cross(q, k)` observes its
    queries."""
    sizes = getattr(spec, part)
    for kind in sizes.block:
        p = SUBLAYER_PREFIX[kind]
        h = _layer_norm(w, f"{p}_ln", x, spec.norm_eps)
        if kind == "mlp":
            x = x + _mlp(w, p, h)
            continue
        q = _linear(w, f"{p}.query", h)
        if kind == "self_attention":
            k, v = _linear(w, f"{p}.key", h, bias=False), _linear(w, f"{p}.value", h)
            k, v = self_kv(k, v) if self_kv else (k, v)
            o = (_attention(w, q, k, v, sizes.n_head, mask) if prefix is None
                 else _attention_after_prefix(q, k, v, prefix[:2], sizes.n_head, mask, prefix[2]))
        else:
            k, v = cross
            o = _by_row(_cross_attention(w, _by_window(q, k.shape[0]), k, v, sizes.n_head), *q.shape[:2])
            if on_cross:
                on_cross(q, k)
        x = x + _linear(w, f"{p}.out", o)
    return x


def _subgraph(g: Graph, name: str, spec: ModelSpec, options: GraphOptions, prefix: str, input_types, body) -> Graph:
    """`body(weights, *inputs)` as a subgraph of g whose weights are named relative to
    `prefix`, a representative layer's (they all have the same shapes)."""
    with g.add_subgraph(name, input_types=input_types, devices=[options.device], **options.kernels) as sub:
        out = body(Weights(sub, spec, options, prefix, placeholder=True), *(v.tensor for v in sub.inputs))
        sub.output(*out)
    return sub


def _call(sub: Graph, *args, prefix: str) -> list[TensorValue]:
    return [v.tensor for v in ops.call(sub, *args, prefix=prefix)]


def encoder_graph(spec: ModelSpec, options: GraphOptions = GraphOptions(),
                  module: Module | None = None) -> tuple[Graph, list[str]]:
    """Returns the graph and the names of its outputs, in order."""
    device, dtype = options.device, options.dtype
    enc, dec = spec.encoder, spec.decoder
    mel_type = TensorType(DType.float32, ["batch", spec.audio.n_mels, spec.audio.n_frames], device)
    x_type = TensorType(dtype, ["batch", enc.n_ctx, enc.n_state], device)
    names, extra = ["features", "cross_k", "cross_v"], []
    with Graph(f"{spec.name}_encoder", input_types=[mel_type], module=module, **options.kernels) as g:
        # Subgraphs first: one added after other ops fails to compile in MAX 26.7
        # ("Expressions are not (currently) allowed in function signatures").
        block = _subgraph(g, "encoder_block", spec, options, "encoder.blocks.0.", [x_type],
                          lambda bw, x: [residual_block(bw, spec, "encoder", x)])
        w = Weights(g, spec, options)

        def tap(name, x):
            if options.taps:
                names.append(name)
                extra.append(x.cast(DType.float32))

        x = g.inputs[0].tensor.cast(dtype).transpose(1, 2)  # (B, frames, mels)
        for c in enc.stem:
            x = _activation(c.activation, _conv1d(w, f"encoder.{c.name}", x, c.kernel, c.stride, c.padding))
            tap(f"encoder.{c.name}", x)
        x = x + w("encoder.positional_embedding")
        tap("encoder.positional_embedding", x)
        for i in range(enc.n_layer):
            x, = _call(block, x, prefix=f"encoder.blocks.{i}.")
            tap(f"encoder.blocks.{i}", x)
        x = _layer_norm(w, f"encoder.{enc.final_norm}", x, spec.norm_eps)
        # Every decoder layer's cross-attention K and V, once per window. Inline: MAX
        # 26.7 fails to compile two calls of one subgraph on the same input value.
        cross = [w.at(f"decoder.blocks.{i}.cross_attn.") for i in range(dec.n_layer)]
        g.output(x, ops.stack([_linear(c, "key", x, bias=False) for c in cross]),
                 ops.stack([_linear(c, "value", x) for c in cross]), *extra)
    return g, names


def embed_tokens(w: Weights, tokens: TensorValue) -> TensorValue:
    """(B, T) token ids -> (B, T, D): rows of the (V, D) embedding."""
    return ops.gather(w("decoder.token_embedding.weight"), tokens, axis=0)


def logits_head(w: Weights, spec: ModelSpec, x: TensorValue, at: TensorValue | None = None) -> TensorValue:
    """The final norm and the tied vocabulary projection: (B, T, D) -> (B, T, V) float32,
    or (B, K, V) at the positions `at` (K,): the projection is most of a pass's work
    and a prompt needs two of its positions, not all."""
    if at is not None:
        x = ops.gather(x, at, axis=1)
    x = _layer_norm(w, f"decoder.{spec.decoder.final_norm}", x, spec.norm_eps)
    return w.matmul(x, "decoder.token_embedding.weight").cast(DType.float32)


def _grown(past: TensorValue, new: TensorValue, order: TensorValue) -> TensorValue:
    """The self-attention cache after a step: past (B0, P, D) rows, new (B, T, D) ->
    (B, P + T, D), row b past row order[b] (beams reorder, finished rows leave) and then
    new row b. Both are laid end to end along their outer axis and gathered in one pass:
    MAX 26.7's CPU concat along an inner axis copies element by element, several times
    slower (docs/benchmarks.md, "The decoder step's cache")."""
    b0, p, d = past.shape
    b, t, _ = new.shape
    dev = new.device
    zero, one = (ops.constant(v, DType.int64, DeviceRef.CPU()) for v in (0, 1))  # range's bounds: on the host
    n_past, n_new = (ops.shape_to_tensor([x]).reshape([]) for x in (p, t))
    at = ops.range(zero, n_past + n_new, one, out_dim=p + t, device=dev, dtype=DType.int64).reshape([1, -1])
    rows = ops.range(zero, ops.shape_to_tensor([b]).reshape([]), one, out_dim=b, device=dev,
                     dtype=DType.int64).reshape([-1, 1])
    n_past, n_new = n_past.to(dev), n_new.to(dev)
    first_new = ops.shape_to_tensor([b0]).reshape([]).to(dev) * n_past
    index = ops.where(at < n_past, order.reshape([-1, 1]) * n_past + at, first_new + rows * n_new + (at - n_past))
    flat = ops.concat([past.reshape([b0 * p, d]), new.reshape([b * t, d])], axis=0)
    return ops.gather(flat, index.reshape([-1]), axis=0).reshape([b, p + t, d])


def _decoder_block(g: Graph, spec: ModelSpec, options: GraphOptions, alignment: bool) -> Graph:
    """The decoder step's block: (x (B, T, D), cached K and V (B0, P, D) and the cache
    row each of the B rows continues (B,), cross K and V (W, S, D), the prefix's K and
    V (W, N, D) and padding mask (W, 1, 1, N + KV), the causal mask (T, KV)) -> (x, the
    cache grown to KV = P + T, and with `alignment` every head's scaled cross-attention
    scores (B, H, T, S) float32). MAX 26.7 admits no dimension expressions in a
    subgraph's signature, so the grown length comes in as the mask's own dimension."""
    dec, dt, dev = spec.decoder, options.dtype, options.device
    rows = TensorType(dt, ["batch", "seq", dec.n_state], dev)
    cache = TensorType(dt, ["cache_batch", "past", dec.n_state], dev)
    order = TensorType(DType.int64, ["batch"], dev)
    cross = TensorType(dt, ["windows", "audio", dec.n_state], dev)
    prefix = TensorType(dt, ["windows", "prefix", dec.n_state], dev)
    padding = TensorType(DType.float32, ["windows", 1, 1, "keys"], dev)
    mask = TensorType(DType.float32, ["seq", "kv"], dev)

    def body(w, x, past_k, past_v, order, cross_k, cross_v, prefix_k, prefix_v, padding, mask):
        grown, scores = [], []

        def self_kv(k, v):
            grown[:] = [_grown(past, new, order).rebind([x.shape[0], mask.shape[1], dec.n_state])
                        for past, new in ((past_k, k), (past_v, v))]
            return grown

        def on_cross(q, k):
            scores.append(_alignment_rows(_scores(_by_window(q, k.shape[0]), k, dec.n_head), *q.shape[:2]))

        x = residual_block(w, spec, "decoder", x, self_kv, mask, (cross_k, cross_v), on_cross if alignment else None,
                           (prefix_k, prefix_v, padding))
        return [x, *grown, *scores]

    name = "decoder_block" + ("_alignment" if alignment else "")
    return _subgraph(g, name, spec, options, "decoder.blocks.0.",
                     [rows, cache, cache, order, cross, cross, prefix, prefix, padding, mask], body)


def decoder_graph(spec: ModelSpec, options: GraphOptions = GraphOptions(), alignment: bool = False,
                  module: Module | None = None) -> tuple[Graph, list[str]]:
    """Returns the graph and the names of its outputs, in order.

    Inputs: tokens (B, T) int64, order (B,) int64: the cache row each output row
    continues, self K and V (L, B0, P, D), cross K and V (L, W, S, D) of the W windows
    whose rows (B = W x group, grouped by window) these are, the prefix's K and V
    (L, W, N, D): positions before the cache's, one row per window (N may be 0), pads
    (W,) and row_pads (B,) int64: how many of the first positions of each window's (and
    each row's window's) sequence are padding, not attended to, its positions counted
    after them (prompts of unequal lengths step together, padded at the start),
    logits_at (K,) int64: the positions of T to give logits for, (B, K, V), text_mask
    (V,) float32: added to the logits for `text_mass` (0, or -inf where a token does not
    count). The tokens sit at positions N + P ...; the caller keeps N + P + T <=
    decoder.n_ctx (the runtime checks it). Taps imply `alignment`. The last two outputs
    are `text_mass`'s, (B, K) each.
    """
    device, dtype = options.device, options.dtype
    dec = spec.decoder
    L, D = dec.n_layer, dec.n_state
    alignment = alignment or options.taps
    types = [TensorType(DType.int64, ["batch", "seq"], device),
             TensorType(DType.int64, ["batch"], device),
             TensorType(dtype, [L, "cache_batch", "past", D], device),
             TensorType(dtype, [L, "cache_batch", "past", D], device),
             TensorType(dtype, [L, "windows", "audio", D], device),
             TensorType(dtype, [L, "windows", "audio", D], device),
             TensorType(dtype, [L, "windows", "prefix", D], device),
             TensorType(dtype, [L, "windows", "prefix", D], device),
             TensorType(DType.int64, ["windows"], device),
             TensorType(DType.int64, ["batch"], device),
             TensorType(DType.int64, ["keep"], device),
             TensorType(DType.float32, [spec.vocab.n_vocab], device)]
    names, extra = ["logits", "self_k", "self_v"], []
    heads_by_layer: dict[int, list[int]] = {}
    for layer, head in sorted(alignment_heads(spec)) if alignment else []:
        heads_by_layer.setdefault(layer, []).append(head)
    name = f"{spec.name}_decoder" + ("_alignment" if alignment else "")
    with Graph(name, input_types=types, module=module, **options.kernels) as g:
        block = _decoder_block(g, spec, options, alignment)  # first, as in encoder_graph
        w = Weights(g, spec, options)
        (tokens, order, self_k, self_v, cross_k, cross_v, prefix_k, prefix_v, pads, row_pads,
         logits_at, text_mask) = (v.tensor for v in g.inputs)
        t, p, n = tokens.shape[1], self_k.shape[2], prefix_k.shape[2]
        x = embed_tokens(w, tokens) + ops.gather(w("decoder.positional_embedding"),
                                                 _positions(n + p, t, row_pads, device), axis=0)
        mask = _causal_mask(t, p, device).rebind([t, "kv"])
        padding = _padding(pads, n + p + t, device).rebind([cross_k.shape[1], 1, 1, "keys"])
        new_k, new_v, qks = [], [], []
        for i in range(L):
            # Beam reordering and dropping finished rows happen as the cache grows.
            x, k, v, *scores = _call(block, x, self_k[i], self_v[i], order, cross_k[i], cross_v[i], prefix_k[i],
                                     prefix_v[i], padding, mask, prefix=f"decoder.blocks.{i}.")
            new_k.append(k.rebind([k.shape[0], p + t, D]))
            new_v.append(v.rebind([v.shape[0], p + t, D]))
            if i in heads_by_layer:
                qks.append(ops.gather(scores[0], ops.constant(heads_by_layer[i], DType.int64, device), axis=1))
            if options.taps:
                names.append(f"decoder.blocks.{i}")
                extra.append(x.cast(DType.float32))
        if qks:
            names.append("alignment_qk")
            extra.append(ops.concat(qks, axis=1) if len(qks) > 1 else qks[0])
        logits = logits_head(w, spec, x, logits_at)
        g.output(logits, ops.stack(new_k), ops.stack(new_v), *extra, *text_mass(logits, text_mask))
    return g, names + ["text_top", "text_sum"]


# Entries per partial sum in `text_mass`: float32 sums this short stray only a few units
# of float32's rounding, however large the vocabulary.
TEXT_SUM_BLOCK = 256


def text_mass(logits: TensorValue, mask: TensorValue) -> tuple[TensorValue, TensorValue]:
    """Each row's maximum (..., 1 dropped) of `logits + mask` (..., V) and the sum of
    exp(entry - maximum) (-inf and 0 where a row is all -inf): the share of the softmax's
    normalization that the logit rules (decoding.LogitRules) take or drop whole, summed
    where the logits are, not on the host. The sum is of float32 sums of
    TEXT_SUM_BLOCK entries each, so that its order is fixed, not the kernel's."""
    x = logits + mask
    top = ops.max(x, axis=-1)
    e = ops.exp(x - top)
    *lead, v = e.shape
    whole = int(v) - int(v) % TEXT_SUM_BLOCK
    blocks = ops.sum(e[..., :whole].reshape([*lead, whole // TEXT_SUM_BLOCK, TEXT_SUM_BLOCK]), axis=-1)
    total = ops.sum(ops.squeeze(blocks, -1), axis=-1) + ops.sum(e[..., whole:], axis=-1)
    # MAX's maximum of a row of -inf is float32's lowest finite value; the row's top
    # entry alone adds 1 to the sum, so a sum of 0 marks a row with nothing in it.
    none = total == ops.constant(0.0, DType.float32, total.device)
    top = ops.where(none, ops.constant(float("-inf"), DType.float32, top.device), top)
    return ops.squeeze(top, -1), ops.squeeze(total, -1)


def select_graph(options: GraphOptions = GraphOptions(), module: Module | None = None) -> Graph:
    """Rows (axis 1) of a stacked (L, B, S, D) tensor: idx (N,) -> (L, N, S, D)."""
    types = [TensorType(options.dtype, ["layers", "rows", "length", "width"], options.device),
             TensorType(DType.int64, ["n"], options.device)]
    with Graph(f"select_rows_{options.dtype}", input_types=types, module=module) as g:
        x, idx = (v.tensor for v in g.inputs)
        g.output(ops.gather(x, idx, axis=1))
    return g
