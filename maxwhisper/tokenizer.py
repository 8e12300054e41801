"""Whisper's tokenizer: byte-level BPE from a model's tokenizer.json (Hugging Face
`tokenizers`), with the special, language, task and timestamp tokens laid out after the
text vocabulary exactly as openai-whisper numbers them, derived from the spec."""

from __future__ import annotations

import copy
import string
from functools import cached_property
from pathlib import Path

from .spec import ModelSpec

# Language codes in Whisper's token order; large-v3 adds "yue".
LANGUAGES = (
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no "
    "th ur hr bg lt la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw "
    "gl mr pa si km sn yo so af oc ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl "
    "mg as tt haw ln ha ba jw su yue"
).split()
N_TIMESTAMPS = 1501  # 0.00 .. 30.00 s in 0.02 s steps

# Symbols that are not speech; with their leading-space forms they are suppressed by default.
_SYMBOLS = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』') + (
    "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split())
_MUSIC = list("♩♪♫♬♭♮♯")


class TokenizerError(ValueError):
    pass


def special_ids(spec) -> tuple[int, int]:
    """(<|endoftext|>, the first timestamp) of a spec's vocabulary: the special tokens
    follow the text vocabulary (eot, sot, languages, translate, transcribe, startoflm,
    startofprev, nospeech, notimestamps), then the timestamps fill it."""
    v = spec.vocab
    eot = v.n_vocab - N_TIMESTAMPS - 7 - v.num_languages - 1
    return eot, eot + 2 + v.num_languages + 6


class WhisperTokenizer:
    def __init__(self, tokenizer_json: str | Path, spec: ModelSpec, language: str | None = None,
                 task: str = "transcribe"):
        from tokenizers import Tokenizer

        path = Path(tokenizer_json)
        if not path.is_file():
            raise TokenizerError(f"{path}: tokenizer.json not found")
        try:
            self.bpe = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({str(e)[:200]})") from None
        self.spec = spec
        v = spec.vocab
        self.multilingual = v.multilingual
        self.languages = LANGUAGES[: v.num_languages] if v.multilingual else []
        # Special tokens follow the text vocabulary: eot, sot, languages, translate,
        # transcribe, startoflm, startofprev, nospeech, notimestamps, timestamps.
        self.eot, _ = special_ids(spec)
        self.sot = self.eot + 1
        self.language_begin = self.sot + 1
        after = self.language_begin + v.num_languages
        (self.translate, self.transcribe, self.sot_lm, self.sot_prev, self.no_speech,
         self.no_timestamps) = range(after, after + 6)
        self.timestamp_begin = after + 6
        if self.timestamp_begin + N_TIMESTAMPS != v.n_vocab:  # pragma: no cover - arithmetic guard
            raise TokenizerError(f"special-token layout does not fill n_vocab={v.n_vocab}")
        found = self.bpe.token_to_id("<|endoftext|>")
        if found is not None and found != self.eot:
            raise TokenizerError(f"{path}: <|endoftext|> is id {found}, but spec {spec.name!r} puts it at "
                                 f"{self.eot}; is this the tokenizer for this model?")
        if language is not None and language not in self.languages and self.multilingual:
            raise TokenizerError(f"unknown language {language!r}; known: {' '.join(self.languages)}")
        if task not in ("transcribe", "translate"):
            raise TokenizerError(f"task must be 'transcribe' or 'translate', found {task!r}")
        self.language = language if self.multilingual else "en"
        self.task = task

    def with_language(self, language: str | None, task: str | None = None) -> "WhisperTokenizer":
        """The same vocabulary, prompting for another language or task."""
        new = copy.copy(self)
        if self.multilingual:
            if language is not None and language not in self.languages:
                raise TokenizerError(f"unknown language {language!r}; known: {' '.join(self.languages)}")
            new.language = language
        elif language not in (None, "en"):
            raise TokenizerError(f"{self.spec.name} is an English-only model; it cannot transcribe language "
                                 f"{language!r} (use a multilingual model)")
        elif task == "translate":
            raise TokenizerError(f"{self.spec.name} is an English-only model; it cannot translate "
                                 "(use a multilingual model)")
        new.task = task or self.task
        return new

    def language_token(self, code: str) -> int:
        return self.language_begin + self.languages.index(code)

    @property
    def language_tokens(self) -> list[int]:
        return [self.language_begin + i for i in range(len(self.languages))]

    @property
    def sot_sequence(self) -> list[int]:
        """English-only models take <|startoftranscript|> alone."""
        if not self.multilingual:
            return [self.sot]
        seq = [self.sot]
        if self.language is not None:
            seq.append(self.language_token(self.language))
        seq.append(self.translate if self.task == "translate" else self.transcribe)
        return seq

    def encode(self, text: str) -> list[int]:
        return self.bpe.encode(text, add_special_tokens=False).ids

    def decode(self, tokens) -> str:
        return self.bpe.decode([int(t) for t in tokens if t < self.eot], skip_special_tokens=False)

    def decode_with_timestamps(self, tokens) -> str:
        out, run = [], []
        for t in tokens:
            if t >= self.timestamp_begin:
                out.append(self.decode(run))
                run = []
                out.append(f"<|{(t - self.timestamp_begin) * 0.02:.2f}|>")
            else:
                run.append(t)
        out.append(self.decode(run))
        return "".join(out)

    def split_to_word_tokens(self, tokens: list[int]) -> tuple[list[str], list[list[int]]]:
        """Words and their tokens. Languages written without spaces split wherever the
        tokens so far decode to whole characters; others at spaces and punctuation."""
        pieces, piece_tokens = self._split_on_characters(tokens)
        if self.language in {"zh", "ja", "th", "lo", "my", "yue"}:
            return pieces, piece_tokens
        words: list[str] = []
        word_tokens: list[list[int]] = []
        for piece, toks in zip(pieces, piece_tokens):
            if not words or toks[0] >= self.eot or piece.startswith(" ") or piece.strip() in string.punctuation:
                words.append(piece)
                word_tokens.append(list(toks))
            else:
                words[-1] += piece
                word_tokens[-1].extend(toks)
        return words, word_tokens

    def _split_on_characters(self, tokens: list[int]) -> tuple[list[str], list[list[int]]]:
        # A token can end inside a multi-byte character: extend the piece until it decodes
        # cleanly, unless the full text itself has a replacement character there.
        full = self.decode_with_timestamps(tokens)
        pieces, piece_tokens, current, at = [], [], [], 0
        for t in tokens:
            current.append(t)
            text = self.decode_with_timestamps(current)
            bad = text.find("\ufffd")
            if bad < 0 or full[at + bad: at + bad + 1] == "\ufffd":
                pieces.append(text)
                piece_tokens.append(current)
                current, at = [], at + len(text)
        return pieces, piece_tokens

    @cached_property
    def non_speech_tokens(self) -> list[int]:
        """Tokens for symbols that are not speech: a symbol's own token, or its
        leading-space form, when it is a single token; music signs always, by first token."""
        result = {self.encode(" -")[0], self.encode(" '")[0]}
        for symbol in _SYMBOLS + _MUSIC:
            for ids in (self.encode(symbol), self.encode(" " + symbol)):
                if len(ids) == 1 or symbol in _MUSIC:
                    result.add(ids[0])
        return sorted(result)
