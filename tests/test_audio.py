"""Audio in: formats, resampling, mixdown, bad input, and log-mel equal to openai-whisper's."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import soundfile as sf

from helpers import speech_clips
from maxwhisper.audio import AudioError, load_audio, log_mel_spectrogram, mel_filters, prepare
from maxwhisper.spec import load_spec

torch = pytest.importorskip("torch", reason="needs the PyTorch reference: pip install -e '.[test]'")
whisper_audio = pytest.importorskip("whisper.audio", reason="needs openai-whisper")

AUDIO = load_spec("tiny").audio
CLIP = next(iter(speech_clips()))


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_equal_openai(n_mels):
    ours = mel_filters(16000, 400, n_mels)
    ref = whisper_audio.mel_filters("cpu", n_mels).numpy()
    assert np.max(np.abs(ours - ref)) <= 1e-6 * np.max(np.abs(ref))


def reference_mel(x: np.ndarray, dtype) -> np.ndarray:
    """openai-whisper's log_mel_spectrogram; in float64 its window and filters are
    promoted with the audio (it hard-codes float32 for both)."""
    if dtype == np.float32:
        return whisper_audio.log_mel_spectrogram(torch.from_numpy(x), 80, padding=AUDIO.n_samples).numpy()
    hann, filters = torch.hann_window, whisper_audio.mel_filters
    try:
        torch.hann_window = lambda n, **kw: hann(n, dtype=torch.float64)
        whisper_audio.mel_filters = lambda device, n: filters(device, n).double()
        return whisper_audio.log_mel_spectrogram(
            torch.from_numpy(x.astype(np.float64)), 80, padding=AUDIO.n_samples).numpy()
    finally:
        torch.hann_window, whisper_audio.mel_filters = hann, filters


def rel_err(a, b):
    return float(np.max(np.abs(a.astype(np.float64) - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("source", ["speech", "noise"])
def test_log_mel_equals_openai(source):
    if source == "speech":
        x = load_audio(CLIP)
    else:
        x = (np.random.default_rng(0).standard_normal(16000 * 45) * 0.1).astype(np.float32)
    ours = log_mel_spectrogram(x, AUDIO, padding=AUDIO.n_samples)
    ref32, ref64 = reference_mel(x, np.float32), reference_mel(x, np.float64)
    assert ours.shape == ref32.shape == ref64.shape
    # Against openai-whisper's own computation carried out in float64: equal.
    assert rel_err(ours, ref64) <= 1e-6
    # Against its float32 result: within 1e-5, beyond the float32 reference's own rounding
    # error (speech with digital silence has bins just above the clamp floor where
    # float32 power spectra lose digits: ~3.6e-5 on the committed clips).
    assert rel_err(ours, ref32) <= rel_err(ref32, ref64) + 1e-5


def test_block_size_does_not_change_the_mel():
    x = load_audio(CLIP)
    np.testing.assert_array_equal(log_mel_spectrogram(x, AUDIO), log_mel_spectrogram(x, AUDIO, block_frames=7))


def test_an_arrays_spectrogram_computes_no_log_mel_until_a_window_is_read(monkeypatch):
    """The VAD's chunks take an array's samples only: its scale pass must not run for them."""
    from maxwhisper import audio
    from maxwhisper.audio import Spectrogram

    x = np.tile(load_audio(CLIP), 4)
    computed = []
    real = audio._log10_mel
    monkeypatch.setattr(audio, "_log10_mel", lambda seg, spec: computed.append(seg.size) or real(seg, spec))
    s = Spectrogram(x, AUDIO)
    assert s.n_samples == x.size and s.content_frames == x.size // AUDIO.hop_length
    np.testing.assert_array_equal(s.samples(100, 500), x[100 * AUDIO.hop_length: 600 * AUDIO.hop_length])
    assert not computed
    np.testing.assert_array_equal(s.mel(0, AUDIO.n_frames),
                                  log_mel_spectrogram(x, AUDIO, padding=AUDIO.n_samples)[:, : AUDIO.n_frames])
    assert computed


@pytest.mark.parametrize("seconds", [0.01, 7.3, 29.9, 45.0, 75.0])
def test_spectrogram_windows_equal_the_whole_log_mel(seconds):
    """A `Spectrogram`'s windows are the log-mel of the audio and a window of silence,
    bit for bit: frames of the padding alone, and (short audio) frames kept from the
    first pass, as much as frames read again from the source (long audio)."""
    from maxwhisper.audio import Spectrogram

    clip = load_audio(CLIP)
    x = np.tile(clip, int(seconds * AUDIO.sample_rate) // clip.size + 1)[: int(seconds * AUDIO.sample_rate)]
    whole = log_mel_spectrogram(x, AUDIO, padding=AUDIO.n_samples)
    s = Spectrogram(x, AUDIO)
    for seek in range(0, s.content_frames + 1, 1234):
        np.testing.assert_array_equal(s.mel(seek, AUDIO.n_frames), whole[:, seek: seek + AUDIO.n_frames])
    assert (s._kept is not None) == (seconds < 30)
    tail = s.content_frames + AUDIO.n_frames - 5
    np.testing.assert_array_equal(s.mel(tail, 20), whole[:, tail:])


def test_hour_long_mel_memory_is_bounded():
    """Over an hour of audio: peak memory stays near the audio plus its mel."""
    x = np.zeros(16000 * 3700, np.float32)
    x[::997] = 0.05
    tracemalloc.start()
    try:
        mel = log_mel_spectrogram(x, AUDIO, padding=AUDIO.n_samples)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert mel.shape == (80, 370000 + 3000)
    # audio copy (~240 MB) + mel (~120 MB) + blocks; all frames' spectra at once would be > 2 GB.
    assert peak < 2 * x.nbytes + 2 * mel.nbytes, f"peak {peak / 1e6:.0f} MB"


def test_rates_and_channels(tmp_path):
    speech = load_audio(CLIP)
    for rate in (8000, 22050, 48000):
        path = tmp_path / f"r{rate}.wav"
        sf.write(path, prepare(speech, 16000, rate), rate)
        back = load_audio(path)
        assert abs(len(back) - len(speech)) <= 2, rate
        if rate > 16000:  # nothing above 8 kHz is lost: the round trip is near exact
            n = min(len(back), len(speech))
            assert np.corrcoef(back[:n], speech[:n])[0, 1] > 0.99
    stereo = np.stack([speech, 0.5 * speech], axis=1)
    sf.write(tmp_path / "stereo.wav", stereo, 16000, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(tmp_path / "stereo.wav"), 0.75 * speech, atol=1e-6)
    sf.write(tmp_path / "speech.flac", speech, 16000)
    sf.write(tmp_path / "speech.ogg", speech, 16000)
    assert len(load_audio(tmp_path / "speech.flac")) == len(speech)
    assert abs(len(load_audio(tmp_path / "speech.ogg")) - len(speech)) < 1600


def test_bad_audio_is_refused_by_name(tmp_path, monkeypatch):
    with pytest.raises(AudioError, match=r"nope.wav: audio file not found"):
        load_audio(tmp_path / "nope.wav")
    with pytest.raises(AudioError, match="not a file"):
        load_audio(tmp_path)
    text = tmp_path / "notes.wav"
    text.write_text("these are not samples")
    monkeypatch.setattr("shutil.which", lambda _: None)  # the soundfile path, not ffmpeg's
    with pytest.raises(AudioError, match=r"notes.wav: not a readable audio file"):
        load_audio(text)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match=r"empty.wav: the audio is empty"):
        load_audio(empty)
    bad = np.ones(1600, np.float32)
    bad[5], bad[9] = np.nan, np.inf
    sf.write(tmp_path / "nan.wav", bad, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"nan.wav: the audio contains 2 NaN or infinite samples"):
        load_audio(tmp_path / "nan.wav")
    with pytest.raises(AudioError, match="must be floating point"):
        prepare(np.zeros(10, np.int16), 16000)


def test_ffmpeg_formats(tmp_path):
    import shutil
    import subprocess

    if not shutil.which("ffmpeg"):
        pytest.skip("ffmpeg is not installed: only formats beyond soundfile's need it")
    mp3 = tmp_path / "speech.mp3"
    subprocess.run(["ffmpeg", "-v", "error", "-i", CLIP, str(mp3)], check=True)
    assert abs(len(load_audio(mp3)) - len(load_audio(CLIP))) < 16000 * 0.1
    text = tmp_path / "notes.mp3"
    text.write_text("not audio")
    with pytest.raises(AudioError, match=r"notes.mp3: not a readable audio file \(ffmpeg"):
        load_audio(text)
