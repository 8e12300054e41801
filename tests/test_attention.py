"""Attention kernels: 'unfused' (matmuls and a softmax, any device; the default) and
'fused' (MAX's flash-attention kernel, which has no CPU implementation).

On the CPU: the refusals, and that every fused graph builds for a GPU with one kernel
per attention (MAX checks each op's operands as the graph is built; only compiling
needs the GPU). On a GPU: the fused model against the unfused one and against
openai-whisper, stage by stage."""

import re

import numpy as np
import pytest
from max.driver import accelerator_count
from max.graph import DeviceRef, Module

from helpers import SMALL_VARIANT, get_spec, reference_model
from maxwhisper.builder import ATTENTION, GraphOptions, check_attention, decoder_graph, encoder_graph
from maxwhisper.loop import greedy_graph
from maxwhisper.precision import PRECISIONS
from maxwhisper.runtime import CompiledWhisper
from maxwhisper.spec import parse_spec

FLASH, MASKED = "mo.mha.no_cache", "mo.composite.masked_flash_attention_gpu"


def test_unknown_attention_is_refused():
    with pytest.raises(ValueError, match="attention must be one of 'unfused', 'fused', found 'flash'"):
        check_attention("flash", DeviceRef.CPU())


def test_fused_attention_is_refused_on_the_cpu():
    with pytest.raises(ValueError, match="attention 'fused' runs on a GPU only"):
        CompiledWhisper(get_spec("micro-2dec"), {}, device="cpu", attention="fused")


def _built(build, options: GraphOptions) -> str:
    """The MLIR text of a module holding the graph `build(options, module)` makes, and
    its block subgraphs."""
    module = Module()
    build(options, module)
    return str(module.mlir_module)


def _kernels(text: str) -> tuple[int, int, int]:
    """(unmasked flash kernels, masked ones, block calls) in a module's text."""
    return tuple(len(re.findall(re.escape(op), text)) for op in (FLASH, MASKED, "mo.call"))


@pytest.mark.parametrize("precision", ["bfloat16", "float32"])
def test_gpu_graphs_build_on_the_cpu(precision):
    spec = get_spec("tiny.en")
    enc, dec = spec.encoder.n_layer, spec.decoder.n_layer
    fused, unfused = (GraphOptions(PRECISIONS[precision], DeviceRef.GPU(), a) for a in ("fused", "unfused"))
    encoder = lambda o, m: encoder_graph(spec, o, m)
    step = lambda o, m: decoder_graph(spec, o, module=m)
    aligner = lambda o, m: decoder_graph(spec, o, alignment=True, module=m)
    loop = lambda o, m: greedy_graph(spec, 50256, 50363, o, m)
    # One block subgraph holds the kernels, called once per layer. Encoder
    # self-attention unmasked; in the decoder step, cross-attention unmasked (its
    # self-attention takes one softmax over the prefix and the cache, which the kernel
    # cannot). The device loop inlines its layers, their self-attention masked.
    assert _kernels(_built(encoder, fused)) == (1, 0, enc)
    assert _kernels(_built(step, fused)) == (1, 0, dec)
    assert _kernels(_built(aligner, fused)) == (1, 0, dec)
    assert _kernels(_built(loop, fused)) == (dec, dec, 0)
    # The GPU's unfused graphs build too, kernel-free, and without the CPU's single-row
    # choice (builder._matmul's `ops.cond`, an `mo.if`): the step's one `mo.if` is the
    # empty prefix's (builder._attention_after_prefix).
    assert _kernels(_built(encoder, unfused)) == (0, 0, enc)
    assert _kernels(_built(step, unfused)) == (0, 0, dec) and _built(step, unfused).count("mo.if") == 1
    assert _kernels(_built(loop, unfused)) == (0, 0, 0)
    assert _built(step, GraphOptions(PRECISIONS[precision])).count("mo.if") > 1


# --- on a GPU ---------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(accelerator_count() == 0,
                               reason="needs a GPU: MAX's flash-attention kernel has no CPU implementation")
# A small variant with heads 64 wide, as in every Whisper size (the widths the GPU
# kernel is built for), and few layers: each GPU graph compiles cold in minutes.
HEADS_64 = {**SMALL_VARIANT, "name": "micro-heads64",
            "encoder": {**SMALL_VARIANT["encoder"], "n_state": 128, "n_head": 2},
            "decoder": {**SMALL_VARIANT["decoder"], "n_state": 128, "n_head": 2}}
EOT, SOT, NO_TIMESTAMPS, TIMESTAMP_BEGIN = 50256, 50257, 50362, 50363  # English-only ids


@pytest.fixture(scope="module")
def gpu_models():
    """HEADS_64 with openai-whisper's seeded random weights, its PyTorch reference, and
    our model on the GPU for each (dtype, attention)."""
    spec = parse_spec(HEADS_64, "<tests/test_attention.py>")
    ref = reference_model(spec)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    return ref, {(d, a): CompiledWhisper(spec, sd, device="gpu", precision=d, attention=a)
                 for d in ("float32", "bfloat16") for a in ATTENTION}


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_attention_matches_unfused_and_openai_whisper_on_the_gpu(gpu_models, dtype):
    import torch

    ref, models = gpu_models
    rng = np.random.default_rng(0)
    mel = rng.standard_normal((2, 80, 3000)).astype(np.float32)
    tokens = rng.integers(0, EOT, (2, 6)).astype(np.int64)
    with torch.no_grad():
        want = ref.decoder(torch.from_numpy(tokens), ref.encoder(torch.from_numpy(mel))).numpy()
    errors = {}
    for a in ATTENTION:
        rt = models[dtype, a]
        _, ck, cv = rt.encode(mel)[:3]
        # A prompt pass (five tokens: the causal mask), then one step over the cache.
        logits, state, _ = rt.decode(tokens[:, :-1], rt.start(ck, cv))
        step, _, _ = rt.decode(tokens[:, -1:], state)
        errors[a] = max(_rel(logits, want[:, :-1]), _rel(step[:, 0], want[:, -1]))
    # The same class of rounding: a mask applied wrongly or heads mixed up err by the
    # size of the logits, far above either kernel's rounding.
    assert errors["fused"] <= 2 * errors["unfused"] + 1e-5, errors


@needs_gpu
def test_fused_device_loop_emits_the_unfused_tokens_on_the_gpu(gpu_models):
    _, models = gpu_models
    mel = np.random.default_rng(1).standard_normal((2, 80, 3000)).astype(np.float32)
    prompt = np.array([[SOT, NO_TIMESTAMPS]] * 2, np.int64)
    out = {}
    for a in ATTENTION:
        rt = models["float32", a]
        _, ck, cv = rt.encode(mel)[:3]
        logits, state, _ = rt.decode(prompt, rt.start(ck, cv), logits_at=[-1])
        never = np.zeros(logits.shape[-1], np.float32)
        never[EOT] = -np.inf  # every row runs all 64 steps
        out[a] = rt.greedy(logits[:, -1], state, never, np.zeros_like(never), 64, EOT, TIMESTAMP_BEGIN)
    assert out["fused"][0].shape == (2, 64)
    np.testing.assert_array_equal(out["fused"][0], out["unfused"][0])
    # Random weights repeat a token or two; the summed log-probabilities read every
    # step's whole distribution, which the attention over the cache shapes.
    np.testing.assert_allclose(out["fused"][1], out["unfused"][1], rtol=1e-4)
