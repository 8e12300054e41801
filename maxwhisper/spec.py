"""Whisper variants as data: a YAML spec, loaded into typed, validated dataclasses.

A variant file holds what distinguishes it (name, widths, heads, depths, vocabulary,
alignment heads); `specs/defaults.yaml` holds the structure they share and is merged
under it. What the code fixes (a sinusoidal encoder table, a learned decoder table,
logits through the tied token embedding) is no key at all. Every error names the file
and the dotted key path, so a user can fix a spec without reading this module.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

# Sublayer kinds a block may be composed of, and the checkpoint prefix each one owns
# (openai-whisper's module names: `attn`, `cross_attn`, `mlp`, each with a `<prefix>_ln`).
SUBLAYER_PREFIX = {"self_attention": "attn", "cross_attention": "cross_attn", "mlp": "mlp"}
ACTIVATIONS = ("gelu",)


class SpecError(ValueError):
    """A spec that cannot describe a Whisper model; the message names file and key."""


@dataclass(frozen=True)
class ConvSpec:
    name: str
    kernel: int
    stride: int
    padding: int
    activation: str


@dataclass(frozen=True)
class AudioSpec:
    n_mels: int
    sample_rate: int
    n_fft: int
    hop_length: int
    chunk_seconds: int

    @property
    def n_samples(self) -> int:
        return self.chunk_seconds * self.sample_rate

    @property
    def n_frames(self) -> int:
        return self.n_samples // self.hop_length


@dataclass(frozen=True)
class VocabSpec:
    n_vocab: int
    tokenizer: str        # "gpt2" (English-only) or "multilingual"
    num_languages: int

    @property
    def multilingual(self) -> bool:
        return self.tokenizer == "multilingual"


@dataclass(frozen=True)
class EncoderSpec:
    n_ctx: int
    n_state: int
    n_head: int
    n_layer: int
    mlp_ratio: int
    stem: list[ConvSpec]
    block: list[str]
    final_norm: str

    @property
    def n_mlp(self) -> int:
        return self.n_state * self.mlp_ratio


@dataclass(frozen=True)
class DecoderSpec:
    n_ctx: int
    n_state: int
    n_head: int
    n_layer: int
    mlp_ratio: int
    block: list[str]
    final_norm: str

    @property
    def n_mlp(self) -> int:
        return self.n_state * self.mlp_ratio


@dataclass(frozen=True)
class ModelSpec:
    name: str
    audio: AudioSpec
    vocab: VocabSpec
    encoder: EncoderSpec
    decoder: DecoderSpec
    norm_eps: float
    alignment_heads: list[list[int]] = field(default_factory=list)
    source: str = field(default="<memory>", compare=False)

    @property
    def dims(self) -> dict[str, int]:
        """openai-whisper's ModelDimensions, as a dict."""
        return dict(
            n_mels=self.audio.n_mels, n_audio_ctx=self.encoder.n_ctx,
            n_audio_state=self.encoder.n_state, n_audio_head=self.encoder.n_head,
            n_audio_layer=self.encoder.n_layer, n_vocab=self.vocab.n_vocab,
            n_text_ctx=self.decoder.n_ctx, n_text_state=self.decoder.n_state,
            n_text_head=self.decoder.n_head, n_text_layer=self.decoder.n_layer,
        )


def _parse(cls, data, path: str, source: str):
    """Build `cls` from plain YAML data, checking keys and types against its annotations."""
    where = f"{source}: {path or 'top level'}"
    origin = typing.get_origin(cls)
    if origin is list:
        (item,) = typing.get_args(cls)
        if not isinstance(data, list):
            raise SpecError(f"{where}: expected a list, found {type(data).__name__} {_short(data)}")
        return [_parse(item, x, f"{path}[{i}]", source) for i, x in enumerate(data)]
    if dataclasses.is_dataclass(cls):
        if not isinstance(data, dict):
            raise SpecError(f"{where}: expected a mapping, found {type(data).__name__} {_short(data)}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
        unknown = sorted(str(k) for k in data if k not in fields)
        if unknown:
            raise SpecError(f"{where}: unknown key(s) {_short(unknown)}; allowed: {sorted(fields)}")
        values = {}
        for name, f in fields.items():
            sub = f"{path}.{name}" if path else name
            if name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise SpecError(f"{source}: {sub}: missing required key")
                continue
            values[name] = _parse(hints[name], data[name], sub, source)
        return cls(**values)
    if cls is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            raise SpecError(f"{where}: expected a number, found {type(data).__name__} {_short(data)}")
        if not math.isfinite(data):
            raise SpecError(f"{where}: expected a finite number, found {data}")
        return float(data)
    if cls in (int, str, bool):
        # bool is an int in Python; a spec that says `n_layer: true` is still wrong.
        if not isinstance(data, cls) or (cls is int and isinstance(data, bool)):
            raise SpecError(f"{where}: expected {cls.__name__}, found {type(data).__name__} {_short(data)}")
        return data
    raise TypeError(f"unsupported schema type {cls}")  # a schema bug, never user input


def _short(value, limit: int = 200) -> str:
    """A value for an error message, cut short: a spec may hold anything."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _check(spec: ModelSpec) -> None:
    """Consistency rules that types alone cannot express."""
    src = spec.source

    def fail(key: str, msg: str):
        raise SpecError(f"{src}: {key}: {msg}")

    positive = {
        "audio.n_mels": spec.audio.n_mels, "audio.sample_rate": spec.audio.sample_rate,
        "audio.n_fft": spec.audio.n_fft, "audio.hop_length": spec.audio.hop_length,
        "audio.chunk_seconds": spec.audio.chunk_seconds, "vocab.n_vocab": spec.vocab.n_vocab,
        "vocab.num_languages": spec.vocab.num_languages,
    }
    for part in ("encoder", "decoder"):
        s = getattr(spec, part)
        for k in ("n_ctx", "n_state", "n_head", "n_layer", "mlp_ratio"):
            positive[f"{part}.{k}"] = getattr(s, k)
        if s.n_head > 0 and s.n_state % s.n_head:
            fail(f"{part}.n_state", f"{s.n_state} is not divisible by {part}.n_head={s.n_head}")
        if not s.block:
            fail(f"{part}.block", "a block needs at least one sublayer")
        for i, kind in enumerate(s.block):
            if kind not in SUBLAYER_PREFIX:
                fail(f"{part}.block[{i}]", f"unknown sublayer {kind!r}; known: {sorted(SUBLAYER_PREFIX)}")
        if len(set(s.block)) != len(s.block):
            fail(f"{part}.block", f"a sublayer kind appears twice in {s.block}")
    for key, v in positive.items():
        if v <= 0:
            fail(key, f"must be positive, found {v}")
    if not 0 < spec.norm_eps < math.inf:
        fail("norm_eps", f"must be positive and finite, found {spec.norm_eps}")
    if spec.vocab.tokenizer not in ("gpt2", "multilingual"):
        fail("vocab.tokenizer", f"unknown tokenizer {spec.vocab.tokenizer!r}; known: gpt2, multilingual")
    for kind in ("self_attention", "cross_attention"):
        if kind not in spec.decoder.block:
            fail("decoder.block", f"the decoder needs a {kind} sublayer, found {spec.decoder.block}")
    if "cross_attention" in spec.encoder.block:
        fail("encoder.block", "the encoder has nothing to cross-attend to")
    if spec.encoder.n_state != spec.decoder.n_state:
        fail("decoder.n_state", f"{spec.decoder.n_state} differs from encoder.n_state={spec.encoder.n_state}; "
             "cross-attention needs equal widths")
    if spec.encoder.n_state % 2:
        fail("encoder.n_state", "sinusoidal positional embedding needs an even width")
    if not spec.encoder.stem:
        fail("encoder.stem", "the stem needs at least one convolution")
    # The stem must map one 30 s window of mel frames onto exactly n_ctx positions.
    length = spec.audio.n_frames
    for i, c in enumerate(spec.encoder.stem):
        key = f"encoder.stem[{i}]"
        if c.kernel <= 0 or c.stride <= 0 or c.padding < 0:
            fail(key, f"kernel and stride must be positive and padding >= 0, found {c}")
        if c.activation not in ACTIVATIONS:
            fail(f"{key}.activation", f"unknown activation {c.activation!r}; known: {list(ACTIVATIONS)}")
        length = (length + 2 * c.padding - c.kernel) // c.stride + 1
    if length != spec.encoder.n_ctx:
        fail("encoder.n_ctx", f"the stem turns {spec.audio.n_frames} mel frames into {length} positions, "
             f"but encoder.n_ctx is {spec.encoder.n_ctx}")
    names = [c.name for c in spec.encoder.stem]
    if len(set(names)) != len(names):
        fail("encoder.stem", f"stem convolution names must be unique, found {names}")
    _check_size(spec, fail)
    for i, pair in enumerate(spec.alignment_heads):
        if len(pair) != 2 or not (0 <= pair[0] < spec.decoder.n_layer and 0 <= pair[1] < spec.decoder.n_head):
            fail(f"alignment_heads[{i}]", f"{pair} is not a [layer, head] inside "
                 f"{spec.decoder.n_layer} layers x {spec.decoder.n_head} heads")


# Bounds that keep a typo (an extra zero or three) from allocating until memory runs
# out: about twice the largest Whisper (large-v3, 1.55 G parameters), and attention
# scores for one window that fit in memory.
MAX_PARAMETERS = 4_000_000_000
MAX_SCORES_BYTES = 4 << 30


def _check_size(spec: ModelSpec, fail) -> None:
    from .manifest import parameter_count

    n = parameter_count(spec)
    if n > MAX_PARAMETERS:
        fail("dims", f"the spec declares {n:,} parameters ({4 * n / 2**30:,.1f} GiB in float32); "
             f"at most {MAX_PARAMETERS:,} are accepted")
    for part in ("encoder", "decoder"):
        s = getattr(spec, part)
        scores = 4 * s.n_head * s.n_ctx * s.n_ctx
        if scores > MAX_SCORES_BYTES:
            fail(f"{part}.n_ctx", f"attention scores of one window would take {scores / 2**30:,.1f} GiB "
                 f"({part}.n_head={s.n_head} x n_ctx={s.n_ctx}^2 float32); at most "
                 f"{MAX_SCORES_BYTES / 2**30:.0f} GiB are accepted")


DEFAULTS = "defaults"  # specs/defaults.yaml: the shared structure, not a variant
MAX_SPEC_BYTES = 1 << 20


class _PlainLoader(yaml.SafeLoader):
    """YAML without anchors and aliases: a spec needs none, and a few nested aliases in a
    small file expand into gigabytes."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise SpecError(f"line {event.start_mark.line + 1}: YAML aliases (*name) are not accepted in a spec; "
                            "write the values out")
        return super().compose_node(parent, index)


def _merged(base, over):
    """`over` on top of `base`: mappings merged key by key, anything else replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        return {**base, **{k: _merged(base[k], v) if k in base else v for k, v in over.items()}}
    return over


def _read_yaml(path: Path):
    size = path.stat().st_size
    if size > MAX_SPEC_BYTES:
        raise SpecError(f"{path}: {size:,} bytes is too large for a spec (at most {MAX_SPEC_BYTES:,})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8 text ({e})") from None
    try:
        return yaml.load(text, Loader=_PlainLoader)
    except SpecError as e:
        raise SpecError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {str(e)[:500]}") from None


def parse_spec(data, source: str = "<memory>") -> ModelSpec:
    """A spec from a variant's YAML data, merged over the shared defaults."""
    if isinstance(data, dict):
        data = _merged(_read_yaml(specs_dir() / f"{DEFAULTS}.yaml"), data)
    spec = _parse(ModelSpec, data, "", source)
    spec = dataclasses.replace(spec, source=source)
    _check(spec)
    return spec


def specs_dir() -> Path:
    """`specs/` of a source checkout, else the copy installed as `maxwhisper.specs`."""
    checkout = Path(__file__).resolve().parent.parent / "specs"
    if checkout.is_dir():
        return checkout
    return Path(str(resources.files("maxwhisper.specs")))


def builtin_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in specs_dir().glob("*.yaml") if p.stem != DEFAULTS)


def is_builtin_name(text: str) -> bool:
    """A built-in variant's name, not a path: a path that spells one is written as a path
    (`./tiny.en`)."""
    return text in builtin_names() and not any(sep and sep in text for sep in (os.sep, os.altsep))


def load_spec(name_or_path: str | Path) -> ModelSpec:
    """A built-in variant by name (`tiny.en`) or a YAML file by path."""
    text = str(name_or_path)
    path = Path(text)
    if is_builtin_name(text):  # even where a folder of that name sits here
        path = specs_dir() / f"{text}.yaml"
    elif not (text.endswith((".yaml", ".yml")) or path.exists()):
        raise SpecError(f"unknown model spec {text!r}: not a file, and not one of {builtin_names()}")
    if not path.is_file():
        raise SpecError(f"{path}: spec file not found")
    return parse_spec(_read_yaml(path), str(path))
