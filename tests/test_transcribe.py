"""End to end on real weights: agreement with faster-whisper, word error rate, long-form
windows, silence, bad input, the CLI, and the multilingual base model."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from helpers import SPEECH_DIR, WER_ROWS, audioeval_sample, faster_whisper_peer, joined, normalized, speech_clips, wer
from maxwhisper.audio import AudioError, load_audio
from maxwhisper.cli import main
from maxwhisper.runtime import resolve_device

jiwer = pytest.importorskip("jiwer", reason="WER needs jiwer: pip install -e '.[test]'")
fw = pytest.importorskip("faster_whisper", reason="the peer comparison needs faster-whisper")

@pytest.fixture(scope="session")
def peer_tiny_en(model_cache):
    return faster_whisper_peer("tiny.en")


def first_difference(ours: list[int], theirs: list[int]) -> int | None:
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return i
    return None if len(ours) == len(theirs) else min(len(ours), len(theirs))


def explain(model, audio, ours_segments, theirs_segments, i) -> str:
    """Where our tokens and the peer's part: the tokens, the text so far, and (for a
    difference in the first window) our logits for both candidates."""
    ours = [t for s in ours_segments for t in s["tokens"]]
    theirs = [t for s in theirs_segments for t in s.tokens]
    msg = (f"first difference at token {i}: ours {ours[i] if i < len(ours) else 'END'} vs faster-whisper "
           f"{theirs[i] if i < len(theirs) else 'END'}; text before: {model.tokenizer.decode(ours[max(0, i - 12):i])!r}")
    first_window = [t for s in ours_segments if s["seek"] == 0 for t in s["tokens"]]
    if i < len(first_window) and i < len(theirs):
        from maxwhisper.audio import log_mel_spectrogram, pad_or_trim

        a = model.spec.audio
        mel = log_mel_spectrogram(audio, a, padding=a.n_samples)
        window = pad_or_trim(mel[:, : min(a.n_frames, mel.shape[-1] - a.n_frames)], a.n_frames)
        _, ck, cv = model.runtime.encode(window[None])[:3]
        prefix = model.tokenizer.sot_sequence + first_window[:i]
        logits, _, _ = model.runtime.decode(np.array([prefix]), model.runtime.start(ck, cv))
        msg += f"; our logits: ours {logits[0, -1, ours[i]]:.4f}, theirs {logits[0, -1, theirs[i]]:.4f}"
    return msg


CASES = {"01": (["01"], 1), "04": (["04"], 1), "long": (["01", "02", "03", "04", "05", "06"], 2)}


@pytest.mark.parametrize("timestamps", [True, False], ids=["timestamps", "no-timestamps"])
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_faster_whisper(tiny_en, peer_tiny_en, case, timestamps):
    audio, _ = joined(*CASES[case])
    if case == "long":
        assert len(audio) > 60 * 16000
    ours = tiny_en.transcribe(audio, temperature=0.0, without_timestamps=not timestamps)
    segments, _ = peer_tiny_en.transcribe(audio, beam_size=1, temperature=0.0, vad_filter=False,
                                          language="en", without_timestamps=not timestamps)
    segments = list(segments)
    mine = [t for s in ours["segments"] for t in s["tokens"]]
    peer = [t for s in segments for t in s.tokens]
    i = first_difference(mine, peer)
    assert i is None, explain(tiny_en, audio, ours["segments"], segments, i)
    if timestamps:
        times = [t for s in ours["segments"] if s["tokens"] for t in (s["start"], s["end"])]
        assert times == pytest.approx([t for s in segments if s.tokens for t in (s.start, s.end)], abs=1e-6)


def test_word_error_rate_on_clean_synthetic_speech(tiny_en):
    errors, words = 0.0, 0
    for path, text in speech_clips().items():
        hyp = tiny_en.transcribe(path)["text"]
        n = len(normalized(text).split())
        rate = wer(text, hyp)
        WER_ROWS.append((Path(path).name, rate, hyp.strip()))
        errors, words = errors + rate * n, words + n
    assert errors / words <= 0.10, f"tiny.en WER {errors / words:.1%} on clean synthetic speech"


def test_five_minutes_cover_the_audio_without_gaps_or_repeats(tiny_en):
    audio, text = joined(["01", "02", "03", "04", "05", "06"], gap_s=0.8, repeat=7)
    duration = len(audio) / 16000
    assert duration >= 300
    result = tiny_en.transcribe(audio)
    segs = [s for s in result["segments"] if s["tokens"]]
    assert segs[0]["start"] < 1.0 and segs[-1]["end"] > duration - 10
    for a, b in zip(segs, segs[1:]):
        assert a["start"] <= a["end"] <= b["start"] + 1e-6, (a, b)
    # A dropped 30 s window loses ~70 words of ~590, a repeated one adds as many: > 10%.
    assert wer(text, result["text"]) <= 0.10


@pytest.mark.parametrize("kind", ["zeros", "faint noise"])
def test_silence_invents_no_words(tiny_en, kind):
    audio = np.zeros(16000 * 20, np.float32)
    if kind == "faint noise":
        audio = (np.random.default_rng(0).standard_normal(16000 * 20) * 1e-4).astype(np.float32)
    result = tiny_en.transcribe(audio)
    assert result["text"].strip() == "", result["text"]


def test_hour_long_file_in_bounded_memory(tiny_en, tmp_path):
    """61 minutes: a clip, an hour of silence, a clip. Both clips are heard; memory stays
    near the audio's own size rather than growing with every window."""
    import psutil

    clip = load_audio(str(SPEECH_DIR / "03.wav"))
    audio = np.concatenate([clip, np.zeros(16000 * 3600, np.float32), clip])
    path = tmp_path / "hour.flac"
    sf.write(path, audio, 16000)
    del audio
    proc, peak, stop = psutil.Process(), [0], threading.Event()

    def watch():
        while not stop.wait(0.05):
            peak[0] = max(peak[0], proc.memory_info().rss)

    before = proc.memory_info().rss
    t = threading.Thread(target=watch)
    t.start()
    try:
        result = tiny_en.transcribe(path)
    finally:
        stop.set()
        t.join()
    growth = peak[0] - before
    assert growth < 1.5e9, f"RSS grew {growth / 1e6:.0f} MB for a 61-minute file"
    spoken = [s for s in result["segments"] if s["tokens"]]
    assert spoken[0]["start"] < 2 and spoken[-1]["end"] > 3600
    assert result["text"].lower().count("wednesday") == 2


def test_resampled_and_stereo_inputs_transcribe_alike(tiny_en, tmp_path):
    path = str(SPEECH_DIR / "04.wav")
    speech, ref = load_audio(path), speech_clips()[path]
    from maxwhisper.audio import prepare

    for rate in (8000, 48000):
        sf.write(tmp_path / f"{rate}.wav", prepare(speech, 16000, rate), rate)
        assert wer(ref, tiny_en.transcribe(tmp_path / f"{rate}.wav")["text"]) <= 0.15, rate
    sf.write(tmp_path / "stereo.wav", np.stack([speech, speech], 1), 16000)
    assert tiny_en.transcribe(tmp_path / "stereo.wav")["text"] == tiny_en.transcribe(path)["text"]


def test_bad_input_is_refused_before_the_model(tiny_en, tmp_path):
    with pytest.raises(AudioError, match="audio file not found"):
        tiny_en.transcribe(tmp_path / "missing.wav")
    with pytest.raises(AudioError, match="the audio is empty"):
        tiny_en.transcribe(np.zeros(0, np.float32))
    with pytest.raises(AudioError, match="NaN or infinite"):
        tiny_en.transcribe(np.array([0.0, np.nan, 0.1], np.float32))


def test_result_keys_match_openai_whisper(tiny_en):
    result = tiny_en.transcribe(str(SPEECH_DIR / "02.wav"))
    assert {"text", "segments", "language"} <= result.keys() and result["language"] == "en"
    seg = result["segments"][0]
    assert {"id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
            "compression_ratio", "no_speech_prob"} <= seg.keys()
    assert resolve_device("auto") in ("cpu", "gpu")
    from max.driver import accelerator_count

    assert resolve_device("auto") == ("gpu" if accelerator_count() else "cpu")


def test_cli_writes_one_file_per_input_and_format(tiny_en, tmp_path, capsys, monkeypatch):
    import maxwhisper.model

    loads = []
    monkeypatch.setattr(maxwhisper.model, "load_model", lambda *a, **k: loads.append(a) or tiny_en)
    a, b = SPEECH_DIR / "02.wav", SPEECH_DIR / "05.wav"
    out = tmp_path / "out"
    rc = main(["transcribe", str(a), str(tmp_path / "missing.wav"), str(b), "--model", "tiny.en",
               "--device", "cpu", "-f", "all", "-o", str(out)])
    assert rc == 2 and "missing.wav: audio file not found" in capsys.readouterr().err
    assert len(loads) == 1, "several inputs load and compile the model once"
    for stem in ("02", "05"):
        for ext in ("txt", "json", "srt", "vtt"):
            assert (out / f"{stem}.{ext}").is_file()
        data = json.loads((out / f"{stem}.json").read_text())
        assert {"text", "segments", "language"} <= data.keys()
        lines = (out / f"{stem}.txt").read_text().splitlines()  # one line per segment
        assert lines == [s["text"].strip() for s in data["segments"] if s["text"].strip()]
        assert " ".join(lines) == data["text"].strip()
    srt = (out / "02.srt").read_text()
    assert srt.startswith("1\n00:00:00,000 --> 00:00:0") and (out / "02.vtt").read_text().startswith("WEBVTT\n\n00:00.000 --> ")


# --- multilingual base ---------------------------------------------------------------

@pytest.mark.parametrize("lang,name", [("en", "quick_brown_fox"), ("es", "pangrama"), ("fr", "pangrama"),
                                       ("it", "pangrama"), ("ja", "pangrama")])
def test_base_detects_the_language(base_model, lang, name):
    wav, _ = audioeval_sample(lang, name)
    result = base_model.transcribe(wav)
    assert result["language"] == lang, f"{wav}: detected {result['language']}"
    assert max(result["language_probs"], key=result["language_probs"].get) == lang


def test_base_tokens_equal_faster_whisper(base_model):
    wav, _ = audioeval_sample("es", "pangrama")
    audio = load_audio(wav)
    ours = base_model.transcribe(audio, temperature=0.0)
    peer = faster_whisper_peer("base")
    segments, info = peer.transcribe(audio, beam_size=1, temperature=0.0, vad_filter=False)
    segments = list(segments)
    assert info.language == ours["language"] == "es"
    mine = [t for s in ours["segments"] for t in s["tokens"]]
    theirs = [t for s in segments for t in s.tokens]
    i = first_difference(mine, theirs)
    assert i is None, explain(base_model, audio, ours["segments"], segments, i)
