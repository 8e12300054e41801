"""Word-level timestamps: align a window's text tokens to audio frames with the
cross-attention of the alignment heads and dynamic time warping, then attach each word's
start, end and probability to its segment (openai-whisper's method and heuristics)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
SENTENCE_END = ".。!！?？"


@dataclass
class WordTiming:
    word: str
    tokens: list[int]
    start: float
    end: float
    probability: float


def median_filter(x: np.ndarray, width: int) -> np.ndarray:
    """Median over a sliding window of odd `width` along the last axis, edges reflected."""
    pad = width // 2
    if x.shape[-1] <= pad:  # too short to reflect: leave it as is
        return x
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    return np.median(np.lib.stride_tricks.sliding_window_view(padded, width, axis=-1), axis=-1)


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cheapest monotonic path through `cost` (N, M) from (0, 0) to (N-1, M-1), moving
    diagonally, down or right. Returns the (row, column) index pairs along it.

    Cells on one anti-diagonal depend only on the two before, so each diagonal is one
    vectorised step. Ties go right, then down, as openai-whisper's implementation breaks
    them; the running totals are float32 as there."""
    n, m = cost.shape
    total = np.full((n + 1, m + 1), np.inf, np.float32)
    total[0, 0] = 0
    move = np.zeros((n + 1, m + 1), np.int8)  # 0 diagonal, 1 down, 2 right
    for d in range(2, n + m + 1):
        i = np.arange(max(1, d - m), min(n, d - 1) + 1)
        j = d - i
        diag, down, right = total[i - 1, j - 1], total[i - 1, j], total[i, j - 1]
        step = np.where((diag < down) & (diag < right), 0, np.where((down < diag) & (down < right), 1, 2))
        best = np.choose(step, [diag, down, right])
        total[i, j] = (cost[i - 1, j - 1] + best).astype(np.float32)
        move[i, j] = step
    move[0, :], move[:, 0] = 2, 1
    path, i, j = [], n, m
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        s = move[i, j]
        i, j = (i - 1, j - 1) if s == 0 else (i - 1, j) if s == 1 else (i, j - 1)
    rows, cols = np.array(path[::-1]).T
    return rows, cols


def find_alignment(runtime, tok, text_tokens: list[int], cross, num_frames: int,
                   medfilt_width: int = 7, qk_scale: float = 1.0) -> list[WordTiming]:
    """Words of `text_tokens` with their start and end (seconds from the window start).
    `cross`: the window's cross-attention K/V (batch 1); `num_frames`: its mel frames."""
    if not text_tokens:
        return []
    sot = tok.sot_sequence
    tokens = [*sot, tok.no_timestamps, *text_tokens, tok.eot]
    logits, qk = runtime.align(np.array([tokens], np.int64), runtime.start(*cross))
    text_logits = logits[0, len(sot): len(sot) + len(text_tokens), : tok.eot].astype(np.float64)
    text_logits -= text_logits.max(axis=-1, keepdims=True)
    probs = np.exp(text_logits) / np.exp(text_logits).sum(axis=-1, keepdims=True)
    token_probs = probs[np.arange(len(text_tokens)), text_tokens]

    # Attention of each alignment head over the window's audio (2 mel frames per position).
    weights = qk[0, :, :, : num_frames // 2].astype(np.float64) * qk_scale
    weights = np.exp(weights - weights.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    # A window of one or two frames leaves nothing to tell tokens apart (std 0): all
    # positions score alike there, rather than NaN.
    std = weights.std(axis=-2, keepdims=True)
    weights = (weights - weights.mean(axis=-2, keepdims=True)) / np.where(std > 0, std, 1.0)
    matrix = median_filter(weights, medfilt_width).mean(axis=0)[len(sot): -1]
    text_index, time_index = dtw(-matrix)

    words, word_tokens = tok.split_to_word_tokens(text_tokens + [tok.eot])
    if len(word_tokens) <= 1:
        return []
    bounds = np.concatenate([[0], np.cumsum([len(t) for t in word_tokens[:-1]])])
    # The first frame each token is aligned to is when it starts.
    jumps = np.diff(text_index, prepend=-1).astype(bool)
    jump_times = time_index[jumps] / (runtime.spec.encoder.n_ctx / runtime.spec.audio.chunk_seconds)
    return [WordTiming(word, toks, float(jump_times[a]), float(jump_times[b]), float(np.mean(token_probs[a:b])))
            for word, toks, a, b in zip(words, word_tokens, bounds[:-1], bounds[1:])]


def merge_punctuations(words: list[WordTiming], prepended: str, appended: str) -> None:
    """Opening punctuation joins the word after it, closing punctuation the word before;
    the emptied entries stay (with no tokens) so that token counts still line up."""
    target = len(words) - 1
    for i in range(len(words) - 2, -1, -1):
        w, nxt = words[i], words[target]
        if w.word.startswith(" ") and w.word.strip() in prepended:
            nxt.word, nxt.tokens = w.word + nxt.word, w.tokens + nxt.tokens
            w.word, w.tokens = "", []
        else:
            target = i
    target = 0
    for i in range(1, len(words)):
        prev, w = words[target], words[i]
        if not prev.word.endswith(" ") and w.word in appended:
            prev.word, prev.tokens = prev.word + w.word, prev.tokens + w.tokens
            w.word, w.tokens = "", []
        else:
            target = i


def add_word_timestamps(segments: list[dict], runtime, tok, cross, num_frames: int,
                        last_speech_timestamp: float, prepend_punctuations: str = PREPEND_PUNCTUATIONS,
                        append_punctuations: str = APPEND_PUNCTUATIONS) -> None:
    """Give every segment of one window its `words`, and pull the segment's start and
    end to its first and last word, with openai-whisper's guards against the long first
    and last words that DTW produces around pauses."""
    if not segments:
        return
    per_segment = [[t for t in s["tokens"] if t < tok.eot] for s in segments]
    words = find_alignment(runtime, tok, [t for ts in per_segment for t in ts], cross, num_frames)
    durations = np.array([w.end - w.start for w in words])
    durations = durations[durations.nonzero()]
    median = min(0.7, float(np.median(durations))) if len(durations) else 0.0
    longest = median * 2
    if len(durations):
        # Words at sentence ends soak up the pause after them: cap them.
        for prev, w in zip(words, words[1:]):
            if w.end - w.start > longest:
                if w.word in SENTENCE_END:
                    w.end = w.start + longest
                elif prev.word in SENTENCE_END:
                    w.start = w.end - longest
    merge_punctuations(words, prepend_punctuations, append_punctuations)

    offset = segments[0]["seek"] * runtime.spec.audio.hop_length / runtime.spec.audio.sample_rate
    it = iter(words)
    for segment, tokens in zip(segments, per_segment):
        out, taken = [], 0
        while taken < len(tokens):
            w = next(it, None)
            if w is None:
                break
            if w.word:
                out.append(dict(word=w.word, start=round(float(offset + w.start), 2),
                                end=round(float(offset + w.end), 2), probability=float(w.probability)))
            taken += len(w.tokens)
        if out:
            first, last = out[0], out[-1]
            # After a pause, the first word (and the second) may have swallowed silence.
            if first["end"] - last_speech_timestamp > median * 4 and (
                    first["end"] - first["start"] > longest
                    or (len(out) > 1 and out[1]["end"] - first["start"] > longest * 2)):
                if len(out) > 1 and out[1]["end"] - out[1]["start"] > longest:
                    first["end"] = out[1]["start"] = max(out[1]["end"] / 2, out[1]["end"] - longest)
                first["start"] = max(0, first["end"] - longest)
            if segment["start"] < first["end"] and segment["start"] - 0.5 > first["start"]:
                first["start"] = max(0, min(first["end"] - median, segment["start"]))
            else:
                segment["start"] = first["start"]
            if segment["end"] > last["start"] and segment["end"] + 0.5 < last["end"]:
                last["end"] = max(last["start"] + median, segment["end"])
            else:
                segment["end"] = last["end"]
            last_speech_timestamp = segment["end"]
        segment["words"] = out
