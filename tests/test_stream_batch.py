"""StreamBatch: the batch a server drives. Streams join between steps with options of
their own, leave when cancelled, and a failure ends only the streams it touched."""

from __future__ import annotations

import pytest

import maxwhisper.transcribe as transcribe_module
from helpers import SPEECH_DIR, joined
from maxwhisper.audio import load_audio
from maxwhisper.transcribe import DecodingPlan, StreamBatch, TranscribeOptions

CLIPS = [str(SPEECH_DIR / f"0{i}.wav") for i in range(1, 5)]


def _run(batch: StreamBatch) -> dict:
    out = {}
    while len(batch):
        batch.step()
        out.update(batch.done())
    return out


def test_streams_join_mid_walk_with_their_own_options(tiny_en):
    """A long audio starts alone; two more join after its first window, one with a
    prompt and word timestamps: the next step encodes all three windows together,
    and each result equals its audio transcribed alone."""
    plain = DecodingPlan.of(tiny_en, TranscribeOptions())
    prompted = DecodingPlan.of(tiny_en, TranscribeOptions(initial_prompt="Stella.", word_timestamps=True))
    audios = {"a": joined(["01", "02", "03", "04"])[0], "b": load_audio(CLIPS[1]), "c": load_audio(CLIPS[2])}
    plans = {"a": plain, "b": prompted, "c": plain}
    seen = []
    batch = StreamBatch(tiny_en, on_segments=lambda key, segs: seen.append((key, [s["text"] for s in segs])))
    batch.admit([("a", audios["a"], plain)])
    assert batch.step() == 1 and batch.done() == []
    batch.admit([(k, audios[k], plans[k]) for k in "bc"])
    assert batch.step() == 3
    results = dict(batch.done())
    results.update(_run(batch))
    for key, audio in audios.items():
        want = tiny_en.transcribe(audio, plans[key].options)
        assert [s["tokens"] for s in results[key]["segments"]] == [s["tokens"] for s in want["segments"]], key
    assert "words" in results["b"]["segments"][0] and "words" not in results["c"]["segments"][0]
    assert [k for k, _ in seen].count("a") >= 2, "a's segments came window by window"
    assert {k for k, _ in seen} == {"a", "b", "c"}


def test_cancelled_stream_leaves_and_a_failure_stays_with_its_group(tiny_en, monkeypatch):
    plain = DecodingPlan.of(tiny_en, TranscribeOptions())
    doomed = DecodingPlan.of(tiny_en, TranscribeOptions(initial_prompt="Doomed."))
    doomed_prompt = tiny_en.tokenizer.encode(" Doomed.")
    real = transcribe_module.decode

    def decode(runtime, tok, cross, opts, prompts=None):
        if any(p[-len(doomed_prompt):] == doomed_prompt for p in prompts or []):
            raise RuntimeError("this group fails")
        return real(runtime, tok, cross, opts, prompts)

    monkeypatch.setattr(transcribe_module, "decode", decode)
    audios = [load_audio(c) for c in CLIPS[:3]]
    batch = StreamBatch(tiny_en)
    batch.admit([(0, audios[0], plain), (1, audios[1], doomed), (2, audios[2], plain)])
    assert batch.cancel(2) and not batch.cancel(2)
    results = _run(batch)
    assert set(results) == {0, 1}
    assert isinstance(results[1], RuntimeError)
    want = tiny_en.transcribe(audios[0])
    assert [s["tokens"] for s in results[0]["segments"]] == [s["tokens"] for s in want["segments"]]


def test_a_plan_refuses_options_before_any_audio(tiny_en):
    with pytest.raises(ValueError, match="word_timestamps"):
        DecodingPlan.of(tiny_en, TranscribeOptions(task="translate", word_timestamps=True))
    with pytest.raises(ValueError, match="beam_size must be >= 1"):
        DecodingPlan.of(tiny_en, TranscribeOptions(beam_size=0))
