"""Greedy decoding on the device: the decoder step, openai-whisper's logit rules and the
argmax inside one `ops.while_loop`, so the host sees only the finished tokens.

The host path (decoding.py) pays per token an execute call, a logits copy (B, V) to
the host and the rules in numpy; here one call decodes a batch of windows to the end.
Its inputs are the prompt pass's results (logits for the first token, the prompt's
self K/V), so the prompt and no-speech probability stay with the regular decoder graph.

Loop-carried values cannot change shape, so the self-attention cache is a fixed
(B, n_ctx, D) tensor per layer: each step writes its position and attends over all n_ctx
positions with the later ones masked. Finished rows ride along emitting
<|endoftext|> until every row is done (the host path drops them instead).

The rules need only a few numbers per row, not the sequence: the last two sampled
tokens and the last timestamp. Rules that hold at the first sampled token only
(suppress blank, a window starts with a timestamp no later than max_initial_timestamp)
come in as one additive mask, built by the host from the options.
"""

from __future__ import annotations

from max.dtype import DType
from max.graph import DeviceRef, Graph, Module, TensorType, TensorValue, ops

from .builder import GraphOptions, Weights, embed_tokens, logits_head, residual_block
from .spec import ModelSpec

NONE = -1  # "no token yet" in the last/previous-token state


def _neg_inf(device: DeviceRef) -> TensorValue:
    return ops.constant(float("-inf"), DType.float32, device)


def _logsumexp(x: TensorValue) -> TensorValue:
    """log(sum(exp(x))) over the last axis, keeping it (size 1); -inf where all are -inf.
    The top terms are counted apart from the rest: in one float32 sum their exp(0) = 1
    swallows terms below half its ulp, and the summed log-probabilities of a 20-token
    segment drifted 6e-4 above the float64 host path's (tests/test_loop.py)."""
    top = ops.max(x, axis=-1)
    is_top = x == top
    zero = ops.constant(0.0, DType.float32, x.device)
    rest = ops.sum(ops.where(is_top, zero, ops.exp(x - top)), axis=-1)
    out = top + ops.log(ops.sum(is_top.cast(DType.float32), axis=-1) + rest)
    return ops.where(top == float("-inf"), top, out)


def _log_softmax(x: TensorValue) -> TensorValue:
    return x - _logsumexp(x)


def _timestamp_rules(logits, last, prev, last_ts, ids, eot: int, tb: int, device):
    """openai-whisper's ApplyTimestampRules for logits (B, V) given each row's last and
    previous sampled token (NONE before the first) and last timestamp (NONE if none)."""
    neg = _neg_inf(device)
    last_is_ts = (last >= tb).reshape([-1, 1])
    # Fewer than two sampled tokens count as "the previous one was a timestamp".
    prev_is_ts = ((prev >= tb) | (prev == NONE)).reshape([-1, 1])
    is_ts = ids >= tb
    pair_closed = last_is_ts & prev_is_ts & is_ts      # after a pair, text must follow
    open_stamp = last_is_ts & ~prev_is_ts & (ids < eot)  # an open timestamp: stamp or end
    # Timestamps never go back, and a segment has non-zero length.
    floor = ops.where(last_is_ts & ~prev_is_ts, last_ts.reshape([-1, 1]), last_ts.reshape([-1, 1]) + 1)
    backwards = (last_ts.reshape([-1, 1]) != NONE) & is_ts & (ids < floor)
    logits = ops.where(pair_closed | open_stamp | backwards, neg, logits)
    # When the timestamps together outweigh every text token, emit a timestamp.
    logprobs = _log_softmax(logits)
    mass = _logsumexp(ops.where(is_ts, logprobs, neg))
    text_max = ops.max(ops.where(is_ts, neg, logprobs), axis=-1)
    return ops.where((mass > text_max) & ~is_ts, neg, logits)


def greedy_graph(spec: ModelSpec, eot: int, timestamp_begin: int, options: GraphOptions = GraphOptions(),
                 module: Module | None = None) -> Graph:
    """Inputs: logits for the first sampled token (B, V) float32; the prompt's self K and
    V (L, B, P, D); cross K and V (L, B, S, D); `suppress` (V,), added to every step's
    logits, and `begin` (V,), added at the first sampled token only (0 or -inf each);
    `max_new` (int64 scalar, host): tokens to sample at most, P + max_new <= n_ctx.

    Outputs: tokens (B, n_ctx) int64, the sampled ones first, then <|endoftext|>;
    summed log-probabilities (B,) float32 up to and including each row's first
    <|endoftext|>; the number of tokens sampled (int64 scalar).

    The loop body inlines its layers: MAX 26.7 verifies an `ops.call` of a block
    subgraph while the body is still detached from the module, and refuses it ("does
    not reference a valid graph"). So does the single-row `ops.cond` of
    builder._matmul ("operand does not dominate this use"); this loop is the
    accelerator's greedy decode, where that CPU choice does not apply anyway.
    """
    options = GraphOptions(options.precision, options.device, options.attention, single_row=False)
    device, dtype = options.device, options.dtype
    cpu = DeviceRef.CPU()
    dec, V = spec.decoder, spec.vocab.n_vocab
    L, D, C = dec.n_layer, dec.n_state, dec.n_ctx
    f32, i64 = DType.float32, DType.int64
    types = [TensorType(f32, ["batch", V], device),
             TensorType(dtype, [L, "batch", "prompt", D], device),
             TensorType(dtype, [L, "batch", "prompt", D], device),
             TensorType(dtype, [L, "batch", "audio", D], device),
             TensorType(dtype, [L, "batch", "audio", D], device),
             TensorType(f32, [V], device),
             TensorType(f32, [V], device),
             TensorType(i64, [], cpu)]
    with Graph(f"{spec.name}_greedy", input_types=types, module=module, **options.kernels) as g:
        w = Weights(g, spec, options)
        logits0, prompt_k, prompt_v, cross_k, cross_v, suppress, begin, max_new = (v.tensor for v in g.inputs)
        b, p0 = logits0.shape[0], prompt_k.shape[2]
        ids = ops.range(0, V, 1, out_dim=V, dtype=i64, device=device).reshape([1, V])
        slots = ops.range(0, C, 1, out_dim=C, dtype=i64, device=device)
        eot_t = ops.constant(eot, i64, device)
        zero_f = ops.constant(0.0, f32, device)

        def pick(logits, last, prev, last_ts, sum_lp, tokens, step):
            """Rules, argmax and bookkeeping for the token at sampled index `step`."""
            logits = _timestamp_rules(logits + suppress, last, prev, last_ts, ids, eot, timestamp_begin, device)
            nxt = ops.argmax(logits, axis=-1).reshape([b])
            lp = ops.sum(ops.where(ids == nxt.reshape([-1, 1]), _log_softmax(logits), zero_f), axis=-1)
            done = (last == eot).reshape([b])
            sum_lp = sum_lp + ops.where(done, zero_f, lp.reshape([b]))
            nxt = ops.where(done, eot_t, nxt)
            tokens = ops.where(slots.reshape([1, C]) == step.to(device), nxt.reshape([-1, 1]), tokens)
            last_ts = ops.where(nxt >= timestamp_begin, nxt, last_ts)
            return nxt, last, last_ts, sum_lp, tokens

        none = ops.broadcast_to(ops.constant(NONE, i64, device), [b])
        tokens = ops.broadcast_to(eot_t, [b, C])
        sum_lp = ops.broadcast_to(ops.constant(0.0, f32, device), [b])
        zero = ops.constant(0, i64, cpu)
        last, prev, last_ts, sum_lp, tokens = pick(logits0 + begin, none, none, none, sum_lp, tokens, zero)
        # The prompt's K/V at the front of a fixed-capacity cache, one tensor per layer
        # (a stacked cache would be re-stacked and re-sliced every step).
        pad = ops.broadcast_to(ops.constant(0.0, dtype, device), [b, C - p0, D])
        caches = [ops.rebind(ops.concat([kv[i], pad], axis=1), [b, C, D])
                  for kv in (prompt_k, prompt_v) for i in range(L)]
        start = ops.shape_to_tensor([p0]).reshape([]).to(cpu)

        def running(step, last, prev, last_ts, sum_lp, tokens, *caches):
            alive = ops.max((last != eot).cast(DType.int32).reshape([-1]), axis=0).reshape([]).to(cpu) > 0
            return (step < max_new) & alive

        def body(step, last, prev, last_ts, sum_lp, tokens, *caches):
            pos = (start + step - 1).to(device)  # where the last sampled token goes
            x = embed_tokens(w, last.reshape([b, 1])) + ops.gather(
                w("decoder.positional_embedding"), pos.reshape([1]), axis=0)
            here = (slots == pos).reshape([1, C, 1])
            mask = ops.where(slots <= pos, zero_f, _neg_inf(device)).reshape([1, C])
            new = list(caches)
            for i in range(L):
                def self_kv(k, v, i=i):
                    new[i], new[L + i] = ops.where(here, k, caches[i]), ops.where(here, v, caches[L + i])
                    return new[i], new[L + i]

                x = residual_block(w.at(f"decoder.blocks.{i}."), spec, "decoder", x, self_kv, mask,
                                   (cross_k[i], cross_v[i]))
            logits = logits_head(w, spec, x).reshape([b, V])
            last, prev, last_ts, sum_lp, tokens = pick(logits, last, prev, last_ts, sum_lp, tokens, step)
            return [step + 1, last, prev, last_ts, sum_lp, tokens, *new]

        one = ops.constant(1, i64, cpu)
        out = ops.while_loop([one, last, prev, last_ts, sum_lp, tokens, *caches], running, body)
        g.output(out[5], out[4], out[0])
    return g
