"""float16 and bfloat16: weights bound and activations run in the low precision (the GPU
default is bfloat16), checked on the CPU against float32 on real weights and speech."""

import numpy as np
import pytest

from helpers import PRECISION_ROWS, first_clip_mel, prompt_logits, prompt_tokens, real_model, speech_clips
from maxwhisper.precision import PRECISIONS, bfloat16_bits, resolve_precision

def test_bfloat16_rounding_equals_torch():
    import torch

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(-6, 6, 10000),
                        # exact ties between two bfloat16 values round to the even one
                        (np.arange(1, 200, dtype=np.uint32) << 16 | 0x8000).view(np.float32)])
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bfloat16_bits(x), want)


def test_precision_defaults_and_refusals():
    from max.dtype import DType

    assert resolve_precision(None, "cpu") == PRECISIONS["float32"]
    assert resolve_precision("auto", "gpu").dtype == DType.bfloat16
    assert resolve_precision("float16", "cpu").dtype == DType.float16
    with pytest.raises(ValueError, match="precision must be 'auto', 'float32', 'float16', 'bfloat16', 'q4_0', 'amx_bf16', "
                                         "'amx_q4_0', 'avx512_bf16', 'avx512_q4_0', found 'int8'"):
        resolve_precision("int8", "cpu")


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def low(request, model_cache):
    return real_model("tiny.en", request.param)


CLIP = sorted(speech_clips())[0]


def _openai_logits(model, dtype: str | None) -> np.ndarray:
    """openai-whisper on the same weights, in `dtype` with layer norms in float32 as
    its GPU half-precision path keeps them."""
    import torch

    from benchmarks import peers

    weights, spec, _ = peers.converted_weights("tiny.en")
    ref, _ = peers.openai_model(weights, spec)
    if dtype:
        ref = ref.to(getattr(torch, dtype))
        for m in ref.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.float()
    with torch.no_grad():
        mel = torch.from_numpy(first_clip_mel(spec)).to(next(ref.parameters()).dtype)
        out = ref.decoder(torch.tensor([prompt_tokens(model.tokenizer)]), ref.encoder(mel))
    return out.float().numpy()[0]


def _rel(got, want) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


# Spacing of representable numbers relative to magnitude (machine epsilon).
EPS = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}


def test_logits_as_close_to_float32_as_openai_whisper_in_the_same_dtype(low, tiny_en):
    """Our low-precision logits stray from float32 no more than (twice) openai-whisper's
    do in the same dtype, and pick float32's top token wherever float32's lead over the
    runner-up is wider than the low-precision logits can resolve (logits leave the graph
    in the model dtype, as openai-whisper's do: a bfloat16 logit near 11 has steps of 1/16)."""
    want = prompt_logits(tiny_en)
    got, theirs = prompt_logits(low), _openai_logits(low, low.precision)
    ours_err, theirs_err = _rel(got, want), _rel(theirs, _openai_logits(low, None))
    PRECISION_ROWS.append((low.precision, "prompt logits, rel. error vs float32",
                           f"ours {ours_err:.1e}, openai-whisper {theirs_err:.1e}"))
    top2 = np.sort(want, -1)[:, -2:]
    resolvable = top2[:, 1] - top2[:, 0] > 2 * EPS[low.precision] * np.abs(top2[:, 1])
    changed = np.argmax(got, -1) != np.argmax(want, -1)
    assert not np.any(changed & resolvable), f"top token changed at positions {np.flatnonzero(changed & resolvable)}"
    assert ours_err <= 2 * theirs_err, f"{low.precision}: ours {ours_err:.2e} vs openai-whisper's {theirs_err:.2e}"


def test_transcript_equals_float32(low, tiny_en):
    got = low.transcribe(CLIP, temperature=0.0)["text"].strip()
    want = tiny_en.transcribe(CLIP, temperature=0.0)["text"].strip()
    PRECISION_ROWS.append((low.precision, CLIP.rsplit("/", 1)[-1], "equal" if got == want else f"{got!r} vs {want!r}"))
    assert got == want
