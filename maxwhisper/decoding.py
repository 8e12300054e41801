"""Decode one batch of 30 s windows: language detection; greedy, best-of-N sampling or
beam search with the KV cache; openai-whisper's logit rules (suppress blank, suppress
tokens, timestamp rules) and its candidate ranking (length penalty).

Every row of every window goes through one decoder call per step. A row names the cache
row it continues, so beams reorder inside that call, and rows whose window is finished
leave the batch instead of riding along."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

from .runtime import CompiledWhisper
from .tokenizer import WhisperTokenizer

NEG_INF = -np.inf


@dataclass(frozen=True)
class DecodingOptions:
    task: str = "transcribe"
    language: str | None = None
    temperature: float = 0.0
    sample_len: int | None = None          # default: half the text context
    best_of: int | None = None             # samples per window when temperature > 0
    beam_size: int | None = None           # beam search when temperature == 0
    patience: float | None = None          # beam search stops after beam_size * patience finished
    length_penalty: float | None = None    # None: rank by mean log-probability per token
    suppress_tokens: str | list[int] | None = "-1"  # "-1": the non-speech symbols
    suppress_blank: bool = True
    without_timestamps: bool = False
    max_initial_timestamp: float | None = 1.0
    prompt: tuple[int, ...] = ()          # previous text, after <|startofprev|>
    seed: int | None = 0                   # for temperature > 0

    def __post_init__(self):
        if self.task not in ("transcribe", "translate"):
            raise ValueError(f"task must be 'transcribe' or 'translate', found {self.task!r}")
        if self.beam_size is not None and self.best_of is not None:
            raise ValueError("beam_size and best_of cannot be given together: beam search is "
                             "for temperature 0, best_of for sampling")
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0, found {self.temperature}")
        if self.temperature > 0 and self.beam_size is not None:
            raise ValueError("beam_size needs temperature 0 (sampling uses best_of)")
        if self.temperature == 0 and self.best_of is not None:
            raise ValueError("best_of needs a temperature above 0 (greedy decoding has one candidate)")
        for name in ("beam_size", "best_of"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, found {getattr(self, name)}")
        if self.patience is not None and (self.beam_size is None or not 0 < self.patience < math.inf):
            raise ValueError(f"patience needs beam_size and must be > 0, found {self.patience}")
        if self.length_penalty is not None and not 0 <= self.length_penalty <= 1:
            raise ValueError(f"length_penalty must lie in [0, 1], found {self.length_penalty}")

    @property
    def group(self) -> int:
        """Rows decoded per window."""
        return self.beam_size or (self.best_of if self.temperature > 0 else None) or 1


@dataclass
class DecodingResult:
    tokens: list[int]
    text: str
    language: str | None
    avg_logprob: float
    no_speech_prob: float
    temperature: float
    compression_ratio: float


def compression_ratio(text: str) -> float:
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


def log_softmax(x: np.ndarray) -> np.ndarray:
    """In float32, as openai-whisper computes it, with the sum of exponentials
    accumulated as `_row_sums` does, so that the top term cannot swallow the many small
    ones. float64 throughout cost 3.3 ms per (5, 51864) beam step against 0.4 ms: a
    quarter of a beam-search transcription on 2 cores."""
    x = np.asarray(x, np.float32)
    y = x - np.max(x, axis=-1, keepdims=True)
    return y - np.log(_row_sums(np.exp(y)))[..., None].astype(np.float32)


_SUM_BLOCK = 256


def _row_sums(x: np.ndarray) -> np.ndarray:
    """float64 sums over the last axis of a float32 array: float32 sums of `_SUM_BLOCK`
    entries each, added in float64. Within float32's rounding of a float64 sum, at a
    fraction of the cost of numpy's sum with a float64 accumulator, which converts
    entry by entry."""
    *lead, n = x.shape
    x = x.reshape(-1, n)
    whole = n - n % _SUM_BLOCK
    total = x[:, :whole].reshape(len(x), -1, _SUM_BLOCK).sum(axis=-1).sum(axis=-1, dtype=np.float64)
    return (total + x[:, whole:].sum(axis=-1, dtype=np.float64)).reshape(lead)


@dataclass(frozen=True)
class LogProbs:
    """`log_softmax(logits)` row by row, formed only where it is read: a beam step reads
    a few entries of each row, not all 51864. `(logits - top) - norm` is log_softmax's
    own float32 arithmetic: from `of`, every entry equals it bit for bit; from
    `with_text`, up to the order of the sum."""
    logits: np.ndarray  # (B, V)
    top: np.ndarray     # (B, 1): each row's max
    norm: np.ndarray    # (B, 1): log of the sum of exp(logits - top) (`_row_sums`)

    @classmethod
    def of(cls, logits: np.ndarray) -> LogProbs:
        logits = np.asarray(logits, np.float32)
        top, total = _exp_sums(logits)
        return cls(logits, top[:, None], np.log(total).astype(np.float32)[:, None])

    def at(self, rows, cols) -> np.ndarray:
        """Entries at (rows, cols), broadcast as numpy indexes them."""
        rows = np.asarray(rows)
        return (self.logits[rows, cols] - self.top[rows, 0]) - self.norm[rows, 0]

    def columns(self, cols: slice) -> np.ndarray:
        return (self.logits[:, cols] - self.top) - self.norm

    @classmethod
    def with_text(cls, logits: np.ndarray, n_text: int, text_top: np.ndarray, text_sum: np.ndarray,
                  alive: np.ndarray) -> LogProbs:
        """`of(logits)` where the first `n_text` entries of each row come summarized
        (`_exp_sums`; finite `text_top` where `alive`), or are all -inf where `alive`
        is False. Only the rest of each row (V - n_text entries) is read here."""
        rest = logits[:, n_text:]
        top = np.max(rest, axis=-1)
        top = np.where(alive, np.maximum(top, text_top), top)
        shifted = rest - top[:, None]
        np.exp(shifted, out=shifted)
        total = _row_sums(shifted)
        with np.errstate(invalid="ignore", over="ignore"):
            total += np.where(alive, text_sum * np.exp(text_top.astype(np.float64) - top), 0.0)
        return cls(logits, top[:, None].astype(np.float32), np.log(total).astype(np.float32)[:, None])


def _exp_sums(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's maximum (B,) and sum of exp(entry - maximum) (B,) (`_row_sums`); nan
    where a row is all -inf."""
    top = np.max(x, axis=-1)
    with np.errstate(invalid="ignore"):
        shifted = x - top[:, None]
        np.exp(shifted, out=shifted)
    return top, _row_sums(shifted)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """log(sum(exp(x))) of each row, accumulated in float64 (openai-whisper's logsumexp)."""
    top = np.max(x, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return (top + np.log(np.sum(np.exp(x.astype(np.float64) - top), axis=-1, keepdims=True)))[:, 0]


# Columns per peak in `largest`: 64 leaves 810 peaks of a 51864-token row to rank.
_PEAK_STRIDE = 64


def largest(x: np.ndarray, k: int) -> np.ndarray:
    """Indices (B, k) of each row's k largest entries, in no order. The row's columns are
    dealt into n interleaved sets and each set's maximum taken (one pass, as a reduction
    over whole rows); the k-th largest of these n maxima bounds the row's k-th largest
    entry from below, so only the sets whose maximum reaches it are searched: a few
    hundred entries instead of the row, for all rows at once."""
    b, v = x.shape
    n = v // _PEAK_STRIDE
    if n <= k:
        return np.argpartition(-x, k - 1, axis=-1)[:, :k]
    body = x[:, : n * _PEAK_STRIDE].reshape(b, _PEAK_STRIDE, n)
    peaks = body.max(axis=1)
    bar = np.partition(peaks, n - k, axis=-1)[:, n - k]
    # Each row's searched sets, padded to the most any row has with a set of its own
    # that cannot win (its entries are read as -inf), then the row's tail columns.
    hit = peaks >= bar[:, None]
    width = int(hit.sum(axis=1).max())
    sets = np.argsort(~hit, axis=1, kind="stable")[:, :width]                   # (B, width)
    valid = np.take_along_axis(hit, sets, axis=1)
    cols = (np.arange(_PEAK_STRIDE)[None, :, None] * n + sets[:, None, :]).reshape(b, -1)
    cols = np.concatenate([cols, np.broadcast_to(np.arange(n * _PEAK_STRIDE, v), (b, v - n * _PEAK_STRIDE))], axis=1)
    values = np.take_along_axis(x, cols, axis=1)
    values[:, : _PEAK_STRIDE * width][~np.tile(valid, (1, _PEAK_STRIDE))] = -np.inf
    pick = np.argpartition(-values, k - 1, axis=-1)[:, :k]
    return np.take_along_axis(cols, pick, axis=1)


def suppressed_tokens(tok: WhisperTokenizer, suppress: str | list[int] | None) -> list[int]:
    if isinstance(suppress, str):
        suppress = [int(t) for t in suppress.split(",") if t.strip()]
    ids = list(suppress or [])
    if -1 in ids:
        ids = [t for t in ids if t >= 0] + tok.non_speech_tokens
    # Control tokens are never sampled: they are the decoder's input, not its output.
    ids += [tok.transcribe, tok.translate, tok.sot, tok.sot_prev, tok.sot_lm, tok.no_speech]
    return sorted(set(ids))


class LogitRules:
    """openai-whisper's logit filters, applied in its order, vectorised over the batch."""

    def __init__(self, tok: WhisperTokenizer, opts: DecodingOptions, sample_begin: int):
        self.tok, self.sample_begin = tok, sample_begin
        self.blank = tok.encode(" ") + [tok.eot] if opts.suppress_blank else None
        self.suppress = suppressed_tokens(tok, opts.suppress_tokens)
        self.timestamps = not opts.without_timestamps
        self.max_initial = (None if opts.max_initial_timestamp is None
                            else round(opts.max_initial_timestamp / 0.02))
        self.always, self.begin = self._masks()
        # What counts towards the text mass (builder.text_mass) at the first sampled
        # token and after it: the text tokens, less those the masks suppress.
        not_text = np.zeros_like(self.always)
        not_text[tok.eot:] = NEG_INF
        self.text_masks = (self.always + self.begin + not_text, self.always + not_text)

    def _masks(self) -> tuple[np.ndarray, np.ndarray]:
        """The rules that need no sequence, as additive (V,) masks: what every step
        suppresses, and what the first sampled token suppresses besides."""
        tok, tb = self.tok, self.tok.timestamp_begin
        always = np.zeros(tok.spec.vocab.n_vocab, np.float32)
        begin = np.zeros_like(always)
        always[self.suppress] = NEG_INF
        if self.blank is not None:
            begin[self.blank] = NEG_INF
        if not self.timestamps:
            always[tb:] = NEG_INF  # and <|notimestamps|> is in the prompt
            return always, begin
        always[tok.no_timestamps] = NEG_INF
        begin[:tb] = NEG_INF  # a window starts with a timestamp
        if self.max_initial is not None:
            begin[tb + self.max_initial + 1:] = NEG_INF
        return always, begin

    def __call__(self, logits: np.ndarray, tokens: list[list[int]],
                 text: tuple[np.ndarray, np.ndarray] | None = None) -> LogProbs:
        """logits (B, V) for the next token after `tokens` (each row the full sequence)
        -> the filtered logits' log-probabilities. The rules are applied to `logits` in
        place: a copy of a step's logits costs more than the rules. They suppress a
        row's text tokens (those before <|endoftext|>) all or none, so their share of
        the row's normalization is summed once, before the rules, and dropped where a
        rule suppresses them; only the 1600-odd tokens after them are summed again. `text`:
        that share, (maximum, sum) per row, as the step's graph gave it for the logits
        plus `text_masks` (first: at the first sampled token); else summed here."""
        eot = self.tok.eot
        np.add(logits, self.always, out=logits)
        if len(tokens[0]) == self.sample_begin:
            logits += self.begin
        if text is None:
            text_top, text_sum = _exp_sums(logits[:, :eot])
        else:
            text_top, text_sum = (np.asarray(a).reshape(len(logits)) for a in text)
        alive = np.isfinite(text_top)  # False: every text token is suppressed
        if not self.timestamps:
            return LogProbs.with_text(logits, eot, text_top, text_sum, alive)
        tb = self.tok.timestamp_begin
        for k, seq in enumerate(tokens):
            sampled = seq[self.sample_begin:]
            last_ts = len(sampled) >= 1 and sampled[-1] >= tb
            penultimate_ts = len(sampled) < 2 or sampled[-2] >= tb
            if last_ts:
                if penultimate_ts:  # a timestamp pair closed a segment: text must follow
                    logits[k, tb:] = NEG_INF
                else:  # an open timestamp: the next is a timestamp or the end
                    logits[k, :eot] = NEG_INF
                    alive[k] = False
            stamps = [t for t in sampled if t >= tb]
            if stamps:
                # Timestamps never go back, and a segment has non-zero length.
                last = stamps[-1] if (last_ts and not penultimate_ts) else stamps[-1] + 1
                logits[k, tb:last] = NEG_INF
        # When the timestamps together outweigh every text token, emit a timestamp.
        probs = LogProbs.with_text(logits, eot, text_top, text_sum, alive)
        below_tb = np.maximum(np.where(alive, text_top, NEG_INF), np.max(logits[:, eot:tb], axis=-1))
        ts_mass = _logsumexp(probs.columns(slice(tb, None)))
        text_max = (below_tb - probs.top[:, 0]) - probs.norm[:, 0]
        flip = np.flatnonzero(ts_mass > text_max)
        if not len(flip):
            return probs
        logits[flip, :tb] = NEG_INF
        alive[flip] = False
        again = LogProbs.with_text(logits[flip], eot, text_top[flip], text_sum[flip], alive[flip])
        top, norm = probs.top.copy(), probs.norm.copy()
        top[flip], norm[flip] = again.top, again.norm
        return LogProbs(logits, top, norm)


def detect_language(model: CompiledWhisper, tok: WhisperTokenizer, cross) -> tuple[list[str], list[dict[str, float]]]:
    """The most likely language per window, and every language's probability."""
    cross_k, cross_v = cross
    b = cross_k.shape[1]
    logits, _, _ = model.decode(np.full((b, 1), tok.sot, np.int64), model.start(cross_k, cross_v))
    lang_ids = np.array(tok.language_tokens)
    probs = np.exp(log_softmax(logits[:, 0, lang_ids]))
    codes = [tok.languages[int(i)] for i in np.argmax(probs, axis=-1)]
    return codes, [dict(zip(tok.languages, map(float, p))) for p in probs]


def prompt_length(tok: WhisperTokenizer, prompt: list[int]) -> int:
    """How many previous-text tokens go before a window: at most half the context, so
    the window keeps room to speak."""
    return min(len(prompt), tok.spec.decoder.n_ctx // 2 - 1)


def initial_tokens(tok: WhisperTokenizer, opts: DecodingOptions, prompt: list[int] | None = None) -> list[int]:
    prompt = opts.prompt if prompt is None else prompt
    seq = list(tok.sot_sequence)
    if prompt:
        seq = [tok.sot_prev] + list(prompt)[len(prompt) - prompt_length(tok, prompt):] + seq
    if opts.without_timestamps:
        seq.append(tok.no_timestamps)
    return seq


def _rank(candidates: list[tuple[list[int], float]], length_penalty: float | None) -> int:
    """Index of the best (tokens, sum_logprob): openai-whisper's maximum-likelihood ranker."""
    def score(c):
        n = len(c[0])
        penalty = n if length_penalty is None else ((5 + n) / 6) ** length_penalty
        return c[1] / penalty
    return max(range(len(candidates)), key=lambda i: score(candidates[i]))


class _Rows:
    """The rows in the batch: their window, tokens and summed log-probability. A step
    replaces them with the rows that go on."""

    def __init__(self, window: np.ndarray, tokens: list[list[int]], sum_logprob: np.ndarray):
        self.window, self.tokens, self.sum_logprob = window, tokens, sum_logprob


def _sample_step(rows: _Rows, logprobs: LogProbs, opts, rng, eot, done_out):
    """Greedy or sampled next token per row. Finished rows go to `done_out[window]`;
    returns (next tokens, source rows) of the rows that go on."""
    if opts.temperature == 0:
        nxt = np.argmax(logprobs.logits, axis=-1)
    else:
        p = np.exp(log_softmax(logprobs.logits / opts.temperature))
        nxt = np.array([rng.choice(p.shape[-1], p=row / row.sum()) for row in p])
    keep = []
    chosen = logprobs.at(np.arange(len(nxt)), nxt)
    for r, t in enumerate(nxt):
        rows.sum_logprob[r] += chosen[r]
        rows.tokens[r].append(int(t))
        if t == eot:
            done_out[rows.window[r]].append((rows.tokens[r], float(rows.sum_logprob[r])))
        else:
            keep.append(r)
    keep = np.array(keep, np.int64)
    rows.window, rows.tokens = rows.window[keep], [rows.tokens[r] for r in keep]
    rows.sum_logprob = rows.sum_logprob[keep]
    return nxt[keep], keep


def _beam_step(rows: _Rows, logprobs: LogProbs, opts, eot, done_out, max_candidates):
    """openai-whisper's beam update: each beam's beam_size + 1 best continuations; per
    window the beam_size best unfinished ones go on, finished ones are kept as candidates
    until the window has `max_candidates`. Returns (next tokens, source rows)."""
    beam = opts.beam_size
    keep, new_tokens, new_sum = [], [], []
    tops = largest(logprobs.logits, beam + 1)
    values = logprobs.at(np.arange(len(tops))[:, None], tops)
    # Python numbers from here: a few candidates a row, where numpy's per-call cost rules.
    tops, values, sums = tops.tolist(), values.tolist(), rows.sum_logprob.tolist()
    members: dict[int, list[int]] = {}
    for r, w in enumerate(rows.window.tolist()):
        members.setdefault(w, []).append(r)
    for w, window_rows in members.items():
        scores: dict[tuple, tuple[float, int]] = {}
        for r in window_rows:
            seq, lps = tuple(rows.tokens[r]), values[r]
            for i in sorted(range(len(lps)), key=lambda i: -lps[i]):  # stable: ties keep their order
                if math.isfinite(lps[i]):
                    scores[seq + (tops[r][i],)] = (sums[r] + lps[i], r)
        finished, survivors = [], []
        for seq in sorted(scores, key=lambda q: scores[q][0], reverse=True):
            score, source = scores[seq]
            if seq[-1] == eot:
                finished.append((list(seq), score))
            else:
                survivors.append((source, list(seq), score))
                if len(survivors) == beam:
                    break
        done_out[w].extend(finished[: max(max_candidates - len(done_out[w]), 0)])
        if len(done_out[w]) < max_candidates:  # a window with all its candidates is done: its beams leave
            for source, seq, score in survivors:
                keep.append(source)
                new_tokens.append(seq)
                new_sum.append(score)
    keep = np.array(keep, np.int64)
    rows.window, rows.tokens, rows.sum_logprob = rows.window[keep], new_tokens, np.array(new_sum)
    return np.array([seq[-1] for seq in new_tokens], np.int64), keep


def _finish(rows: _Rows, done: list[list], group: int, eot: int) -> None:
    """Rows still going when the length ran out end as if <|endoftext|> came next, best
    first, until their window has `group` candidates."""
    for r in np.argsort(-rows.sum_logprob, kind="stable"):
        w = rows.window[r]
        if len(done[w]) < group:
            done[w].append((rows.tokens[r] + [eot], float(rows.sum_logprob[r])))


def _cross_rows(window: np.ndarray) -> np.ndarray:
    """The windows whose cross K/V the decoder step reads, one per row of its buffers:
    each window once when every window has the same number of consecutive rows (its
    beams attend together, and each step reads the window's 1500 keys once, not once
    per beam), else each row's window."""
    starts = np.flatnonzero(np.r_[True, window[1:] != window[:-1]])
    sizes = np.diff(np.r_[starts, len(window)])
    if len(starts) == len(set(window[starts].tolist())) and (sizes == sizes[0]).all():
        return window[starts]
    return window


def decode(model: CompiledWhisper, tok: WhisperTokenizer, cross, opts: DecodingOptions,
           prompts: list[list[int]] | None = None) -> list[DecodingResult]:
    """Decode a batch of windows whose cross-attention K/V are `cross`; one result each.
    `prompts`: each window's previous text (default: `opts.prompt` for all). Shorter
    prompts are padded at the start to the longest, so that every row steps together;
    the model never attends to the padding (runtime.decode's `pads`)."""
    cross_k, cross_v = cross
    n_win, group = cross_k.shape[1], opts.group
    tok = tok.with_language(opts.language or tok.language, opts.task)
    prefixes = [initial_tokens(tok, opts, p) for p in (prompts if prompts is not None else [None] * n_win)]
    if len(prefixes) != n_win:
        raise ValueError(f"{n_win} windows need {n_win} prompts, found {len(prefixes)}")
    sample_begin = max(map(len, prefixes))
    pads = [sample_begin - len(p) for p in prefixes]
    prefixes = [[tok.eot] * pad + p for pad, p in zip(pads, prefixes)]
    sot_index = prefixes[0].index(tok.sot, pads[0]) - sample_begin  # from the end: the same in every row
    sample_len = opts.sample_len or tok.spec.decoder.n_ctx // 2
    sample_len = min(sample_len, tok.spec.decoder.n_ctx - sample_begin)
    rules = LogitRules(tok, opts, sample_begin)
    rng = np.random.default_rng(opts.seed)
    max_candidates = round(group * (opts.patience or 1.0)) if opts.beam_size else group

    # Logits at two positions only: <|startoftranscript|> (no-speech) and the last.
    # The prompt's K/V become the windows' shared prefix (runtime.DecoderState).
    logits, text_top, text_sum, state = model.decode_text(
        np.array(prefixes, np.int64), model.start(cross_k, cross_v), rules.text_masks[0],
        logits_at=[sot_index, -1], pads=pads)
    prompted = state
    no_speech = np.exp(log_softmax(logits[:, 0])[:, tok.no_speech])
    if group == 1 and opts.temperature == 0 and model.greedy_on_device and not any(pads):
        tokens, sums = model.greedy(logits[:, -1], state, rules.always, rules.begin, sample_len,
                                    tok.eot, tok.timestamp_begin)
        # A row that ran out of length ends as if <|endoftext|> came next, as in _finish.
        done = [[(prefixes[w] + tokens[w].tolist() + [tok.eot], float(sums[w]))] for w in range(n_win)]
        return _results(tok, done, sample_begin, no_speech, opts)
    # The group's rows all start from their window's prompt cache row.
    window = np.repeat(np.arange(n_win), group)
    rows = _Rows(window, [list(prefixes[w]) for w in window], np.zeros(len(window)))
    logits, source = logits[window, -1], window
    text = (text_top[window, -1], text_sum[window, -1])
    done: list[list[tuple[list[int], float]]] = [[] for _ in range(n_win)]
    cross_windows = np.arange(n_win)  # the window of each row of the state's cross K/V
    for step in range(sample_len):
        logprobs = rules(logits, rows.tokens, text)
        if opts.beam_size:
            nxt, keep = _beam_step(rows, logprobs, opts, tok.eot, done, max_candidates)
        else:
            nxt, keep = _sample_step(rows, logprobs, opts, rng, tok.eot, done)
        if not len(keep) or step == sample_len - 1:
            break
        order = source[keep] if step == 0 else keep  # step 0 continues the prompt's cache rows
        needed = _cross_rows(rows.window)
        if not np.array_equal(needed, cross_windows):  # a window finished, or groups became unequal
            state = model.windows(state, needed, of=prompted)
            cross_windows = needed
        logits, text_top, text_sum, state = model.decode_text(nxt[:, None], state, rules.text_masks[1], order=order)
        logits, text = logits[:, -1], (text_top[:, -1], text_sum[:, -1])

    _finish(rows, done, group, tok.eot)
    return _results(tok, done, sample_begin, no_speech, opts)


def _results(tok, done, sample_begin, no_speech, opts) -> list[DecodingResult]:
    """Each window's best candidate (tokens up to <|endoftext|>, summed log-prob)."""
    results = []
    for w in range(len(done)):
        candidates = [(seq[sample_begin: seq.index(tok.eot, sample_begin)], float(lp)) for seq, lp in done[w]]
        out, sum_logprob = candidates[_rank(candidates, opts.length_penalty)]
        text = tok.decode(out).strip()
        results.append(DecodingResult(
            tokens=out, text=text, language=tok.language, avg_logprob=sum_logprob / (len(out) + 1),
            no_speech_prob=float(no_speech[w]), temperature=opts.temperature,
            compression_ratio=compression_ratio(text)))
    return results
