"""openai-whisper's `hallucination_silence_threshold`: with word timestamps, a window's
words that look like a hallucination (improbable, or too short or too long to be
spoken) and stand in silence are dropped, and the seek skips the silence before them,
so that the next window starts at the speech."""

from __future__ import annotations

# The symbols that do not count as words (openai-whisper's set, quotes twice).
PUNCTUATION = "\"'“¿([{-\"'.。,，!！?？:：”)]}、"


def word_anomaly(word: dict) -> float:
    """How unlike a spoken word `word` is: improbable, shorter than 0.133 s, longer than 2 s."""
    probability = word.get("probability", 0.0)
    duration = word["end"] - word["start"]
    score = 0.0
    if probability < 0.15:
        score += 1.0
    if duration < 0.133:
        score += (0.133 - duration) * 15
    if duration > 2.0:
        score += duration - 2.0
    return score


def is_anomaly(segment: dict | None) -> bool:
    """Whether a segment's first eight words look made up."""
    if segment is None or not segment["words"]:
        return False
    words = [w for w in segment["words"] if w["word"] not in PUNCTUATION][:8]
    score = sum(word_anomaly(w) for w in words)
    return score >= 3 or score + 0.01 >= len(words)


def end_of(segments: list[dict]) -> float | None:
    """The end of the last word, or of the last segment when none has words."""
    return next((w["end"] for s in reversed(segments) for w in reversed(s["words"])),
                segments[-1]["end"] if segments else None)


def _with_words(segments: list[dict]) -> dict | None:
    return next((s for s in segments if s["words"]), None)


def skip_silence(segments: list[dict], threshold: float, *, seek: int, previous_seek: int, frames: int,
                 time_offset: float, window_end: float, window_duration: float, single_ending: bool,
                 last_speech: float, content_frames: int, content_duration: float,
                 frames_per_second: int) -> tuple[int, bool]:
    """The seek after a window whose `segments` (with words) were decoded from
    `previous_seek`, and whether the window is kept. A possible hallucination surrounded
    by silence (more than `threshold` seconds, or the window's edges) is cut off with
    what follows it, in place; when the window's first worded segment is one, the
    window is dropped and the seek moves to it."""
    if not single_ending:
        end = end_of(segments)
        if end is not None and end > time_offset:
            # Resume at the last word only when silence follows it; else read on.
            seek = round(end * frames_per_second) if window_end - end > threshold else previous_seek + frames
    first = _with_words(segments)
    if first is not None and is_anomaly(first):
        gap = first["start"] - time_offset
        if gap > threshold:
            return previous_seek + round(gap * frames_per_second), False
    last_end = last_speech
    for k, segment in enumerate(segments):
        if not segment["words"]:
            continue
        if is_anomaly(segment):
            nxt = _with_words(segments[k + 1:])
            next_start = nxt["words"][0]["start"] if nxt is not None else time_offset + window_duration
            silence_before = (segment["start"] - last_end > threshold or segment["start"] < threshold
                              or segment["start"] - time_offset < 2.0)
            silence_after = (next_start - segment["end"] > threshold or is_anomaly(nxt)
                             or window_end - segment["end"] < 2.0)
            if silence_before and silence_after:
                seek = round(max(time_offset + 1, segment["start"]) * frames_per_second)
                if content_duration - segment["end"] < threshold:
                    seek = content_frames
                del segments[k:]
                break
        last_end = segment["end"]
    return seek, True
