"""Transcripts in the shapes of OpenAI's audio API: json, text, srt, vtt, verbose_json,
and the server-sent events of a streamed transcription."""

from __future__ import annotations

import json

from ..tokenizer import LANGUAGES
from ..writers import to_srt, to_vtt

RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")

# English names, in the order of LANGUAGES: OpenAI's verbose_json names the language.
_NAMES = (
    "english chinese german spanish russian korean french japanese portuguese turkish polish catalan dutch "
    "arabic swedish italian indonesian hindi finnish vietnamese hebrew ukrainian greek malay czech romanian "
    "danish hungarian tamil norwegian thai urdu croatian bulgarian lithuanian latin maori malayalam welsh "
    "slovak telugu persian latvian bengali serbian azerbaijani slovenian kannada estonian macedonian breton "
    "basque icelandic armenian nepali mongolian bosnian kazakh albanian swahili galician marathi punjabi "
    "sinhala khmer shona yoruba somali afrikaans occitan georgian belarusian tajik sindhi gujarati amharic "
    "yiddish lao uzbek faroese haitian_creole pashto turkmen nynorsk maltese sanskrit luxembourgish myanmar "
    "tibetan tagalog malagasy assamese tatar hawaiian lingala hausa bashkir javanese sundanese cantonese"
).split()
LANGUAGE_NAMES = {code: name.replace("_", " ") for code, name in zip(LANGUAGES, _NAMES, strict=True)}

SEGMENT_KEYS = ("id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
                "compression_ratio", "no_speech_prob")


def duration_of(samples: int, sample_rate: int) -> float:
    return round(samples / sample_rate, 3)


def _usage(duration: float) -> dict:
    return {"type": "duration", "seconds": duration}


def verbose_json(result: dict, task: str, duration: float, words: bool) -> dict:
    """OpenAI's verbose_json: the task, the language's English name, the duration, the
    text, every segment, and the words when asked for."""
    out = dict(task=task, language=LANGUAGE_NAMES.get(result["language"] or "en", result["language"]),
               duration=duration, text=result["text"].strip(),
               segments=[{k: s[k] for k in SEGMENT_KEYS} for s in result["segments"]])
    if words:
        out["words"] = [dict(word=w["word"], start=w["start"], end=w["end"])
                        for s in result["segments"] for w in s.get("words", [])]
    out["usage"] = _usage(duration)
    return out


def render(result: dict, fmt: str, task: str, duration: float, words: bool) -> tuple[str, str]:
    """(body, media type) of a finished transcript in `fmt`."""
    if fmt == "json":
        return json.dumps(dict(text=result["text"].strip(), usage=_usage(duration)), ensure_ascii=False), \
            "application/json"
    if fmt == "verbose_json":
        return json.dumps(verbose_json(result, task, duration, words), ensure_ascii=False), "application/json"
    if fmt == "text":
        return result["text"].strip() + "\n", "text/plain; charset=utf-8"
    if fmt == "srt":
        return to_srt(result), "text/plain; charset=utf-8"
    if fmt == "vtt":
        return to_vtt(result), "text/plain; charset=utf-8"
    raise ValueError(f"unknown response_format {fmt!r}")


def sse(event: dict) -> str:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"


def text_delta(segments: list[dict]) -> dict | None:
    """A `transcript.text.delta` event of a window's new segments; None when they hold no text."""
    text = "".join(s["text"] for s in segments)
    return {"type": "transcript.text.delta", "delta": text} if text else None


def text_done(result: dict, duration: float) -> dict:
    return {"type": "transcript.text.done", "text": result["text"].strip(), "usage": _usage(duration)}
