"""Uploaded audio bytes to the model's samples, refused by name when they cannot be."""

from __future__ import annotations

import io
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..audio import AudioError, load_audio, prepare


def decode_upload(data: bytes, filename: str, sample_rate: int) -> np.ndarray:
    """Mono float32 samples at `sample_rate` from a file's bytes: soundfile reads
    WAV/FLAC/OGG (and MP3 where libsndfile has it) from memory; other formats go
    through ffmpeg when it is installed."""
    import soundfile as sf

    if not data:
        raise AudioError(f"{filename}: the uploaded file is empty (zero bytes)")
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        if not shutil.which("ffmpeg"):
            raise AudioError(f"{filename}: not a readable audio file ({e}); formats beyond WAV/FLAC/OGG "
                             "need ffmpeg installed on the server") from None
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"upload{Path(filename).suffix}"
            path.write_bytes(data)
            try:
                return load_audio(path, sample_rate)
            except AudioError as err:
                raise AudioError(str(err).replace(str(path), filename)) from None
    return prepare(samples, rate, sample_rate, filename)
