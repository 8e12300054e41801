"""Long-form transcription with the VAD and clips (tiny.en, real weights): no words in
silence, noise or tones; a long silence with three utterances gives their words only,
at their times; batched VAD long-form gives the sequential words with absolute times,
with beam search and word timestamps too."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import SPEECH_DIR, speech_clips, wer
from maxwhisper.audio import load_audio

RATE = 16000
CLIPS = speech_clips()


def _level(x: np.ndarray, dbfs: float) -> np.ndarray:
    """`x` scaled to an RMS level of `dbfs`."""
    return (x / np.sqrt(np.mean(x ** 2)) * 10 ** (dbfs / 20)).astype(np.float32)


def _no_speech(name: str, seconds: int = 60) -> np.ndarray:
    rng = np.random.default_rng(3)
    n = RATE * seconds
    if name == "silence":
        return np.zeros(n, np.float32)
    if name == "white noise":
        return _level(rng.standard_normal(n), -30)
    if name == "pink noise":  # power falling as 1/f
        spectrum = np.fft.rfft(rng.standard_normal(n))
        spectrum[1:] /= np.sqrt(np.arange(1, spectrum.size))
        spectrum[0] = 0
        return _level(np.fft.irfft(spectrum, n), -30)
    t = np.arange(n) / RATE  # tones: 440 Hz and 1 kHz in turn, two seconds each, with a sweep
    tone = np.sin(2 * np.pi * np.where((t // 2) % 2 == 0, 440.0, 1000.0) * t)
    sweep = np.sin(2 * np.pi * (200 * t + 30 * t ** 2 / seconds))
    return _level(np.where(t < seconds - 10, tone, sweep), -12)


@pytest.mark.parametrize("vad_filter", [False, True], ids=["without vad", "with vad"])
@pytest.mark.parametrize("name", ["silence", "white noise", "pink noise", "tones"])
def test_no_words_are_invented_in_silence_noise_or_tones(tiny_en, name, vad_filter):
    result = tiny_en.transcribe(_no_speech(name), vad_filter=vad_filter)
    assert result["text"].strip() == "", result["text"]
    assert not any(s["text"].strip() for s in result["segments"])


def _placed(names: list[str], starts_s: list[float], total_s: float) -> tuple[np.ndarray, str, list[tuple]]:
    """Clips set into digital silence at the given times: audio, text, [(start, end)] s."""
    audio = np.zeros(int(total_s * RATE), np.float32)
    spans = []
    for name, at in zip(names, starts_s):
        clip = load_audio(SPEECH_DIR / f"{name}.wav")
        audio[int(at * RATE): int(at * RATE) + clip.size] = clip
        spans.append((at, at + clip.size / RATE))
    return audio, " ".join(CLIPS[str(SPEECH_DIR / f"{n}.wav")] for n in names), spans


def _check_words(result: dict, spans: list[tuple], slack_s: float) -> list[dict]:
    """Every word, in order, overlaps an utterance widened by `slack_s`: none lies in the
    silence between them (Whisper may start a first word early, into the silence)."""
    words = [w for s in result["segments"] for w in s["words"]]
    assert words
    for w in words:
        assert w["start"] <= w["end"]
        assert any(w["start"] < b + slack_s and w["end"] > a - slack_s for a, b in spans), w
    starts = [w["start"] for w in words]
    assert starts == sorted(starts)
    return words


@pytest.fixture(scope="module")
def long_silence():
    """Ten minutes of digital silence holding three short utterances."""
    return _placed(["01", "03", "05"], [40.0, 301.5, 556.25], 600.0)


@pytest.mark.parametrize("kw", [dict(), dict(vad_filter=True), dict(vad_filter=True, batch_size=4)],
                         ids=["without vad", "with vad", "with vad, batched"])
def test_a_long_silence_gives_the_words_of_its_utterances_only(tiny_en, long_silence, kw):
    audio, text, spans = long_silence
    result = tiny_en.transcribe(audio, word_timestamps=True, **kw)
    words = _check_words(result, spans, slack_s=0.5)
    # Each utterance is heard: its first and last words fall inside it.
    for a, b in spans:
        inside = [w for w in words if a - 0.5 <= w["start"] <= b + 0.5]
        assert inside and inside[0]["start"] < a + 1.0 and inside[-1]["end"] > b - 1.5
    # Measured without the VAD: 6.2% (tiny.en misreads 3 of the 48 words).
    assert wer(text, result["text"]) <= 0.10, result["text"]


@pytest.fixture(scope="module")
def conversation():
    """The six clips twice, with pauses of 0.8 to 2.4 s: about two minutes."""
    names = ["01", "02", "03", "04", "05", "06"] * 2
    starts, at = [], 0.5
    for k, name in enumerate(names):
        starts.append(at)
        at += load_audio(SPEECH_DIR / f"{name}.wav").size / RATE + 0.8 + 0.4 * (k % 5)
    return _placed(names, starts, at + 0.5)


@pytest.fixture(scope="module")
def sequential(tiny_en, conversation):
    return tiny_en.transcribe(conversation[0])


def test_batched_vad_long_form_gives_the_sequential_words_at_absolute_times(tiny_en, conversation, sequential):
    audio, text, spans = conversation
    batched = tiny_en.transcribe(audio, vad_filter=True, batch_size=8)
    # Measured on this audio (190 words): sequential 0.0%, batched 2.1%; the bound is
    # for tiny.en, greedy, on two minutes (docs/benchmarks.md has a longer clip).
    assert wer(text, batched["text"]) <= wer(text, sequential["text"]) + 0.03, batched["text"]
    assert wer(sequential["text"], batched["text"]) <= 0.04
    segments = [s for s in batched["segments"] if s["text"].strip()]
    assert [s["id"] for s in batched["segments"]] == list(range(len(batched["segments"])))
    for s in segments:  # on the audio's own timeline: each segment overlaps the speech
        assert 0 <= s["start"] < s["end"] <= audio.size / RATE
        assert any(s["start"] < b and s["end"] > a for a, b in spans), s
    assert segments[-1]["end"] > spans[-1][0]  # the last utterance's time, not a joined one


def test_batched_vad_long_form_with_beams_and_word_timestamps(tiny_en, conversation, sequential):
    audio, text, spans = conversation
    result = tiny_en.transcribe(audio, vad_filter=True, batch_size=8, beam_size=5, word_timestamps=True)
    assert wer(text, result["text"]) <= wer(text, sequential["text"]) + 0.03, result["text"]
    _check_words(result, spans, slack_s=0.5)


def test_clip_timestamps_transcribe_only_their_spans(tiny_en, conversation):
    audio, _, spans = conversation
    (a3, b3), (a8, b8) = spans[2], spans[7]
    clips = f"{a3 - 0.3:.2f},{b3 + 0.3:.2f},{a8 - 0.3:.2f},{b8 + 0.3:.2f}"
    result = tiny_en.transcribe(audio, clip_timestamps=clips, word_timestamps=True)
    want = CLIPS[str(SPEECH_DIR / "03.wav")] + " " + CLIPS[str(SPEECH_DIR / "02.wav")]
    assert wer(want, result["text"]) <= 0.05, result["text"]
    _check_words(result, [spans[2], spans[7]], slack_s=0.35)


def test_the_cli_transcribes_the_speech_with_vad(tiny_en, conversation, tmp_path):
    import soundfile as sf

    from maxwhisper.cli import main

    audio, text, spans = conversation
    path = tmp_path / "talk.wav"
    sf.write(path, audio[: int(spans[3][1] * RATE) + RATE], RATE)
    assert main(["transcribe", str(path), "--vad", "--vad-min-silence-duration-ms", "500", "--batch-size", "4",
                 "--beam-size", "1", "-f", "json", "-o", str(tmp_path), "--quiet"]) == 0
    result = json.loads((tmp_path / "talk.json").read_text())
    four = " ".join(CLIPS[str(SPEECH_DIR / f"{n}.wav")] for n in ["01", "02", "03", "04"])
    assert wer(four, result["text"]) <= 0.05, result["text"]
    assert result["segments"][-1]["end"] > spans[3][0]


def test_the_long_form_benchmark_builds_its_recording_and_table():
    from benchmarks import longform

    audio, text = longform.recording(1.0)
    assert audio.size >= 60 * RATE
    names = sorted(CLIPS)
    assert text.startswith(" ".join(CLIPS[n] for n in names))
    # Each clip is in the recording as it is, after a pause of 0.6-3 s of zeros.
    first = load_audio(names[0])
    start = int(np.flatnonzero(audio)[0])
    assert 0 < start <= RATE and np.array_equal(audio[start: start + 1000], first[np.flatnonzero(first)[0]:][:1000])
    rows = [longform.Row("maxwhisper batched (VAD, batch 8)", "float32", 10.0, 0.02),
            longform.Row("faster-whisper BatchedInferencePipeline (batch 8)", "float32", 5.0, 0.05),
            longform.Row("faster-whisper sequential", "q4_0 / int8", skipped="not installed")]
    report = dict(model="tiny.en", audio_s=300.0, words=500, batch=8, beam=5, threads=2, date="d",
                  machine="2 CPU cores", versions={"max": "26.7"}, repeats=3, rows=[r.__dict__ for r in rows])
    table = longform.table(report)
    assert "the median of 3 runs each" in table.splitlines()[0]
    assert "| float32 | faster-whisper BatchedInferencePipeline (batch 8) | 5.0 | 60.0 | 5.0% | 0.50 |" in table
    assert "| q4_0 / int8 | faster-whisper sequential | - | - | - | could not run: not installed |" in table


def test_progress_with_vad_counts_the_whole_audio(tiny_en, long_silence):
    from maxwhisper.transcribe import transcribe

    audio, _, _ = long_silence  # the first utterance at 40 s
    seen = []
    transcribe(tiny_en, audio[: 120 * RATE], vad_filter=True, batch_size=4,
               progress=lambda frames, total: seen.append((frames, total)))
    assert seen and all(total == 120 * RATE // 160 for _, total in seen)
    assert sum(frames for frames, _ in seen) == 120 * RATE // 160


def _file_of(audio: np.ndarray, path, rate: int = RATE, subtype: str = "PCM_16"):
    """`audio` written at `rate` (resampled to it): read back, resampled to 16 kHz."""
    import soundfile as sf
    import soxr

    sf.write(path, audio if rate == RATE else soxr.resample(audio, RATE, rate), rate, subtype=subtype)
    return path


@pytest.mark.parametrize("rate, subtype", [(RATE, "PCM_16"), (RATE, "FLOAT"), (44100, "PCM_16")],
                         ids=["16 kHz PCM16, seeking", "16 kHz float, seeking", "44.1 kHz, read from the start"])
def test_a_files_spans_are_read_as_its_samples(tmp_path, monkeypatch, rate, subtype):
    from maxwhisper import audio as audio_module
    from maxwhisper.audio import AudioFile

    monkeypatch.setattr(audio_module, "BLOCK_SAMPLES", 1000)  # spans cross many blocks
    samples = np.random.default_rng(0).uniform(-0.5, 0.5, 5 * RATE).astype(np.float32)
    path = _file_of(samples, tmp_path / "a.wav", rate, subtype)
    whole = load_audio(path)
    spans = [(0, 10), (10, 2500), (2999, 3001), (7000, 7000 + 1000), (40000, whole.size)]
    got = {}
    for k, piece in AudioFile(path).pieces(spans):
        assert piece.size <= 1000
        got.setdefault(k, []).append(piece)
    for k, (a, b) in enumerate(spans):
        assert np.array_equal(np.concatenate(got[k]), whole[a:b]), (a, b)


def test_the_vad_on_a_file_gives_its_samples_probabilities(tmp_path, conversation):
    from maxwhisper.audio import AudioFile
    from maxwhisper.spans import probabilities
    from maxwhisper.vad import detector

    path = _file_of(conversation[0][: 40 * RATE], tmp_path / "talk.wav")
    samples = load_audio(path)
    spans = [(0, 3 * RATE + 7), (5 * RATE, 30 * RATE + 100), (30 * RATE + 100, samples.size)]
    for got, (a, b) in zip(probabilities(AudioFile(path), spans), spans):
        assert np.array_equal(got, detector()(samples[a:b]))


@pytest.mark.parametrize("rate", [RATE, 44100], ids=["seeking", "read from the start"])
def test_a_file_with_the_vad_gives_the_result_of_its_samples(tiny_en, tmp_path, conversation, rate):
    path = _file_of(conversation[0], tmp_path / "talk.wav", rate)
    kw = dict(vad_filter=True, temperature=0.0, word_timestamps=True, clip_timestamps="2,70,75")
    for batch in (8, 1):
        assert tiny_en.transcribe(str(path), batch_size=batch, **kw) == \
            tiny_en.transcribe(load_audio(path), batch_size=batch, **kw)
