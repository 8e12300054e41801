"""Decoding and word-timing pieces against openai-whisper's own implementations, on
random inputs: beam update and finalisation, candidate ranking, DTW, median filter,
punctuation merging and word splitting. No model is compiled here."""

from __future__ import annotations

import numpy as np
import pytest

from maxwhisper import decoding, timing
from maxwhisper.decoding import DecodingOptions
from maxwhisper.registry import package_files
from maxwhisper.spec import load_spec
from maxwhisper.tokenizer import WhisperTokenizer

torch = pytest.importorskip("torch", reason="needs the PyTorch reference: pip install -e '.[test]'")
wd = pytest.importorskip("whisper.decoding", reason="needs openai-whisper: pip install -e '.[test]'")
wtiming = pytest.importorskip("whisper.timing", reason="needs openai-whisper: pip install -e '.[test]'")


class _NoCache:
    def rearrange_kv_cache(self, source_indices):
        self.sources = list(source_indices)


@pytest.mark.parametrize("patience", [None, 2.0])
@pytest.mark.parametrize("seed", range(4))
def test_beam_step_equals_openai(seed, patience):
    """Same logits in, same surviving beams, sources and finished candidates out, step
    after step, through to the final candidate lists; a finished window's beams leave
    our batch, openai-whisper keeps computing them."""
    rng = np.random.default_rng(seed)
    n_audio, beam, vocab, eot = 3, 4, 12, 11
    prefix = [7, 8]
    ref = wd.BeamSearchDecoder(beam, eot, _NoCache(), patience)
    ref.reset()
    ref_tokens = torch.tensor([prefix] * (n_audio * beam))
    ref_sum = torch.zeros(n_audio * beam)
    opts = DecodingOptions(beam_size=beam, patience=patience)
    max_candidates = round(beam * (patience or 1.0))
    window = np.repeat(np.arange(n_audio), beam)
    rows = decoding._Rows(window, [list(prefix) for _ in window], np.zeros(len(window)))
    done = [[] for _ in range(n_audio)]
    for step in range(8):
        logits = rng.standard_normal((n_audio * beam, vocab)) * 3
        logits[:, eot] += step * 0.6  # ending grows likelier: windows finish at different steps
        ours_in = logits[[w * beam + j for w in range(n_audio) for j in range(beam)
                          if w in set(rows.window.tolist())]]
        ref_tokens, completed = ref.update(ref_tokens, torch.from_numpy(logits).float(), ref_sum)
        nxt, keep = decoding._beam_step(rows, decoding.LogProbs.of(ours_in.astype(np.float32)), opts, eot, done,
                                        max_candidates)
        for w in range(n_audio):
            assert [list(s) for s in ref.finished_sequences[w]] == [s for s, _ in done[w]], (step, w)
            assert list(ref.finished_sequences[w].values()) == pytest.approx([lp for _, lp in done[w]], abs=1e-4)
            mine = [rows.tokens[r] for r in np.flatnonzero(rows.window == w)]
            if mine:  # still open: the same beams in the same order
                assert mine == ref_tokens[w * beam:(w + 1) * beam].tolist(), (step, w)
        if completed:
            assert len(rows.tokens) == 0
            break
    decoding._finish(rows, done, beam, eot)
    ref_final, ref_lp = ref.finalize(ref_tokens.reshape(n_audio, beam, -1), ref_sum.reshape(n_audio, beam))
    for w in range(n_audio):
        assert [t.tolist() for t in ref_final[w]] == [s for s, _ in done[w]]


@pytest.mark.parametrize("k", [1, 6, 11])
def test_largest_entries_equal_a_full_partition(k):
    """A beam step's candidates: each row's k largest logits, found from the maxima of
    interleaved column sets, are those of a full partition, also where most of a row is
    -inf (suppressed tokens, timestamps), where few entries are finite, and on ties."""
    rng = np.random.default_rng(k)
    x = (rng.standard_normal((12, 51864)) * 4).astype(np.float32)
    x[1, :50257] = -np.inf  # only timestamps left
    x[2, 7:] = -np.inf      # fewer finite entries than some k
    x[3, rng.choice(51864, 40, replace=False)] = 30.0  # ties at the top
    x[4, 51850:] = 50.0     # the largest past the last full set of columns
    x[5] = np.round(x[5])   # ties everywhere
    got = decoding.largest(x, k)
    assert got.shape == (12, k)
    want = np.sort(np.partition(x, x.shape[1] - k, axis=-1)[:, -k:], axis=-1)
    np.testing.assert_array_equal(np.sort(np.take_along_axis(x, got, -1), axis=-1), want)
    assert all(len(set(row)) == k for row in got.tolist())


def test_log_probs_equal_log_softmax_entry_for_entry():
    """The beam step reads log-probabilities entry by entry: each equals the whole
    row's log_softmax bit for bit."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((7, 51864)) * 3).astype(np.float32)
    x[2, 100:] = -np.inf
    lp = decoding.LogProbs.of(x)
    np.testing.assert_array_equal(lp.columns(slice(None)), decoding.log_softmax(x))
    cols = rng.integers(0, 51864, (7, 5))
    np.testing.assert_array_equal(lp.at(np.arange(7)[:, None], cols),
                                  np.take_along_axis(decoding.log_softmax(x), cols, -1))


@pytest.fixture(scope="module")
def en_tokenizers():
    wt = pytest.importorskip("whisper.tokenizer", reason="needs openai-whisper: pip install -e '.[test]'")
    spec = load_spec("tiny.en")
    return WhisperTokenizer(package_files("tiny.en")[1], spec), wt.get_tokenizer(multilingual=False)


def _histories(tok, rng, n):
    """Sampled tokens after the prompt in every state the timestamp rules tell apart:
    nothing yet, an open timestamp, a closed pair, text after a timestamp, text only."""
    tb = tok.timestamp_begin
    ts = lambda: int(tb + rng.integers(0, 1000))
    text = lambda: int(rng.integers(0, tok.eot))
    shapes = [[ts], [ts, text], [ts, text, ts], [ts, text, ts, ts], [text, text], [ts, text, text]]
    return [[f() for f in shapes[i % len(shapes)]] for i in range(n)]


@pytest.mark.parametrize("without_timestamps", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_logit_rules_equal_openai_filters(en_tokenizers, seed, without_timestamps):
    """The rules' log-probabilities equal openai-whisper's SuppressBlank, SuppressTokens
    and ApplyTimestampRules followed by log_softmax: the same entries -inf, the others
    within float32 rounding of the float64 log_softmax. Rows cover every timestamp
    state, timestamps outweighing the text (the rule that then suppresses all text) and
    the first sampled token."""
    ours, theirs = en_tokenizers
    rng = np.random.default_rng(seed)
    opts = DecodingOptions(without_timestamps=without_timestamps)
    prompt = decoding.initial_tokens(ours, opts)
    rules = decoding.LogitRules(ours, opts, len(prompt))
    ref_filters = [wd.SuppressBlank(theirs, len(prompt)), wd.SuppressTokens(rules.suppress)]
    if not without_timestamps:
        ref_filters.append(wd.ApplyTimestampRules(theirs, len(prompt), rules.max_initial))
    else:  # ours never samples a timestamp after <|notimestamps|> (LogitRules._masks)
        ref_filters.append(wd.SuppressTokens(range(ours.timestamp_begin, 51864)))
    n = 12
    for histories in ([[]] * n, _histories(ours, rng, n)):
        logits = (rng.standard_normal((n, 51864)) * 3).astype(np.float32)
        logits[::3, ours.timestamp_begin:] += 6.0  # timestamps outweigh the text in these rows
        tokens = [prompt + h for h in histories]
        ref = torch.from_numpy(logits.copy())
        for k, seq in enumerate(tokens):  # a row at a time: openai-whisper's rows are of one length
            for f in ref_filters:
                f.apply(ref[k: k + 1], torch.tensor([seq]))
        want = torch.log_softmax(ref.double(), dim=-1).numpy()  # float64: torch's float32 sum strays 2e-5
        got = rules(logits, [list(t) for t in tokens]).columns(slice(None))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
        finite = np.isfinite(want)
        np.testing.assert_allclose(got[finite], want[finite], rtol=0, atol=1e-5)


@pytest.mark.parametrize("without_timestamps", [False, True])
def test_the_steps_text_mass_is_the_hosts(tiny_en, without_timestamps):
    """The text mass that the decoder step's graph gives (builder.text_mass) is the
    host's summation of the same masked logits, and the rules' log-probabilities are
    the same whichever summed it: at the first sampled token (its mask suppresses every
    text token where timestamps are on) and after it, for a window of speech."""
    from helpers import speech_clips
    from maxwhisper.audio import Spectrogram, load_audio, pad_or_trim

    rt, tok = tiny_en.runtime, tiny_en.tokenizer
    a = tiny_en.spec.audio
    mel = pad_or_trim(Spectrogram(load_audio(next(iter(speech_clips()))), a).mel(0, a.n_frames), a.n_frames)
    _, ck, cv = rt.encode(mel[None])[:3]
    opts = DecodingOptions(without_timestamps=without_timestamps)
    prompt = decoding.initial_tokens(tok, opts)
    rules = decoding.LogitRules(tok, opts, len(prompt))
    first, top, total, state = rt.decode_text(np.array([prompt]), rt.start(ck, cv), rules.text_masks[0],
                                              logits_at=[-1])
    nxt = int(np.argmax(first[0, -1] + rules.always + rules.begin))
    later, top2, total2, _ = rt.decode_text(np.array([[nxt]]), state, rules.text_masks[1])
    for logits, mask, got_top, got_sum, tokens in ((first[:, -1], rules.text_masks[0], top, total, [prompt]),
                                                   (later[:, -1], rules.text_masks[1], top2, total2, [prompt + [nxt]])):
        want_top, want_sum = decoding._exp_sums((logits + mask)[:, : tok.eot])
        np.testing.assert_array_equal(got_top[:, -1], want_top)
        counted = np.isfinite(want_top)
        np.testing.assert_allclose(got_sum[counted, -1], want_sum[counted], rtol=1e-6)
        here = rules(logits, tokens).columns(slice(None))
        there = rules(logits, tokens, (got_top[:, -1], got_sum[:, -1])).columns(slice(None))
        np.testing.assert_array_equal(np.isinf(here), np.isinf(there))
        np.testing.assert_allclose(there[np.isfinite(here)], here[np.isfinite(here)], rtol=0, atol=1e-6)
    if not without_timestamps:  # a window starts with a timestamp: no text token counts
        assert np.isneginf(top[0, -1])
    assert np.isfinite(top2[0, -1]) and total2[0, -1] >= 1.0


def test_cross_rows_one_per_window_when_groups_are_equal():
    """Which cross K/V rows a step reads: a window's beams share its row; unequal or
    scattered groups (sampled rows that finished) get a row each."""
    rows = decoding._cross_rows
    np.testing.assert_array_equal(rows(np.array([0, 0, 2, 2, 5, 5])), [0, 2, 5])
    np.testing.assert_array_equal(rows(np.array([3, 4])), [3, 4])
    np.testing.assert_array_equal(rows(np.array([0, 0, 1])), [0, 0, 1])
    np.testing.assert_array_equal(rows(np.array([0, 1, 0, 1])), [0, 1, 0, 1])


@pytest.mark.parametrize("length_penalty", [None, 0.0, 0.5, 1.0])
def test_ranking_equals_openai(length_penalty):
    rng = np.random.default_rng(3)
    ranker = wd.MaximumLikelihoodRanker(length_penalty)
    for _ in range(20):
        lengths = rng.integers(1, 30, size=5)
        cands = [(list(range(n)), float(-rng.uniform(0.1, 2.0) * n)) for n in lengths]
        (want,) = ranker.rank([[torch.zeros(n) for n in lengths]], [[lp for _, lp in cands]])
        assert decoding._rank(cands, length_penalty) == want


@pytest.mark.parametrize("kwargs,message", [
    (dict(beam_size=5, best_of=5), "cannot be given together"),
    (dict(temperature=0.5, beam_size=5), "beam_size needs temperature 0"),
    (dict(best_of=5), "best_of needs a temperature above 0"),
    (dict(patience=2.0), "patience needs beam_size"),
    (dict(beam_size=5, length_penalty=1.5), "length_penalty must lie in"),
    (dict(beam_size=0), "beam_size must be >= 1"),
    (dict(task="summarise"), "task must be"),
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
])
def test_contradictory_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DecodingOptions(**kwargs)


def test_dtw_equals_openai_including_ties():
    rng = np.random.default_rng(0)
    for shape, integer in [((12, 40), False), ((30, 30), True), ((5, 90), True), ((1, 7), False), ((9, 1), False)]:
        x = rng.integers(0, 3, size=shape).astype(np.float64) if integer else rng.standard_normal(shape)
        rows, cols = timing.dtw(x)
        want = wtiming.dtw_cpu(x)
        np.testing.assert_array_equal(rows, want[0])
        np.testing.assert_array_equal(cols, want[1])


@pytest.mark.parametrize("width", [1, 3, 7])
def test_median_filter_equals_openai(width):
    x = np.random.default_rng(1).standard_normal((3, 9, 50))
    np.testing.assert_allclose(timing.median_filter(x, width),
                               wtiming.median_filter(torch.from_numpy(x), width).numpy())
    short = np.ones((2, 3))  # shorter than the reflection: returned as it is
    np.testing.assert_array_equal(timing.median_filter(short, 7), short)


def test_punctuation_merges_like_openai():
    words = [" \"", "Hello", ",", " world", "!", " (", "ok", ")", " -", " yes", "."]

    def make(cls):
        return [cls(w, [i], float(i), float(i) + 1, 0.5) for i, w in enumerate(words)]

    ours, ref = make(timing.WordTiming), make(wtiming.WordTiming)
    timing.merge_punctuations(ours, timing.PREPEND_PUNCTUATIONS, timing.APPEND_PUNCTUATIONS)
    wtiming.merge_punctuations(ref, timing.PREPEND_PUNCTUATIONS, timing.APPEND_PUNCTUATIONS)
    assert [(w.word, w.tokens) for w in ours] == [(w.word, w.tokens) for w in ref]
    assert [w.word for w in ours if w.word] == [' "Hello,', " world!", " (ok)", " - yes."]


@pytest.mark.parametrize("language,text", [
    ("en", " Hello, world! It's 3.14 o'clock -- isn't it?"),
    ("en", " Ünïcödé façade — naïve 'quotes'"),
    ("ja", "こんにちは、世界。今日はいい天気ですね"),
    ("zh", "你好，世界。"),
])
def test_word_split_equals_openai(language, text):
    wt = pytest.importorskip("whisper.tokenizer")
    ours = WhisperTokenizer(package_files("base")[1], load_spec("base"), language=language)
    ref = wt.get_tokenizer(True, num_languages=99, language=language, task="transcribe")
    tokens = ours.encode(text)
    assert tokens == ref.encode(text)
    words, word_tokens = ours.split_to_word_tokens(tokens + [ours.eot])
    ref_words, ref_tokens = ref.split_to_word_tokens(tokens + [ref.eot])
    assert word_tokens == ref_tokens
    assert words[:-1] == ref_words[:-1]  # the last is <|endoftext|>, which we decode to ""
