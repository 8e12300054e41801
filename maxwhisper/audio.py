"""Audio in: read any file soundfile (or ffmpeg, when installed) reads, mix down to mono,
resample to the model's rate, and compute Whisper's log-mel spectrogram."""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

import numpy as np

from .spec import AudioSpec


class AudioError(ValueError):
    """Audio that cannot be transcribed; the message names the file and the problem."""


def _read_ffmpeg(path: Path, sample_rate: int) -> np.ndarray:
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-f", "f32le", "-ac", "1",
           "-ar", str(sample_rate), "-"]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode:
        raise AudioError(f"{path}: not a readable audio file (ffmpeg: {proc.stderr.decode().strip()[:200]})")
    return np.frombuffer(proc.stdout, np.float32).copy()


def load_audio(path: str | Path, sample_rate: int = 16000) -> np.ndarray:
    """Mono float32 samples at `sample_rate`."""
    import soundfile as sf

    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: audio file not found")
    if not path.is_file():
        raise AudioError(f"{path}: not a file")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        if shutil.which("ffmpeg"):
            return prepare(_read_ffmpeg(path, sample_rate), sample_rate, sample_rate, str(path))
        raise AudioError(f"{path}: not a readable audio file ({e}); formats beyond WAV/FLAC/OGG "
                         "need ffmpeg installed") from None
    return prepare(data, rate, sample_rate, str(path))


def prepare(samples: np.ndarray, rate: int, sample_rate: int = 16000, source: str = "<array>") -> np.ndarray:
    """Check, mix down (frames x channels -> mono) and resample an array of samples."""
    import soxr

    a = np.asarray(samples)
    if not np.issubdtype(a.dtype, np.floating):
        raise AudioError(f"{source}: samples must be floating point in [-1, 1], found dtype {a.dtype}")
    if a.ndim == 2:
        a = a.mean(axis=1)
    elif a.ndim != 1:
        raise AudioError(f"{source}: expected samples shaped (n,) or (n, channels), found {a.shape}")
    if a.size == 0:
        raise AudioError(f"{source}: the audio is empty (zero samples)")
    if not np.all(np.isfinite(a)):
        raise AudioError(f"{source}: the audio contains {int(np.sum(~np.isfinite(a)))} NaN or infinite samples")
    a = a.astype(np.float32)
    if rate != sample_rate:
        a = soxr.resample(a, rate, sample_rate, quality="HQ").astype(np.float32)
    return a


def _hz_to_mel(f):
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    lin = f / (200.0 / 3)
    log = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(f >= 1000.0, log, lin)


def _mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    lin = m * (200.0 / 3)
    log = 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0))
    return np.where(m >= 15.0, log, lin)


@functools.lru_cache(maxsize=4)
def mel_filters(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular filters, Slaney-normalised (librosa's default,
    which openai-whisper's stored filters were made with)."""
    fft_freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    mel_pts = np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), n_mels + 2)
    hz = _mel_to_hz(mel_pts)
    fdiff = np.diff(hz)
    ramps = hz[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (hz[2: n_mels + 2] - hz[:n_mels]))[:, None]
    return weights.astype(np.float32)


def log_mel_spectrogram(audio: np.ndarray, spec: AudioSpec, padding: int = 0,
                        block_frames: int = 4096) -> np.ndarray:
    """(n_mels, frames) log-mel, as openai-whisper's `log_mel_spectrogram`: centred STFT
    with reflect padding and a periodic Hann window, last frame dropped, log10 clamped
    to 8 below the maximum, scaled to about [-1, 1].

    The STFT runs `block_frames` at a time, so memory stays at the size of the audio and
    its mel, not of every frame's spectrum (an hour would need gigabytes)."""
    n_fft, hop = spec.n_fft, spec.hop_length
    x = np.asarray(audio, dtype=np.float32)
    if padding:
        x = np.pad(x, (0, padding))
    x = np.pad(x, (n_fft // 2, n_fft // 2), mode="reflect")
    n_frames = (len(x) - n_fft) // hop  # the last frame is dropped, as openai-whisper does
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    filters = mel_filters(spec.sample_rate, n_fft, spec.n_mels).astype(np.float64)
    out = np.empty((spec.n_mels, n_frames), np.float32)
    for start in range(0, n_frames, block_frames):
        count = min(block_frames, n_frames - start)
        seg = x[start * hop: start * hop + (count - 1) * hop + n_fft].astype(np.float64)
        frames = np.lib.stride_tricks.as_strided(seg, (count, n_fft), (seg.strides[0] * hop, seg.strides[0]))
        power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
        out[:, start: start + count] = np.log10(np.maximum(filters @ power.T, 1e-10))
    np.maximum(out, out.max() - 8.0, out=out)
    out += 4.0
    out /= 4.0
    return out


def pad_or_trim(mel: np.ndarray, n_frames: int) -> np.ndarray:
    """Pad with zeros (as openai-whisper pads the log-mel of silence) or trim to n_frames."""
    if mel.shape[-1] >= n_frames:
        return mel[..., :n_frames]
    return np.pad(mel, [(0, 0)] * (mel.ndim - 1) + [(0, n_frames - mel.shape[-1])])
