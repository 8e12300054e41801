"""The manifest equals the reference model's state_dict, for every spec, without compiling."""

from __future__ import annotations

import pytest

from maxwhisper.manifest import manifest
from maxwhisper.spec import builtin_names, load_spec

torch = pytest.importorskip("torch", reason="needs the PyTorch reference: pip install -e '.[test]'")
wm = pytest.importorskip("whisper.model", reason="needs openai-whisper: pip install -e '.[test]'")


@pytest.mark.parametrize("name", builtin_names())
def test_manifest_equals_reference_state_dict(name):
    spec = load_spec(name)
    d = spec.dims
    # Meta tensors: shapes without memory, so large-v3 costs nothing. The encoder and
    # decoder are built apart because Whisper.__init__ makes a sparse tensor meta lacks.
    with torch.device("meta"):
        enc = wm.AudioEncoder(d["n_mels"], d["n_audio_ctx"], d["n_audio_state"], d["n_audio_head"], d["n_audio_layer"])
        dec = wm.TextDecoder(d["n_vocab"], d["n_text_ctx"], d["n_text_state"], d["n_text_head"], d["n_text_layer"])
    want = {f"encoder.{k}": tuple(v.shape) for k, v in enc.state_dict().items()}
    want |= {f"decoder.{k}": tuple(v.shape) for k, v in dec.state_dict().items()}
    got = {k: v.shape for k, v in manifest(spec).items()}
    assert got.keys() == want.keys(), f"missing {want.keys() - got.keys()}, extra {got.keys() - want.keys()}"
    assert got == want
