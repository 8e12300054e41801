"""Checkpoints are checked against the manifest by name, shape and dtype; converters too."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

from helpers import SMALL_VARIANT, reference_model
from maxwhisper.convert import convert
from maxwhisper.cli import main
from maxwhisper.manifest import manifest
from maxwhisper.spec import parse_spec
from maxwhisper.weights import WeightsError, load_weights, read_metadata, save_weights, sinusoids

SPEC = parse_spec(SMALL_VARIANT, "micro")


def random_tensors(spec, dtype=np.float16):
    rng = np.random.default_rng(0)
    return {k: rng.standard_normal(v.shape).astype(dtype) for k, v in manifest(spec).items()}


def test_round_trip_keeps_names_values_and_dtype(tmp_path):
    tensors = random_tensors(SPEC)
    path = save_weights(tmp_path / "w.safetensors", tensors, SPEC, "test")
    loaded = load_weights(path, SPEC)
    assert loaded.keys() == tensors.keys()
    for k in tensors:
        assert loaded[k].dtype == np.float16
        np.testing.assert_array_equal(loaded[k], tensors[k])
    assert read_metadata(path)["maxwhisper.spec"] == "micro-2dec"


def test_positional_table_is_derived_when_absent(tmp_path):
    tensors = random_tensors(SPEC)
    del tensors["encoder.positional_embedding"]
    loaded = load_weights(save_weights(tmp_path / "w.safetensors", tensors, SPEC, "test"), SPEC)
    np.testing.assert_allclose(loaded["encoder.positional_embedding"], sinusoids(1500, 64))


def test_sinusoids_equal_openai_whisper():
    pytest.importorskip("torch", reason="needs the PyTorch reference")
    from whisper.model import sinusoids as ref

    # openai-whisper rounds the sin/cos arguments (up to 1500) to float32, whose spacing
    # there is 2**-13 = 1.2e-4: the two tables may differ by about that, and no more.
    np.testing.assert_allclose(sinusoids(1500, 384), ref(1500, 384).numpy(), rtol=0, atol=2 * 2.0**-13)
    # Near zero the arguments are exact in float32 too, so the tables agree tightly there.
    np.testing.assert_allclose(sinusoids(1500, 384)[:8], ref(1500, 384).numpy()[:8], rtol=0, atol=1e-6)


def _write_raw(tmp_path, tensors):
    p = tmp_path / "raw.safetensors"
    save_file(tensors, str(p))
    return p


def test_missing_tensor_is_named(tmp_path):
    t = random_tensors(SPEC)
    del t["decoder.blocks.1.mlp.2.bias"]
    with pytest.raises(WeightsError, match=r"missing tensor\(s\).*'decoder.blocks.1.mlp.2.bias'"):
        load_weights(_write_raw(tmp_path, t), SPEC)


def test_unexpected_tensor_is_named(tmp_path):
    t = random_tensors(SPEC)
    t["decoder.blocks.2.attn.query.weight"] = np.zeros((64, 64), np.float16)
    with pytest.raises(WeightsError, match=r"unexpected tensor\(s\).*'decoder.blocks.2.attn.query.weight'"):
        load_weights(_write_raw(tmp_path, t), SPEC)


def test_wrong_shape_names_expected_and_found(tmp_path):
    t = random_tensors(SPEC)
    t["encoder.conv1.weight"] = np.zeros((64, 80, 5), np.float16)
    with pytest.raises(WeightsError, match=r"'encoder.conv1.weight' has shape \(64, 80, 5\), spec 'micro-2dec' expects \(64, 80, 3\)"):
        load_weights(_write_raw(tmp_path, t), SPEC)


def test_wrong_dtype_is_refused(tmp_path):
    t = random_tensors(SPEC)
    t["decoder.ln.bias"] = np.zeros((64,), np.int32)
    with pytest.raises(WeightsError, match=r"'decoder.ln.bias' has dtype I32"):
        load_weights(_write_raw(tmp_path, t), SPEC)


def test_not_safetensors_and_missing_file(tmp_path):
    p = tmp_path / "junk.safetensors"
    p.write_bytes(b"definitely not a safetensors header")
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        load_weights(p, SPEC)
    with pytest.raises(WeightsError, match="weights file not found"):
        load_weights(tmp_path / "nope.safetensors", SPEC)
    import maxwhisper

    with pytest.raises(WeightsError, match="junk.safetensors: not a readable safetensors file"):
        maxwhisper.load_model(p)


# --- OpenAI .pt converter ---------------------------------------------------------

@pytest.fixture(scope="module")
def openai_checkpoint(tmp_path_factory):
    torch = pytest.importorskip("torch", reason="the .pt converter needs torch")
    model = reference_model(SPEC).half()
    path = tmp_path_factory.mktemp("pt") / "micro.pt"
    torch.save({"dims": SPEC.dims, "model_state_dict": model.state_dict()}, path)
    return path, model


def test_openai_pt_converts_exactly(openai_checkpoint, tmp_path):
    src, model = openai_checkpoint
    out = convert(src, SPEC, tmp_path / "micro.safetensors")
    loaded = load_weights(out, SPEC)
    sd = model.state_dict()
    assert loaded.keys() == sd.keys()
    for k, v in sd.items():
        np.testing.assert_array_equal(loaded[k], v.numpy())
    assert read_metadata(out)["maxwhisper.source_format"] == "openai"


def test_openai_pt_dims_must_match_spec(openai_checkpoint, tmp_path):
    src, _ = openai_checkpoint
    other = parse_spec({**SMALL_VARIANT, "decoder": {**SMALL_VARIANT["decoder"], "n_layer": 3}})
    with pytest.raises(WeightsError, match=r"dims disagree with spec 'micro-2dec' \(n_text_layer: spec 3, checkpoint 2\)"):
        convert(src, other, tmp_path / "x.safetensors")


def test_openai_pt_not_a_checkpoint(tmp_path):
    torch = pytest.importorskip("torch", reason="the .pt converter needs torch")
    p = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, p)
    with pytest.raises(WeightsError, match="not an OpenAI Whisper checkpoint"):
        convert(p, SPEC, tmp_path / "x.safetensors")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"nope")
    with pytest.raises(WeightsError, match="not a loadable PyTorch checkpoint"):
        convert(junk, SPEC, tmp_path / "x.safetensors")


def test_cli_convert(openai_checkpoint, tmp_path, capsys):
    src, _ = openai_checkpoint
    spec_file = tmp_path / "micro.yaml"
    import yaml
    spec_file.write_text(yaml.safe_dump(SMALL_VARIANT))
    out = tmp_path / "cli.safetensors"
    assert main(["convert", str(src), "--spec", str(spec_file), "--out", str(out)]) == 0
    assert out.exists() and f"wrote {out}" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "nope.pt"), "--spec", str(spec_file), "--out", str(out)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
