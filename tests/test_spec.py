"""Spec loading: every built-in loads; every kind of bad spec is refused by file and key."""

from __future__ import annotations

import copy

import pytest
import yaml

from helpers import SMALL_VARIANT
from maxwhisper.cli import main
from maxwhisper.manifest import manifest, parameter_count
from maxwhisper.spec import SpecError, builtin_names, load_spec, parse_spec

EXPECTED = {"tiny", "tiny.en", "base", "base.en", "small", "small.en", "medium", "medium.en",
            "large-v2", "large-v3", "large-v3-turbo"}


def test_every_builtin_loads():
    assert EXPECTED <= set(builtin_names())
    for name in builtin_names():
        spec = load_spec(name)
        assert spec.name == name


def test_alignment_heads_and_decoder_shape_are_openai_whispers():
    """openai-whisper publishes each size's alignment heads as a boolean mask over the
    decoder's (layers x heads): every built-in spec's heads and decoder shape match it
    (the widths and vocabularies meet real checkpoints in the converter tests)."""
    import base64
    import gzip

    import numpy as np

    whisper = pytest.importorskip("whisper", reason="the published masks come with openai-whisper")
    for name in builtin_names():
        spec = load_spec(name)
        mask = np.frombuffer(gzip.decompress(base64.b85decode(whisper._ALIGNMENT_HEADS[name])), dtype=bool)
        assert mask.size == spec.decoder.n_layer * spec.decoder.n_head, name
        want = np.argwhere(mask.reshape(spec.decoder.n_layer, spec.decoder.n_head)).tolist()
        assert sorted(spec.alignment_heads) == sorted(want), name


def test_a_variant_file_holds_only_what_varies():
    """The shared structure comes from specs/defaults.yaml; a variant's file is short."""
    from maxwhisper.spec import specs_dir

    for name in builtin_names():
        lines = [l for l in (specs_dir() / f"{name}.yaml").read_text().splitlines() if not l.startswith("#")]
        assert len(lines) <= 7, (name, lines)
    assert not load_spec("tiny.en").vocab.multilingual and load_spec("tiny").vocab.multilingual
    assert load_spec("large-v3").audio.n_mels == 128 and load_spec("tiny").audio.n_mels == 80


def _write(tmp_path, data, name="bad.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def _mutate(path, value):
    data = copy.deepcopy(SMALL_VARIANT)
    *head, last = path
    d = data
    for k in head:
        d = d[k]
    if value is KeyError:
        del d[last]
    else:
        d[last] = value
    return data


@pytest.mark.parametrize("path,value,message", [
    (("encoder", "n_layrs"), 4, r"encoder: unknown key\(s\) \['n_layrs'\]"),
    (("decoder", "n_head"), KeyError, r"decoder.n_head: missing required key"),
    (("encoder", "n_state"), "384", r"encoder.n_state: expected int, found str"),
    (("encoder", "n_layer"), True, r"encoder.n_layer: expected int, found bool"),
    (("norm_eps",), "small", r"norm_eps: expected a number"),
    (("encoder", "stem"), {"name": "conv1"}, r"encoder.stem: expected a list"),
    (("encoder", "n_head"), 3, r"encoder.n_state: 64 is not divisible by encoder.n_head=3"),
    (("decoder", "n_layer"), 0, r"decoder.n_layer: must be positive, found 0"),
    (("encoder", "n_ctx"), 1000, r"encoder.n_ctx: the stem turns 3000 mel frames into 1500 positions"),
    (("decoder", "n_state"), 128, r"decoder.n_state: 128 differs from encoder.n_state=64"),
    (("decoder", "block"), ["self_attention", "mlp"], r"decoder.block: the decoder needs a cross_attention"),
    (("encoder", "block"), ["self_attention", "swiglu"], r"encoder.block\[1\]: unknown sublayer 'swiglu'"),
    (("vocab", "tokenizer"), "bpe", r"vocab.tokenizer: unknown tokenizer 'bpe'"),
    (("vocab", "multilingual"), True, r"vocab: unknown key\(s\) \['multilingual'\]"),
    (("decoder", "output"), "tied_embedding", r"decoder: unknown key\(s\) \['output'\]"),
    (("alignment_heads",), [[5, 0]], r"alignment_heads\[0\]: \[5, 0\] is not a \[layer, head\]"),
    (("norm_eps",), 0, r"norm_eps: must be positive"),
])
def test_bad_spec_names_file_and_key(tmp_path, path, value, message):
    p = _write(tmp_path, _mutate(path, value))
    with pytest.raises(SpecError, match=message) as e:
        load_spec(p)
    assert str(p) in str(e.value)


def test_stem_activation_must_be_known(tmp_path):
    data = copy.deepcopy(SMALL_VARIANT)
    data["encoder"]["stem"] = [{"name": "conv1", "kernel": 3, "stride": 1, "padding": 1, "activation": "gelu"},
                               {"name": "conv2", "kernel": 3, "stride": 2, "padding": 1, "activation": "relu6"}]
    with pytest.raises(SpecError, match=r"encoder.stem\[1\].activation: unknown activation 'relu6'"):
        load_spec(_write(tmp_path, data))


def test_not_yaml_and_not_a_mapping(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("encoder: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(p)
    p.write_text("- just a list")
    with pytest.raises(SpecError, match="top level: expected a mapping"):
        load_spec(p)


def test_unknown_name_lists_builtins():
    with pytest.raises(SpecError, match=r"unknown model spec 'tiny-en'.*'tiny.en'"):
        load_spec("tiny-en")
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec("missing/file.yaml")


def test_depth_is_data():
    """A 2-layer decoder variant needs no code: its manifest follows from the numbers."""
    spec = parse_spec(SMALL_VARIANT)
    names = manifest(spec)
    assert "decoder.blocks.1.cross_attn.query.weight" in names
    assert "decoder.blocks.2.attn.query.weight" not in names
    assert "encoder.blocks.1.attn.query.weight" not in names
    assert parameter_count(spec) > 0


def test_cli_spec_show_and_check(tmp_path, capsys):
    assert main(["spec", "show", "small"]) == 0
    out = capsys.readouterr().out
    assert "n_text_layer   12" in out and "parameters     240,582,912" in out
    assert main(["spec", "check", str(_write(tmp_path, SMALL_VARIANT, "ok.yaml"))]) == 0
    assert "ok (micro-2dec)" in capsys.readouterr().out
    bad = _write(tmp_path, _mutate(("encoder", "n_head"), 5))
    assert main(["spec", "check", str(bad)]) == 2
    assert "not divisible" in capsys.readouterr().err
