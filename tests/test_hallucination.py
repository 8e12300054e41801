"""`hallucination_silence_threshold` (tiny.en, real weights) against openai-whisper's
`transcribe()` on the same weights: an utterance, noise, an utterance, and noise in
which tiny.en makes up a sentence that the option drops, or an utterance that runs past
a window's end, where the option moves the next window; the same segments either way,
whether the audio is decoded alone or beside another."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import SPEECH_DIR, openai_peer
from maxwhisper import TranscribeOptions
from maxwhisper.audio import load_audio
from maxwhisper.cli import build_parser, main

RATE = 16000
# One temperature: fallback samples, and the two draw different random numbers.
GREEDY = dict(word_timestamps=True, temperature=0.0)


def _brown(n: int, dbfs: float, seed: int) -> np.ndarray:
    """Noise whose power falls as 1/f², at an RMS level of `dbfs`."""
    spectrum = np.fft.rfft(np.random.default_rng(seed).standard_normal(n))
    spectrum[1:] /= np.arange(1, spectrum.size)
    spectrum[0] = 0
    x = np.fft.irfft(spectrum, n)
    return (x / np.sqrt(np.mean(x ** 2)) * 10 ** (dbfs / 20)).astype(np.float32)


def _case(first: str, noise_s: int, second: str, tail_s: int) -> np.ndarray:
    """A clip, brown noise at -20 dBFS, another clip, more of the noise."""
    noise = _brown((noise_s + tail_s) * RATE, -20, seed=0)
    return np.concatenate([load_audio(SPEECH_DIR / f"{first}.wav"), noise[: noise_s * RATE],
                           load_audio(SPEECH_DIR / f"{second}.wav"), noise[noise_s * RATE:]])


# "made up": tiny.en hears a sentence in the last noise (after 60 s); "across a window":
# the second clip runs past the window that starts at 30 s.
CASES = {"made up": ("01", 35, "03", 15), "across a window": ("01", 45, "03", 5)}


@pytest.fixture(scope="module")
def noisy():
    return _case(*CASES["made up"])


@pytest.fixture(scope="module")
def openai_transcribe(model_cache):
    whisper = pytest.importorskip("whisper", reason="needs openai-whisper: pip install -e '.[test]'")
    model = openai_peer("tiny.en")
    return lambda audio, **kw: whisper.transcribe(model, audio, fp16=False, language="en", **kw)


def _said(result: dict, spoken_only: bool = False) -> list[tuple]:
    return [(s["seek"], s["text"], s["start"], s["end"]) for s in result["segments"]
            if s["text"] or not spoken_only]


def _assert_same(ours: list[tuple], theirs: list[tuple]) -> None:
    assert [s[:2] for s in ours] == [s[:2] for s in theirs]
    assert [t for s in ours for t in s[2:]] == pytest.approx([t for s in theirs for t in s[2:]], abs=1e-6)


@pytest.mark.parametrize("case, threshold", [("made up", 2.0), ("made up", 0.5), ("across a window", 2.0)])
def test_the_threshold_gives_openai_whispers_segments(tiny_en, openai_transcribe, case, threshold):
    audio = _case(*CASES[case])
    ours = tiny_en.transcribe(audio, hallucination_silence_threshold=threshold, **GREEDY)
    theirs = openai_transcribe(audio, hallucination_silence_threshold=threshold, **GREEDY)
    _assert_same(_said(ours), _said(theirs))
    words = [(w["word"], w["start"], w["end"]) for s in ours["segments"] for w in s["words"]]
    assert words == [(w["word"], pytest.approx(w["start"], abs=1e-6), pytest.approx(w["end"], abs=1e-6))
                     for s in theirs["segments"] for w in s["words"]]
    assert ours["text"] == theirs["text"]


@pytest.mark.parametrize("case", list(CASES))
def test_the_threshold_changes_the_segments_where_openai_whispers_does(tiny_en, openai_transcribe, case):
    audio = _case(*CASES[case])
    ours, theirs = [[_said(f(audio, hallucination_silence_threshold=t, **GREEDY), spoken_only=True)
                     for t in (None, 2.0)] for f in (tiny_en.transcribe, openai_transcribe)]
    assert theirs[0] != theirs[1]
    _assert_same(ours[0], theirs[0])
    _assert_same(ours[1], theirs[1])


def test_the_threshold_drops_the_sentence_made_up_in_noise(tiny_en, openai_transcribe, noisy):
    plain, theirs = tiny_en.transcribe(noisy, **GREEDY), openai_transcribe(noisy, **GREEDY)
    # Without the option both make up a sentence in the last noise (after 60 s).
    _assert_same(_said(plain, spoken_only=True), _said(theirs, spoken_only=True))
    assert any(s["text"] and s["start"] > 60 for s in plain["segments"]), plain["text"]
    skipped = tiny_en.transcribe(noisy, hallucination_silence_threshold=2.0, **GREEDY)
    assert [s["text"] for s in skipped["segments"]] == [s["text"] for s in plain["segments"] if s["start"] < 60]
    assert not any(s["start"] > 60 for s in skipped["segments"])


def test_the_threshold_decides_the_same_beside_other_audio(tiny_en, noisy):
    from maxwhisper.transcribe import transcribe_batch

    other = np.concatenate([np.zeros(5 * RATE, np.float32), load_audio(SPEECH_DIR / "02.wav"), noisy[-20 * RATE:]])
    options = TranscribeOptions(hallucination_silence_threshold=2.0, **GREEDY)
    together = dict(transcribe_batch(tiny_en, [noisy, other], options, batch_size=2))
    for k, audio in enumerate([noisy, other]):
        alone = tiny_en.transcribe(audio, options)
        _assert_same(_said(together[k]), _said(alone))


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), "2", True])
def test_a_bad_threshold_is_refused_by_name(value):
    with pytest.raises(ValueError, match="hallucination_silence_threshold must be seconds >= 0 or None"):
        TranscribeOptions(word_timestamps=True, hallucination_silence_threshold=value)


def test_the_threshold_needs_word_timestamps(monkeypatch, capsys):
    with pytest.raises(ValueError, match="hallucination_silence_threshold .* needs word_timestamps=True"):
        TranscribeOptions(hallucination_silence_threshold=2.0)
    assert TranscribeOptions(word_timestamps=True, hallucination_silence_threshold=0).hallucination_silence_threshold == 0
    import maxwhisper.model

    monkeypatch.setattr(maxwhisper.model, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["transcribe", str(SPEECH_DIR / "01.wav"), "--hallucination-silence-threshold", "2"]) == 2
    assert "--hallucination-silence-threshold judges the words' timing: it needs --word-timestamps" in \
        capsys.readouterr().err
    args = build_parser().parse_args(["transcribe", "a.wav", "--word-timestamps",
                                      "--hallucination-silence-threshold", "1.5"])
    assert args.hallucination_silence_threshold == 1.5
