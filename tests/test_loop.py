"""Greedy decoding on the device (loop.py) against the host loop, on one compiled model:
same tokens, timestamps and scores, with and without timestamps, with previous text,
in batches, and cut at sample_len."""

import numpy as np
import pytest

from helpers import joined, speech_clips
from maxwhisper.audio import load_audio, log_mel_spectrogram, pad_or_trim
from maxwhisper.decoding import DecodingOptions, decode


def both(model, run):
    """`run(m)` with `model`'s greedy decoding placed on the device, then on the host."""
    return run(model.placed(greedy_on_device=True)), run(model.placed(greedy_on_device=False))


def assert_same_segments(dev: dict, host: dict):
    assert [s["tokens"] for s in dev["segments"]] == [s["tokens"] for s in host["segments"]]
    assert [(s["start"], s["end"]) for s in dev["segments"]] == [(s["start"], s["end"]) for s in host["segments"]]
    # float32 on the device, float64 on the host: the sums agree to rounding.
    np.testing.assert_allclose([s["avg_logprob"] for s in dev["segments"]],
                               [s["avg_logprob"] for s in host["segments"]], rtol=1e-4, atol=1e-5)
    assert [s["no_speech_prob"] for s in dev["segments"]] == [s["no_speech_prob"] for s in host["segments"]]


@pytest.mark.parametrize("clip", sorted(speech_clips()))
def test_device_loop_equals_host_greedy(tiny_en, clip):
    dev, host = both(tiny_en, lambda m: m.transcribe(clip, temperature=0.0))
    assert dev["segments"], "the clip has speech"
    assert_same_segments(dev, host)


def test_device_loop_with_previous_text_and_without_timestamps(tiny_en):
    audio, _ = joined(["01", "02", "03", "04", "05", "06"])  # > 30 s: windows prompted with earlier text
    for opts in (dict(), dict(without_timestamps=True)):
        dev, host = both(tiny_en, lambda m: m.transcribe(audio, temperature=0.0, **opts))
        assert len(dev["segments"]) > 1
        assert_same_segments(dev, host)


def test_device_loop_batches_equal_host(tiny_en):
    clips = [load_audio(c) for c in sorted(speech_clips())[:3]]
    dev, host = both(tiny_en, lambda m: m.transcribe_many(clips, batch_size=3, temperature=0.0))
    for d, h in zip(dev, host):
        assert_same_segments(d, h)


def test_device_loop_stops_at_sample_len(tiny_en):
    a = tiny_en.spec.audio
    mel = pad_or_trim(log_mel_spectrogram(load_audio(sorted(speech_clips())[0]), a), a.n_frames)
    mel = np.stack([mel] * 2).astype(np.float32)
    _, ck, cv = tiny_en.runtime.encode(mel)[:3]
    opts = DecodingOptions(sample_len=4)
    dev, host = both(tiny_en, lambda m: decode(m.runtime, m.tokenizer, (ck, cv), opts))
    assert [len(r.tokens) for r in dev] == [4, 4]
    assert [r.tokens for r in dev] == [r.tokens for r in host]


def test_device_loop_is_the_gpu_default(tiny_en):
    assert tiny_en.runtime.greedy_on_device is (tiny_en.device == "gpu")
    other = tiny_en.placed(greedy_on_device=not tiny_en.runtime.greedy_on_device)
    assert other.runtime.greedy_on_device is not tiny_en.runtime.greedy_on_device  # a new value, this one as it was
    assert other.runtime._decoder is tiny_en.runtime._decoder  # the compiled graphs shared


def test_device_loop_refuses_more_than_the_context(tiny_en):
    rt = tiny_en.runtime
    n_ctx, V = rt.spec.decoder.n_ctx, rt.spec.vocab.n_vocab
    mel = np.zeros((1, rt.spec.audio.n_mels, rt.spec.audio.n_frames), np.float32)
    _, ck, cv = rt.encode(mel)[:3]
    logits, state, _ = rt.decode(np.array([[tiny_en.tokenizer.sot]]), rt.start(ck, cv))
    zeros = np.zeros(V, np.float32)
    with pytest.raises(ValueError, match=f"1 prompt \\+ {n_ctx} new tokens must fit the text context of {n_ctx}"):
        rt.greedy(logits[:, -1], state, zeros, zeros, n_ctx, tiny_en.tokenizer.eot, tiny_en.tokenizer.timestamp_begin)
