"""The streaming policy alone, with a scripted decoder whose last word is unreliable
(as Whisper's is at the edge of the audio): committed words are the spoken words, in
order, never taken back, each committed soon after it was said."""

from __future__ import annotations

import numpy as np
import pytest

from maxwhisper.streaming import SAMPLE_RATE, Event, Request, Stream, StreamOptions

# (word, start, end) in seconds; a pause from 4.0 to 6.0 ends the first utterance.
SCRIPT = [(" one", 0.5, 0.9), (" two", 1.0, 1.4), (" three", 1.6, 2.0), (" four", 2.2, 2.6),
          (" five", 2.8, 3.3), (" six", 3.4, 3.9), (" seven", 6.2, 6.6), (" eight", 6.8, 7.3),
          (" nine", 7.5, 8.0), (" ten", 8.2, 8.8)]
TOTAL = 10.0


def _speaking(t: float) -> bool:
    return any(s - 0.05 <= t <= e + 0.05 for _, s, e in SCRIPT)


class Detector:
    """Scores 512-sample windows by the script, fed in pieces like the real one."""

    def __init__(self):
        self.pending, self.windows = 0, 0

    def __call__(self, samples):
        self.pending += len(samples)
        n, self.pending = self.pending // 512, self.pending % 512
        out = [1.0 if _speaking((self.windows + k + 0.5) * 512 / SAMPLE_RATE) else 0.0 for k in range(n)]
        self.windows += n
        return np.array(out)


def _speaking_in(start: float, end: float) -> bool:
    return any(s - 0.05 <= end and e + 0.05 >= start for _, s, e in SCRIPT)


def scripted_decoder(stream: Stream):
    """The script's words in the request's audio: its context (the end of the utterance
    before, from `stream._context_start`), then the buffer (from `stream._offset`)."""
    def decode(request: Request) -> dict:
        context = request.context / SAMPLE_RATE
        parts = [(stream._context_start / SAMPLE_RATE, context, 0.0)] if request.context else []
        start = stream._offset / SAMPLE_RATE
        parts.append((start, len(request.audio) / SAMPLE_RATE - context, context))
        end = start + parts[-1][1]
        words = []
        for first, length, at in parts:
            for w, s, e in SCRIPT:
                if s >= first - 0.05 and e <= first + length:
                    garbled = e > end - 0.3  # just heard: the decoder guesses
                    words.append(dict(word=w + "ish" if garbled else w, start=at + s - first, end=at + e - first))
        return dict(segments=[dict(words=words)])
    return decode


def run(options: StreamOptions = StreamOptions(), chunk: float = 0.1, decoder=scripted_decoder):
    stream = Stream(lambda text: list(range(len(text.split()))), Detector(), options)
    decode = decoder(stream)
    events: list[tuple[float, Event]] = []
    t = 0.0
    while t < TOTAL - 1e-9:
        stream.add(np.zeros(int(chunk * SAMPLE_RATE), np.float32))
        t += chunk
        if stream.due():
            request = stream.request()
            if request is not None:
                events += [(t, e) for e in stream.accept(decode(request), request)]
    events += [(t, e) for e in stream.finish()]
    while stream.due():
        request = stream.request()
        if request is not None:
            events += [(t, e) for e in stream.accept(decode(request), request)]
    return stream, events


def test_committed_words_are_the_spoken_words_in_order():
    stream, events = run()
    committed = [w.word for _, e in events if e.type == "committed" for w in e.words]
    assert committed == [w for w, _, _ in SCRIPT]
    final = [e for _, e in events if e.type == "final"]
    assert len(final) == 1 and final[0].text == "".join(w for w, _, _ in SCRIPT).strip()
    assert stream.finished


def test_words_are_committed_within_two_updates_of_being_said():
    _, events = run()
    for t, e in events:
        if e.type == "committed":
            for w in e.words:
                assert t - w.end <= 2 * StreamOptions().update_seconds + 0.35, (w, t)


def test_words_heard_whole_are_committed_from_one_decoding():
    """With `commit_after_seconds`, a word is committed by the first decoding that holds
    that much audio after it, not two updates later; a word the decoder is still
    unsure of (garbled near the edge) is never committed."""
    options = StreamOptions(commit_after_seconds=0.5)
    stream, events = run(options)
    committed = [(t, w) for t, e in events if e.type == "committed" for w in e.words]
    assert [w.word for _, w in committed] == [w for w, _, _ in SCRIPT]
    for t, w in committed:
        assert t - w.end <= options.commit_after_seconds + options.update_seconds + 0.15, (w, t)
    _, agreeing = run()
    first = {w.word: t for t, e in agreeing if e.type == "committed" for w in e.words}
    sooner = [w.word for t, w in committed if t < first[w.word] - 0.5]
    assert len(sooner) >= 3, "most words come an update sooner than by agreement"


@pytest.mark.parametrize("commit_after", [None, 0.5])
def test_words_where_no_speech_was_heard_are_never_committed(commit_after):
    """Whisper's "Thank you." in the pause after an utterance, which the speech detector
    heard as silence, is dropped from every decoding."""
    def inventing(stream):
        decode = scripted_decoder(stream)

        def invent(request):
            result = decode(request)
            start = stream._offset / SAMPLE_RATE
            if start <= 4.2 and start + len(request.audio) / SAMPLE_RATE >= 4.6:
                result["segments"][0]["words"].append(dict(word=" Thanks", start=4.2 - start, end=4.6 - start))
            return result
        return invent

    _, events = run(StreamOptions(commit_after_seconds=commit_after), decoder=inventing)
    committed = [w.word for _, e in events if e.type == "committed" for w in e.words]
    assert committed == [w for w, _, _ in SCRIPT]


@pytest.mark.parametrize("context", [0.0, 3.0])
def test_decodings_after_a_pause_begin_with_the_end_of_the_utterance_before(context):
    """The second utterance is decoded after the last `context_seconds` of the first (up
    to where its speech ended), the pause left out, and unprompted; those words are not
    committed again."""
    seen = []

    def recording(stream):
        decode = scripted_decoder(stream)

        def record(request):
            seen.append((stream._offset / SAMPLE_RATE, request.context / SAMPLE_RATE, len(request.prompt)))
            return decode(request)
        return record

    _, events = run(StreamOptions(context_seconds=context), decoder=recording)
    assert [w.word for _, e in events if e.type == "committed" for w in e.words] == [w for w, _, _ in SCRIPT]
    after = [(c, p) for offset, c, p in seen if offset > 4.0]
    assert after
    if context:
        assert all(2.8 <= c <= 3.0 for c, _ in after), after  # speech heard to 3.95 s, context from 0.95 s
        assert all(p == 0 for _, p in after), "the context's audio, not a prompt, carries what came before"
    else:
        assert all(c == 0 for c, _ in after) and all(p == 6 for _, p in after)


def test_an_utterance_is_committed_in_the_pause_after_it():
    options = StreamOptions()
    _, events = run(options)
    six = next(t for t, e in events if e.type == "committed" and any(w.word == " six" for w in e.words))
    assert six <= 3.9 + options.end_silence_seconds + options.update_seconds + 0.2


def test_the_buffer_stays_short_and_silence_is_not_decoded():
    options = StreamOptions(max_buffer_seconds=3.0, update_seconds=0.5)
    stream = Stream(lambda text: [1] * len(text.split()), Detector(), options)
    decode = scripted_decoder(stream)
    longest = 0.0
    t = 0.0
    while t < TOTAL:
        stream.add(np.zeros(1600, np.float32))
        t += 0.1
        longest = max(longest, len(stream._buffer) / SAMPLE_RATE)
        if stream.due():
            request = stream.request()
            if request is not None:
                assert _speaking_in(stream._offset / SAMPLE_RATE, t), "only audio with speech is decoded"
                stream.accept(decode(request), request)
    assert longest <= options.max_buffer_seconds + options.update_seconds + 1.0
    assert [w.word for w in stream.committed][:6] == [w for w, _, _ in SCRIPT][:6]


@pytest.mark.parametrize("bad", [dict(update_seconds=0), dict(max_buffer_seconds=40), dict(prompt_tokens=-1),
                                 dict(speech_threshold=2), dict(end_silence_seconds=float("nan")),
                                 dict(commit_after_seconds=0), dict(commit_after_seconds="1"),
                                 dict(context_seconds=-1), dict(context_seconds=20)])
def test_bad_stream_options_are_refused_by_name(bad):
    (name,) = bad
    with pytest.raises(ValueError, match=name):
        StreamOptions(**bad)


def test_frames_with_nan_are_refused():
    stream = Stream(lambda text: [], Detector())
    with pytest.raises(ValueError, match="NaN"):
        stream.add(np.array([0.0, np.nan], np.float32))


def _decode_due(stream: Stream, decode) -> list[tuple[Request, list[Event]]]:
    done = []
    while stream.due():
        request = stream.request()
        if request is None:
            break
        done.append((request, stream.accept(decode(request), request)))
    return done


def test_an_utterance_that_ended_is_decoded_alone_when_the_next_one_is_already_in():
    """On a busy server the second utterance arrives before the first one's last
    decoding: that decoding stops where the first ended, and the second is an utterance
    of its own."""
    stream = Stream(lambda text: [1] * len(text.split()), Detector(), StreamOptions(update_seconds=30.0))
    for _ in range(int(TOTAL / 0.1)):
        stream.add(np.zeros(1600, np.float32))
    assert stream.utterance == "closing"
    (first, events), (second, more) = _decode_due(stream, scripted_decoder(stream))
    assert (first.context + len(first.audio)) / SAMPLE_RATE <= 6.2, "the first utterance's audio only"
    assert [w.word for e in events if e.type == "committed" for w in e.words] == [w for w, _, _ in SCRIPT[:6]]
    assert [w.word for e in more if e.type == "committed" for w in e.words] == [w for w, _, _ in SCRIPT[6:]]
    assert stream.utterances == 2 and stream.utterance == "silence"


def test_without_end_silence_an_utterance_ends_when_the_caller_says():
    """`end_silence_seconds=None`: a pause ends nothing (the words still commit by
    agreement); `end_utterance()` ends it, and `clear()` drops what is not committed."""
    stream = Stream(lambda text: [1] * len(text.split()), Detector(), StreamOptions(end_silence_seconds=None))
    decode = scripted_decoder(stream)
    for _ in range(50):  # to 5.0 s: the first utterance and a second of pause
        stream.add(np.zeros(1600, np.float32))
        _decode_due(stream, decode)
    assert stream.utterance == "speech" and stream.utterances == 0
    assert stream.speech_start() == pytest.approx(0.45, abs=0.05)
    assert stream.end_utterance() and stream.utterance == "closing"
    _decode_due(stream, decode)
    assert [w.word for w in stream.committed] == [w for w, _, _ in SCRIPT[:6]] and stream.utterances == 1
    assert not stream.end_utterance(), "no speech left to end"
    for _ in range(25):  # into the second utterance
        stream.add(np.zeros(1600, np.float32))
    assert stream.utterance == "speech"
    stream.clear()
    assert stream.utterance == "silence" and len(stream.committed) == 6


def test_a_clear_while_an_utterance_ends_keeps_it_and_the_stream_clock():
    """Audio cleared after an utterance ended is gone, but the ended utterance still
    decodes whole and times after the clear stay on the stream's clock."""
    stream = Stream(lambda text: [1] * len(text.split()), Detector(), StreamOptions(end_silence_seconds=None))
    decode = scripted_decoder(stream)
    for _ in range(45):  # the first utterance, then a pause
        stream.add(np.zeros(1600, np.float32))
        _decode_due(stream, decode)
    assert stream.end_utterance()
    for _ in range(30):  # into the second utterance, which is then cleared
        stream.add(np.zeros(1600, np.float32))
    stream.clear()
    assert stream.received == pytest.approx(7.5)
    _decode_due(stream, decode)
    assert [w.word for w in stream.committed] == [w for w, _, _ in SCRIPT[:6]] and stream.utterances == 1
    assert stream.utterance == "silence", "the cleared speech is not heard again"
    for _ in range(25):  # the rest of the script: only its last words, after the clear
        stream.add(np.zeros(1600, np.float32))
        _decode_due(stream, decode)
    assert stream.received == pytest.approx(TOTAL)
    assert stream.end_utterance()
    _decode_due(stream, decode)
    assert [w.word for w in stream.committed[6:]] == [w for w, start, _ in SCRIPT if start >= 7.5]
