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
    def decode(request: Request) -> dict:
        start = stream._offset / SAMPLE_RATE
        end = start + len(request.audio) / SAMPLE_RATE
        words = []
        for w, s, e in SCRIPT:
            if s >= start - 0.05 and e <= end:
                garbled = e > end - 0.3  # just heard: the decoder guesses
                words.append(dict(word=w + "ish" if garbled else w, start=s - start, end=e - start))
        return dict(segments=[dict(words=words)])
    return decode


def run(options: StreamOptions = StreamOptions(), chunk: float = 0.1):
    stream = Stream(lambda text: list(range(len(text.split()))), Detector(), options)
    decode = scripted_decoder(stream)
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
                                 dict(speech_threshold=2), dict(end_silence_seconds=float("nan"))])
def test_bad_stream_options_are_refused_by_name(bad):
    (name,) = bad
    with pytest.raises(ValueError, match=name):
        StreamOptions(**bad)


def test_frames_with_nan_are_refused():
    stream = Stream(lambda text: [], Detector())
    with pytest.raises(ValueError, match="NaN"):
        stream.add(np.array([0.0, np.nan], np.float32))
