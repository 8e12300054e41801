"""Walk a ModelSpec and emit MAX graphs: the encoder and the decoder step.

Two graphs serve a model:
- encoder: log-mel (B, n_mels, n_frames) -> audio features (B, S, D) and every decoder
  layer's cross-attention K and V, stacked (L, B, S, D): computed once per window.
- decoder: tokens (B, T), the rows of the cache to continue (B,), self-attention cache
  K/V (L, B0, P, D), cross K/V (L, W, S, D) -> logits (B, T, V) and the grown cache
  (L, B, P+T, D). B, B0, W, T and P are symbolic, so one compiled graph serves the
  prompt, every step and every batch size; the row gather reorders beams and drops
  finished rows inside the same call. W windows with B/W rows each (beams) share
  their window's cross K/V row.
- select: rows of a stacked (L, B, S, D) tensor, to drop finished windows' cross K/V or
  give rows of unequal groups one each.

Every weight is a `max.graph.Weight` named as in the checkpoint, bound at load time.
With `taps=True` each stage's output is also a graph output, so a layer-by-layer parity
check costs one compile per graph. With `alignment=True` the decoder also returns the
scaled cross-attention scores of the spec's alignment heads (B, heads, T, S), which word
timestamps align with dynamic time warping; the hot decoder leaves them out.
"""

from __future__ import annotations

import math

from max.dtype import DType
from max.graph import DeviceRef, Graph, Module, StaticDim, TensorType, TensorValue, Weight, ops
from max.graph.quantization import QuantizationEncoding

from .manifest import manifest
from .spec import SUBLAYER_PREFIX, ModelSpec


def is_matrix(name: str, shape) -> bool:
    """Linear weights and the token embedding: bound in the checkpoint's (out, in) layout
    and multiplied by `_matmul`, or as Q4_0 blocks."""
    return name.endswith(".weight") and len(shape) == 2


# Q4_0 (GGML's layout): blocks of 32 weights along a row, each an fp16 scale and 32
# 4-bit values, 18 bytes. MAX's CPU kernel wants rows (outputs) in multiples of 32 too.
Q4_0_BLOCK, Q4_0_BYTES = 32, 18
Q4_0_SUFFIX = ".q4_0"


def quantized_matrices(spec: ModelSpec) -> list[str]:
    """The matrices the q4_0 precision binds as 4-bit blocks: the decoder's, which every
    token reads again (its step is bound by memory traffic, and the logits projection is
    most of it). The encoder, run once per window and bound by arithmetic, and the cross
    K/V projections it holds stay float32."""
    return [name for name, info in manifest(spec).items()
            if name.startswith("decoder.") and is_matrix(name, info.shape)
            and ".cross_attn.key." not in name and ".cross_attn.value." not in name]


def float_weights(spec: ModelSpec, quantized: bool) -> list[str]:
    """The names the graphs bind in the model's float dtype: all of them, or under q4_0
    all but the quantized matrices, save the token embedding, which the embedding lookup
    still gathers from."""
    skip = set(quantized_matrices(spec)) - {"decoder.token_embedding.weight"} if quantized else set()
    return [name for name in manifest(spec) if name not in skip]


# How attention is computed. "unfused": softmax(QK^T)V as matmuls and a softmax, on any
# device (MAX's CPU compiler fuses it itself). "fused": MAX's flash-attention kernel
# (`mo.mha.no_cache`), which exists for GPUs only.
ATTENTION = ("unfused", "fused")


def check_attention(attention: str, device: DeviceRef) -> str:
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {', '.join(map(repr, ATTENTION))}, found {attention!r}")
    if attention == "fused" and device == DeviceRef.CPU():
        raise ValueError("attention 'fused' runs on a GPU only: MAX's flash-attention kernel has no CPU "
                         "implementation; use 'unfused' on the CPU")
    return attention


def q4_0_rows(n: int) -> int:
    """Rows (outputs) of a matrix as bound in Q4_0: padded with zero rows to a multiple of 32."""
    return -(-n // Q4_0_BLOCK) * Q4_0_BLOCK


class Weights:
    """Declares graph weights on first use, with the manifest's (the checkpoint's) shape
    and one dtype. With `quantized`, the `quantized_matrices` are bound as Q4_0 blocks
    under `name + ".q4_0"`, which `matmul` uses. `single_row`: see `_matmul`. It also
    carries the graph's attention kernel choice (`ATTENTION`), which `_attention` reads."""

    def __init__(self, graph: Graph, spec: ModelSpec, dtype: DType, device: DeviceRef, quantized: bool = False,
                 single_row: bool = True, attention: str = "unfused"):
        self.graph, self.manifest, self.dtype, self.device = graph, manifest(spec), dtype, device
        self.single_row = single_row
        self.fused_attention = check_attention(attention, device) == "fused"
        self.quantized = frozenset(quantized_matrices(spec)) if quantized else frozenset()
        self.declared: dict[str, TensorValue] = {}

    def __call__(self, name: str) -> TensorValue:
        if name not in self.declared:  # a tied weight is used twice but declared once
            shape = tuple(self.manifest[name].shape)
            self.declared[name] = self.graph.add_weight(Weight(name, self.dtype, shape, self.device)).tensor
        return self.declared[name]

    def matmul(self, x: TensorValue, name: str) -> TensorValue:
        """x (..., in) @ the matrix `name`.T -> (..., out)."""
        if name not in self.quantized:
            return _matmul(x, self(name), self.single_row)
        n_out, n_in = self.manifest[name].shape
        *lead, _ = x.shape
        y = ops.qmatmul(QuantizationEncoding.Q4_0, None, x.reshape([-1, n_in]), self.blocks(name))
        return (y if q4_0_rows(n_out) == n_out else y[:, :n_out]).reshape([*lead, n_out])

    def blocks(self, name: str) -> TensorValue:
        """The Q4_0 blocks of matrix `name`, (rows padded to 32, bytes per row)."""
        q = name + Q4_0_SUFFIX
        if q not in self.declared:
            n_out, n_in = self.manifest[name].shape
            shape = (q4_0_rows(n_out), n_in // Q4_0_BLOCK * Q4_0_BYTES)
            self.declared[q] = self.graph.add_weight(Weight(
                q, DType.uint8, shape, self.device, quantization_encoding=QuantizationEncoding.Q4_0)).tensor
        return self.declared[q]


def _matmul(x: TensorValue, w: TensorValue, single_row: bool = True) -> TensorValue:
    """x (..., in) @ w.T for w (out, in), as one 2-D product. MAX 26.7's CPU matmul of a
    3-D activation with a symbolic batch, fed by fused ops (the conv stem's im2col),
    accumulated bfloat16 in bfloat16: conv1 strayed 2.7e-2 from float32 against 3.8e-3
    flattened (the rounding of its inputs), and the encoder 2.2e-1 by its last block.

    On the CPU a single row (a greedy step of one window) goes through w @ x.T instead:
    MAX takes its matrix-vector kernel over w's contiguous rows, 1.7x faster for the
    tiny.en logits, while for two rows or more that form is slower than x @ w.T.
    `single_row=False` leaves that choice out of the graph."""
    *lead, n_in = x.shape
    x = x.reshape([-1, n_in])
    n_out = w.shape[0]
    rows = x.shape[0]
    if not single_row or x.device != DeviceRef.CPU() or any(isinstance(d, StaticDim) and int(d) > 1 for d in lead):
        y = x @ w.transpose(0, 1)
    else:
        one_row = ops.shape_to_tensor([rows]).reshape([]) == ops.constant(1, DType.int64, DeviceRef.CPU())
        y = ops.cond(one_row, [TensorType(x.dtype, [rows, n_out], DeviceRef.CPU())],
                     lambda: (w @ x.transpose(0, 1)).transpose(0, 1),
                     lambda: x @ w.transpose(0, 1))[0].tensor
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
    if w.fused_attention:
        return _flash_attention(q, k, v, n_head, mask)
    b, t, d = q.shape
    scores = _scores(q, k, n_head)
    if mask is not None:
        scores = scores + mask
    return _bmm(ops.softmax(scores), _heads(v, n_head), q.dtype).transpose(1, 2).reshape([b, t, d])


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


def encoder_graph(spec: ModelSpec, dtype: DType = DType.float32,
                  device: DeviceRef | None = None, taps: bool = False,
                  module: Module | None = None, attention: str = "unfused") -> tuple[Graph, list[str]]:
    """Returns the graph and the names of its outputs, in order. `attention`: `ATTENTION`."""
    device = device or DeviceRef.CPU()
    enc, dec, eps = spec.encoder, spec.decoder, spec.norm_eps
    mel_type = TensorType(DType.float32, ["batch", spec.audio.n_mels, spec.audio.n_frames], device)
    names, extra = ["features", "cross_k", "cross_v"], []
    with Graph(f"{spec.name}_encoder", input_types=[mel_type], module=module) as g:
        w = Weights(g, spec, dtype, device, attention=attention)

        def tap(name, x):
            if taps:
                names.append(name)
                extra.append(x.cast(DType.float32))

        x = g.inputs[0].tensor.cast(dtype).transpose(1, 2)  # (B, frames, mels)
        for c in enc.stem:
            x = _activation(c.activation, _conv1d(w, f"encoder.{c.name}", x, c.kernel, c.stride, c.padding))
            tap(f"encoder.{c.name}", x)
        x = x + w("encoder.positional_embedding")
        tap("encoder.positional_embedding", x)
        for i in range(enc.n_layer):
            for kind in enc.block:
                p = f"encoder.blocks.{i}.{SUBLAYER_PREFIX[kind]}"
                h = _layer_norm(w, f"{p}_ln", x, eps)
                if kind == "mlp":
                    x = x + _mlp(w, p, h)
                else:
                    x = x + _linear(w, f"{p}.out", _attention(
                        w, _linear(w, f"{p}.query", h), _linear(w, f"{p}.key", h, bias=False),
                        _linear(w, f"{p}.value", h), enc.n_head))
            tap(f"encoder.blocks.{i}", x)
        x = _layer_norm(w, f"encoder.{enc.final_norm}", x, eps)
        ks, vs = [], []
        for i in range(dec.n_layer):
            p = f"decoder.blocks.{i}.cross_attn"
            ks.append(_linear(w, f"{p}.key", x, bias=False))
            vs.append(_linear(w, f"{p}.value", x))
        g.output(x, ops.stack(ks), ops.stack(vs), *extra)
    return g, names


def alignment_heads(spec: ModelSpec) -> list[tuple[int, int]]:
    """The spec's [layer, head] pairs; without any, every head of the upper half of the
    decoder, as openai-whisper assumes for checkpoints that name none."""
    dec = spec.decoder
    if spec.alignment_heads:
        return [(int(l), int(h)) for l, h in spec.alignment_heads]
    return [(l, h) for l in range(dec.n_layer // 2, dec.n_layer) for h in range(dec.n_head)]


def _by_window(x: TensorValue, windows) -> TensorValue:
    """(B, T, D) rows, grouped by window in equal runs, -> (W, B/W * T, D): a window's
    rows (its beams) attend to its cross K/V together, which each step then reads once
    per window instead of once per row."""
    if x.shape[0] == windows:
        return x
    b, t, d = x.shape
    group = b // windows
    return x.rebind([group * windows, t, d]).reshape([windows, group * t, d])


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


def embed_tokens(w: Weights, tokens: TensorValue) -> TensorValue:
    """(B, T) token ids -> (B, T, D): rows of the (V, D) embedding."""
    return ops.gather(w("decoder.token_embedding.weight"), tokens, axis=0)


def decoder_layers(w: Weights, spec: ModelSpec, x: TensorValue, self_kv, cross_k: TensorValue,
                   cross_v: TensorValue, mask: TensorValue, on_cross=None, on_layer=None,
                   logits_at: TensorValue | None = None) -> TensorValue:
    """The decoder blocks and the logits (B, T, V) float32 for embedded tokens x (B, T, D).
    `self_kv(i, k, v)` gets layer i's new keys and values (B, T, D) and returns those to
    attend over: how the cache is kept is the caller's. `mask` is added to the
    self-attention scores. `cross_k`/`cross_v` (L, W, S, D): one row per window, the B
    rows grouped by window in runs of B/W (one row each, or a window's beams).
    `on_cross(i, q)` and `on_layer(i, x)` observe the cross-attention
    queries and each block's output. `logits_at` (K,): the positions to give logits
    for, (B, K, V); the vocabulary projection is most of a pass's work and a prompt
    needs two of its positions, not all."""
    dec, eps = spec.decoder, spec.norm_eps
    for i in range(dec.n_layer):
        for kind in dec.block:
            pre = f"decoder.blocks.{i}.{SUBLAYER_PREFIX[kind]}"
            h = _layer_norm(w, f"{pre}_ln", x, eps)
            if kind == "mlp":
                x = x + _mlp(w, pre, h)
                continue
            q = _linear(w, f"{pre}.query", h)
            if kind == "self_attention":
                k, v = self_kv(i, _linear(w, f"{pre}.key", h, bias=False), _linear(w, f"{pre}.value", h))
                o = _attention(w, q, k, v, dec.n_head, mask)
            else:
                k, v = cross_k[i], cross_v[i]
                o = _by_row(_attention(w, _by_window(q, k.shape[0]), k, v, dec.n_head), *q.shape[:2])
                if on_cross:
                    on_cross(i, q)
            x = x + _linear(w, f"{pre}.out", o)
        if on_layer:
            on_layer(i, x)
    if logits_at is not None:
        x = ops.gather(x, logits_at, axis=1)
    x = _layer_norm(w, f"decoder.{dec.final_norm}", x, eps)
    return w.matmul(x, "decoder.token_embedding.weight").cast(DType.float32)


def decoder_graph(spec: ModelSpec, dtype: DType = DType.float32, device: DeviceRef | None = None,
                  taps: bool = False, alignment: bool = False,
                  module: Module | None = None, quantized: bool = False,
                  attention: str = "unfused") -> tuple[Graph, list[str]]:
    """Returns the graph and the names of its outputs, in order.

    Inputs: tokens (B, T) int64, order (B,) int64: the cache row each output row
    continues, self K and V (L, B0, P, D), cross K and V (L, W, S, D) of the W windows
    whose rows (B = W x group, grouped by window) these are, logits_at (K,) int64: the
    positions of T to give logits for, (B, K, V). The caller keeps
    P + T <= decoder.n_ctx (the runtime checks it). `taps` implies `alignment`.
    `quantized`: the `quantized_matrices` multiply as Q4_0 (float32 activations).
    `attention`: `ATTENTION`.
    """
    device = device or DeviceRef.CPU()
    dec = spec.decoder
    L, D = dec.n_layer, dec.n_state
    types = [TensorType(DType.int64, ["batch", "seq"], device),
             TensorType(DType.int64, ["batch"], device),
             TensorType(dtype, [L, "cache_batch", "past", D], device),
             TensorType(dtype, [L, "cache_batch", "past", D], device),
             TensorType(dtype, [L, "windows", "audio", D], device),
             TensorType(dtype, [L, "windows", "audio", D], device),
             TensorType(DType.int64, ["keep"], device)]
    names, extra = ["logits", "self_k", "self_v"], []
    heads_by_layer: dict[int, list[int]] = {}
    for layer, head in sorted(alignment_heads(spec)) if (alignment or taps) else []:
        heads_by_layer.setdefault(layer, []).append(head)
    qks = []
    name = f"{spec.name}_decoder" + ("_alignment" if heads_by_layer else "") + ("_q4_0" if quantized else "")
    with Graph(name, input_types=types, module=module) as g:
        w = Weights(g, spec, dtype, device, quantized, attention=attention)
        tokens, order, self_k, self_v, cross_k, cross_v, logits_at = (v.tensor for v in g.inputs)
        # Beam reordering and dropping finished rows, fused into the step.
        self_k, self_v = ops.gather(self_k, order, axis=1), ops.gather(self_v, order, axis=1)
        t, p = tokens.shape[1], self_k.shape[2]
        start = ops.shape_to_tensor([p]).reshape([])
        stop = ops.shape_to_tensor([p + t]).reshape([])
        pos = ops.slice_tensor(w("decoder.positional_embedding"), [(slice(start, stop), t), slice(None)])
        x = embed_tokens(w, tokens) + pos
        mask = _causal_mask(t, p, device)
        new_k, new_v = [], []

        def self_kv(i, k, v):  # the cache grows by the new tokens
            new_k.append(ops.concat([self_k[i], k], axis=1))
            new_v.append(ops.concat([self_v[i], v], axis=1))
            return new_k[-1], new_v[-1]

        def on_cross(i, q):
            if i in heads_by_layer:
                idx = ops.constant(heads_by_layer[i], DType.int64, device)
                k = cross_k[i]
                scores = ops.gather(_scores(_by_window(q, k.shape[0]), k, dec.n_head), idx, axis=1)
                qks.append(_alignment_rows(scores, *q.shape[:2]))

        def on_layer(i, x):
            if taps:
                names.append(f"decoder.blocks.{i}")
                extra.append(x.cast(DType.float32))

        logits = decoder_layers(w, spec, x, self_kv, cross_k, cross_v, mask, on_cross, on_layer, logits_at)
        if qks:
            names.append("alignment_qk")
            extra.append(ops.concat(qks, axis=1) if len(qks) > 1 else qks[0])
        g.output(logits, ops.stack(new_k), ops.stack(new_v), *extra)
    return g, names


def select_graph(dtype: DType, device: DeviceRef | None = None, module: Module | None = None) -> Graph:
    """Rows (axis 1) of a stacked (L, B, S, D) tensor: idx (N,) -> (L, N, S, D)."""
    device = device or DeviceRef.CPU()
    types = [TensorType(dtype, ["layers", "rows", "length", "width"], device),
             TensorType(DType.int64, ["n"], device)]
    with Graph(f"select_rows_{dtype}", input_types=types, module=module) as g:
        x, idx = (v.tensor for v in g.inputs)
        g.output(ops.gather(x, idx, axis=1))
    return g
