"""Token ids identical to openai-whisper's tokenizer, special tokens included."""

from __future__ import annotations

import pytest

from maxwhisper.registry import package_files
from maxwhisper.spec import load_spec
from maxwhisper.tokenizer import LANGUAGES, TokenizerError, WhisperTokenizer

wt = pytest.importorskip("whisper.tokenizer", reason="needs openai-whisper: pip install -e '.[test]'")

TEXTS = [" Hello world, it's 3.14 o'clock!", " Привет мир 你好", "  double  spaces\nnewline",
         " ♪ music ♪ [applause] (laughs)", " Ünïcödé façade — naïve 'quotes' \"double\""]
SPECIAL = ["eot", "sot", "sot_prev", "sot_lm", "no_speech", "no_timestamps", "timestamp_begin",
           "translate", "transcribe"]


def tokenizer_json(model):
    return package_files(model)[1]


@pytest.mark.parametrize("model,spec_name,multilingual,num_languages", [
    ("tiny.en", "tiny.en", False, 99), ("base", "base", True, 99), ("base", "large-v3", True, 100)])
def test_ids_equal_openai(model, spec_name, multilingual, num_languages):
    ours = WhisperTokenizer(tokenizer_json(model), load_spec(spec_name), language="de" if multilingual else None)
    ref = wt.get_tokenizer(multilingual, num_languages=num_languages, language="de" if multilingual else None,
                           task="transcribe")
    for name in SPECIAL:
        assert getattr(ours, name) == getattr(ref, name), name
    assert ours.sot_sequence == list(ref.sot_sequence)
    assert ours.non_speech_tokens == list(ref.non_speech_tokens)
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.decode(ref.encode(text)) == ref.decode(ref.encode(text))
    if multilingual:
        assert sorted(ours.language_tokens) == sorted(ref.all_language_tokens)
        assert ours.with_language("ja", "translate").sot_sequence == list(
            wt.get_tokenizer(True, num_languages=num_languages, language="ja", task="translate").sot_sequence)
    stamps = [ours.timestamp_begin, *ours.encode(" hi"), ours.timestamp_begin + 75]
    assert ours.decode_with_timestamps(stamps) == ref.decode_with_timestamps(stamps) == "<|0.00|> hi<|1.50|>"


def test_language_list_equals_openai():
    assert LANGUAGES == list(wt.LANGUAGES)


def test_bad_language_and_task():
    with pytest.raises(TokenizerError, match="unknown language 'xx'"):
        WhisperTokenizer(tokenizer_json("base"), load_spec("base"), language="xx")
    with pytest.raises(TokenizerError, match="task must be"):
        WhisperTokenizer(tokenizer_json("base"), load_spec("base"), task="summarize")


def test_tokenizer_must_fit_the_spec():
    with pytest.raises(TokenizerError, match=r"<\|endoftext\|> is id 50256, but spec 'base' puts it at 50257"):
        WhisperTokenizer(tokenizer_json("tiny.en"), load_spec("base"))
