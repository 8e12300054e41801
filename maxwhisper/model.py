"""The user-facing model: `load_model(...)` and `Whisper.transcribe(...)`."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from .audio import AudioFile, Spectrogram, prepare
from .registry import DEFAULT_MODEL, ensure_converted
from .runtime import CompiledWhisper
from .spec import ModelSpec, is_builtin_name, load_spec
from .tokenizer import WhisperTokenizer
from .transcribe import TranscribeOptions, transcribe, transcribe_batch
from .weights import WeightsError, embedded_spec, load_weights


class Whisper:
    """A compiled model with its tokenizer; compile once, transcribe many."""

    def __init__(self, spec: ModelSpec, weights: dict[str, np.ndarray], tokenizer_json: str | Path,
                 device: str = "auto", precision: str | None = None, attention: str = "unfused",
                 greedy_on_device: bool | None = None):
        self.spec = spec
        self.tokenizer = WhisperTokenizer(tokenizer_json, spec)
        self.runtime = CompiledWhisper(spec, weights, device=device, precision=precision, attention=attention,
                                       greedy_on_device=greedy_on_device)

    def placed(self, greedy_on_device: bool) -> Whisper:
        """This model, compiled graphs shared, with greedy decoding on the device or the host."""
        other = copy.copy(self)
        other.runtime = self.runtime.placed(greedy_on_device)
        return other

    @property
    def device(self) -> str:
        return self.runtime.device_name

    @property
    def precision(self) -> str:
        """'float32', 'float16', 'bfloat16', 'q4_0' (the decoder's matrices in 4-bit
        blocks, the rest float32), 'amx_bf16' (matrix products on AMX in bfloat16),
        'amx_q4_0' (q4_0's decoder, amx_bf16's encoder), or 'avx512_bf16' and
        'avx512_q4_0' (the same with AVX-512 BF16 dot products)."""
        return self.runtime.precision.name

    @property
    def is_multilingual(self) -> bool:
        return self.spec.vocab.multilingual

    def transcribe(self, audio: str | Path | np.ndarray, options: TranscribeOptions | None = None,
                   batch_size: int = 1, **overrides) -> dict:
        """`audio`: a file path, or mono float32 samples at 16 kHz. Options as
        openai-whisper's `transcribe()` (language, task, temperature, ...): a
        `TranscribeOptions`, keyword overrides of its fields, or both. With
        `vad_filter=True`, `batch_size` > 1 cuts the speech at pauses into chunks of one
        window and decodes up to `batch_size` of them side by side."""
        return transcribe(self, self._samples(audio), options, batch_size=batch_size, **overrides)

    def transcribe_many(self, audios, options: TranscribeOptions | None = None, batch_size: int = 8,
                        **overrides) -> list[dict]:
        """Transcribe several files or sample arrays, up to `batch_size` decoded together;
        results in input order, equal to transcribing each alone (on the CPU a lone row
        takes a matrix-vector kernel, so logits agree to float rounding, not bit for bit)."""
        sources = [self._samples(a) for a in audios]  # bad audio refused before any decoding
        results = dict(transcribe_batch(self, sources, options, batch_size=batch_size, **overrides))
        return [results[i] for i in range(len(results))]

    def _samples(self, audio: str | Path | np.ndarray) -> Spectrogram:
        """A file is read a window at a time (its samples never all in memory)."""
        a = self.spec.audio
        if isinstance(audio, (str, Path)):
            return Spectrogram(AudioFile(audio, a.sample_rate), a)
        return Spectrogram(prepare(audio, a.sample_rate, a.sample_rate), a)


def _local_files(path: Path, spec: str | None) -> tuple[Path, Path, ModelSpec]:
    weights = path / "model.safetensors" if path.is_dir() else path
    if not weights.is_file():
        raise WeightsError(f"{path}: no model.safetensors found")
    tokenizer = weights.parent / "tokenizer.json"
    if spec is not None:
        return weights, tokenizer, load_spec(spec)
    found = embedded_spec(weights)
    if found is None:
        raise WeightsError(f"{weights}: the file does not say which spec it is; pass spec=NAME or a YAML path")
    return weights, tokenizer, found


def load_model(name_or_path: str | Path = DEFAULT_MODEL, device: str = "auto", spec: str | None = None,
               precision: str | None = None, attention: str = "unfused",
               greedy_on_device: bool | None = None) -> Whisper:
    """A built-in model name (its weight package must be installed; converted once into
    the cache) or a converted .safetensors file / directory, with tokenizer.json beside it.
    `precision`: 'float32', 'float16', 'bfloat16', 'q4_0' (CPU: the decoder's matrices in
    4-bit blocks, faster per token, words may differ in places; docs/transcription.md),
    'amx_bf16' (CPUs with Intel AMX: every matrix product in bfloat16 on AMX tiles,
    activations float32), 'amx_q4_0' (q4_0's decoder with amx_bf16's encoder),
    'avx512_bf16' and 'avx512_q4_0' (the same two on CPUs with AVX-512 BF16, such as AMD
    Zen 4: bfloat16 dot products in vector registers), or None for the device's default
    (bfloat16 on a GPU, float32 on the CPU).
    `attention`: 'unfused', or 'fused' for MAX's flash-attention kernel (GPU only).
    `greedy_on_device`: greedy decoding as one device loop; default on a GPU only.
    The first load on a machine compiles the graphs (announced on the `maxwhisper`
    logger); later loads read them compiled from the cache."""
    path = Path(name_or_path)
    if is_builtin_name(str(name_or_path)) or not path.exists():  # `-o tiny.en` leaves a folder here
        weights, tokenizer, model_spec = ensure_converted(str(name_or_path))
    else:
        weights, tokenizer, model_spec = _local_files(path, spec)
    return Whisper(model_spec, load_weights(weights, model_spec), tokenizer, device=device, precision=precision,
                   attention=attention, greedy_on_device=greedy_on_device)
