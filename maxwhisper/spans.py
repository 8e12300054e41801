"""The parts of an audio that are transcribed: the spans that `clip_timestamps` names,
narrowed to speech by the VAD; joined into one audio (decoded in order, each window
prompted with the text before it) or cut at pauses into chunks of one window (decoded
side by side, each as audio of its own); and the times of what was decoded mapped back
onto the original timeline."""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass

import numpy as np

from .audio import BLOCK_SAMPLES, slice_blocks
from .vad import BLOCK, WINDOW, VadOptions, detector, speech_timestamps

CHUNK_S = 30.0  # one Whisper window


def parse_clip_timestamps(clips) -> tuple[float, ...]:
    """openai-whisper's `clip_timestamps`: "start,end,start,end,..." seconds (a last end
    left out runs to the end of the audio), or a sequence of numbers. Refused with a
    message naming the option when a value does not parse, is negative, or runs
    backwards."""
    if isinstance(clips, str):
        parts = [p.strip() for p in clips.split(",")] if clips.strip() else []
        try:
            values = tuple(float(p) for p in parts)
        except ValueError:
            raise ValueError(f"clip_timestamps must be seconds as 'start,end,start,end,...', found {clips!r}") from None
    else:
        try:
            values = tuple(float(v) for v in clips)
        except (TypeError, ValueError):
            raise ValueError(f"clip_timestamps must be a 'start,end,...' string or a sequence of seconds, "
                             f"found {clips!r}") from None
    if not values:
        raise ValueError("clip_timestamps is empty; '0' transcribes the whole audio")
    bad = [v for v in values if not math.isfinite(v) or v < 0]
    if bad:
        raise ValueError(f"clip_timestamps must be finite seconds >= 0, found {bad[0]!r} in {clips!r}")
    for k in range(1, len(values)):
        if values[k] < values[k - 1]:
            kind = "end" if k % 2 else "start"
            raise ValueError(f"clip_timestamps run backwards: the {kind} {values[k]} is before the "
                             f"{values[k - 1]} ahead of it in {clips!r}")
    return values


def clip_spans(values: tuple[float, ...], n_samples: int, sample_rate: int) -> list[tuple[int, int]]:
    """[(start, end)] samples of the clips inside the audio."""
    bounds = list(values) + ([n_samples / sample_rate] if len(values) % 2 else [])
    spans = []
    for start, end in zip(bounds[::2], bounds[1::2]):
        a, b = min(round(start * sample_rate), n_samples), min(round(end * sample_rate), n_samples)
        if b > a:
            spans.append((a, b))
    return spans


def pieces(source, spans: list[tuple[int, int]]):
    """(k, samples) of each span of `source` in turn: views of an array, or blocks read
    from an `AudioFile` (or any source with `blocks()`), never the whole audio at once."""
    if isinstance(source, np.ndarray):
        return ((k, source[i: min(i + BLOCK_SAMPLES, b)]) for k, (a, b) in enumerate(spans)
                for i in range(a, b, BLOCK_SAMPLES))
    if hasattr(source, "pieces"):
        return source.pieces(spans)
    return slice_blocks(source.blocks(), spans)


def _exact(chunks, size: int):
    """The samples of `chunks` regrouped into arrays of `size`, the rest last."""
    held, n = [], 0
    for chunk in chunks:
        while chunk.size:
            take = min(size - n, chunk.size)
            held.append(chunk[:take])
            n, chunk = n + take, chunk[take:]
            if n == size:
                yield np.concatenate(held)
                held, n = [], 0
    if n:
        yield np.concatenate(held)


def probabilities(source, spans: list[tuple[int, int]]) -> list[np.ndarray]:
    """The VAD's speech probabilities of each span, the VAD run on the span alone and fed
    as `SileroVad.__call__` feeds a whole array, so that they are the same."""
    vad, probs = detector(), [np.zeros(0, np.float32) for _ in spans]
    for k, group in itertools.groupby(pieces(source, spans), key=lambda piece: piece[0]):
        stream = vad.streaming()
        got = [stream(chunk) for chunk in _exact((samples for _, samples in group), BLOCK * WINDOW)]
        probs[k] = np.concatenate([np.zeros(0, np.float32), *got, stream.flush()])
    return probs


def speech_spans(probs: list[np.ndarray], spans: list[tuple[int, int]], vad: VadOptions) -> list[tuple[int, int]]:
    """The speech inside each span, from its `probabilities`."""
    out = []
    for p, (a, b) in zip(probs, spans):
        out += [(a + s, a + e) for s, e in speech_timestamps(p, b - a, vad)]
    return out


def speech_chunks(probs: list[np.ndarray], spans: list[tuple[int, int]], vad: VadOptions, sample_rate: int,
                  chunk_s: float = CHUNK_S) -> list[Timeline]:
    """The speech inside the spans (from their `probabilities`) cut at pauses into
    chunks of at most `chunk_s` (one window each), in order (`_chunks`). A pause is a
    gap between speech spans, or a run of windows below the VAD's silence threshold
    inside one. Each chunk is then read as a long-form audio of its own."""
    speech, pauses = [], []
    for p, (a, b) in zip(probs, spans):
        found = [(a + s, a + e) for s, e in speech_timestamps(p, b - a, vad)]
        pauses += _pauses(p, found, a, vad) + ([(speech[-1][1], found[0][0], found[0][0] - speech[-1][1])]
                                               if speech and found else [])
        speech += found
    if not speech:
        return []
    return _chunks(speech, sorted(pauses), sample_rate, chunk_s)


def _pauses(probs: np.ndarray, speech: list[tuple[int, int]], offset: int,
            vad: VadOptions) -> list[tuple[int, int, int]]:
    """Where a chunk may end: (its end, the next one's start, how long the pause
    is) in samples, at each gap between speech spans and in the middle of each run of
    quiet windows (three or more, 96 ms) inside a span."""
    cuts = [(e, s, s - e) for (_, e), (s, _) in zip(speech, speech[1:])]
    quiet = np.concatenate([[False], probs < vad.silence_threshold, [False]])
    edges = np.flatnonzero(np.diff(quiet.astype(np.int8)))
    for first, last in zip(edges[::2], edges[1::2]):
        if last - first >= 3:
            mid = offset + (first + last) // 2 * WINDOW
            if any(s < mid < e for s, e in speech):
                cuts.append((mid, mid, (last - first) * WINDOW))
    return sorted(cuts)


def _chunks(speech: list[tuple[int, int]], pauses: list[tuple[int, int, int]], sample_rate: int,
            chunk_s: float) -> list[Timeline]:
    """Chunks of at most `chunk_s` of speech, each ended at the longest pause in its last
    third (else at its latest pause, else where `chunk_s` runs out), so that a window
    holds a chunk whole and sees where its speech stops."""
    starts = np.cumsum([0] + [e - s for s, e in speech])
    total, limit = int(starts[-1]), int(chunk_s * sample_rate)

    firsts = [s for s, _ in speech]

    def content(x: int) -> int:  # speech before sample x
        k = bisect.bisect_right(firsts, x) - 1
        return 0 if k < 0 else int(starts[k] + min(x, speech[k][1]) - speech[k][0])

    def at(c: int) -> int:  # the sample where c samples of speech have gone by
        i = int(np.searchsorted(starts, c, side="right")) - 1
        return int(speech[i][0] + c - starts[i])

    placed = [(content(stop), stop, start, length) for stop, start, length in pauses]
    chunks, x, done = [], speech[0][0], 0
    while total - done > limit:
        inside = [p for p in placed if done < p[0] <= done + limit and p[1] > x]
        late = [p for p in inside if p[0] > done + 2 * limit // 3]
        if late:
            _, stop, start, _ = max(late, key=lambda p: (p[3], p[0]))
        elif inside:
            _, stop, start, _ = inside[-1]
        else:
            stop = start = at(done + limit)
        chunks.append((x, stop))
        x, done = start, content(start)
    chunks.append((x, speech[-1][1]))

    def part(x: int, y: int) -> tuple[tuple[int, int], ...]:
        return tuple((max(s, x), min(e, y)) for s, e in speech if min(e, y) > max(s, x))

    return [Timeline(part(x, y), sample_rate) for x, y in chunks]


@dataclass(frozen=True)
class Timeline:
    """Spans of the original audio laid end to end: where each starts in the joined
    audio, and where it came from."""
    spans: tuple[tuple[int, int], ...]
    sample_rate: int

    @property
    def joined_starts(self) -> list[int]:
        starts, at = [], 0
        for a, b in self.spans:
            starts.append(at)
            at += b - a
        return starts

    def joined(self, source) -> Joined:
        """The spans of `source` (the audio they were found in) laid end to end."""
        return Joined(source, self.spans)

    def original(self, seconds: float, is_end: bool = False) -> float:
        """A time in the joined audio on the original timeline. An end that falls on a
        join belongs to the span before it; a start there, to the span after it."""
        if not self.spans:
            return seconds
        sample = seconds * self.sample_rate
        starts = self.joined_starts
        k = (bisect.bisect_left if is_end else bisect.bisect_right)(starts, sample) - 1
        k = min(max(k, 0), len(starts) - 1)
        a, b = self.spans[k]
        return min(a + sample - starts[k], b) / self.sample_rate

    def restore(self, result: dict, hop_length: int) -> dict:
        """`result` (of the joined audio) with segment and word times, and each
        segment's `seek`, on the original timeline."""
        for segment in result["segments"]:
            segment["seek"] = round(self.original(segment["seek"] * hop_length / self.sample_rate)
                                    * self.sample_rate / hop_length)
            segment["start"] = round(self.original(segment["start"]), 3)
            segment["end"] = round(self.original(segment["end"], is_end=True), 3)
            for word in segment.get("words", ()):
                word["start"] = round(self.original(word["start"]), 3)
                word["end"] = round(self.original(word["end"], is_end=True), 3)
        return result


@dataclass(frozen=True, eq=False)
class Joined:
    """A source's spans laid end to end, as a `Spectrogram` reads its source: block by
    block, each time it is read, so that a part of an hour never sits in memory whole."""
    source: object
    spans: tuple[tuple[int, int], ...]

    def blocks(self):
        for _, samples in pieces(self.source, list(self.spans)):
            yield samples


def merged(results: list[dict], language: str | None) -> dict:
    """The results of one audio's parts, in order, as one result."""
    segments = [s for r in results for s in r["segments"]]
    for i, segment in enumerate(segments):
        segment["id"] = i
    out = dict(text="".join(s["text"] for s in segments), segments=segments,
               language=results[0]["language"] if results else language)
    probs = [r["language_probs"] for r in results if "language_probs" in r]
    if probs:
        out["language_probs"] = probs[0]
    return out
