"""Transcript files in openai-whisper's CLI conventions: txt, json, srt, vtt, tsv."""

from __future__ import annotations

import json
from pathlib import Path

FORMATS = ("txt", "json", "srt", "vtt", "tsv")


def format_timestamp(seconds: float, always_include_hours: bool, decimal_marker: str) -> str:
    ms = round(seconds * 1000.0)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    head = f"{hours:02d}:" if always_include_hours or hours else ""
    return f"{head}{minutes:02d}:{secs:02d}{decimal_marker}{ms:03d}"


def _cues(result: dict):
    """Non-empty segments as (start, end, text). Players mis-render cues that overlap or
    run backwards, so a cue never starts before the previous one ended."""
    last_end = 0.0
    for seg in result["segments"]:
        text = seg["text"].strip().replace("-->", "->")
        if text:
            start = max(seg["start"], last_end)
            last_end = max(seg["end"], start)
            yield start, last_end, text


def to_txt(result: dict) -> str:
    return "".join(f"{seg['text'].strip()}\n" for seg in result["segments"] if seg["text"].strip())


def to_json(result: dict) -> str:
    return json.dumps(result, ensure_ascii=False)


def to_srt(result: dict) -> str:
    return "".join(f"{i}\n{format_timestamp(s, True, ',')} --> {format_timestamp(e, True, ',')}\n{t}\n\n"
                   for i, (s, e, t) in enumerate(_cues(result), start=1))


def to_vtt(result: dict) -> str:
    return "WEBVTT\n\n" + "".join(f"{format_timestamp(s, False, '.')} --> {format_timestamp(e, False, '.')}\n{t}\n\n"
                                  for s, e, t in _cues(result))


def to_tsv(result: dict) -> str:
    """Start and end in integer milliseconds, as openai-whisper writes them."""
    rows = (f"{round(1000 * s['start'])}\t{round(1000 * s['end'])}\t{s['text'].strip().replace(chr(9), ' ')}\n"
            for s in result["segments"])
    return "start\tend\ttext\n" + "".join(rows)


def write(result: dict, audio_path: str | Path, output_dir: str | Path, fmt: str) -> list[Path]:
    """Writes <output_dir>/<audio stem>.<ext> for `fmt` (or every format for 'all')."""
    formats = FORMATS if fmt == "all" else (fmt,)
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for f in formats:
        path = out_dir / f"{Path(audio_path).stem}.{f}"
        path.write_text(globals()[f"to_{f}"](result), encoding="utf-8")
        written.append(path)
    return written
