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


def load_audio(path: str | Path, sample_rate: int = 16000) -> np.ndarray:
    """Mono float32 samples at `sample_rate`, the whole file in memory (`AudioFile`
    reads it block by block)."""
    return np.concatenate([np.zeros(0, np.float32), *AudioFile(path, sample_rate).blocks()])


# About a minute at 16 kHz: large enough to keep reading cheap, small beside a model.
BLOCK_SAMPLES = 1 << 20
# Samples louder than this are not audio in [-1, 1] (float audio may overshoot a little;
# integer PCM cast to float without scaling peaks in the thousands).
MAX_PEAK = 2.0
# More channels than this in a (frames, channels) array is a channels-first array.
MAX_CHANNELS = 32


class AudioFile:
    """A file's samples, mixed to mono and resampled to `sample_rate`, read block by block
    (soundfile; ffmpeg for other formats when installed), so that hours of audio never
    sit in memory at once. `blocks()` can be read again; each read checks the samples."""

    def __init__(self, path: str | Path, sample_rate: int = 16000):
        import soundfile as sf

        self.path, self.sample_rate = Path(path), sample_rate
        if not self.path.exists():
            raise AudioError(f"{self.path}: audio file not found")
        if not self.path.is_file():
            raise AudioError(f"{self.path}: not a file")
        try:
            info = sf.info(str(self.path))
            self._rate, self._ffmpeg = info.samplerate, False
            self.duration = info.frames / info.samplerate
            # Lossless and at the wanted rate: a seek lands on the very samples a full read gives.
            self._seekable = self._rate == sample_rate and (
                info.format == "FLAC" or info.subtype.startswith("PCM") or info.subtype in ("FLOAT", "DOUBLE"))
        except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError
            if not shutil.which("ffmpeg"):
                raise AudioError(f"{self.path}: not a readable audio file ({e}); formats beyond WAV/FLAC/OGG "
                                 "need ffmpeg installed") from None
            self._rate, self._ffmpeg, self.duration, self._seekable = sample_rate, True, None, False
        if self._rate <= 0:
            raise AudioError(f"{self.path}: the file declares a sample rate of {self._rate} Hz")

    def blocks(self):
        """Mono float32 blocks at `sample_rate`; AudioError for a file that is empty or holds
        NaN, infinite or out-of-range samples."""
        import soxr

        resampler = (None if self._rate == self.sample_rate else
                     soxr.ResampleStream(self._rate, self.sample_rate, 1, dtype="float32", quality="HQ"))
        total = 0
        for block in (self._ffmpeg_blocks() if self._ffmpeg else self._soundfile_blocks()):
            mono = _checked(block, str(self.path), total)
            total += len(mono)
            yield mono if resampler is None else resampler.resample_chunk(mono)
        if not total:
            raise AudioError(f"{self.path}: the audio is empty (zero samples)")
        if resampler is not None:
            yield resampler.resample_chunk(np.zeros(0, np.float32), last=True)

    def pieces(self, spans: list[tuple[int, int]]):
        """(k, samples) of each span [start, end) in turn (samples at `sample_rate`, sorted
        spans that do not overlap), block by block: a lossless file at that rate seeks to
        each span; any other is read once from its start."""
        if not self._seekable:
            yield from slice_blocks(self.blocks(), spans)
            return
        import soundfile as sf

        try:
            with sf.SoundFile(str(self.path)) as f:
                for k, (start, end) in enumerate(spans):
                    f.seek(start)
                    at = start
                    while at < end:
                        block = f.read(min(BLOCK_SAMPLES, end - at), dtype="float32", always_2d=True)
                        if not len(block):
                            break
                        yield k, _checked(block, str(self.path), at)
                        at += len(block)
        except AudioError:
            raise
        except Exception as e:
            raise AudioError(f"{self.path}: unreadable part in the audio data ({e})") from None

    def _soundfile_blocks(self):
        import soundfile as sf

        try:
            with sf.SoundFile(str(self.path)) as f:
                for block in f.blocks(BLOCK_SAMPLES, dtype="float32", always_2d=True):
                    yield block
        except AudioError:
            raise
        except Exception as e:
            raise AudioError(f"{self.path}: unreadable part in the audio data ({e})") from None

    def _ffmpeg_blocks(self):
        cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(self.path), "-f", "f32le", "-ac", "1",
               "-ar", str(self.sample_rate), "-"]
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            while chunk := proc.stdout.read(4 * BLOCK_SAMPLES):
                yield np.frombuffer(chunk[: len(chunk) // 4 * 4], np.float32)[:, None]
            err = proc.stderr.read().decode(errors="replace").strip()
            if proc.wait():
                raise AudioError(f"{self.path}: not a readable audio file (ffmpeg: {err[:200]})")


def slice_blocks(blocks, spans: list[tuple[int, int]]):
    """(k, samples) of each span [start, end) of the samples that `blocks` yields in
    turn (sorted spans that do not overlap), read in one pass that stops after the last."""
    k, at = 0, 0
    for block in blocks:
        while k < len(spans):
            start, end = spans[k]
            lo, hi = max(start - at, 0), min(end - at, len(block))
            if hi > lo:
                yield k, block[lo:hi]
            if end > at + len(block):
                break
            k += 1
        at += len(block)
        if k == len(spans):
            return


def _mono(a: np.ndarray, source: str) -> np.ndarray:
    if a.ndim == 2:
        if a.shape[1] == 0:
            raise AudioError(f"{source}: samples shaped {a.shape} have no channel")
        if a.shape[1] > MAX_CHANNELS:
            raise AudioError(f"{source}: samples must be shaped (n,) or (n, channels); found {a.shape}, "
                             f"{a.shape[1]} channels, more than {MAX_CHANNELS}: a channels-first array "
                             "(as librosa and torchaudio return) needs transposing (`samples.T`)")
        return a.mean(axis=1) if a.shape[1] > 1 else a[:, 0]
    if a.ndim != 1:
        raise AudioError(f"{source}: expected samples shaped (n,) or (n, channels), found {a.shape}")
    return a


def _checked(a: np.ndarray, source: str, offset: int = 0) -> np.ndarray:
    """Mono float32 samples, refused when they are not audio."""
    if not np.issubdtype(a.dtype, np.floating):
        raise AudioError(f"{source}: samples must be floating point in [-1, 1], found dtype {a.dtype}")
    a = _mono(a, source)
    finite = np.isfinite(a)
    if not finite.all():
        first = int(np.argmin(finite)) + offset
        raise AudioError(f"{source}: the audio contains {int(a.size - np.count_nonzero(finite))} NaN or "
                         f"infinite samples (the first at sample {first})")
    peak = float(np.max(np.abs(a))) if a.size else 0.0
    if peak > MAX_PEAK:
        raise AudioError(f"{source}: samples must be in [-1, 1], found a peak of {peak:g}; integer PCM "
                         "cast to float needs scaling (divide 16-bit samples by 32768)")
    return a.astype(np.float32, copy=False)


def prepare(samples: np.ndarray, rate: int, sample_rate: int = 16000, source: str = "<array>") -> np.ndarray:
    """Check, mix down (frames x channels -> mono) and resample an array of samples."""
    import soxr

    a = _checked(np.asarray(samples), source)
    if a.size == 0:
        raise AudioError(f"{source}: the audio is empty (zero samples)")
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
    out = np.empty((spec.n_mels, n_frames), np.float32)
    for start in range(0, n_frames, block_frames):
        count = min(block_frames, n_frames - start)
        out[:, start: start + count] = _log10_mel(x[start * hop: start * hop + (count - 1) * hop + n_fft], spec)
    return _scaled(out, out.max() - 8.0)


def _log10_mel(seg: np.ndarray, spec: AudioSpec) -> np.ndarray:
    """log10 mel power of the frames of `seg`, one every hop, each n_fft long (float64
    STFT, periodic Hann window, 1e-10 floor)."""
    n_fft, hop = spec.n_fft, spec.hop_length
    seg = np.asarray(seg, np.float64)
    count = (len(seg) - n_fft) // hop + 1
    frames = np.lib.stride_tricks.as_strided(seg, (count, n_fft), (seg.strides[0] * hop, seg.strides[0]))
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    filters = mel_filters(spec.sample_rate, n_fft, spec.n_mels).astype(np.float64)
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
    return np.log10(np.maximum(filters @ power.T, 1e-10)).astype(np.float32)


def _scaled(out: np.ndarray, floor) -> np.ndarray:
    """openai-whisper's scale, in place: clamped at `floor` (8 below the loudest frame),
    then about [-1, 1]."""
    np.maximum(out, floor, out=out)
    out += 4.0
    out /= 4.0
    return out


class _Reader:
    """Samples of one pass over a source, kept from a moving start onwards: index i < 0
    reads sample -i (reflect padding), indices past the end read 0 (the padding of
    silence), as `log_mel_spectrogram` pads them."""

    def __init__(self, blocks):
        self._blocks, self._buf, self._start, self.n = blocks, np.zeros(0, np.float32), 0, None

    def get(self, lo: int, hi: int) -> np.ndarray:
        while self.n is None and self._start + len(self._buf) < max(hi, 1 - lo):
            block = next(self._blocks, None)
            if block is None:
                self.n = self._start + len(self._buf)
            else:
                self._buf = np.concatenate([self._buf, block])
        out = np.zeros(hi - lo, np.float32)
        if lo >= self._start:  # no reflection: the held samples, then zeros past the end
            held = self._buf[lo - self._start: hi - self._start]
            out[: held.size] = held
            return out
        idx = np.arange(lo, hi)
        idx = np.abs(idx)  # reflect: the sample at -k mirrors the one at k
        inside = (idx >= self._start) & (idx < self._start + len(self._buf))
        out[inside] = self._buf[idx[inside] - self._start]
        return out

    def exhausted_before(self, i: int) -> bool:
        return self.n is not None and i >= self.n

    def release(self, before: int) -> None:
        """Forget samples before `before` (never those a reflected frame 0 needs)."""
        drop = min(max(0, before - self._start), len(self._buf))
        if self._start + drop > 1024:
            self._buf, self._start = self._buf[drop:], self._start + drop


def _raw_log_mel(reader: _Reader, t0: int, t1: int, spec: AudioSpec) -> np.ndarray:
    """log10 mel power of frames [t0, t1), each centred on sample t * hop. Frames that
    lie wholly past the end of the source read only zeros (the padding of silence):
    their value is the same for all of them, and their STFT is skipped."""
    n_fft, hop, half = spec.n_fft, spec.hop_length, spec.n_fft // 2
    samples = reader.get(t0 * hop - half, (t1 - 1) * hop + n_fft - half)
    if reader.n is None:
        return _log10_mel(samples, spec)
    sounding = min(t1, max(t0, -(-(reader.n + half) // hop)))  # frames from here on: zeros only
    out = np.empty((spec.n_mels, t1 - t0), np.float32)
    out[:, sounding - t0:] = _silent_log_mel(spec)[:, None]
    if sounding > t0:
        out[:, : sounding - t0] = _log10_mel(samples[: (sounding - t0 - 1) * hop + n_fft], spec)
    return out


@functools.lru_cache(maxsize=4)
def _silent_log_mel(spec: AudioSpec) -> np.ndarray:
    """(n_mels,) log10 mel power of a frame of zeros."""
    return _log10_mel(np.zeros(spec.n_fft, np.float32), spec)[:, 0]


class Spectrogram:
    """The log-mel of an audio followed by one window of silence, as
    `log_mel_spectrogram(audio, spec, padding=spec.n_samples)` computes it, read one
    window at a time: memory stays at a window's size however long the audio (an audio
    of up to `KEEP_FRAMES` frames keeps its log-mel from the first pass instead of
    reading the source twice).

    The scale depends on the loudest frame of the whole audio, so the log-mel is read
    twice: once for the scale, then again from the start, a window at a time, in order.
    A file's first pass runs at construction (it learns the length, and refuses bad
    audio, naming it, before any decoding); an array's, whose length is known and which
    `prepare` has checked, waits until the first window is read, so that a caller that
    takes only the samples (the VAD's chunks) never computes it. `source`: mono float32
    samples at the spec's rate, or an `AudioFile`."""

    # Frames (of log-mel, 1.3 KB each) up to which the first pass's are kept: two windows.
    KEEP_FRAMES = 6000

    def __init__(self, source, spec: AudioSpec, block_frames: int = 4096):
        if not hasattr(source, "blocks"):
            source = np.asarray(source, dtype=np.float32).reshape(-1)
        self.spec, self._source, self._block_frames = spec, source, block_frames
        if isinstance(source, np.ndarray):
            self._blocks = lambda: (source[i: i + BLOCK_SAMPLES] for i in range(0, max(len(source), 1), BLOCK_SAMPLES))
        else:
            self._blocks = source.blocks
        self._floor = self._kept = self._reader = None
        self.n_samples = source.size if isinstance(source, np.ndarray) else None
        if self.n_samples is None:
            self._scan()
        self.total_frames = (self.n_samples + spec.n_samples) // spec.hop_length
        self.content_frames = self.total_frames - spec.n_frames

    def _scan(self) -> None:
        """The first pass: the length, the loudest frame, and a short audio's frames."""
        spec = self.spec
        hop, half = spec.hop_length, spec.n_fft // 2
        reader, peak, t0 = _Reader(self._blocks()), np.float32(-np.inf), 0
        kept: list[np.ndarray] | None = []
        while not reader.exhausted_before(t0 * hop - half):
            t1 = t0 + self._block_frames
            raw = _raw_log_mel(reader, t0, t1, spec)
            if reader.n is not None:  # frames past the end of the padded audio do not exist
                raw = raw[:, : max(0, (reader.n + spec.n_samples) // hop - t0)]
            if raw.size:
                peak = max(peak, raw.max())
            if kept is not None:
                kept = kept + [raw] if t0 + raw.shape[1] <= self.KEEP_FRAMES else None
            reader.release(t1 * hop - half)
            t0 = t1
        # A short audio's frames are kept from this pass for the windows to read.
        self._kept = None if kept is None else np.concatenate(kept + [np.zeros((spec.n_mels, 0), np.float32)], 1)
        self.n_samples = reader.n  # zero only for arrays: files and `prepare` refuse empty audio
        if t0 < (self.n_samples + spec.n_samples) // hop:  # frames of pure padding: log10 of the 1e-10 floor
            peak = max(peak, np.float32(-10.0))
        self._floor = np.float32(peak - 8.0)

    @property
    def duration(self) -> float:
        return self.n_samples / self.spec.sample_rate

    @property
    def source(self):
        """What the samples are read from: the array, or the `AudioFile` (or other source)."""
        return self._source

    def _at(self, seek: int) -> _Reader:
        """The second pass's reader, moved on to `seek`: what lies before it is forgotten."""
        if self._reader is None or self._reader_start > seek:
            self._reader, self._reader_start = _Reader(self._blocks()), 0
        self._reader.release(seek * self.spec.hop_length - self.spec.n_fft // 2)
        self._reader_start = seek
        return self._reader

    def samples(self, seek: int, frames: int) -> np.ndarray:
        """The audio's own samples under frames [seek, seek + frames)."""
        hop = self.spec.hop_length
        lo, hi = seek * hop, min((seek + frames) * hop, self.n_samples)
        return self._at(seek).get(lo, hi) if hi > lo else np.zeros(0, np.float32)

    def mel(self, seek: int, frames: int) -> np.ndarray:
        """(n_mels, frames) log-mel of frames [seek, seek + frames); later calls may not seek
        back further than this one (they may, at the cost of reading from the start)."""
        if self._floor is None:
            self._scan()
        frames = max(0, min(frames, self.total_frames - seek))
        if self._kept is not None:
            out = np.empty((self.spec.n_mels, frames), np.float32)
            got = self._kept[:, seek: seek + frames]
            out[:, : got.shape[1]] = got
            out[:, got.shape[1]:] = _silent_log_mel(self.spec)[:, None]  # the padding past the kept frames
        elif frames:
            out = _raw_log_mel(self._at(seek), seek, seek + frames, self.spec)
        else:
            out = np.zeros((self.spec.n_mels, 0), np.float32)
        return _scaled(out, self._floor)


def pad_or_trim(mel: np.ndarray, n_frames: int) -> np.ndarray:
    """Pad with zeros (as openai-whisper pads the log-mel of silence) or trim to n_frames."""
    if mel.shape[-1] >= n_frames:
        return mel[..., :n_frames]
    return np.pad(mel, [(0, 0)] * (mel.ndim - 1) + [(0, n_frames - mel.shape[-1])])
