"""Real-time transcription of audio as it arrives: words within a second or two of being
spoken, and never taken back once committed.

Policy, LocalAgreement-2 over word-timestamped decoding: every `update_seconds` of new
audio the uncommitted buffer (at most `max_buffer_seconds`) is decoded again, with the
committed words before the buffer as its prompt; the words on which two decodings in a row agree, in
order from the start, are committed. With `commit_after_seconds`, a word is also
committed from one decoding once the buffer holds that much audio after its end (its
end as the alignment heads place it): words Whisper heard whole, well before the edge
of the audio, are the ones later decodings keep. Silence ends an utterance: once the speech
detector hears `end_silence_seconds` of it after the last word, the rest of the
hypothesis is committed and the buffer moves past the silence, which is never decoded;
the utterance's last `context_seconds` go before the next one's audio in its decodings.

A `Stream` only keeps the audio and the policy; the decoding is the caller's
(`request()` -> any decoder -> `accept()`), so that many streams can share one batched
model (`decode_streams`, and the server's scheduler)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

SAMPLE_RATE = 16000
# Silence kept before an utterance: the detector hears a soft onset ("a", "the") a few
# windows late, and Whisper drops a word whose start is cut.
LEAD_IN_SECONDS = 0.5


@dataclass(frozen=True)
class StreamOptions:
    """`update_seconds`: new audio that triggers the next decoding. `max_buffer_seconds`:
    the buffer is cut after its last committed word when it grows longer. `prompt_tokens`:
    how many tokens of committed text prompt each decoding, at most.
    `end_silence_seconds`: the silence after the last word that ends an utterance; None:
    silence never does, the caller does (`end_utterance()`, a client's manual turns).
    `speech_threshold`: the speech detector's probability above which a 32 ms window is
    speech. `commit_after_seconds`: commit, from one decoding, the leading words that end
    at least this long before the buffer does; None: only what two decodings agree on.
    `context_seconds`: the end of an utterance, already committed, that goes before the
    next one's audio in its decodings (a lone short utterance is misheard more often)."""
    language: str | None = None
    update_seconds: float = 1.0
    max_buffer_seconds: float = 15.0
    prompt_tokens: int = 32
    end_silence_seconds: float | None = 0.8
    speech_threshold: float = 0.5
    commit_after_seconds: float | None = None
    context_seconds: float = 3.0

    def __post_init__(self):
        for name, low, high in (("update_seconds", 0.1, 30.0), ("max_buffer_seconds", 2.0, 28.0),
                                ("end_silence_seconds", 0.1, 30.0), ("speech_threshold", 0.0, 1.0),
                                ("commit_after_seconds", 0.1, 10.0), ("context_seconds", 0.0, 10.0)):
            value = getattr(self, name)
            if value is None and name in ("commit_after_seconds", "end_silence_seconds"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"{name} must lie in [{low}, {high}], found {value!r}")
        if self.max_buffer_seconds + self.context_seconds > 28.0:
            raise ValueError(f"max_buffer_seconds + context_seconds must be at most 28 (a decoding fits one "
                             f"30 s window), found {self.max_buffer_seconds} + {self.context_seconds}")
        if isinstance(self.prompt_tokens, bool) or not isinstance(self.prompt_tokens, int) \
                or not 0 <= self.prompt_tokens <= 200:
            raise ValueError(f"prompt_tokens must be an int in [0, 200], found {self.prompt_tokens!r}")
        if self.language is not None and not isinstance(self.language, str):
            raise ValueError(f"language must be a language code or None, found {self.language!r}")


@dataclass(frozen=True)
class Word:
    word: str
    start: float
    end: float

    def as_dict(self) -> dict:
        return dict(word=self.word, start=round(self.start, 3), end=round(self.end, 3))


@dataclass(frozen=True)
class Event:
    """`interim`: the current guess after the committed text (may change); `committed`:
    words never taken back; `final`: after `finish()`, the whole committed text."""
    type: str
    text: str
    words: tuple[Word, ...] = ()

    def as_dict(self) -> dict:
        return dict(type=self.type, text=self.text, words=[w.as_dict() for w in self.words])


@dataclass(frozen=True)
class Request:
    """One decoding a stream asks for: its buffer and the prompt tokens to condition on;
    times in the result are seconds into `audio`, whose first `context` samples are the
    end of the utterance before (committed audio, before a pause that is left out)."""
    audio: np.ndarray
    prompt: tuple[int, ...]
    context: int = 0


def _key(word: str) -> str:
    return re.sub(r"[^\w']", "", word.lower())


@dataclass
class Stream:
    """One live audio. `add(pcm)` as it arrives; when `due()`, decode `request()` and
    hand the result (a transcribe() result with word timestamps) to `accept()`, which
    returns the events; `finish()` ends the audio (one last decoding, then `final`).

    `tokenize(text) -> token ids` makes the committed text a prompt; `speech(samples) ->
    probabilities` is a streaming speech detector: fed the audio in pieces, it returns
    the speech probability of each 512-sample window completed (maxwhisper.vad)."""
    tokenize: Callable[[str], list[int]]
    speech: Callable[[np.ndarray], np.ndarray]
    options: StreamOptions = field(default_factory=StreamOptions)
    committed: list[Word] = field(default_factory=list)

    def __post_init__(self):
        self._buffer = np.zeros(0, np.float32)
        self._offset = 0  # samples of the audio before the buffer
        self._decoded_to = 0  # buffer length at the last request
        self._hypothesis: list[Word] = []
        self._finishing = self._finished = False
        self._closing = False  # an utterance ended: decode it once more, commit it whole
        self._closed_at = self._closed_speech = 0  # where it ended: the buffer's end, its speech's end
        self.utterances = 0  # utterances ended and committed whole
        self._heard = bytearray()  # per 512-sample window scored: 1 where the detector heard speech
        self._context = np.zeros(0, np.float32)  # the last utterance's end, before a pause
        self._context_start = 0  # its first sample

    @property
    def received(self) -> float:
        """Seconds of audio received."""
        return (self._offset + len(self._buffer)) / SAMPLE_RATE

    def add(self, pcm: np.ndarray) -> None:
        """Append mono float32 samples at 16 kHz."""
        if self._finishing:
            raise ValueError("the stream is finished; start a new one")
        pcm = np.asarray(pcm, np.float32).reshape(-1)
        if pcm.size and not np.isfinite(pcm).all():
            raise ValueError("audio frames hold NaN or infinite samples")
        self._buffer = np.concatenate([self._buffer, pcm])
        probs = np.asarray(self.speech(pcm))
        self._heard += (probs >= self.options.speech_threshold).astype(np.uint8).tobytes()
        self._settle_silence()

    @property
    def _speech_end(self) -> int:
        """The sample where the last window heard as speech ends (0: none yet)."""
        return (self._heard.rfind(1) + 1) * 512

    @property
    def utterance(self) -> str:
        """'silence' (no speech since the last utterance), 'speech' (an utterance under
        way) or 'closing' (it is over; its last decoding is due)."""
        if self._closing:
            return "closing"
        return "speech" if self._speech_end > self._offset else "silence"

    def speech_start(self) -> float:
        """Seconds into the stream where the speech of the utterance under way begins
        (the first window heard as speech in the buffer)."""
        first = self._heard.find(1, self._offset // 512)
        return max(first, 0) * 512 / SAMPLE_RATE

    def end_utterance(self) -> bool:
        """End the utterance under way now, as silence would: its audio is decoded once
        more and committed whole. False when the buffer holds no speech."""
        if self._finishing or self._speech_end <= self._offset:
            return False
        if not self._closing:
            self._close()
        return True

    def clear(self) -> None:
        """Drop the audio not yet committed, and the interim text with it; an utterance
        that has ended keeps its audio for its last decoding."""
        if self._finishing:
            raise ValueError("the stream is finished; start a new one")
        if self._closing:  # what came after it becomes silence, so the stream's clock runs on
            self._buffer = self._buffer.copy()
            self._buffer[self._closed_at - self._offset:] = 0
            first = -(-self._closed_at // 512)  # the first window wholly after the utterance's end
            self._heard[first:] = bytes(max(0, len(self._heard) - first))
            return
        self._drop(len(self._buffer))
        self._hypothesis = []

    def due(self) -> bool:
        """Whether enough new audio arrived (or the stream is finishing) to decode again."""
        if self._finished:
            return False
        new = len(self._buffer) - self._decoded_to
        return self._finishing or self._closing or new >= self.options.update_seconds * SAMPLE_RATE

    def request(self) -> Request | None:
        """The buffer to decode now, or None when it holds no speech (nothing to do)."""
        self._decoded_to = len(self._buffer)
        if self._speech_end <= self._offset:  # no speech in the buffer
            return None
        # An utterance that ended is decoded to where it ended: audio that came since
        # (the next utterance, on a busy server) waits for decodings of its own; the
        # stream's last decoding takes all there is.
        end = self._closed_at - self._offset if self._closing and not self._finishing else len(self._buffer)
        self._decoded_to = end
        # Only text whose audio has left the buffer: prompted with words it still hears,
        # the model tends to skip them, or not, from one decoding to the next. With a
        # context, none: the context's audio carries what was said, and a prompt that
        # stops where that audio starts mid-word (word times are loose) can make
        # Whisper say nothing at all.
        before = self._offset / SAMPLE_RATE + 0.05
        text = "" if self._context.size else "".join(w.word for w in self.committed if w.end <= before)
        prompt = tuple(self.tokenize(text)[-self.options.prompt_tokens:]) if text and self.options.prompt_tokens \
            else ()
        return Request(np.concatenate([self._context, self._buffer[:end]]), prompt, self._context.size)

    def _seconds(self, t: float, request: Request) -> float:
        """A time in a request's audio -> seconds of the stream."""
        context = request.context / SAMPLE_RATE
        if t < context:
            return self._context_start / SAMPLE_RATE + t
        return (self._offset - request.context) / SAMPLE_RATE + t

    def accept(self, result: dict, request: Request) -> list[Event]:
        """LocalAgreement-2: commit the agreed prefix of this and the last hypothesis;
        with `commit_after_seconds`, as far as the leading words heard whole reach, if
        further."""
        words = [Word(w["word"], self._seconds(w["start"], request), self._seconds(w["end"], request))
                 for s in result.get("segments", []) for w in s.get("words", [])]
        words = self._after_committed([w for w in words if _key(w.word)])  # a lone "." is no word
        # A word where the speech detector heard none is Whisper's "Thank you." of
        # silence; so, in an utterance's final decoding, is what follows the last word
        # heard squeezed into no time.
        words = [w for w in words if self._spoken(w)]
        if self._finishing or self._closing:
            while words and words[-1].end - words[-1].start < 0.08:
                words.pop()
        if self._finishing:
            self._finished = True
            events = self._commit(words)
            return events + [Event("final", "".join(w.word for w in self.committed).strip(), tuple(self.committed))]
        if self._closing:  # the utterance is over: all of it is committed, its audio dropped
            self._closing, self._hypothesis = False, []
            self.utterances += 1
            events = self._commit(words)
            self._keep_context(self._closed_speech)
            self._drop(len(request.audio) - request.context - int(LEAD_IN_SECONDS * SAMPLE_RATE))
            self._settle_silence()  # the audio after it may hold a whole utterance too
            return events + [Event("interim", "")]
        agreed = 0
        while agreed < min(len(words), len(self._hypothesis)) and \
                _key(words[agreed].word) == _key(self._hypothesis[agreed].word):
            agreed += 1
        if self.options.commit_after_seconds is not None:
            edge = self._seconds(len(request.audio) / SAMPLE_RATE, request) - self.options.commit_after_seconds
            heard = 0
            while heard < len(words) and words[heard].end <= edge:
                heard += 1
            agreed = max(agreed, heard)
        events = self._commit(words[:agreed])
        self._hypothesis = words[agreed:]
        self._trim()
        events.append(Event("interim", "".join(w.word for w in self._hypothesis).strip(), tuple(self._hypothesis)))
        return events

    def finish(self) -> list[Event]:
        """No more audio. Where speech is left in the buffer, the next request decodes it
        and its `accept` commits all of it, then `final`; else `final` comes now."""
        self._finishing = True
        if self._speech_end > self._offset:
            return []
        self._finished = True
        events = self._commit(self._hypothesis)
        return events + [Event("final", "".join(w.word for w in self.committed).strip(), tuple(self.committed))]

    @property
    def finished(self) -> bool:
        return self._finished

    def _after_committed(self, words: list[Word]) -> list[Word]:
        """The words after the committed ones. The buffer still holds audio of committed
        words, and a decoding's word times near its start are loose, so the committed
        tail is found by its words (the longest run of up to 5 that the decoding repeats,
        ending within a second of where the committed text ends); by time only where no
        such run is found."""
        if not self.committed:
            return words
        last_end = self.committed[-1].end
        keys = [_key(w.word) for w in words]
        tail = [_key(w.word) for w in self.committed[-5:]]
        for n in range(min(5, len(tail)), 0, -1):
            ends = [p + n for p in range(len(words) - n + 1) if keys[p: p + n] == tail[-n:]
                    and abs(words[p + n - 1].end - last_end) < 1.0]
            if ends:
                return words[ends[-1]:]
        return [w for w in words if w.start > last_end - 0.1]

    def _commit(self, words: list[Word]) -> list[Event]:
        if not words:
            return []
        self.committed.extend(words)
        return [Event("committed", "".join(w.word for w in words).strip(), tuple(words))]

    def _trim(self) -> None:
        """Keep the buffer short: cut it after the last committed word once it is longer
        than `max_buffer_seconds` (the prompt carries the text before the cut)."""
        if len(self._buffer) <= self.options.max_buffer_seconds * SAMPLE_RATE or not self.committed:
            return
        cut = int(round(self.committed[-1].end * SAMPLE_RATE)) - self._offset
        if cut > 0:
            self._keep_context(self._offset + cut)
        else:  # nothing committed inside the buffer: drop its oldest part instead
            cut = len(self._buffer) - int(self.options.max_buffer_seconds * SAMPLE_RATE)
        self._drop(cut)

    def _spoken(self, word: Word, slack: float = 0.1) -> bool:
        """Whether the detector heard speech in a window within `slack` of the word."""
        lo = max(0, int((word.start - slack) * SAMPLE_RATE) // 512)
        hi = int((word.end + slack) * SAMPLE_RATE) // 512 + 1
        return any(self._heard[lo:hi])

    def _keep_context(self, end: int) -> None:
        """Up to `context_seconds` of committed audio before sample `end` go before the
        audio after it in its decodings, starting between two committed words: a
        decoding that begins mid-word mishears that word."""
        end = max(self._offset, min(end, self._offset + len(self._buffer)))
        lo = max(self._offset, end - int(self.options.context_seconds * SAMPLE_RATE))
        first = len(self.committed)  # the earliest committed word that starts after `lo`
        while first and self.committed[first - 1].start * SAMPLE_RATE >= lo:
            first -= 1
        start = end
        if first < len(self.committed) and self.committed[first].start * SAMPLE_RATE < end:
            word = self.committed[first]
            gap = word.start if first == 0 else min(self.committed[first - 1].end, word.start)
            start = max(self._offset, int(round((gap + word.start) / 2 * SAMPLE_RATE)))
        self._context, self._context_start = self._buffer[start - self._offset: end - self._offset].copy(), start

    def _close(self) -> None:
        self._closing = True
        self._closed_at, self._closed_speech = self._offset + len(self._buffer), self._speech_end

    def _drop(self, n: int) -> None:
        n = max(0, min(n, len(self._buffer)))
        self._buffer, self._offset = self._buffer[n:], self._offset + n
        self._decoded_to = max(0, self._decoded_to - n)

    def _settle_silence(self) -> None:
        """After `end_silence_seconds` without speech the utterance is over: its audio is
        decoded once more and committed whole; silence alone is dropped undecoded (a
        little kept, for the next word's onset)."""
        end = self._offset + len(self._buffer)
        quiet = self.options.end_silence_seconds
        if quiet is None:  # turns end by the caller; silence alone is still never decoded
            if self._speech_end <= self._offset and not self._closing:
                self._drop(len(self._buffer) - int(LEAD_IN_SECONDS * SAMPLE_RATE))
            return
        if end - max(self._speech_end, self._offset) < int(quiet * SAMPLE_RATE):
            return
        if self._closing:  # ended already, and where it ended stays put
            return
        if self._speech_end > self._offset:
            self._close()
        else:
            self._drop(len(self._buffer) - int(LEAD_IN_SECONDS * SAMPLE_RATE))


def stream_transcribe_options(options: StreamOptions, prompt: tuple[int, ...]):
    """The `TranscribeOptions` of one streaming decoding: greedy and without fallback
    (latency first), word timestamps, the committed text as the prompt."""
    from .transcribe import TranscribeOptions

    return TranscribeOptions(language=options.language, temperature=0.0, word_timestamps=True,
                             condition_on_previous_text=False, initial_prompt=prompt or None,
                             no_speech_threshold=None, compression_ratio_threshold=None, logprob_threshold=None)


def decode_streams(model, requests: list[tuple[StreamOptions, Request]]) -> list[dict]:
    """Decode the requests of many streams together, in one `StreamBatch` (their prompts
    differ; the rest of their options, and so their decoding group, is shared)."""
    from .transcribe import DecodingPlan, StreamBatch

    batch = StreamBatch(model)
    batch.admit([(i, request.audio, DecodingPlan.of(model, stream_transcribe_options(options, request.prompt)))
                 for i, (options, request) in enumerate(requests)])
    results: dict[int, dict] = {}
    while True:
        for key, result in batch.done():
            if isinstance(result, Exception):
                raise result
            results[key] = result
        if not batch:
            return [results[i] for i in range(len(requests))]
        batch.step()


def model_stream(model, options: StreamOptions = StreamOptions()) -> Stream:
    """A `Stream` for `model`, its prompt from the model's tokenizer and its speech
    detector maxwhisper's Silero VAD."""
    from .vad import detector

    return Stream(model.tokenizer.encode, detector().streaming(), options)


def replay(model, chunks, options: StreamOptions = StreamOptions(), speed: float | None = 1.0, clock=None):
    """Run one stream over `chunks` (an iterable of float32 sample arrays), yielding
    (event, emitted) where `emitted` is the wall-clock seconds since the first chunk.
    With `speed`, audio is released no faster than real time times `speed` and the clock
    runs during decoding, so what decoding costs shows in the times; `speed=None`
    releases it as fast as it comes (a live source such as stdin paces itself)."""
    import time

    clock = clock or time.monotonic
    stream = model_stream(model, options)
    start, released = clock(), 0.0

    def step():
        while stream.due():
            request = stream.request()
            if request is None:
                break
            (result,) = decode_streams(model, [(options, request)])
            yield from ((e, clock() - start) for e in stream.accept(result, request))

    for chunk in chunks:
        chunk = np.asarray(chunk, np.float32).reshape(-1)
        step_s = chunk.size / SAMPLE_RATE / (speed or 1.0)
        if speed is not None:  # a chunk is out once all of it has been spoken
            released += step_s
            wait = start + released - clock()
            if wait > 0:
                time.sleep(wait)
        stream.add(chunk)
        if speed is None or clock() < start + released + step_s:  # behind: take what is out first
            yield from step()
    for event in stream.finish():
        yield event, clock() - start
    yield from step()
