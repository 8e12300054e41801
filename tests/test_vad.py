"""Silero VAD as maxwhisper runs it: speech probabilities against faster-whisper's bundled
ONNX model through onnxruntime (tests only), speech timestamps against faster-whisper's,
options refused by name, and times mapped back from joined speech."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers import assert_prebuilt_is_built_now, joined, speech_clips
from maxwhisper import TranscribeOptions
from maxwhisper.spans import Timeline, parse_clip_timestamps
from maxwhisper.vad import CONTEXT, WINDOW, VadOptions, detector, speech_timestamps

RATE = 16000


def _fw_onnx() -> Path:
    fw = pytest.importorskip("faster_whisper", reason="the reference model ships with faster-whisper")
    return Path(fw.__file__).parent / "assets" / "silero_vad_v6.onnx"


@pytest.fixture(scope="module")
def reference():
    """Speech probabilities from the ONNX model, each window read with the 64 samples
    before it (zeros before the first), the state carried over the whole audio."""
    ort = pytest.importorskip("onnxruntime", reason="the VAD reference runs on onnxruntime")
    session = ort.InferenceSession(str(_fw_onnx()), providers=["CPUExecutionProvider"])

    def probs(audio: np.ndarray) -> np.ndarray:
        n = -(-audio.size // WINDOW)
        windows = np.zeros(n * WINDOW, np.float32)
        windows[: audio.size] = audio
        windows = windows.reshape(n, WINDOW)
        context = np.concatenate([np.zeros((1, CONTEXT), np.float32), windows[:-1, -CONTEXT:]])
        state = np.zeros((1, 1, 128), np.float32)
        return session.run(None, {"input": np.concatenate([context, windows], 1), "h": state, "c": state})[0]

    return probs


@pytest.fixture(scope="module")
def vad():
    return detector()


def _level(x: np.ndarray, dbfs: float) -> np.ndarray:
    return (x / np.sqrt(np.mean(x ** 2)) * 10 ** (dbfs / 20)).astype(np.float32)


def _signals() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    n = RATE * 20
    spectrum = np.fft.rfft(rng.standard_normal(n))
    spectrum[1:] /= np.sqrt(np.arange(1, spectrum.size))
    spectrum[0] = 0
    t = np.arange(n) / RATE
    speech, _ = joined(["01", "02", "03", "04", "05", "06"], gap_s=0.7)
    return {
        "speech": speech,
        "silence": np.zeros(n, np.float32),
        "white noise": _level(rng.standard_normal(n), -30),
        "pink noise": _level(np.fft.irfft(spectrum, n), -30),
        "tones": _level(np.sin(2 * np.pi * np.where((t // 2) % 2 == 0, 440.0, 1000.0) * t), -12),
        # Not a multiple of the window: the last window is zero-padded alike.
        "speech, odd length": speech[: RATE * 7 + 123],
    }


@pytest.mark.parametrize("name", list(_signals()))
def test_speech_probabilities_match_the_onnx_model(vad, reference, name):
    audio = _signals()[name]
    got, want = vad(audio), reference(audio)
    assert got.shape == want.shape == (-(-audio.size // WINDOW),)
    assert np.max(np.abs(got - want)) < 1e-4
    if name.startswith("speech"):  # the comparison covers speech, not only near-zero scores
        assert (want > 0.9).mean() > 0.3


def test_speech_timestamps_follow_faster_whispers_rules(vad):
    """The spans from our probabilities equal faster-whisper's (its own ONNX run), for
    options that exercise each rule: the silence that ends speech, dropped short speech,
    over-long speech split at a pause or cut, and padding."""
    fw_vad = pytest.importorskip("faster_whisper.vad", reason="the reference rules are faster-whisper's")
    pytest.importorskip("onnxruntime", reason="faster-whisper's VAD runs on onnxruntime")
    audio, _ = joined(["01", "02", "03", "04", "05", "06"], gap_s=0.6)
    audio = np.concatenate([np.zeros(RATE, np.float32), audio, 0.3 * audio[: RATE * 2]])
    probs = vad(audio)
    settings = [{}, dict(min_silence_duration_ms=300), dict(min_silence_duration_ms=100, speech_pad_ms=30),
                dict(max_speech_duration_s=5, min_silence_duration_ms=500),
                dict(max_speech_duration_s=2, min_silence_duration_ms=3000, speech_pad_ms=0),
                dict(threshold=0.8, neg_threshold=0.6, min_speech_duration_ms=1500, min_silence_duration_ms=200)]
    seen = set()
    for kw in settings:
        want = [(s["start"], s["end"]) for s in fw_vad.get_speech_timestamps(audio, fw_vad.VadOptions(**kw))]
        got = speech_timestamps(probs, audio.size, VadOptions(**kw))
        assert got == want, kw
        seen.add(len(got))
    assert len(seen) > 2  # the settings do cut the audio differently


@pytest.mark.parametrize("kw, message", [
    (dict(threshold=1.5), r"VadOptions.threshold must lie in \[0, 1\], found 1.5"),
    (dict(neg_threshold=-0.1), r"VadOptions.neg_threshold must lie in \[0, 1\]"),
    (dict(min_speech_duration_ms=-1), r"VadOptions.min_speech_duration_ms must be a duration >= 0, found -1"),
    (dict(min_silence_duration_ms=-5), r"VadOptions.min_silence_duration_ms must be a duration >= 0"),
    (dict(speech_pad_ms=-30), r"VadOptions.speech_pad_ms must be a duration >= 0"),
    (dict(max_speech_duration_s=-2.0), r"VadOptions.max_speech_duration_s must be a duration >= 0"),
    (dict(max_speech_duration_s=0), r"VadOptions.max_speech_duration_s must be above 0"),
])
def test_bad_vad_options_are_refused_by_name(kw, message):
    with pytest.raises(ValueError, match=message):
        VadOptions(**kw)
    with pytest.raises(ValueError, match=message):
        TranscribeOptions(vad_filter=True, vad_options=kw)


@pytest.mark.parametrize("clips, message", [
    ("5,x", r"clip_timestamps must be seconds as 'start,end,start,end,...', found '5,x'"),
    ("5,3", r"clip_timestamps run backwards: the end 3.0 is before the 5.0"),
    ([0, 10, 5, 20], r"clip_timestamps run backwards: the start 5.0 is before the 10.0"),
    ([1.0, -2.0], r"clip_timestamps must be finite seconds >= 0, found -2.0"),
    ("", r"clip_timestamps is empty"),
    (object(), r"clip_timestamps must be a 'start,end,...' string or a sequence of seconds"),
])
def test_bad_clip_timestamps_are_refused_by_name(clips, message):
    with pytest.raises(ValueError, match=message):
        TranscribeOptions(clip_timestamps=clips)


def test_other_bad_vad_settings_are_refused():
    with pytest.raises(ValueError, match="vad_filter must be True or False, found 'yes'"):
        TranscribeOptions(vad_filter="yes")
    with pytest.raises(ValueError, match="vad_options must be a maxwhisper.vad.VadOptions or a dict"):
        TranscribeOptions(vad_options=0.5)
    with pytest.raises(TypeError, match="treshold"):
        TranscribeOptions(vad_options={"treshold": 0.5})


def test_the_cli_refuses_bad_vad_options_before_loading_a_model(capsys):
    from maxwhisper.cli import main

    assert main(["transcribe", "missing.wav", "--vad", "--vad-threshold", "2", "--model", "no-such-model"]) == 2
    assert "VadOptions.threshold must lie in [0, 1], found 2.0" in capsys.readouterr().err
    assert main(["transcribe", "missing.wav", "--clip-timestamps", "4,2", "--model", "no-such-model"]) == 2
    assert "clip_timestamps run backwards" in capsys.readouterr().err


def test_clip_timestamps_parse_as_openai_whisper_reads_them():
    assert parse_clip_timestamps("0") == (0.0,)
    assert parse_clip_timestamps(" 1.5, 3 ,4") == (1.5, 3.0, 4.0)
    assert parse_clip_timestamps([2, 2.5]) == (2.0, 2.5)


def test_times_in_joined_parts_map_back_onto_the_original_timeline():
    line = Timeline(((16000, 32000), (80000, 96000)), RATE)  # 1-2 s and 5-6 s, joined as 0-2 s
    assert line.original(0.0) == 1.0
    assert line.original(0.5) == 1.5
    assert line.original(1.0) == 5.0  # a start on the join: the second span
    assert line.original(1.0, is_end=True) == 2.0  # an end on the join: the first span
    assert line.original(1.25, is_end=True) == 5.25
    assert line.original(3.0, is_end=True) == 6.0  # past the end: clamped to the last span
    result = {"segments": [{"seek": 0, "start": 0.2, "end": 1.0, "text": " a",
                            "words": [{"word": " a", "start": 0.2, "end": 1.0}]},
                           {"seek": 0, "start": 1.0, "end": 1.6, "text": " b",
                            "words": [{"word": " b", "start": 1.1, "end": 1.6}]}]}
    line.restore(result, hop_length=160)
    assert [(s["start"], s["end"], s["seek"]) for s in result["segments"]] == [(1.2, 2.0, 100), (5.0, 5.6, 100)]
    assert [(w["start"], w["end"]) for s in result["segments"] for w in s["words"]] == [(1.2, 2.0), (5.1, 5.6)]


def test_speech_is_cut_into_chunks_at_pauses():
    from maxwhisper.spans import _chunks

    r = RATE
    # 100.75 s of speech in four spans; pauses inside them of 0.2 s (at 24 s and 49 s)
    # and 0.6 s (at 44 s).
    speech = [(0, 30 * r), (31 * r, 60 * r), (62 * r, 80 * r), (80 * r + 4000, 104 * r)]
    pauses = sorted([(30 * r, 31 * r, r), (60 * r, 62 * r, 2 * r), (80 * r, 80 * r + 4000, 4000),
                     (24 * r, 24 * r, r // 5), (44 * r, 44 * r, 3 * r // 5), (49 * r, 49 * r, r // 5)])
    # Chunks of at most 30 s of speech, each ended at the longest pause in its last third
    # (the 1 s gap at 30 s, not the 0.2 s pause at 24 s; the 2 s gap at 59 s of speech,
    # not the 0.6 s one at 43 s), else at its latest pause (the gap at 80 s).
    got = _chunks(speech, pauses, r, chunk_s=30.0)
    assert [line.spans for line in got] == [((0, 30 * r),), ((31 * r, 60 * r),), ((62 * r, 80 * r),),
                                            ((80 * r + 4000, 104 * r),)]
    # Without the 2 s gap among the pauses, none lies in the second chunk's last third:
    # it ends at its latest pause (0.2 s at 49 s), and the third holds two spans, the
    # gap between them left out.
    got = _chunks(speech, [p for p in pauses if p[2] != 2 * r], r, chunk_s=30.0)
    assert [line.spans for line in got] == [((0, 30 * r),), ((31 * r, 49 * r),),
                                            ((49 * r, 60 * r), (62 * r, 80 * r)), ((80 * r + 4000, 104 * r),)]
    # Speech without pauses is cut where 30 s run out.
    plain = _chunks([(0, 90 * r)], [], r, chunk_s=30.0)
    assert [line.spans for line in plain] == [((0, 30 * r),), ((30 * r, 60 * r),), ((60 * r, 90 * r),)]


def test_the_shipped_prebuilt_vad_graph_is_the_one_built_now():
    """A change to the graph must come with its prebuilt file rebuilt (else every fresh
    machine compiles it, minutes on 2 cores)."""
    from safetensors.numpy import load_file

    from maxwhisper.vad import WEIGHTS, graph_shapes, vad_graph

    shapes = graph_shapes(load_file(str(WEIGHTS)))
    assert_prebuilt_is_built_now("silero-vad-v6-cpu", lambda module: vad_graph(shapes, module))


def test_decoding_options_are_checked_before_the_vad_runs(tiny_en, monkeypatch):
    import maxwhisper.spans

    monkeypatch.setattr(maxwhisper.spans, "detector", lambda: pytest.fail("the VAD ran before the options were checked"))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        tiny_en.transcribe(np.zeros(RATE, np.float32), vad_filter=True, batch_size=0)
    with pytest.raises(ValueError, match="word_timestamps"):
        tiny_en.transcribe(np.zeros(RATE, np.float32), vad_filter=True, word_timestamps=True, task="translate")


def test_streaming_in_pieces_gives_the_whole_audios_probabilities(vad):
    """Fed in pieces of any size (as a live stream arrives), the detector carries its
    state and context over and scores every window as it would in one call."""
    audio = joined(["01", "02"])[0][: 16000 * 9 + 123]
    whole = vad(audio)
    stream = vad.streaming()
    rng = np.random.default_rng(0)
    pieces, at = [], 0
    while at < audio.size:
        n = int(rng.integers(1, 3000))
        pieces.append(stream(audio[at: at + n]))
        at += n
    got = np.concatenate([*pieces, stream.flush()])
    assert got.shape == whole.shape
    np.testing.assert_allclose(got, whole, atol=1e-6)
