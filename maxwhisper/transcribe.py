"""Long-form transcription: slide a 30 s window along the audio, seeking to the last
complete timestamped segment, as openai-whisper's `transcribe()` does."""

from __future__ import annotations

import numpy as np

from .audio import log_mel_spectrogram, pad_or_trim
from .decoding import DecodingOptions, DecodingResult, decode, detect_language
from .timing import APPEND_PUNCTUATIONS, PREPEND_PUNCTUATIONS, add_word_timestamps

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


def transcribe(model, audio: np.ndarray, *, language: str | None = None, task: str = "transcribe",
               temperature: float | tuple[float, ...] = DEFAULT_TEMPERATURES,
               beam_size: int | None = None, best_of: int | None = None, patience: float | None = None,
               length_penalty: float | None = None,
               compression_ratio_threshold: float | None = 2.4, logprob_threshold: float | None = -1.0,
               no_speech_threshold: float | None = 0.6, condition_on_previous_text: bool = True,
               initial_prompt: str | None = None, without_timestamps: bool = False,
               suppress_tokens: str | list[int] | None = "-1", suppress_blank: bool = True,
               word_timestamps: bool = False, prepend_punctuations: str = PREPEND_PUNCTUATIONS,
               append_punctuations: str = APPEND_PUNCTUATIONS,
               silence_threshold_db: float | None = -60.0, progress=None) -> dict:
    """`model` is a `maxwhisper.model.Whisper`; `audio` mono float32 at the model's rate.
    Returns openai-whisper's keys: text, segments (with `words` when `word_timestamps`),
    language. `beam_size` applies at temperature 0, `best_of` above it.

    `silence_threshold_db`: a window whose loudest sample is below this level (dBFS) is
    skipped unheard. openai-whisper's no-speech rule alone lets a confident
    hallucination through (tiny.en says " you" to 20 s of digital zeros, no-speech
    probability 0.94); audio this quiet holds no speech to transcribe."""
    spec, runtime = model.spec, model.runtime
    a = spec.audio
    tok = model.tokenizer.with_language(language, task)
    if word_timestamps and task == "translate":
        raise ValueError("word_timestamps align the spoken words; they are not available with task='translate'")
    n_frames = a.n_frames
    mel = log_mel_spectrogram(audio, a, padding=a.n_samples)
    content_frames = mel.shape[-1] - n_frames
    input_stride = n_frames // spec.encoder.n_ctx
    precision = input_stride * a.hop_length / a.sample_rate
    frame_seconds = a.hop_length / a.sample_rate
    temperatures = (temperature,) if isinstance(temperature, (int, float)) else tuple(temperature)
    search = dict(beam_size=beam_size, best_of=best_of, patience=patience, length_penalty=length_penalty)
    # Options are checked now, not after the first window has been decoded.
    for t in temperatures:
        _options_at(t, search, task=task)

    def encode(seek: int, frames: int):
        # Only content frames; the rest of the window is zeros, not the log-mel of the
        # padding silence, exactly as openai-whisper and faster-whisper feed the encoder.
        window = pad_or_trim(mel[:, seek: seek + frames], n_frames)[None]
        _, ck, cv = runtime.encode(window)[:3]
        return ck, cv

    language_probs = None
    if tok.multilingual and tok.language is None:
        codes, probs = detect_language(runtime, tok, encode(0, min(n_frames, content_frames)))
        tok = tok.with_language(codes[0], task)
        language_probs = probs[0]

    prompt_tokens = tok.encode(" " + initial_prompt.strip()) if initial_prompt else []
    all_tokens: list[int] = list(prompt_tokens)
    segments: list[dict] = []
    prompt_reset_since = 0
    seek = 0
    last_speech_timestamp = 0.0
    floor = None if silence_threshold_db is None else 10.0 ** (silence_threshold_db / 20.0)
    while seek < content_frames:
        time_offset = seek * frame_seconds
        window_frames = min(n_frames, content_frames - seek)
        previous_seek = seek
        samples = audio[seek * a.hop_length: (seek + window_frames) * a.hop_length]
        quiet = floor is not None and (samples.size == 0 or np.max(np.abs(samples)) < floor)
        cross = None if quiet else encode(seek, window_frames)
        result = None if quiet else _decode_with_fallback(
            runtime, tok, cross, temperatures, search, dict(
                task=task, language=tok.language, prompt=all_tokens[prompt_reset_since:],
                suppress_tokens=suppress_tokens, suppress_blank=suppress_blank,
                without_timestamps=without_timestamps), compression_ratio_threshold,
            logprob_threshold, no_speech_threshold)
        if result is None or (no_speech_threshold is not None and result.no_speech_prob > no_speech_threshold
                              and not (logprob_threshold is not None and result.avg_logprob > logprob_threshold)):
            seek += window_frames  # too quiet to encode, or no speech heard: no words, no prompt
        else:
            pieces, advance, single_ending = _segments_from_window(
                result.tokens, tok.timestamp_begin, time_offset, window_frames, input_stride, precision)
            seek += advance
            current = [dict(id=len(segments) + i, seek=previous_seek, start=round(start, 3), end=round(end, 3),
                            text=tok.decode(toks), tokens=toks, temperature=result.temperature,
                            avg_logprob=result.avg_logprob, compression_ratio=result.compression_ratio,
                            no_speech_prob=result.no_speech_prob)
                       for i, (start, end, toks) in enumerate(pieces)]
            if word_timestamps:
                add_word_timestamps(current, runtime, tok, cross, window_frames, last_speech_timestamp,
                                    prepend_punctuations, append_punctuations)
                word_ends = [w["end"] for s in current for w in s["words"]]
                if word_ends:
                    last_speech_timestamp = word_ends[-1]
                    # The last word is a better place to resume than a cut-off segment.
                    if not single_ending and word_ends[-1] > time_offset:
                        seek = round(word_ends[-1] / frame_seconds)
            for segment in current:
                if segment["start"] == segment["end"] or not segment["text"].strip():
                    # Instantaneous or empty: keep its slot, drop its words.
                    segment.update(text="", tokens=[], **({"words": []} if word_timestamps else {}))
                all_tokens.extend(segment["tokens"])
            segments.extend(current)
            if not condition_on_previous_text or result.temperature > 0.5:
                prompt_reset_since = len(all_tokens)
        if progress is not None:
            progress(min(content_frames, seek) - previous_seek, content_frames)
    out = dict(text=tok.decode(all_tokens[len(prompt_tokens):]), segments=segments, language=tok.language)
    if language_probs is not None:
        out["language_probs"] = language_probs
    return out


def _options_at(t: float, search: dict, **fixed) -> DecodingOptions:
    """Beam search (and its patience) is for temperature 0, best_of for sampling."""
    greedy = t == 0
    return DecodingOptions(temperature=t, beam_size=search["beam_size"] if greedy else None,
                           patience=search["patience"] if greedy else None,
                           best_of=None if greedy else search["best_of"],
                           length_penalty=search["length_penalty"], **fixed)


def _decode_with_fallback(runtime, tok, cross, temperatures, search: dict, fixed: dict,
                          compression_ratio_threshold, logprob_threshold, no_speech_threshold) -> DecodingResult:
    """Retry at the next temperature while the text looks repetitive or unlikely,
    unless the window is probably silence."""
    result = None
    for t in temperatures:
        (result,) = decode(runtime, tok, cross, _options_at(t, search, **fixed))
        too_repetitive = (compression_ratio_threshold is not None
                          and result.compression_ratio > compression_ratio_threshold)
        too_unlikely = logprob_threshold is not None and result.avg_logprob < logprob_threshold
        silence = (no_speech_threshold is not None and result.no_speech_prob > no_speech_threshold
                   and too_unlikely)
        if silence or not (too_repetitive or too_unlikely):
            break
    return result
