"""The multipart fields of OpenAI's transcription and translation requests, checked
and turned into the transcript options; every refusal names the field."""

from __future__ import annotations

from dataclasses import dataclass

from ..transcribe import DEFAULT_TEMPERATURES, TranscribeOptions
from .errors import APIError
from .responses import RESPONSE_FORMATS

FIELDS = {
    "transcribe": {"file", "model", "language", "prompt", "response_format", "temperature",
                   "timestamp_granularities[]", "timestamp_granularities", "stream"},
    "translate": {"file", "model", "prompt", "response_format", "temperature"},
}
GRANULARITIES = ("segment", "word")
FALLBACK_STEP = 0.2


@dataclass(frozen=True)
class AudioRequest:
    filename: str
    model: str
    response_format: str
    options: TranscribeOptions
    stream: bool

    @property
    def words(self) -> bool:
        return self.options.word_timestamps


def _bad(field: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, f"{field}: {message}", param=field, code=code)


def _one(form, name: str) -> str | None:
    values = form.getlist(name)
    if not values:
        return None
    if len(values) > 1:
        raise _bad(name, f"given {len(values)} times; give it once")
    if not isinstance(values[0], str):
        raise _bad(name, "expected a text field, found a file")
    return values[0]


def temperatures(value: str | None) -> tuple[float, ...]:
    """0 (or none given) falls back through 0, 0.2 ... 1.0 as openai-whisper does; a
    higher temperature starts there and falls back upwards in the same steps."""
    if value is None:
        return DEFAULT_TEMPERATURES
    try:
        t = float(value)
    except ValueError:
        raise _bad("temperature", f"expected a number between 0 and 1, found {value!r}") from None
    if not 0 <= t <= 1:
        raise _bad("temperature", f"must lie between 0 and 1, found {t}")
    out = [t]
    while out[-1] + FALLBACK_STEP <= 1.0 + 1e-9:
        out.append(round(out[-1] + FALLBACK_STEP, 6))
    return tuple(out)


def parse(form, task: str, model_names: tuple[str, ...], languages: tuple[str, ...], multilingual: bool,
          model_label: str) -> AudioRequest:
    """`form`: the request's multipart form; `model_names`: the names that mean the
    loaded model; `languages`: the codes it knows."""
    known = FIELDS[task]
    unknown = sorted(set(form.keys()) - known)
    if unknown:
        raise _bad(unknown[0], f"unknown field; this endpoint takes {', '.join(sorted(known))}",
                   code="unknown_parameter")
    model = _one(form, "model")
    if model is None:
        raise _bad("model", "required (the loaded model's name, or whisper-1)", code="missing_required_parameter")
    if model not in model_names:
        raise APIError(404, f"model {model!r} is not served here; this server has {', '.join(model_names)}",
                       param="model", code="model_not_found")
    files = form.getlist("file")
    if not files:
        raise _bad("file", "required: the audio file to transcribe", code="missing_required_parameter")
    if len(files) > 1 or isinstance(files[0], str):
        raise _bad("file", "expected one uploaded file")
    if task == "translate" and not multilingual:
        raise _bad("model", f"{model_label} is an English-only model; translations need a multilingual one")

    fmt = _one(form, "response_format") or "json"
    if fmt not in RESPONSE_FORMATS:
        raise _bad("response_format", f"expected one of {', '.join(RESPONSE_FORMATS)}, found {fmt!r}")

    language = _one(form, "language") or None
    if language is not None:
        if not multilingual and language != "en":
            raise _bad("language", f"{model_label} transcribes English only, found {language!r}")
        if multilingual and language not in languages:
            raise _bad("language", f"unknown language code {language!r}; expected an ISO-639-1 code such as 'en'")

    granularities = form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")
    for g in granularities:
        if g not in GRANULARITIES:
            raise _bad("timestamp_granularities[]", f"expected segment or word, found {g!r}")
    words = "word" in granularities
    if granularities and fmt != "verbose_json":
        raise _bad("timestamp_granularities[]", f"needs response_format verbose_json, found {fmt!r}")

    stream_value = (_one(form, "stream") or "false").lower()
    if stream_value not in ("true", "false"):
        raise _bad("stream", f"expected true or false, found {stream_value!r}")
    stream = stream_value == "true"
    if stream and fmt not in ("json", "text"):
        raise _bad("stream", f"streams text events; it takes response_format json or text, found {fmt!r}")

    options = TranscribeOptions(language=language, task=task, temperature=temperatures(_one(form, "temperature")),
                                initial_prompt=_one(form, "prompt") or None, word_timestamps=words)
    return AudioRequest(filename=files[0].filename or "upload", model=model, response_format=fmt,
                        options=options, stream=stream)
