"""Layer-by-layer numeric parity of the MAX graphs against openai-whisper, fp32 on CPU.

One compiled graph per model serves every stage: intermediate outputs are taps.
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers import get_spec, record_parity, reference_model, shared_compiled, shared_reference

torch = pytest.importorskip("torch", reason="needs the PyTorch reference: pip install -e '.[test]'")
F = torch.nn.functional

MODELS = ["tiny", "base", "micro-2dec"]
REL_TOL = 1e-4


def reference_encoder_stages(model, mel):
    """The reference encoder's forward, stage by stage, using its own modules."""
    enc, stages = model.encoder, {}
    x = mel
    for name in ("conv1", "conv2"):
        x = F.gelu(getattr(enc, name)(x))
        stages[f"encoder.{name}"] = x.permute(0, 2, 1)
    x = x.permute(0, 2, 1) + enc.positional_embedding
    stages["encoder.positional_embedding"] = x
    for i, block in enumerate(enc.blocks):
        x = block(x)
        stages[f"encoder.blocks.{i}"] = x
    stages["features"] = enc.ln_post(x)
    return stages


def reference_decoder_stages(model, tokens, features):
    stages, hooks = {}, []
    for i, block in enumerate(model.decoder.blocks):
        hooks.append(block.register_forward_hook(
            lambda m, inp, out, i=i: stages.__setitem__(f"decoder.blocks.{i}", out)))
    try:
        stages["logits"] = model.decoder(tokens, features)
    finally:
        for h in hooks:
            h.remove()
    return stages


@pytest.fixture(scope="module", params=MODELS)
def parity_case(request):
    name = request.param
    spec, ref, compiled = get_spec(name), shared_reference(name), shared_compiled(name, taps=True)
    rng = np.random.default_rng(1)
    mel = rng.standard_normal((2, spec.audio.n_mels, spec.audio.n_frames)).astype(np.float32)
    tokens = rng.integers(0, spec.vocab.n_vocab, size=(2, 12))
    return name, spec, ref, compiled, mel, tokens


def test_encoder_every_stage(parity_case):
    name, spec, ref, compiled, mel, _ = parity_case
    outs = compiled.encode(mel)
    got = dict(zip(compiled.encoder_outputs, (o.to_numpy() for o in outs)))
    with torch.no_grad():
        want = reference_encoder_stages(ref, torch.from_numpy(mel))
    stages = [f"encoder.{c.name}" for c in spec.encoder.stem] + ["encoder.positional_embedding"]
    stages += [f"encoder.blocks.{i}" for i in range(spec.encoder.n_layer)] + ["features"]
    assert set(stages) <= set(got), f"graph lacks taps {set(stages) - set(got)}"
    for stage in stages:
        rel = record_parity(name, stage, got[stage], want[stage].numpy())
        assert rel <= REL_TOL, f"{name} {stage}: relative error {rel:.2e} > {REL_TOL}"


def test_cross_attention_kv(parity_case):
    name, spec, ref, compiled, mel, _ = parity_case
    features, cross_k, cross_v = (o.to_numpy() for o in compiled.encode(mel)[:3])
    x = torch.from_numpy(features)
    with torch.no_grad():
        for i, block in enumerate(ref.decoder.blocks):
            for kind, got in (("key", cross_k[i]), ("value", cross_v[i])):
                want = getattr(block.cross_attn, kind)(x).numpy()
                rel = record_parity(name, f"decoder.blocks.{i}.cross_attn.{kind}", got, want)
                assert rel <= REL_TOL, f"{name} block {i} cross {kind}: {rel:.2e}"


def test_decoder_every_block_and_logits(parity_case):
    name, spec, ref, compiled, mel, tokens = parity_case
    _, ck, cv = compiled.encode(mel)[:3]
    logits, _, taps = compiled.decode(tokens, compiled.start(ck, cv))
    got = dict(zip(compiled.decoder_outputs, [logits] + [None, None] + [t.to_numpy() for t in taps]))
    with torch.no_grad():
        features = ref.encoder(torch.from_numpy(mel))
        want = reference_decoder_stages(ref, torch.from_numpy(tokens), features)
    stages = [f"decoder.blocks.{i}" for i in range(spec.decoder.n_layer)] + ["logits"]
    for stage in stages:
        rel = record_parity(name, stage, got[stage], want[stage].numpy())
        assert rel <= REL_TOL, f"{name} {stage}: relative error {rel:.2e} > {REL_TOL}"


def test_alignment_head_scores(parity_case):
    """The cross-attention scores that word timestamps align with: the spec's alignment
    heads, scaled and before softmax, as openai-whisper's hooks see them."""
    from whisper.model import disable_sdpa

    from maxwhisper.builder import alignment_heads

    name, spec, ref, compiled, mel, tokens = parity_case
    _, ck, cv = compiled.encode(mel)[:3]
    _, _, taps = compiled.decode(tokens, compiled.start(ck, cv))
    got = taps[compiled.decoder_outputs.index("alignment_qk") - 3].to_numpy()
    qks, hooks = {}, [block.cross_attn.register_forward_hook(
        lambda m, inp, out, i=i: qks.__setitem__(i, out[1])) for i, block in enumerate(ref.decoder.blocks)]
    try:
        with torch.no_grad(), disable_sdpa():
            ref.decoder(torch.from_numpy(tokens), ref.encoder(torch.from_numpy(mel)))
    finally:
        for h in hooks:
            h.remove()
    heads = sorted(alignment_heads(spec))
    want = np.stack([qks[layer][:, head].numpy() for layer, head in heads], axis=1)
    assert got.shape == want.shape
    rel = record_parity(name, "alignment heads cross-attn scores", got, want)
    assert rel <= REL_TOL, f"{name} alignment scores: relative error {rel:.2e} > {REL_TOL}"


def test_rows_reorder_and_drop_inside_the_step(parity_case):
    """A step's row order picks which cache row each output row continues: reversing,
    repeating or dropping rows gives the logits of those rows, bit for bit while two or
    more rows remain; one row alone takes the CPU's matrix-vector kernel (builder._matmul),
    which sums in another order."""
    name, spec, ref, compiled, mel, tokens = parity_case
    _, ck, cv = compiled.encode(mel)[:3]
    _, state, _ = compiled.decode(tokens[:, :6], compiled.start(ck, cv))
    want, _, _ = compiled.decode(tokens[:, 6:7], state)
    for order in ([1, 0], [0, 0, 1], [1]):
        got, new, _ = compiled.decode(tokens[order, 6:7], compiled.windows(state, order), order=order)
        if len(order) > 1 or compiled.device_name != "cpu":
            np.testing.assert_array_equal(got, want[order])
        else:
            np.testing.assert_allclose(got, want[order], rtol=0, atol=1e-5 * np.abs(want).max())
        assert new.self_k.shape[1] == len(order)
    # The cache rows move with their rows, whole, and the new token's K/V go after them.
    _, stepped, _ = compiled.decode(tokens[:, 6:8], state)
    order = [1, 0, 0]
    _, grown, _ = compiled.decode(tokens[order, 8:9], compiled.windows(stepped, order), order=order)
    _, plain, _ = compiled.decode(tokens[:, 8:9], stepped)
    for old, new, last in ((stepped.self_k, grown.self_k, plain.self_k), (stepped.self_v, grown.self_v, plain.self_v)):
        old, new, last = old.to_numpy(), new.to_numpy(), last.to_numpy()
        assert new.shape == (old.shape[0], 3, 3, old.shape[3])
        np.testing.assert_array_equal(new[:, :, :2], old[:, order])
        np.testing.assert_array_equal(new[:, :, 2], last[:, order, 2])
    with pytest.raises(ValueError, match="order must be"):
        compiled.decode(tokens[:, 6:7], state, order=[0, 2])


def test_a_windows_rows_share_its_cross_kv(parity_case):
    """Beams: W windows' cross K/V serve B = W x group rows, grouped by window, and give
    the logits (and alignment scores) of each row with its own copy, and openai-whisper's."""
    name, spec, ref, compiled, mel, tokens = parity_case
    _, ck, cv = compiled.encode(mel)[:3]
    _, state, _ = compiled.decode(tokens[:, :6], compiled.start(ck, cv))
    order = np.array([0, 0, 0, 1, 1, 1])
    nxt = np.random.default_rng(2).integers(0, spec.vocab.n_vocab, size=(6, 1))
    got, _, got_taps = compiled.decode(nxt, state, order=order)
    want, _, want_taps = compiled.decode(nxt, compiled.windows(state, order), order=order)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    qk = compiled.decoder_outputs.index("alignment_qk") - 3
    np.testing.assert_allclose(got_taps[qk].to_numpy(), want_taps[qk].to_numpy(), rtol=0,
                               atol=1e-5 * np.abs(want_taps[qk].to_numpy()).max())
    with torch.no_grad():
        features = ref.encoder(torch.from_numpy(mel))[torch.from_numpy(order)]
        seqs = torch.from_numpy(np.concatenate([tokens[order, :6], nxt], axis=1))
        ref_logits = ref.decoder(seqs, features)[:, -1].numpy()
    assert float(np.max(np.abs(got[:, 0] - ref_logits)) / np.max(np.abs(ref_logits))) <= REL_TOL
    with pytest.raises(ValueError, match="a multiple of the 2 windows' cross K/V rows"):
        compiled.decode(nxt[:5], state, order=order[:5])


def test_logits_at_chosen_positions(parity_case):
    """A prompt pass asks for logits at a few positions only (no-speech at
    <|startoftranscript|>, the next token at the end): they equal those rows of the full
    logits, and the cache grows by all tokens alike."""
    name, spec, ref, compiled, mel, tokens = parity_case
    _, ck, cv = compiled.encode(mel)[:3]
    full, full_state, _ = compiled.decode(tokens, compiled.start(ck, cv))
    got, state, _ = compiled.decode(tokens, compiled.start(ck, cv), logits_at=[3, -1, 0])
    assert got.shape == (tokens.shape[0], 3, spec.vocab.n_vocab)
    np.testing.assert_allclose(got, full[:, [3, -1, 0]], rtol=0, atol=1e-5 * np.abs(full).max())
    np.testing.assert_array_equal(state.prefix_k.to_numpy(), full_state.prefix_k.to_numpy())
    with pytest.raises(ValueError, match=r"logits_at must be positions of the 12 new tokens, found \[12\]"):
        compiled.decode(tokens, compiled.start(ck, cv), logits_at=[12])


@pytest.mark.parametrize("split", [[12], [4, 1, 1, 6], [1] * 12])
def test_kv_cache_incremental_equals_full(parity_case, split):
    """Feeding tokens in pieces through the cache gives the full forward's logits."""
    name, spec, ref, compiled, mel, tokens = parity_case
    _, ck, cv = compiled.encode(mel)[:3]
    full, _, _ = compiled.decode(tokens, compiled.start(ck, cv))
    state, pieces, at = compiled.start(ck, cv), [], 0
    for n in split:
        logits, state, _ = compiled.decode(tokens[:, at: at + n], state)
        pieces.append(logits)
        at += n
    assert state.length == tokens.shape[1]
    assert state.prefix_k.shape[2] == split[0] and state.self_k.shape[2] == tokens.shape[1] - split[0]
    inc = np.concatenate(pieces, axis=1)
    rel = float(np.max(np.abs(inc - full)) / np.max(np.abs(full)))
    assert rel <= REL_TOL, f"{name} split {split}: incremental differs from full by {rel:.2e}"
    with torch.no_grad():
        want = ref.decoder(torch.from_numpy(tokens), ref.encoder(torch.from_numpy(mel))).numpy()
    assert float(np.max(np.abs(inc - want)) / np.max(np.abs(want))) <= REL_TOL


def test_decode_refuses_overflowing_context(parity_case):
    name, spec, ref, compiled, mel, tokens = parity_case
    _, ck, cv = compiled.encode(mel[:1])[:3]
    too_long = np.zeros((1, spec.decoder.n_ctx + 1), dtype=np.int64)
    with pytest.raises(ValueError, match="exceed the text context"):
        compiled.decode(too_long, compiled.start(ck, cv))
    with pytest.raises(ValueError, match="token ids must lie in"):
        compiled.decode(np.array([[spec.vocab.n_vocab]]), compiled.start(ck, cv))


@pytest.mark.parametrize("name", ["small", "large-v3-turbo"])
def test_deep_variants_layer_by_layer(name):
    """small (12 + 12 layers) and large-v3-turbo (32 + 4 layers, 128 mels, 51866 tokens)
    with openai-whisper's random weights: every encoder block, cross K/V, every decoder
    block, the logits and the alignment scores, at the same tolerance. One window, a
    few tokens: the depth is what is checked."""
    from whisper.model import disable_sdpa

    from maxwhisper.builder import alignment_heads
    from maxwhisper.runtime import CompiledWhisper

    spec, ref = get_spec(name), reference_model(get_spec(name))
    compiled = CompiledWhisper(spec, {k: v.numpy() for k, v in ref.state_dict().items()}, device="cpu", taps=True)
    rng = np.random.default_rng(3)
    mel = rng.standard_normal((1, spec.audio.n_mels, spec.audio.n_frames)).astype(np.float32)
    tokens = rng.integers(0, spec.vocab.n_vocab, size=(1, 5))
    enc = dict(zip(compiled.encoder_outputs, (o.to_numpy() for o in compiled.encode(mel))))
    qks, hooks = {}, [block.cross_attn.register_forward_hook(
        lambda m, inp, out, i=i: qks.__setitem__(i, out[1])) for i, block in enumerate(ref.decoder.blocks)]
    try:
        with torch.no_grad(), disable_sdpa():
            want = reference_encoder_stages(ref, torch.from_numpy(mel))
            features = want["features"]
            want |= reference_decoder_stages(ref, torch.from_numpy(tokens), features)
            for i, block in enumerate(ref.decoder.blocks):
                want[f"cross_k.{i}"], want[f"cross_v.{i}"] = block.cross_attn.key(features), block.cross_attn.value(features)
    finally:
        for h in hooks:
            h.remove()
    ck, cv = enc["cross_k"], enc["cross_v"]
    got = {**enc, **{f"cross_k.{i}": ck[i] for i in range(len(ck))}, **{f"cross_v.{i}": cv[i] for i in range(len(cv))}}
    logits, _, taps = compiled.decode(tokens, compiled.start(*compiled.encode(mel)[1:3]))
    got |= dict(zip(compiled.decoder_outputs, [logits, None, None] + [t.to_numpy() for t in taps]))
    heads = sorted(alignment_heads(spec))
    want["alignment_qk"] = torch.from_numpy(np.stack([qks[l][:, h].numpy() for l, h in heads], axis=1))
    stages = ([f"encoder.blocks.{i}" for i in range(spec.encoder.n_layer)] + ["features"]
              + [f"cross_{kv}.{i}" for i in range(spec.decoder.n_layer) for kv in "kv"]
              + [f"decoder.blocks.{i}" for i in range(spec.decoder.n_layer)] + ["logits", "alignment_qk"])
    for stage in stages:
        rel = record_parity(name, stage, got[stage], want[stage].numpy())
        assert rel <= REL_TOL, f"{name} {stage}: relative error {rel:.2e} > {REL_TOL}"
