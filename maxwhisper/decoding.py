"""Decode one batch of 30 s windows: language detection, greedy or sampled decoding with
the KV cache, and openai-whisper's logit rules (suppress blank, suppress tokens,
timestamp rules)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from .runtime import CompiledWhisper
from .tokenizer import WhisperTokenizer

NEG_INF = -np.inf


@dataclass
class DecodingOptions:
    task: str = "transcribe"
    language: str | None = None
    temperature: float = 0.0
    sample_len: int | None = None          # default: half the text context
    suppress_tokens: str | list[int] | None = "-1"  # "-1": the non-speech symbols
    suppress_blank: bool = True
    without_timestamps: bool = False
    max_initial_timestamp: float | None = 1.0
    prompt: list[int] = field(default_factory=list)  # previous text, after <|startofprev|>
    seed: int | None = 0                   # for temperature > 0


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
    x = x.astype(np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


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

    def __call__(self, logits: np.ndarray, tokens: list[list[int]]) -> np.ndarray:
        """logits (B, V) for the next token after `tokens` (each row the full sequence)."""
        tok, logits = self.tok, logits.copy()
        at_start = len(tokens[0]) == self.sample_begin
        if self.blank is not None and at_start:
            logits[:, self.blank] = NEG_INF
        logits[:, self.suppress] = NEG_INF
        if not self.timestamps:
            logits[:, tok.timestamp_begin:] = NEG_INF  # and <|notimestamps|> is in the prompt
            return logits
        tb = tok.timestamp_begin
        logits[:, tok.no_timestamps] = NEG_INF
        for k, seq in enumerate(tokens):
            sampled = seq[self.sample_begin:]
            last_ts = len(sampled) >= 1 and sampled[-1] >= tb
            penultimate_ts = len(sampled) < 2 or sampled[-2] >= tb
            if last_ts:
                if penultimate_ts:  # a timestamp pair closed a segment: text must follow
                    logits[k, tb:] = NEG_INF
                else:  # an open timestamp: the next is a timestamp or the end
                    logits[k, : tok.eot] = NEG_INF
            stamps = [t for t in sampled if t >= tb]
            if stamps:
                # Timestamps never go back, and a segment has non-zero length.
                last = stamps[-1] if (last_ts and not penultimate_ts) else stamps[-1] + 1
                logits[k, tb:last] = NEG_INF
        if at_start:
            logits[:, :tb] = NEG_INF  # a window starts with a timestamp
            if self.max_initial is not None:
                logits[:, tb + self.max_initial + 1:] = NEG_INF
        # When the timestamps together outweigh every text token, emit a timestamp.
        logprobs = log_softmax(logits)
        ts_mass = np.logaddexp.reduce(logprobs[:, tb:], axis=-1)
        text_max = np.max(logprobs[:, :tb], axis=-1)
        logits[ts_mass > text_max, :tb] = NEG_INF
        return logits


def detect_language(model: CompiledWhisper, tok: WhisperTokenizer, cross) -> tuple[list[str], list[dict[str, float]]]:
    """The most likely language per window, and every language's probability."""
    cross_k, cross_v = cross
    b = cross_k.shape[1]
    logits, _, _ = model.decode(np.full((b, 1), tok.sot, np.int64), model.start(cross_k, cross_v))
    lang_ids = np.array(tok.language_tokens)
    probs = np.exp(log_softmax(logits[:, 0, lang_ids]))
    codes = [tok.languages[int(i)] for i in np.argmax(probs, axis=-1)]
    return codes, [dict(zip(tok.languages, map(float, p))) for p in probs]


def initial_tokens(tok: WhisperTokenizer, opts: DecodingOptions) -> list[int]:
    seq = list(tok.sot_sequence)
    if opts.prompt:
        # At most half the context is prompt, so the window keeps room to speak.
        seq = [tok.sot_prev] + list(opts.prompt)[-(tok.spec.decoder.n_ctx // 2 - 1):] + seq
    if opts.without_timestamps:
        seq.append(tok.no_timestamps)
    return seq


def decode(model: CompiledWhisper, tok: WhisperTokenizer, cross, opts: DecodingOptions) -> list[DecodingResult]:
    """Decode a batch of windows whose cross-attention K/V are `cross`; one result each."""
    cross_k, cross_v = cross
    b = cross_k.shape[1]
    prefix = initial_tokens(tok, opts)
    sot_index = prefix.index(tok.sot)
    sample_begin = len(prefix)
    sample_len = opts.sample_len or tok.spec.decoder.n_ctx // 2
    sample_len = min(sample_len, tok.spec.decoder.n_ctx - sample_begin)
    rules = LogitRules(tok, opts, sample_begin)
    rng = np.random.default_rng(opts.seed)

    tokens = [list(prefix) for _ in range(b)]
    state = model.start(cross_k, cross_v)
    logits, state, _ = model.decode(np.array(tokens, np.int64), state)
    sot_logprobs = log_softmax(logits[:, sot_index])
    no_speech = np.exp(sot_logprobs[:, tok.no_speech])
    logits = logits[:, -1]
    sum_logprob = np.zeros(b)
    done = np.zeros(b, bool)
    for _ in range(sample_len):
        filtered = rules(logits, tokens)
        logprobs = log_softmax(filtered)
        if opts.temperature == 0:
            nxt = np.argmax(filtered, axis=-1)
        else:
            p = np.exp(log_softmax(filtered / opts.temperature))
            nxt = np.array([rng.choice(p.shape[-1], p=row / row.sum()) for row in p])
        nxt[done] = tok.eot
        sum_logprob += np.where(done, 0.0, logprobs[np.arange(b), nxt])
        for k in range(b):
            tokens[k].append(int(nxt[k]))
        done |= nxt == tok.eot
        if done.all() or len(tokens[0]) >= sample_begin + sample_len:
            break
        # Finished rows ride along with <|endoftext|>; their outputs are ignored.
        logits, state, _ = model.decode(nxt[:, None].astype(np.int64), state)
        logits = logits[:, -1]

    results = []
    for k in range(b):
        out = tokens[k][sample_begin:]
        if tok.eot in out:
            out = out[: out.index(tok.eot)]
        text = tok.decode(out).strip()
        results.append(DecodingResult(
            tokens=out, text=text, language=tok.language, avg_logprob=float(sum_logprob[k] / (len(out) + 1)),
            no_speech_prob=float(no_speech[k]), temperature=opts.temperature,
            compression_ratio=compression_ratio(text)))
    return results
