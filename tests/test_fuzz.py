"""Property-based fuzzing: whatever bytes, values and shapes come in, the readers and
checks answer with the project's own error types (messages naming the input), never
with an exception from deep inside. Each property runs a fixed number of examples."""

from __future__ import annotations

import io
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis", reason="fuzzing needs hypothesis: pip install -e '.[test]'")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from maxwhisper.audio import AudioError, AudioFile, Spectrogram, prepare  # noqa: E402
from maxwhisper.convert import ctranslate2  # noqa: E402
from maxwhisper.spec import SpecError, load_spec, parse_spec  # noqa: E402
from maxwhisper.transcribe import TranscribeOptions  # noqa: E402
from maxwhisper.weights import WeightsError, load_weights  # noqa: E402
from maxwhisper.writers import FORMATS, to_json, to_srt, to_tsv, to_txt, to_vtt  # noqa: E402

MICRO = Path(__file__).parent / "data" / "specs" / "micro-2dec.yaml"
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                    st.text(max_size=12))
plain = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                     max_leaves=20)


def _write(data: bytes, name: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix="maxwhisper-fuzz-"))
    (d / name).write_bytes(data)
    return d / name


# Specs

@FUZZ
@given(plain)
def test_spec_parser_takes_any_data(data):
    try:
        parse_spec(data, "fuzz.yaml")
    except SpecError as e:
        assert str(e).startswith("fuzz.yaml") or "fuzz.yaml" in str(e)


def _leaves(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, (*path, i))
    yield path


@FUZZ
@given(st.data())
def test_spec_parser_takes_any_value_at_any_key(data):
    """The micro spec with one value (at any depth) replaced by anything."""
    spec = yaml.safe_load(MICRO.read_text())
    paths = [p for p in _leaves(spec) if p]
    path = data.draw(st.sampled_from(paths))
    node = spec
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = data.draw(plain)
    try:
        parse_spec(spec, "fuzz.yaml")
    except SpecError as e:
        assert "fuzz.yaml" in str(e)


@FUZZ
@given(st.binary(max_size=400) | st.text(max_size=400).map(str.encode))
def test_spec_files_of_any_bytes(raw):
    path = _write(raw, "fuzz.yaml")
    try:
        load_spec(path)
    except SpecError as e:
        assert str(path) in str(e)


# Checkpoints

@FUZZ
@given(st.binary(max_size=300))
def test_safetensors_reader_takes_any_bytes(raw):
    path = _write(raw, "w.safetensors")
    with pytest.raises(WeightsError, match="w.safetensors"):
        load_weights(path, load_spec(MICRO))


@FUZZ
@given(st.dictionaries(st.text(max_size=20), st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "I8", "BF16", "X"]),
    "shape": st.lists(st.integers(0, 6), max_size=3),
    "data_offsets": st.lists(st.integers(0, 64), min_size=2, max_size=2)}), max_size=3), st.binary(max_size=64))
def test_safetensors_reader_takes_any_header(header, body):
    import json

    text = json.dumps(header).encode()
    path = _write(struct.pack("<Q", len(text)) + text + body, "w.safetensors")
    with pytest.raises(WeightsError, match="w.safetensors"):
        load_weights(path, load_spec(MICRO))


def _ct2_str(s: bytes) -> bytes:
    return struct.pack("<H", len(s) + 1) + s + b"\0"


ct2_variables = st.lists(st.tuples(st.binary(max_size=12), st.lists(st.integers(0, 5), max_size=3),
                                   st.integers(0, 6), st.integers(0, 40)), max_size=3)


@FUZZ
@given(ct2_variables, st.binary(max_size=40), st.booleans())
def test_ctranslate2_reader_takes_any_container(variables, tail, whisper):
    """Well-formed framing with any names, shapes, dtype ids and byte counts, then any tail."""
    raw = struct.pack("<I", 6) + _ct2_str(b"WhisperSpec" if whisper else b"Other") + struct.pack("<I", 1)
    raw += struct.pack("<I", len(variables))
    for name, shape, dtype, n in variables:
        raw += _ct2_str(name) + struct.pack("<B", len(shape)) + b"".join(struct.pack("<I", d) for d in shape)
        raw += struct.pack("<B", dtype) + struct.pack("<I", n) + bytes(n)
    raw += struct.pack("<I", 0) + tail
    path = _write(raw, "model.bin")
    with pytest.raises(WeightsError, match="model.bin"):
        ctranslate2.read(path, load_spec(MICRO))


@FUZZ
@given(st.binary(max_size=200))
def test_ctranslate2_reader_takes_any_bytes(raw):
    with pytest.raises(WeightsError, match="model.bin"):
        ctranslate2.read(_write(raw, "model.bin"), load_spec(MICRO))


# Audio

def _wav_header(rate: int, channels: int, bits: int, fmt: int, n_bytes: int) -> bytes:
    block = channels * max(bits // 8, 1)
    return (b"RIFF" + struct.pack("<I", 36 + n_bytes) + b"WAVEfmt " + struct.pack("<I", 16)
            + struct.pack("<HHIIHH", fmt, channels, rate, rate * block, block, bits)
            + b"data" + struct.pack("<I", n_bytes))


@FUZZ
@given(st.binary(max_size=300) | st.builds(lambda h, b: h + b, st.builds(
    _wav_header, st.integers(0, 200_000), st.integers(0, 40), st.sampled_from([0, 1, 8, 16, 24, 32, 64]),
    st.sampled_from([0, 1, 3, 6, 0xFFFE]), st.integers(0, 4000)), st.binary(max_size=400)))
def test_audio_files_of_any_bytes(raw):
    """Random bytes and random WAV headers: read into a spectrogram or refused by name."""
    path = _write(raw, "clip.wav")
    spec = load_spec("tiny.en").audio
    try:
        s = Spectrogram(AudioFile(path, 16000), spec)
    except AudioError as e:
        assert str(path) in str(e)
    else:
        mel = s.mel(0, min(spec.n_frames, max(s.content_frames, 0)))
        assert mel.dtype == np.float32 and np.isfinite(mel).all()


@FUZZ
@given(hnp.arrays(st.sampled_from([np.float16, np.float32, np.float64, np.int16, np.int32, np.uint8, np.bool_,
                                   np.complex64]),
                  hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=40),
                  elements=None), st.sampled_from([8000, 16000, 44100]))
def test_audio_arrays_of_any_shape_and_dtype(a, rate):
    try:
        out = prepare(a, rate, 16000)
    except AudioError as e:
        assert str(e).startswith("<array>")
    else:
        assert out.dtype == np.float32 and out.ndim == 1 and out.size and np.isfinite(out).all()
        assert np.abs(out).max() <= 2.5


# Writers

segment = st.builds(lambda start, length, text: dict(start=start, end=start + length, text=text),
                    st.floats(0, 40_000), st.floats(0, 100), st.text(max_size=40))


@FUZZ
@given(st.lists(segment, max_size=8))
def test_writers_take_any_text_and_times(segments):
    import srt
    import webvtt

    result = dict(text="".join(s["text"] for s in segments), segments=segments, language="en")
    for fmt, write in zip(FORMATS, (to_txt, to_json, to_srt, to_vtt, to_tsv)):
        assert isinstance(write(result), str), fmt
    spoken = [s["text"].strip().replace("-->", "->") for s in segments if s["text"].strip()]
    cues = list(srt.parse(to_srt(result)))
    assert len(cues) == len(spoken)
    assert all(c.start <= c.end for c in cues)
    assert len(webvtt.from_buffer(io.StringIO(to_vtt(result)))) == len(spoken) or not all(
        "\n" not in t for t in spoken)


# Options

option_values = st.one_of(scalars, st.lists(st.floats(allow_nan=True), max_size=3).map(tuple))
option_names = st.sampled_from(["language", "task", "temperature", "beam_size", "best_of", "patience",
                                "length_penalty", "compression_ratio_threshold", "logprob_threshold",
                                "no_speech_threshold", "condition_on_previous_text", "initial_prompt",
                                "without_timestamps", "suppress_tokens", "word_timestamps", "silence_threshold_db",
                                "not_an_option"])


@FUZZ
@given(st.dictionaries(option_names, option_values, max_size=3))
def test_options_take_any_values(overrides):
    try:
        TranscribeOptions.of(None, **overrides)
    except ValueError as e:
        assert any(name in str(e) for name in overrides) or "temperature" in str(e) or "beam" in str(e) \
            or "best_of" in str(e) or "patience" in str(e)


_REALTIME_KEYS = st.sampled_from(["type", "rate", "language", "model", "threshold", "silence_duration_ms", "prompt"])


_inputs = st.dictionaries(st.sampled_from(["format", "transcription", "turn_detection", "noise_reduction"]),
                          st.one_of(st.dictionaries(_REALTIME_KEYS, plain, max_size=4), plain), max_size=4)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.builds(lambda i: {"type": "transcription", "audio": {"input": i}}, _inputs), plain))
def test_realtime_session_updates_take_any_data(session):
    """A Realtime client's `session.update` of any shape is taken or answered with an
    error naming its field, never an exception from inside."""
    from maxwhisper.server.realtime import _BadEvent, _Session

    try:
        updated = _Session().updated(session, ("en",), False)
    except _BadEvent as e:
        assert e.message and (e.param is None or e.param.startswith("session"))
    else:
        assert updated.describe("sess")["type"] == "transcription"
