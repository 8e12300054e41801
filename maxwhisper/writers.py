"""Transcript files in openai-whisper's CLI conventions: txt, json, srt, vtt, tsv."""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
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


class OutputError(OSError):
    """Transcripts that cannot be written where asked; the message names the path."""


def check_output_dir(output_dir: str | Path) -> Path:
    """The output directory, made if missing; refused when it is a file or not writable,
    before any audio is decoded."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: the output directory is a file")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out}: cannot make the output directory ({e.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: the output directory is not writable")
    return out


def output_stems(audio_paths: Sequence[str | Path]) -> list[str]:
    """One output name per input, in input order: the audio's stem (`talk.wav` -> `talk`),
    or, where inputs share a stem, its whole file name (`clip.flac`, `clip.mp3`); where
    they share that too (`a/same.wav`, `b/same.wav`), `-2`, `-3`, ... in input order after
    the first."""
    paths = [Path(p) for p in audio_paths]
    stems = Counter(p.stem for p in paths)
    names = [p.stem if stems[p.stem] == 1 else p.name for p in paths]
    taken: set[str] = set()
    out = []
    for name in names:
        candidate, k = name, 2
        while candidate in taken:
            candidate, k = f"{name}-{k}", k + 1
        taken.add(candidate)
        out.append(candidate)
    return out


def write_atomic(path: Path, data: str | bytes) -> None:
    """The file appears whole or not at all: written beside its target (text as UTF-8),
    synced, then renamed over it."""
    if path.is_dir():
        raise OutputError(f"{path}: cannot write the file, a directory is in the way")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write(result: dict, audio_path: str | Path, output_dir: str | Path, fmt: str,
          stem: str | None = None) -> list[Path]:
    """Writes <output_dir>/<stem>.<ext> for `fmt` (or every format for 'all'); `stem`
    defaults to the audio's. Each file is written atomically; OutputError names the path
    that failed."""
    formats = FORMATS if fmt == "all" else (fmt,)
    out_dir = check_output_dir(output_dir)
    stem = Path(audio_path).stem if stem is None else stem
    written = []
    for f in formats:
        path = out_dir / f"{stem}.{f}"
        try:
            write_atomic(path, globals()[f"to_{f}"](result))
        except OutputError:
            raise
        except OSError as e:
            raise OutputError(f"{path}: cannot write the transcript ({e.strerror or e})") from None
        written.append(path)
    return written
