"""Beam search, best-of sampling, temperature fallback, word timestamps and subtitle
files on real weights, checked against faster-whisper on the same CTranslate2 weights
and against real subtitle parsers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import SPEECH_DIR, WORD_ROWS, audioeval_sample, faster_whisper_peer, joined
from maxwhisper import decoding, transcribe as transcribe_module
from maxwhisper.audio import load_audio
from maxwhisper.cli import main

fw = pytest.importorskip("faster_whisper", reason="the peer comparison needs faster-whisper")

CASES = {"01": (["01"], 1), "04": (["04"], 1), "long": (["01", "02", "03", "04", "05", "06"], 2)}


@pytest.fixture(scope="module")
def peers(model_cache):
    return faster_whisper_peer


def tokens_of(segments) -> list[int]:
    return [t for s in segments for t in (s["tokens"] if isinstance(s, dict) else s.tokens)]


@pytest.mark.parametrize("case", list(CASES))
def test_beam_search_equals_faster_whisper(tiny_en, peers, case):
    audio, _ = joined(*CASES[case])
    ours = tiny_en.transcribe(audio, beam_size=5, temperature=0.0)
    theirs, _ = peers("tiny.en").transcribe(audio, beam_size=5, temperature=0.0, vad_filter=False,
                                            language="en")
    theirs = list(theirs)
    assert tokens_of(ours["segments"]) == tokens_of(theirs)
    times = [t for s in ours["segments"] if s["tokens"] for t in (s["start"], s["end"])]
    assert times == pytest.approx([t for s in theirs if s.tokens for t in (s.start, s.end)], abs=1e-6)


@pytest.mark.parametrize("lang,name", [("es", "pangrama"), ("en", "quick_brown_fox")])
def test_base_beam_search_equals_faster_whisper(base_model, peers, lang, name):

    audio = load_audio(audioeval_sample(lang, name)[0])
    ours = base_model.transcribe(audio, beam_size=5, temperature=0.0)
    theirs, info = peers("base").transcribe(audio, beam_size=5, temperature=0.0, vad_filter=False)
    assert info.language == ours["language"] == lang
    assert tokens_of(ours["segments"]) == tokens_of(list(theirs))


@pytest.mark.parametrize("model,case", [("tiny.en", "01"), ("tiny.en", "04"), ("tiny.en", "long"),
                                        ("base", "long")])
def test_word_timestamps_agree_with_faster_whisper(request, peers, model, case):
    whisper = request.getfixturevalue("tiny_en" if model == "tiny.en" else "base_model")
    # Without the final gap: faster-whisper decodes the last 0.45 s of digital silence,
    # where base hallucinates a sentence; our silence gate skips it (see transcribe()).
    names, gap = CASES[case]
    audio = joined(names, gap)[0][: -int(gap * 16000)]
    ours = whisper.transcribe(audio, language="en" if whisper.is_multilingual else None, beam_size=5,
                              temperature=0.0, word_timestamps=True)
    theirs, _ = peers(model).transcribe(audio, beam_size=5, temperature=0.0, vad_filter=False, language="en",
                                        word_timestamps=True)
    theirs = list(theirs)
    assert tokens_of(ours["segments"]) == tokens_of(theirs), "word timing needs the same words to compare"
    mine = [w for s in ours["segments"] for w in s["words"]]
    peer = [w for s in theirs for w in s.words]
    assert [w["word"] for w in mine] == [w.word for w in peer]
    errors = np.array([max(abs(a["start"] - b.start), abs(a["end"] - b.end)) for a, b in zip(mine, peer)])
    close = float(np.mean(errors <= 0.2))
    WORD_ROWS.append((model, case, len(mine), close, float(np.median(errors)), float(errors.max())))
    assert close >= 0.9, f"only {close:.0%} of words within 0.2 s of faster-whisper's"
    for a, b in zip(mine, peer):
        assert a["probability"] == pytest.approx(b.probability, abs=0.02), a["word"]
    # Words run forward in time and sit inside their segment.
    starts = [w["start"] for w in mine]
    assert starts == sorted(starts) and all(w["start"] <= w["end"] for w in mine)
    spoken = [s for s in ours["segments"] if s["words"]]
    for s in spoken:
        assert s["start"] <= s["words"][0]["end"] and s["end"] >= s["words"][-1]["start"]
    # Segments take their bounds from their words, as faster-whisper's do.
    assert [t for s in spoken for t in (s["start"], s["end"])] == pytest.approx(
        [t for s in theirs if s.words for t in (s.start, s.end)], abs=0.011)
    assert all(type(t) is float for s in spoken for t in (s["start"], s["end"]))


def test_best_of_keeps_the_highest_scoring_sample(tiny_en, monkeypatch):
    ranked = []
    real_rank = decoding._rank
    monkeypatch.setattr(decoding, "_rank", lambda c, lp: ranked.append(c) or real_rank(c, lp))
    result = tiny_en.transcribe(str(SPEECH_DIR / "01.wav"), temperature=1.0, best_of=5, without_timestamps=True,
                                compression_ratio_threshold=None, logprob_threshold=None)
    (candidates,) = ranked
    assert len(candidates) == 5 and len({tuple(t) for t, _ in candidates}) >= 2, "five different samples"
    best = max(candidates, key=lambda c: c[1] / len(c[0]))
    assert result["segments"][0]["tokens"] == best[0]
    assert result["segments"][0]["temperature"] == 1.0


def _spy_decode(monkeypatch) -> list:
    """Records the (options, prompts) of every decode call."""
    seen = []
    real = transcribe_module.decode

    def spy(runtime, tok, cross, opts, prompts=None):
        seen.append((opts, prompts))
        return real(runtime, tok, cross, opts, prompts)

    monkeypatch.setattr(transcribe_module, "decode", spy)
    return seen


def test_fallback_walks_the_temperatures_and_reports_the_last(tiny_en, monkeypatch):
    """No text can reach a mean log-probability of 0, so every temperature is tried:
    beam search at 0, best-of sampling above; the segment says which one it kept."""
    calls = _spy_decode(monkeypatch)
    result = tiny_en.transcribe(str(SPEECH_DIR / "04.wav"), beam_size=5, best_of=5, logprob_threshold=0.0,
                                no_speech_threshold=None)
    seen = [o for o, _ in calls]
    assert [o.temperature for o in seen] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert (seen[0].beam_size, seen[0].best_of) == (5, None)
    assert all((o.beam_size, o.best_of) == (None, 5) for o in seen[1:])
    assert {s["temperature"] for s in result["segments"]} == {1.0}


def test_fallback_on_repetitive_text(tiny_en, monkeypatch):
    """One sentence said six times over: the greedy transcript compresses far better than
    2.4, so the window is decoded again, hotter, and its segments say at which
    temperature they were kept (as openai-whisper does, for better or worse here)."""
    audio = np.concatenate([load_audio(str(SPEECH_DIR / "02.wav"))] * 6)[: 29 * 16000]
    greedy = tiny_en.transcribe(audio, temperature=0.0)
    assert decoding.compression_ratio(greedy["text"]) > 2.4
    calls = _spy_decode(monkeypatch)
    result = tiny_en.transcribe(audio)
    seen = [o for o, _ in calls]
    assert [o.temperature for o in seen][:2] == [0.0, 0.2]
    kept = {s["temperature"] for s in result["segments"]}
    assert len(kept) == 1 and kept.pop() == seen[-1].temperature > 0
    assert all(s["compression_ratio"] < decoding.compression_ratio(greedy["text"]) for s in result["segments"])


def test_initial_prompt_goes_before_the_first_window(tiny_en, monkeypatch):
    seen = _spy_decode(monkeypatch)
    tiny_en.transcribe(str(SPEECH_DIR / "02.wav"), initial_prompt="Stella's shopping list.", temperature=0.0)
    (_, first_prompts), *_ = seen
    assert first_prompts == [tiny_en.tokenizer.encode(" Stella's shopping list.")]


def test_subtitles_parse_with_real_parsers(tiny_en, tmp_path, monkeypatch):
    srt = pytest.importorskip("srt", reason="subtitle checks need srt: pip install -e '.[test]'")
    webvtt = pytest.importorskip("webvtt", reason="subtitle checks need webvtt-py: pip install -e '.[test]'")
    import soundfile as sf

    import maxwhisper.model

    audio, _ = joined(*CASES["long"])
    sf.write(tmp_path / "long.wav", audio, 16000)
    monkeypatch.setattr(maxwhisper.model, "load_model", lambda *a, **k: tiny_en)
    out = tmp_path / "out"
    assert main(["transcribe", str(tmp_path / "long.wav"), "--device", "cpu", "--word-timestamps",
                 "-f", "all", "-o", str(out), "--quiet"]) == 0
    data = json.loads((out / "long.json").read_text())
    spoken = [s for s in data["segments"] if s["text"].strip()]
    assert len(spoken) >= 6
    for s in spoken:
        assert s["words"] and set(s["words"][0]) == {"word", "start", "end", "probability"}
    subs = list(srt.parse((out / "long.srt").read_text()))
    vtt = webvtt.read(str(out / "long.vtt"))
    assert [c.content for c in subs] == [c.text for c in vtt] == [s["text"].strip() for s in spoken]
    for starts, ends in (([c.start.total_seconds() for c in subs], [c.end.total_seconds() for c in subs]),
                         ([c.start_in_seconds + c.start_time.milliseconds / 1000 for c in vtt],
                          [c.end_in_seconds + c.end_time.milliseconds / 1000 for c in vtt])):
        assert all(s < e for s, e in zip(starts, ends)), "every cue lasts"
        assert all(e <= s for e, s in zip(ends, starts[1:])), "cues run forward without overlap"
        assert starts == pytest.approx([s["start"] for s in spoken], abs=1e-3)
    rows = (out / "long.tsv").read_text().splitlines()
    assert rows[0] == "start\tend\ttext"
    assert [r.split("\t") for r in rows[1:]] == [[str(round(1000 * s["start"])), str(round(1000 * s["end"])),
                                                  s["text"].strip()] for s in data["segments"]]


def test_cli_passes_decoding_flags(tiny_en, tmp_path, monkeypatch, capsys):
    import maxwhisper.model

    import maxwhisper.transcribe

    calls = []

    def fake_batch(model, audios, options, **kw):
        calls.append(dict(vars(options), **kw))
        for i, _ in enumerate(audios):
            yield i, dict(text="", segments=[], language="en")

    monkeypatch.setattr(maxwhisper.model, "load_model", lambda *a, **k: tiny_en)
    monkeypatch.setattr(maxwhisper.transcribe, "transcribe_batch", fake_batch)
    wav = str(SPEECH_DIR / "01.wav")
    assert main(["transcribe", wav, "-o", str(tmp_path), "--beam-size", "3", "--best-of", "2", "--patience", "2",
                 "--length-penalty", "0.5", "--initial-prompt", "Hi.", "--word-timestamps",
                 "--temperature", "0", "0.5", "--no-condition-on-previous-text", "--batch-size", "3"]) == 0
    kw = calls[0]
    assert (kw["beam_size"], kw["best_of"], kw["patience"], kw["length_penalty"]) == (3, 2, 2.0, 0.5)
    assert kw["initial_prompt"] == "Hi." and kw["word_timestamps"] and tuple(kw["temperature"]) == (0.0, 0.5)
    assert kw["condition_on_previous_text"] is False and kw["batch_size"] == 3
    assert main(["transcribe", wav, "-o", str(tmp_path), "--beam-size", "1", "--best-of", "1"]) == 0
    assert (calls[1]["beam_size"], calls[1]["best_of"]) == (None, None)
    assert main(["transcribe", wav, "--word-timestamps", "--task", "translate"]) == 2
    assert "does not work with --task translate" in capsys.readouterr().err


def test_batched_files_equal_one_by_one(tiny_en, monkeypatch):
    """Files of different lengths decoded side by side, with beams and word timestamps,
    give each file's own transcript; the short ones leave the batch early."""
    audios = [joined(["01"])[0], joined(["02", "03", "04"])[0], load_audio(str(SPEECH_DIR / "05.wav")),
              joined(["06", "01", "02", "03", "04", "05"])[0]]
    options = dict(beam_size=5, word_timestamps=True)
    alone = [tiny_en.transcribe(a, **options) for a in audios]
    encoded = []
    real_encode = tiny_en.runtime.encode
    monkeypatch.setattr(tiny_en.runtime, "encode", lambda mel: encoded.append(len(mel)) or real_encode(mel))
    together = tiny_en.transcribe_many(audios, batch_size=3, **options)
    assert max(encoded) == 3, "windows of three files were encoded in one call"
    for one, many in zip(alone, together):
        assert [s["tokens"] for s in one["segments"]] == [s["tokens"] for s in many["segments"]]
        words_one = [w for s in one["segments"] for w in s["words"]]
        words_many = [w for s in many["segments"] for w in s["words"]]
        assert [w["word"] for w in words_one] == [w["word"] for w in words_many]
        assert [t for w in words_one for t in (w["start"], w["end"])] == pytest.approx(
            [t for w in words_many for t in (w["start"], w["end"])], abs=0.011)


@pytest.mark.parametrize("search", [dict(), dict(beam_size=5)])
def test_prompts_of_unequal_lengths_decode_together(tiny_en, search):
    """Windows whose previous texts differ in length decode in one batch, the shorter
    prompts padded at the start and masked: each window's tokens equal its own decoding
    alone, and no padding reaches the logits (the first window has no prompt at all)."""
    from maxwhisper.audio import log_mel_spectrogram

    rt, tok = tiny_en.runtime, tiny_en.tokenizer
    a = tiny_en.spec.audio
    mels = [log_mel_spectrogram(load_audio(str(SPEECH_DIR / f"{n}.wav")), a)[:, : a.n_frames] for n in ("02", "03", "04")]
    mel = np.stack([np.pad(m, ((0, 0), (0, a.n_frames - m.shape[1]))) for m in mels]).astype(np.float32)
    _, ck, cv = rt.encode(mel)[:3]
    prompts = [[], tok.encode(" Please call Stella."), tok.encode(" The weather was cold and windy, so the children "
                                                                 "stayed inside and played games all afternoon.")]
    opts = decoding.DecodingOptions(language="en", **search)
    together = decoding.decode(rt, tok, (ck, cv), opts, prompts=prompts)
    for w, prompt in enumerate(prompts):
        alone, = decoding.decode(rt, tok, rt.select_pair((ck, cv), [w]), opts, prompts=[prompt])
        assert together[w].tokens == alone.tokens, w
        assert together[w].avg_logprob == pytest.approx(alone.avg_logprob, abs=1e-4)
        assert together[w].no_speech_prob == pytest.approx(alone.no_speech_prob, abs=1e-5)
    assert len({len(p) for p in prompts}) == 3 and all(r.tokens for r in together)
