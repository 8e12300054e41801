"""Long-form transcription: slide a 30 s window along the audio, seeking to the last
complete timestamped segment, as openai-whisper's `transcribe()` does; many audios walk
their windows side by side so that each step encodes and decodes a batch."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields, replace

import numpy as np

from .audio import Spectrogram, pad_or_trim
from .decoding import DecodingOptions, DecodingResult, decode, detect_language, prompt_length
from .hallucination import end_of, skip_silence
from .spans import (Joined, Timeline, clip_spans, merged, parse_clip_timestamps, probabilities, speech_chunks,
                    speech_spans)
from .timing import APPEND_PUNCTUATIONS, PREPEND_PUNCTUATIONS, add_word_timestamps
from .tokenizer import WhisperTokenizer
from .vad import VadOptions

DEFAULT_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def _segments_from_window(tokens: list[int], tb: int, time_offset: float, window_frames: int,
                          input_stride: int, precision: float) -> tuple[list[tuple[float, float, list[int]]], int, bool]:
    """Split a window's tokens at timestamp pairs. Returns [(start, end, tokens)], how
    many mel frames to advance, and whether the window ended on a lone timestamp."""
    is_ts = [t >= tb for t in tokens]
    single_ending = is_ts[-2:] == [False, True]
    cuts = [i + 1 for i in range(len(tokens) - 1) if is_ts[i] and is_ts[i + 1]]
    segments = []
    if cuts:
        if single_ending:
            cuts.append(len(tokens))
        last = 0
        for cut in cuts:
            piece = tokens[last:cut]
            segments.append((time_offset + (piece[0] - tb) * precision,
                             time_offset + (piece[-1] - tb) * precision, piece))
            last = cut
        # Without a closing timestamp the last segment may be cut off: re-read from it.
        advance = window_frames if single_ending else (tokens[last - 1] - tb) * input_stride
    else:
        duration = window_frames * precision / input_stride
        stamps = [t for t in tokens if t >= tb]
        if stamps and stamps[-1] != tb:
            duration = (stamps[-1] - tb) * precision
        segments.append((time_offset, time_offset + duration, tokens))
        advance = window_frames
    return segments, advance, single_ending


class _Stream:
    """One audio's walk through its 30 s windows: where it is, what it said, and the
    previous text that prompts its next window."""

    def __init__(self, model, audio: np.ndarray | Spectrogram | Joined, tok,
                 initial_prompt: str | tuple[int, ...] | None, floor: float | None):
        self.spectrogram = audio if isinstance(audio, Spectrogram) else Spectrogram(audio, model.spec.audio)
        self.tok, self.floor = tok, floor
        self.content_frames = self.spectrogram.content_frames
        if isinstance(initial_prompt, tuple):
            self.prompt_tokens = list(initial_prompt)
        else:
            self.prompt_tokens = tok.encode(" " + initial_prompt.strip()) if initial_prompt else []
        self.all_tokens: list[int] = list(self.prompt_tokens)
        self.segments: list[dict] = []
        self.prompt_reset_since = self.seek = 0
        self.last_speech_timestamp = 0.0
        self.language_probs = None

    @property
    def finished(self) -> bool:
        return self.seek >= self.content_frames

    @property
    def prompt(self) -> list[int]:
        return self.all_tokens[self.prompt_reset_since:]

    def window(self, n_frames: int) -> tuple[int, np.ndarray | None]:
        """The next window's content frames and its padded log-mel; None when it is too
        quiet to hold speech. Only content frames go in: the rest of the window is
        zeros, not the log-mel of padding, as openai-whisper and faster-whisper feed it."""
        frames = min(n_frames, self.content_frames - self.seek)
        if self.floor is not None:
            samples = self.spectrogram.samples(self.seek, frames)
            if samples.size == 0 or np.max(np.abs(samples)) < self.floor:
                return frames, None
        return frames, pad_or_trim(self.spectrogram.mel(self.seek, frames), n_frames)

    def accept(self, model, result: DecodingResult | None, cross, frames: int, cfg: dict) -> None:
        """Take a window's decoding (None: skipped unheard) and move on."""
        spec, a = model.spec, model.spec.audio
        input_stride = a.n_frames // spec.encoder.n_ctx
        precision = input_stride * a.hop_length / a.sample_rate
        fps = a.sample_rate // a.hop_length
        time_offset, previous_seek = self.seek * a.hop_length / a.sample_rate, self.seek
        no_speech, lp = cfg["no_speech_threshold"], cfg["logprob_threshold"]
        if result is None or (no_speech is not None and result.no_speech_prob > no_speech
                              and not (lp is not None and result.avg_logprob > lp)):
            self.seek += frames  # too quiet to encode, or no speech heard: no words, no prompt
            return
        tok = self.tok
        pieces, advance, single_ending = _segments_from_window(
            result.tokens, tok.timestamp_begin, time_offset, frames, input_stride, precision)
        self.seek += advance
        current = [dict(id=len(self.segments) + i, seek=previous_seek, start=round(start, 3), end=round(end, 3),
                        text=tok.decode(toks), tokens=toks, temperature=result.temperature,
                        avg_logprob=result.avg_logprob, compression_ratio=result.compression_ratio,
                        no_speech_prob=result.no_speech_prob)
                   for i, (start, end, toks) in enumerate(pieces)]
        if cfg["word_timestamps"]:
            add_word_timestamps(current, model.runtime, tok, cross, frames, self.last_speech_timestamp,
                                cfg["prepend_punctuations"], cfg["append_punctuations"])
            last_end = end_of(current)
            # The last word is a better place to resume than a cut-off segment.
            if not single_ending and last_end is not None and last_end > time_offset:
                self.seek = round(last_end * fps)
            threshold = cfg["hallucination_silence_threshold"]
            if threshold is not None:
                self.seek, kept = skip_silence(
                    current, threshold, seek=self.seek, previous_seek=previous_seek, frames=frames,
                    time_offset=time_offset, window_end=(previous_seek + a.n_frames) * a.hop_length / a.sample_rate,
                    window_duration=frames * a.hop_length / a.sample_rate, single_ending=single_ending,
                    last_speech=self.last_speech_timestamp, content_frames=self.content_frames,
                    content_duration=self.content_frames * a.hop_length / a.sample_rate, frames_per_second=fps)
                if not kept:
                    return
            last_end = end_of(current)
            if last_end is not None:
                self.last_speech_timestamp = last_end
        for segment in current:
            if segment["start"] == segment["end"] or not segment["text"].strip():
                # Instantaneous or empty: keep its slot, drop its words.
                segment.update(text="", tokens=[], **({"words": []} if cfg["word_timestamps"] else {}))
            self.all_tokens.extend(segment["tokens"])
        self.segments.extend(current)
        if not cfg["condition_on_previous_text"] or result.temperature > 0.5:
            self.prompt_reset_since = len(self.all_tokens)

    def result(self) -> dict:
        out = dict(text=self.tok.decode(self.all_tokens[len(self.prompt_tokens):]), segments=self.segments,
                   language=self.tok.language)
        if self.language_probs is not None:
            out["language_probs"] = self.language_probs
        return out


def transcribe(model, audio: np.ndarray, options: TranscribeOptions | None = None, *, batch_size: int = 1,
               progress=None, **overrides) -> dict:
    """`model` is a `maxwhisper.model.Whisper`; `audio` mono float32 at the model's rate.
    Returns openai-whisper's keys: text, segments (with `words` when `word_timestamps`),
    language. Options as `transcribe_batch`; `progress(frames, total_frames)`.

    With `vad_filter`, `batch_size` > 1 cuts the speech at pauses into chunks of one
    window, up to `batch_size` decoded side by side, each as audio of its own;
    `batch_size=1` decodes the speech joined, in order, each window prompted with the
    text before it."""
    report = None if progress is None else (lambda _i, frames, total: progress(frames, total))
    ((_, result),) = transcribe_batch(model, [audio], options, batch_size=batch_size, progress=report, **overrides)
    return result


@dataclass(frozen=True)
class TranscribeOptions:
    """`transcribe`'s options, with openai-whisper's defaults; the CLI reads them too.
    `beam_size` applies at temperature 0, `best_of` above it. `initial_prompt`: text, or
    token ids (as faster-whisper takes it). `silence_threshold_db`: a window whose
    loudest sample is below this level (dBFS) is skipped unheard.
    `vad_filter`: transcribe only the speech that the VAD finds (`vad_options`, default
    `VadOptions()`). `clip_timestamps`: openai-whisper's, the spans to transcribe,
    "start,end,start,end,..." seconds or a sequence of them ("0": all of it). Times in
    the result stay on the audio's own timeline either way.
    `hallucination_silence_threshold`: openai-whisper's, seconds; with `word_timestamps`
    (it needs them), words that look made up and stand in more silence than this are
    dropped and the silence before them skipped (hallucination.py)."""
    language: str | None = None
    task: str = "transcribe"
    temperature: float | tuple[float, ...] = DEFAULT_TEMPERATURES
    beam_size: int | None = None
    best_of: int | None = None
    patience: float | None = None
    length_penalty: float | None = None
    compression_ratio_threshold: float | None = 2.4
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    condition_on_previous_text: bool = True
    initial_prompt: str | tuple[int, ...] | None = None
    without_timestamps: bool = False
    suppress_tokens: str | tuple[int, ...] | None = "-1"
    suppress_blank: bool = True
    word_timestamps: bool = False
    prepend_punctuations: str = PREPEND_PUNCTUATIONS
    append_punctuations: str = APPEND_PUNCTUATIONS
    silence_threshold_db: float | None = -60.0
    vad_filter: bool = False
    vad_options: VadOptions | None = None
    clip_timestamps: str | tuple[float, ...] = "0"
    hallucination_silence_threshold: float | None = None

    @property
    def whole_audio(self) -> bool:
        """Whether every sample is transcribed: no VAD, no clips."""
        return not self.vad_filter and parse_clip_timestamps(self.clip_timestamps) == (0.0,)

    def __post_init__(self):
        if not isinstance(self.vad_filter, bool):
            raise ValueError(f"vad_filter must be True or False, found {self.vad_filter!r}")
        if isinstance(self.vad_options, dict):  # as faster-whisper takes them
            object.__setattr__(self, "vad_options", VadOptions(**self.vad_options))
        if self.vad_options is not None and not isinstance(self.vad_options, VadOptions):
            raise ValueError(f"vad_options must be a maxwhisper.vad.VadOptions or a dict of its fields, "
                             f"found {type(self.vad_options).__name__}")
        parse_clip_timestamps(self.clip_timestamps)
        number, flag, text = (int, float), (bool,), (str,)
        kinds = dict(language=text, task=text, beam_size=(int,), best_of=(int,), patience=number,
                     length_penalty=number, compression_ratio_threshold=number, logprob_threshold=number,
                     no_speech_threshold=number, condition_on_previous_text=flag, initial_prompt=(str, tuple),
                     without_timestamps=flag, suppress_tokens=(str, tuple), suppress_blank=flag,
                     word_timestamps=flag, prepend_punctuations=text, append_punctuations=text,
                     silence_threshold_db=number, temperature=(int, float, tuple, list))
        for name, kind in kinds.items():
            value = getattr(self, name)
            optional = "None" in _FIELD_TYPES[name]
            wrong_bool = isinstance(value, bool) and bool not in kind
            if (value is None and not optional) or (value is not None and (not isinstance(value, kind) or wrong_bool)):
                raise ValueError(f"{name} must be {' or '.join(k.__name__ for k in kind)}"
                                 f"{' or None' if optional else ''}, found {value!r}")
        for name in ("suppress_tokens", "initial_prompt"):
            value = getattr(self, name)
            if isinstance(value, tuple) and not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
                raise ValueError(f"{name} must be text or token ids (ints), found {value!r}")
        temperatures = (self.temperature,) if isinstance(self.temperature, (int, float)) else self.temperature
        if not temperatures or not all(isinstance(t, (int, float)) and 0 <= t < math.inf for t in temperatures):
            raise ValueError(f"temperature must be a finite number >= 0 or a sequence of them, "
                             f"found {self.temperature!r}")
        for name in ("compression_ratio_threshold", "logprob_threshold", "no_speech_threshold",
                     "silence_threshold_db"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number or None, found {value!r}")
        h = self.hallucination_silence_threshold
        if h is not None:
            if isinstance(h, bool) or not isinstance(h, (int, float)) or not 0 <= h < math.inf:
                raise ValueError(f"hallucination_silence_threshold must be seconds >= 0 or None, found {h!r}")
            if not self.word_timestamps:
                raise ValueError("hallucination_silence_threshold judges the words' timing: it needs "
                                 "word_timestamps=True")
        search = dict(beam_size=self.beam_size, best_of=self.best_of, patience=self.patience,
                      length_penalty=self.length_penalty)
        for t in temperatures:  # the decoding options of every temperature, checked now
            _options_at(t, search, task=self.task, suppress_tokens=self.suppress_tokens,
                        suppress_blank=self.suppress_blank, without_timestamps=self.without_timestamps)

    @classmethod
    def of(cls, options: TranscribeOptions | None = None, **overrides) -> TranscribeOptions:
        """`options` (default: the defaults) with keyword overrides; an unknown name is
        refused with the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown transcribe option(s) {unknown}; known: {sorted(known)}")
        return replace(options or cls(), **overrides)


_FIELD_TYPES = {f.name: str(f.type) for f in fields(TranscribeOptions)}


def transcribe_batch(model, audios: Iterable[np.ndarray | Spectrogram], options: TranscribeOptions | None = None, *,
                     batch_size: int = 8, progress=None, **overrides) -> Iterator[tuple[int, dict]]:
    """Transcribe many audios, up to `batch_size` at once: their current windows are
    encoded in one call and decoded together (windows whose prompts differ in length
    go in separate groups), and a finished audio makes room for the next. Yields
    (index, result) as each audio finishes; results equal one-by-one transcription.

    `options`: a `TranscribeOptions`, and keyword overrides of its fields. The silence
    gate (`silence_threshold_db`) is there because openai-whisper's no-speech rule alone
    lets a confident hallucination through (tiny.en says " you" to 20 s of digital
    zeros, no-speech probability 0.94); audio this quiet holds no speech to transcribe.
    `progress(index, frames, total_frames)`.

    With `vad_filter` or `clip_timestamps`, each audio's parts are decoded instead
    (`_transcribe_parts`), their times mapped back onto the audio's timeline."""
    o = TranscribeOptions.of(options, **overrides)
    if not o.whole_audio:
        yield from _transcribe_parts(model, audios, o, batch_size, progress)
        return
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, found {batch_size}")
    plan = DecodingPlan.of(model, o)
    batch = StreamBatch(model, progress=progress)
    pending = enumerate(audios)
    while True:
        for index, result in batch.done():
            if isinstance(result, Exception):
                raise result
            yield index, result
        arrivals = []
        while len(batch) + len(arrivals) < batch_size and (nxt := next(pending, None)) is not None:
            arrivals.append((nxt[0], nxt[1], plan))
        if arrivals:
            batch.admit(arrivals)
            continue  # an audio shorter than one frame is finished on arrival
        if not batch:
            return
        batch.step()


@dataclass(frozen=True, eq=False)
class DecodingPlan:
    """A `TranscribeOptions` checked against a model and turned into what decoding each
    window needs. Streams of equal options decode in the same groups."""
    options: TranscribeOptions
    tok: WhisperTokenizer  # prompting for the options' language and task
    temperatures: tuple[float, ...]
    search: dict
    fixed: dict
    cfg: dict
    floor: float | None
    # The initial prompt is already in each stream's prompt: streams whose options differ
    # only in it (live streams, each prompted with its own text) decode together.
    group: TranscribeOptions

    @classmethod
    def of(cls, model, options: TranscribeOptions) -> DecodingPlan:
        """Refuses (ValueError) options that could not decode with this model, before any
        audio is read (`TranscribeOptions` checked the rest when it was made)."""
        o = options
        if o.word_timestamps and o.task == "translate":
            raise ValueError("word_timestamps align the spoken words; they are not available with task='translate'")
        tok = model.tokenizer.with_language(o.language, o.task)
        temperatures = (o.temperature,) if isinstance(o.temperature, (int, float)) else tuple(o.temperature)
        search = dict(beam_size=o.beam_size, best_of=o.best_of, patience=o.patience, length_penalty=o.length_penalty)
        fixed = dict(task=o.task, suppress_tokens=o.suppress_tokens, suppress_blank=o.suppress_blank,
                     without_timestamps=o.without_timestamps)
        cfg = dict(no_speech_threshold=o.no_speech_threshold, logprob_threshold=o.logprob_threshold,
                   compression_ratio_threshold=o.compression_ratio_threshold, word_timestamps=o.word_timestamps,
                   condition_on_previous_text=o.condition_on_previous_text,
                   prepend_punctuations=o.prepend_punctuations, append_punctuations=o.append_punctuations,
                   hallucination_silence_threshold=o.hallucination_silence_threshold)
        floor = None if o.silence_threshold_db is None else 10.0 ** (o.silence_threshold_db / 20.0)
        return cls(o, tok, temperatures, search, fixed, cfg, floor, replace(o, initial_prompt=None))


class StreamBatch:
    """The audios being transcribed side by side, each with its own options. Every
    `step` encodes the current window of every stream in one call and decodes them in
    groups of equal options and language; streams may be admitted or
    cancelled between steps, so a caller can keep the batch full as audios come and go.

    `progress(key, frames, total_frames)` follows each stream's seek;
    `on_segments(key, segments)` receives each window's new segments as they are decoded.
    A failure while admitting or decoding ends only the streams it touched: `done()`
    hands back their exception in place of a result."""

    def __init__(self, model, progress=None, on_segments=None):
        self.model, self.progress, self.on_segments = model, progress, on_segments
        self._active: list[tuple[object, _Stream, DecodingPlan]] = []
        self._failed: list[tuple[object, Exception]] = []

    def __len__(self) -> int:
        return len(self._active)

    def admit(self, arrivals: list[tuple[object, np.ndarray, DecodingPlan]]) -> None:
        """Start streams (key, audio, plan); languages still unknown are detected from
        their first windows, one detection per plan."""
        started: dict[TranscribeOptions, list[tuple[object, _Stream, DecodingPlan]]] = {}
        for key, audio, plan in arrivals:
            try:
                stream = _Stream(self.model, audio, plan.tok, plan.options.initial_prompt, plan.floor)
            except Exception as e:
                self._failed.append((key, e))
                continue
            started.setdefault(plan.options, []).append((key, stream, plan))
        for entries in started.values():
            plan = entries[0][2]
            try:
                _detect_languages(self.model, [s for _, s, _ in entries], plan.tok, plan.options.task)
            except Exception as e:
                self._failed += [(key, e) for key, _, _ in entries]
                continue
            self._active += entries

    def cancel(self, key) -> bool:
        """Drop a stream between steps; False when it is not (or no longer) active."""
        for entry in self._active:
            if entry[0] == key:
                self._active.remove(entry)
                return True
        return False

    def done(self) -> list[tuple[object, dict | Exception]]:
        """Streams finished since the last call, and leave the batch: (key, result or
        the exception that ended it)."""
        finished = [(key, stream.result()) for key, stream, _ in self._active if stream.finished]
        self._active = [e for e in self._active if not e[1].finished]
        failed, self._failed = self._failed, []
        return failed + finished

    def step(self) -> int:
        """Decode one window of every active stream; returns how many were encoded."""
        model, runtime = self.model, self.model.runtime
        a = model.spec.audio
        heard = []
        for key, stream, plan in self._active:
            if stream.finished:
                continue
            frames, mel = stream.window(a.n_frames)
            if mel is None:
                self._advance(key, stream, plan, None, None, frames)
            else:
                heard.append((key, stream, plan, frames, mel))
        if not heard:
            return 0
        try:
            _, ck, cv = runtime.encode(np.stack([m for *_, m in heard]))[:3]
        except Exception as e:
            self._fail([h[0] for h in heard], e)
            return 0
        groups: dict[tuple, list[int]] = {}
        for row, (_, stream, plan, _, _) in enumerate(heard):
            # Prompts of any length decode together (padded, decoding.decode), but the
            # device's greedy loop takes them of one length.
            key = (plan.group, stream.tok.language,
                   prompt_length(stream.tok, stream.prompt) if runtime.greedy_on_device else None)
            groups.setdefault(key, []).append(row)
        for rows in groups.values():
            self._decode(heard, rows, ck, cv)
        return len(heard)

    def _decode(self, heard: list, rows: list[int], ck, cv) -> None:
        """Decode one group's windows together; if that fails, each window alone, so that
        a failure stays with the streams that cause it."""
        runtime = self.model.runtime
        plan, streams = heard[rows[0]][2], [heard[r][1] for r in rows]
        try:
            cross = runtime.select_pair((ck, cv), rows)
            results = _decode_with_fallback(runtime, streams[0].tok, cross, [s.prompt for s in streams], plan)
        except Exception as e:
            if len(rows) == 1:
                self._fail([heard[rows[0]][0]], e)
            else:
                for r in rows:
                    self._decode(heard, [r], ck, cv)
            return
        for k, (r, result) in enumerate(zip(rows, results)):
            key, stream, _, frames, _ = heard[r]
            try:
                self._advance(key, stream, plan, result,
                              runtime.select_pair(cross, [k]) if plan.cfg["word_timestamps"] else None, frames)
            except Exception as e:
                self._fail([key], e)

    def _advance(self, key, stream: _Stream, plan: DecodingPlan, result, cross, frames: int) -> None:
        before, n_segments = stream.seek, len(stream.segments)
        stream.accept(self.model, result, cross, frames, plan.cfg)
        if self.progress is not None:
            self.progress(key, min(stream.content_frames, stream.seek) - before, stream.content_frames)
        if self.on_segments is not None and len(stream.segments) > n_segments:
            self.on_segments(key, stream.segments[n_segments:])

    def _fail(self, keys: list, error: Exception) -> None:
        gone = set(keys)
        self._failed += [(key, error) for key in keys if any(e[0] == key for e in self._active)]
        self._active = [e for e in self._active if e[0] not in gone]


def _transcribe_parts(model, audios: Iterable[np.ndarray | Spectrogram], o: TranscribeOptions, batch_size: int,
                      progress) -> Iterator[tuple[int, dict]]:
    """Each audio's clips, narrowed to speech by the VAD, decoded as audios of their own:
    with the VAD and `batch_size` > 1, chunks of one window cut at pauses
    (spans.speech_chunks), up to `batch_size` side by side, each read as long-form audio;
    otherwise the parts joined into one audio, decoded in order. Yields (index, result)
    with times on each audio's own timeline."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, found {batch_size}")
    rate, hop = model.spec.audio.sample_rate, model.spec.audio.hop_length
    chunked = o.vad_filter and batch_size > 1
    vad = o.vad_options or VadOptions()
    clips = parse_clip_timestamps(o.clip_timestamps)
    plain = replace(o, vad_filter=False, vad_options=None, clip_timestamps="0")
    next(transcribe_batch(model, [], plain, batch_size=batch_size), None)  # options checked before the VAD runs
    timelines: dict[int, list[Timeline]] = {}
    owner: list[tuple[int, int]] = []  # part -> (audio, its position among the audio's parts)
    # Progress counts the audio's own frames: each part's share, the skipped rest at its end.
    frames_of: dict[int, int] = {}
    reported: dict[int, int] = {}

    def parts():
        for index, audio in enumerate(audios):
            # A file is read block by block: by the VAD once, then each part when it is decoded.
            if isinstance(audio, Spectrogram):
                source, n_samples = audio.source, audio.n_samples
            else:
                source = np.asarray(audio, np.float32).reshape(-1)
                n_samples = source.size
            frames_of[index], reported[index] = n_samples // hop, 0
            spans = clip_spans(clips, n_samples, rate)
            if chunked:
                lines = speech_chunks(probabilities(source, spans), spans, vad, rate)
            elif o.vad_filter:
                lines = [Timeline(tuple(speech_spans(probabilities(source, spans), spans, vad)), rate)]
            else:
                lines = [Timeline(tuple(spans), rate)]
            timelines[index] = lines or [Timeline((), rate)]  # no speech: an empty part, no words
            for k, line in enumerate(timelines[index]):
                owner.append((index, k))
                yield line.joined(source)

    def report(index: int, frames: int) -> None:
        frames = min(frames, frames_of[index] - reported[index])
        reported[index] += frames
        if progress is not None and frames > 0:
            progress(index, frames, frames_of[index])

    done: dict[int, dict[int, dict]] = {}
    for part, result in transcribe_batch(model, parts(), plain, batch_size=batch_size,
                                         progress=lambda part, frames, _total: report(owner[part][0], frames)):
        index, k = owner[part]
        done.setdefault(index, {})[k] = timelines[index][k].restore(result, hop)
        if len(done[index]) == len(timelines[index]):
            got = done.pop(index)
            results = [got[j] for j in range(len(timelines.pop(index)))]
            report(index, frames_of[index])
            yield index, merged(results, o.language) if chunked else results[0]


def _detect_languages(model, streams: list[_Stream], tok, task: str) -> None:
    """Streams of a multilingual model without a given language learn theirs from their
    first window, all in one encoder and one decoder call."""
    if not (tok.multilingual and tok.language is None) or not streams:
        return
    a = model.spec.audio
    mels = [pad_or_trim(s.spectrogram.mel(0, min(a.n_frames, s.content_frames)), a.n_frames) for s in streams]
    _, ck, cv = model.runtime.encode(np.stack(mels))[:3]
    codes, probs = detect_language(model.runtime, tok, (ck, cv))
    for stream, code, p in zip(streams, codes, probs):
        stream.tok, stream.language_probs = tok.with_language(code, task), p


def _options_at(t: float, search: dict, **fixed) -> DecodingOptions:
    """Beam search (and its patience) is for temperature 0, best_of for sampling."""
    greedy = t == 0
    return DecodingOptions(temperature=t, beam_size=search["beam_size"] if greedy else None,
                           patience=search["patience"] if greedy else None,
                           best_of=None if greedy else search["best_of"],
                           length_penalty=search["length_penalty"], **fixed)


def _decode_with_fallback(runtime, tok, cross, prompts: list[list[int]], plan: DecodingPlan) -> list[DecodingResult]:
    """Decode the windows together; those whose text looks repetitive or unlikely (and
    not like silence) are decoded again, together, at the next temperature."""
    results: list[DecodingResult | None] = [None] * len(prompts)
    todo = list(range(len(prompts)))
    cfg = plan.cfg
    cr, lp, ns = cfg["compression_ratio_threshold"], cfg["logprob_threshold"], cfg["no_speech_threshold"]
    for t in plan.temperatures:
        outs = decode(runtime, tok, runtime.select_pair(cross, todo),
                      _options_at(t, plan.search, language=tok.language, **plan.fixed),
                      prompts=[prompts[i] for i in todo])
        retry = []
        for i, result in zip(todo, outs):
            results[i] = result
            too_repetitive = cr is not None and result.compression_ratio > cr
            too_unlikely = lp is not None and result.avg_logprob < lp
            silence = ns is not None and result.no_speech_prob > ns and too_unlikely
            if not silence and (too_repetitive or too_unlikely):
                retry.append(i)
        if not retry:
            break
        todo = retry
    return results
