"""q4_0: the decoder's matrices in GGML's 4-bit blocks through MAX's CPU Q4_0 matmul,
everything else float32. Checked on real tiny.en weights and speech against float32."""

import numpy as np
import pytest

from helpers import PRECISION_ROWS, clips_wer, prompt_logits, real_model, speech_clips
from maxwhisper.precision import q4_0_blocks, quantized_matrices, resolve_precision
from maxwhisper.model import Whisper

gguf = pytest.importorskip("gguf", reason="q4_0 quantizes with the gguf package (a runtime dependency)")


def _dequantized(name, a):
    blocks = q4_0_blocks(name, a)
    return gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_0).reshape(blocks.shape[0], a.shape[1])


def test_blocks_keep_the_rows_and_pad_with_zeros():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((45, 64)).astype(np.float32)
    back = _dequantized("m", a)
    assert back.shape == (64, 64)  # rows padded up to a multiple of 32
    assert not back[45:].any()
    # Each block of 32 has 16 levels spaced max|x|/8 apart, -8..7 steps: rounding is off by
    # half a step at most, except the side opposite the largest value, clipped at 7 steps.
    step = np.abs(a).reshape(45, 2, 32).max(-1, keepdims=True) / 8
    err = np.abs(back[:45] - a).reshape(45, 2, 32) / step
    assert err.max() <= 1.01 and np.mean(err <= 0.51) > 0.95
    with pytest.raises(ValueError, match=r"decoder.x.weight: q4_0 needs the input width to be a multiple of 32, "
                                         r"found shape \(4, 40\)"):
        q4_0_blocks("decoder.x.weight", np.ones((4, 40), np.float32))


def test_only_the_decoders_per_token_matrices_are_quantized(tiny_en):
    names = set(quantized_matrices(tiny_en.spec))
    assert "decoder.token_embedding.weight" in names and "decoder.blocks.3.mlp.2.weight" in names
    assert not any(n.startswith("encoder.") or ".cross_attn.key." in n or ".cross_attn.value." in n for n in names)
    assert len(names) == 4 * 8 + 1  # per layer: self q/k/v/out, cross q/out, mlp 0/2; the logits


def test_q4_0_is_for_the_cpu():
    from max.dtype import DType

    q4 = resolve_precision("q4_0", "cpu")
    assert q4.quantized and q4.dtype == DType.float32
    with pytest.raises(ValueError, match="precision 'q4_0' runs on the CPU only"):
        resolve_precision("q4_0", "gpu")


@pytest.fixture(scope="module")
def q4(model_cache):
    return real_model("tiny.en", "q4_0")


def test_logits_equal_float32_on_the_dequantized_weights(q4, tiny_en):
    """The q4_0 graph computes what float32 computes on the same 4-bit weights, up to MAX
    quantizing each row of activations to 8 bits (GGML's Q8_0) inside the matmul: a
    wrong block order, row padding or vocabulary slice would be off by the logits' scale."""
    from benchmarks import peers
    from maxwhisper.registry import ensure_converted

    weights, spec, _ = peers.converted_weights("tiny.en")
    deq = {k: (_dequantized(k, v)[: v.shape[0]] if k in set(quantized_matrices(spec)) else v) for k, v in weights.items()}
    same_weights = Whisper(spec, deq, ensure_converted("tiny.en")[1], device="cpu", precision="float32")
    want, got, full = prompt_logits(same_weights), prompt_logits(q4), prompt_logits(tiny_en)
    err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    quant_err = float(np.linalg.norm(got - full) / np.linalg.norm(full))
    PRECISION_ROWS.append(("q4_0", "prompt logits, rel. error vs float32 on the same 4-bit weights / vs float32",
                           f"{err:.1e} / {quant_err:.1e}"))
    assert got.shape == want.shape
    # Measured: 3.7e-2 on the same weights, 2.2e-1 against float32. A misplaced block, row
    # or vocabulary column would put the error at the logits' own scale (about 1).
    assert err < 0.1, err
    assert err < quant_err / 3  # most of q4_0's departure from float32 is the 4-bit weights'


def test_transcripts_close_to_float32(q4, tiny_en):
    """4-bit weights may change words (as CTranslate2's int8 does); on clean speech the
    word error rate stays within 3 points of float32's."""

    rates = {"q4_0": clips_wer(q4), "float32": clips_wer(tiny_en)}
    PRECISION_ROWS.append(("q4_0", "WER on tests/data/speech (float32's)", f"{rates['q4_0']:.1%} ({rates['float32']:.1%})"))
    assert rates["q4_0"] <= rates["float32"] + 0.03, rates


def test_batched_windows_equal_one_by_one(q4):
    """MAX's Q4_0 matmul rounds activations to 8 bits per row, so a window's tokens do not
    depend on the other windows decoded with it."""
    clips = sorted(speech_clips())[:3]
    many = q4.transcribe_many(clips, batch_size=3)
    for path, got in zip(clips, many):
        want = q4.transcribe(path)
        assert [s["tokens"] for s in got["segments"]] == [s["tokens"] for s in want["segments"]], path
