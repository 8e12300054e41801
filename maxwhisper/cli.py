"""`maxwhisper` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .builder import ATTENTION
from .registry import DEFAULT_MODEL
from .precision import PRECISIONS
from .spec import SpecError, load_spec
from .transcribe import TranscribeOptions
from .streaming import StreamOptions
from .vad import VadOptions
from .weights import WeightsError
from .writers import FORMATS


def _spec_show(args) -> None:
    from .manifest import manifest, parameter_count

    spec = load_spec(args.spec)
    print(f"{spec.name}  ({spec.source})")
    for k, v in spec.dims.items():
        print(f"  {k:<14} {v}")
    print(f"  {'tensors':<14} {len(manifest(spec))}")
    print(f"  {'parameters':<14} {parameter_count(spec):,}")


def _spec_check(args) -> None:
    spec = load_spec(args.spec)
    print(f"{spec.source}: ok ({spec.name})")


def _convert(args) -> None:
    from .convert import convert

    out = convert(args.src, load_spec(args.spec), args.out, args.format)
    print(f"wrote {out}")


CLI_SEARCH = 5


def _above_one(n: int, flag: str) -> int | None:
    if n < 0:
        raise ValueError(f"{flag} must be >= 0, found {n}")
    return n if n > 1 else None


def _transcribe(args) -> int:
    from tqdm import tqdm

    from .audio import AudioError, AudioFile, Spectrogram
    from .model import load_model
    from .transcribe import transcribe_batch
    from .writers import OutputError, check_output_dir, output_stems, write

    options = _options(args)  # options and the output directory are checked before the model loads
    check_output_dir(args.output_dir)

    # Compiled once for every input.
    model = load_model(args.model, device=args.device, precision=args.precision, attention=args.attention)
    rate, hop = model.spec.audio.sample_rate, model.spec.audio.hop_length
    loaded: list[tuple[str, str]] = []  # (audio path, output stem) of each decoded input
    failed = 0
    bar = tqdm(total=0, unit="s", disable=args.quiet or not sys.stderr.isatty(), desc="transcribing")

    def inputs():
        nonlocal failed
        for audio_path, stem in zip(args.audio, output_stems(args.audio)):
            try:
                audio = Spectrogram(AudioFile(audio_path, rate), model.spec.audio)
            except AudioError as e:
                print(f"maxwhisper: error: {e}", file=sys.stderr)
                failed += 1
                continue
            loaded.append((audio_path, stem))
            bar.total = round(bar.total + audio.duration, 2)
            bar.refresh()
            yield audio

    results = transcribe_batch(model, inputs(), options, batch_size=args.batch_size,
                               progress=lambda _i, frames, _total: bar.update(round(frames * hop / rate, 2)))
    with bar:
        for index, result in results:
            audio_path, stem = loaded[index]
            try:
                for path in write(result, audio_path, args.output_dir, args.output_format, stem):
                    bar.write(f"wrote {path}", file=sys.stderr)
            except OutputError as e:
                bar.write(f"maxwhisper: error: {audio_path}: {e}", file=sys.stderr)
                failed += 1
            if not args.quiet:
                bar.write(result["text"].strip(), file=sys.stdout)
    return 2 if failed else 0


def _batch(args) -> int:
    from .batch import Job, ResultsTable, write_parquet

    options = _options(args)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, found {args.batch_size}")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1, found {args.workers}")
    if args.engine == "local" and (args.address is not None or args.workers is not None):
        raise ValueError("--address and --workers are for --engine ray")
    if args.table == "parquet":
        # Now, not at the end: pyarrow loaded after a MAX model has crashed reading Parquet.
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise RuntimeError("--table parquet needs pyarrow: pip install 'maxwhisper[ray]'") from None
    formats = FORMATS if "all" in args.output_format else tuple(dict.fromkeys(args.output_format))
    job = Job(model=args.model, precision=args.precision, options=options, formats=formats)
    with ResultsTable(args.output_dir, retry_errors=args.retry_errors) as table:
        if args.engine == "ray":
            from .batch_ray import run_ray

            tally = run_ray(args.inputs, args.output_dir, job, table=table, device=args.device,
                            attention=args.attention, workers=args.workers, batch_size=args.batch_size,
                            address=args.address, quiet=args.quiet)
        else:
            from .batch import run_local
            from .model import load_model

            model = load_model(args.model, device=args.device, precision=args.precision, attention=args.attention)
            tally = run_local(model, args.inputs, args.output_dir, job, batch_size=args.batch_size, table=table,
                              quiet=args.quiet)
    if args.table == "parquet":
        write_parquet(table.path)
    print(f"maxwhisper: {tally.summary()}; table {table.path}", file=sys.stderr)
    return 2 if tally.failed else 0


def _vad_options(args) -> VadOptions:
    return VadOptions(threshold=args.vad_threshold, neg_threshold=args.vad_neg_threshold,
                      min_speech_duration_ms=args.vad_min_speech_duration_ms,
                      max_speech_duration_s=args.vad_max_speech_duration_s,
                      min_silence_duration_ms=args.vad_min_silence_duration_ms, speech_pad_ms=args.vad_speech_pad_ms)


def _vad_arguments(p: argparse.ArgumentParser) -> None:
    v = VadOptions()
    p.add_argument("--vad", action="store_true",
                   help="transcribe only the speech that the voice activity detector (Silero VAD) finds; "
                        "with --batch-size above 1 the speech is cut at pauses into chunks of one window decoded side by side")
    p.add_argument("--vad-threshold", type=float, default=v.threshold,
                   help="speech probability at which speech starts (default %(default)s)")
    p.add_argument("--vad-neg-threshold", type=float, default=v.neg_threshold,
                   help="probability below which speech may end (default: threshold - 0.15)")
    p.add_argument("--vad-min-speech-duration-ms", type=int, default=v.min_speech_duration_ms,
                   help="drop speech shorter than this (default %(default)s)")
    p.add_argument("--vad-max-speech-duration-s", type=float, default=v.max_speech_duration_s,
                   help="split speech longer than this at a pause (default: no limit)")
    p.add_argument("--vad-min-silence-duration-ms", type=int, default=v.min_silence_duration_ms,
                   help="silence that ends speech (default %(default)s)")
    p.add_argument("--vad-speech-pad-ms", type=int, default=v.speech_pad_ms,
                   help="widen each speech span by this on both sides (default %(default)s)")
    p.add_argument("--clip-timestamps", default=TranscribeOptions().clip_timestamps,
                   help="transcribe only these spans: 'start,end,start,end,...' seconds (default: all)")


def _pcm_chunks(source: str, rate: int, chunk_s: float):
    """Float32 chunks of a file (resampled to `rate`) or of raw PCM16 mono at `rate` on
    stdin ('-')."""
    import numpy as np

    n = max(1, int(chunk_s * rate))
    if source == "-":
        stdin = sys.stdin.buffer
        while data := stdin.read(2 * n):
            yield np.frombuffer(data[: len(data) // 2 * 2], "<i2").astype(np.float32) / 32768.0
        return
    from .audio import load_audio

    audio = load_audio(source, rate)
    for i in range(0, audio.size, n):
        yield audio[i: i + n]


def _stream(args) -> int:
    import json

    from .model import load_model
    from .streaming import SAMPLE_RATE, StreamOptions, replay

    options = StreamOptions(language=args.language, update_seconds=args.update_seconds,
                            end_silence_seconds=args.end_silence_seconds,
                            commit_after_seconds=args.commit_after_seconds, context_seconds=args.context_seconds)
    if args.speed is not None and not args.speed > 0:
        raise ValueError(f"--speed must be > 0, found {args.speed}")
    if args.audio != "-":
        from .audio import AudioFile

        AudioFile(args.audio, SAMPLE_RATE)  # a bad file is named before the model loads
    model = load_model(args.model, device=args.device, precision=args.precision, attention=args.attention)
    model.runtime.warmup()
    speed = None if args.audio == "-" else args.speed
    for event, emitted in replay(model, _pcm_chunks(args.audio, SAMPLE_RATE, 0.1), options, speed=speed):
        if args.events == "jsonl":
            print(json.dumps(dict(event.as_dict(), emitted=round(emitted, 3)), ensure_ascii=False), flush=True)
        elif event.type == "committed":
            print(event.text, flush=True)
    return 0


def _warmup(args) -> None:
    from .model import load_model

    model = load_model(args.model, device=args.device, precision=args.precision, attention=args.attention)
    model.runtime.warmup(word_timestamps=not args.no_word_timestamps)
    print(f"{args.model}: compiled for {model.device} ({model.precision}); later loads read it from the cache")


def _serve(args) -> None:
    try:
        from .server import ServerSettings, serve
    except ImportError as e:
        raise RuntimeError(f"maxwhisper serve needs the server extra ({e.name} is missing): "
                           "pip install 'maxwhisper[server]'") from None

    settings = ServerSettings(model=args.model, device=args.device,
                              precision=None if args.precision == "auto" else args.precision,
                              attention=args.attention,
                              max_batch=args.max_batch, api_key=args.api_key, max_upload_mb=args.max_upload_mb,
                              timeout_s=args.timeout or None)
    serve(settings, host=args.host, port=args.port)


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model name or converted .safetensors (default {DEFAULT_MODEL})")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    p.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS],
                   help="precision of weights and activations (auto: bfloat16 on a GPU, float32 on the CPU; "
                        "q4_0: CPU only, the decoder's matrices in 4-bit blocks, faster, words may differ; "
                        "amx_bf16: CPUs with Intel AMX, every matrix product in bfloat16 on AMX; "
                        "amx_q4_0: q4_0's decoder with amx_bf16's encoder; "
                        "avx512_bf16, avx512_q4_0: the same two on CPUs with AVX-512 BF16, such as AMD Zen 4)")
    p.add_argument("--attention", default="unfused", choices=ATTENTION,
                   help="fused: MAX's flash-attention kernel (GPU only)")


def _decoding_arguments(p: argparse.ArgumentParser) -> None:
    d = TranscribeOptions()
    p.add_argument("--language", default=d.language, help="language code; detected when omitted")
    p.add_argument("--task", default=d.task, choices=["transcribe", "translate"])
    p.add_argument("--temperature", type=float, nargs="+", default=list(d.temperature),
                   help="temperatures to fall back through (default 0 0.2 ... 1.0)")
    # Beams and samples: 5 each, as openai-whisper's command line has them (its API: one).
    p.add_argument("--beam-size", type=int, default=CLI_SEARCH,
                   help="beams for beam search at temperature 0; 0 or 1 decodes greedily (default 5)")
    p.add_argument("--best-of", type=int, default=CLI_SEARCH,
                   help="samples per window at temperatures above 0; 0 or 1 takes one (default 5)")
    p.add_argument("--patience", type=float, default=d.patience,
                   help="beam search stops after beam_size * patience finished candidates (default 1)")
    p.add_argument("--length-penalty", type=float, default=d.length_penalty,
                   help="rank candidates by logprob / ((5 + length) / 6) ** alpha; default: by mean logprob")
    p.add_argument("--initial-prompt", default=d.initial_prompt, help="text to condition the first window on")
    p.add_argument("--no-condition-on-previous-text", dest="condition_on_previous_text",
                   action="store_false", help="do not prompt each window with the text before it")
    p.add_argument("--compression-ratio-threshold", type=float, default=d.compression_ratio_threshold,
                   help="retry hotter when the text compresses better than this (default %(default)s)")
    p.add_argument("--logprob-threshold", type=float, default=d.logprob_threshold,
                   help="retry hotter when the mean token logprob is below this (default %(default)s)")
    p.add_argument("--no-speech-threshold", type=float, default=d.no_speech_threshold,
                   help="skip a window whose no-speech probability is above this and whose text is unlikely")
    p.add_argument("--without-timestamps", action="store_true", help="decode without timestamp tokens")
    p.add_argument("--word-timestamps", action="store_true",
                   help="align every word (json segments then carry `words`)")
    p.add_argument("--prepend-punctuations", default=d.prepend_punctuations,
                   help="with --word-timestamps, merge these symbols into the next word")
    p.add_argument("--append-punctuations", default=d.append_punctuations,
                   help="with --word-timestamps, merge these symbols into the previous word")
    p.add_argument("--hallucination-silence-threshold", type=float, default=d.hallucination_silence_threshold,
                   help="with --word-timestamps, drop words that look made up and stand in more silence "
                        "than this many seconds, and skip the silence before them (default: off)")
    _vad_arguments(p)


def _options(args) -> TranscribeOptions:
    """The decoding flags as options, checked before any model loads."""
    if args.word_timestamps and args.task == "translate":
        raise ValueError("--word-timestamps aligns spoken words; it does not work with --task translate")
    if args.hallucination_silence_threshold is not None and not args.word_timestamps:
        raise ValueError("--hallucination-silence-threshold judges the words' timing: it needs --word-timestamps")
    return TranscribeOptions(
        language=args.language, task=args.task, temperature=tuple(args.temperature),
        beam_size=_above_one(args.beam_size, "--beam-size"), best_of=_above_one(args.best_of, "--best-of"),
        patience=args.patience, length_penalty=args.length_penalty, initial_prompt=args.initial_prompt,
        condition_on_previous_text=args.condition_on_previous_text,
        compression_ratio_threshold=args.compression_ratio_threshold,
        logprob_threshold=args.logprob_threshold, no_speech_threshold=args.no_speech_threshold,
        without_timestamps=args.without_timestamps, word_timestamps=args.word_timestamps,
        prepend_punctuations=args.prepend_punctuations, append_punctuations=args.append_punctuations,
        hallucination_silence_threshold=args.hallucination_silence_threshold,
        vad_filter=args.vad, vad_options=_vad_options(args), clip_timestamps=args.clip_timestamps)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maxwhisper", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    spec = sub.add_parser("spec", help="inspect and validate model specs").add_subparsers(dest="action", required=True)
    show = spec.add_parser("show", help="print a spec's dimensions and parameter count")
    show.add_argument("spec", help="built-in name (tiny.en) or path to a YAML spec")
    show.set_defaults(func=_spec_show)
    check = spec.add_parser("check", help="validate a YAML spec")
    check.add_argument("spec", help="path to a YAML spec")
    check.set_defaults(func=_spec_check)

    conv = sub.add_parser("convert", help="convert a checkpoint into maxwhisper safetensors")
    conv.add_argument("src", help="checkpoint file or directory")
    conv.add_argument("--spec", required=True, help="built-in spec name or YAML path")
    conv.add_argument("--out", required=True, help="output .safetensors path")
    conv.add_argument("--format", default=None, help="source format; detected when omitted")
    conv.set_defaults(func=_convert)

    tr = sub.add_parser("transcribe", help="transcribe audio files")
    tr.add_argument("audio", nargs="+", help="audio files (WAV/FLAC/OGG; more with ffmpeg installed)")
    _model_arguments(tr)
    _decoding_arguments(tr)
    tr.add_argument("--output-format", "-f", default="txt", choices=[*FORMATS, "all"],
                    help="file format to write; 'all' writes every one (default txt)")
    tr.add_argument("--output-dir", "-o", default=".", help="where to write <audio stem>.<format>")
    tr.add_argument("--batch-size", type=int, default=8,
                    help="audio files (with --vad: speech chunks) decoded together, one window each per step "
                         "(default 8)")
    tr.add_argument("--quiet", action="store_true", help="no progress bar, no transcript on stdout")
    tr.set_defaults(func=_transcribe)

    bt = sub.add_parser("batch", help="transcribe many files, resumably, here or on a Ray cluster",
                        description="Transcribe files, directories (recursive) and manifests (text, JSONL or "
                                    "CSV lists of paths). Each file's transcripts go to the output directory "
                                    "(a directory's tree mirrored) and its row to results.jsonl there; a "
                                    "rerun skips the files already in it.")
    bt.add_argument("inputs", nargs="+", help="audio files, directories and manifests (.txt, .jsonl, .csv)")
    bt.add_argument("--output-dir", "-o", required=True, help="where transcripts and results.jsonl go")
    bt.add_argument("--output-format", "-f", nargs="+", default=["txt"], choices=[*FORMATS, "all"],
                    help="file formats to write per input (default txt)")
    _model_arguments(bt)
    _decoding_arguments(bt)
    bt.add_argument("--engine", default="local", choices=["local", "ray"],
                    help="local: this process; ray: a Ray Data pipeline (pip install 'maxwhisper[ray]')")
    bt.add_argument("--address", default=None, help="Ray cluster to join (default: start one on this machine)")
    bt.add_argument("--workers", type=int, default=None,
                    help="model actors for --engine ray (default: one per GPU, or one without GPUs)")
    bt.add_argument("--batch-size", type=int, default=8, help="files decoded side by side per model (default 8)")
    bt.add_argument("--table", default="jsonl", choices=["jsonl", "parquet"],
                    help="parquet: also write results.parquet at the end (pyarrow)")
    bt.add_argument("--retry-errors", action="store_true", help="try again the files the table has as failed")
    bt.add_argument("--quiet", action="store_true", help="no progress bar")
    bt.set_defaults(func=_batch)

    st = sub.add_parser("stream", help="transcribe as the audio plays: committed words as they come",
                        description="Replay a file in real time (or faster with --speed), or read raw PCM16 "
                                    "mono at 16 kHz from stdin ('-'), printing the words as they are committed.")
    st.add_argument("audio", help="audio file, or '-' for raw PCM16 mono 16 kHz on stdin "
                                  "(arecord -f S16_LE -r 16000 -c 1 -t raw | maxwhisper stream -)")
    _model_arguments(st)
    st.add_argument("--language", default=None, help="language code; detected when omitted")
    st.add_argument("--speed", type=float, default=1.0, help="replay speed for a file (default 1: real time)")
    st.add_argument("--events", choices=["text", "jsonl"], default="text",
                    help="text: committed text, a line at a time; jsonl: every event as a JSON line "
                         "(type, text, words with start and end in audio seconds, emitted: wall seconds)")
    d = StreamOptions()
    st.add_argument("--update-seconds", type=float, default=d.update_seconds,
                    help="new audio that triggers the next decoding (default %(default)s)")
    st.add_argument("--end-silence-seconds", type=float, default=d.end_silence_seconds,
                    help="silence that ends an utterance (default %(default)s)")
    st.add_argument("--commit-after-seconds", type=float, default=d.commit_after_seconds,
                    help="also commit, from one decoding, words that end at least this long before the "
                         "audio heard so far (default: only words two decodings agree on)")
    st.add_argument("--context-seconds", type=float, default=d.context_seconds,
                    help="committed audio before a pause that goes in front of the next utterance's "
                         "decodings (default %(default)s)")
    st.set_defaults(func=_stream)

    warm = sub.add_parser("warmup", help="compile a model now, for images, servers and workers",
                          description="Compile a model's graphs ahead of time into the cache "
                                      "(MAXWHISPER_CACHE), so that the first transcription starts at once.")
    _model_arguments(warm)
    warm.add_argument("--no-word-timestamps", action="store_true",
                      help="leave out the alignment decoder that word timestamps compile on first use")
    warm.set_defaults(func=_warmup)

    srv = sub.add_parser("serve", help="serve OpenAI's transcription API over HTTP",
                         description="An OpenAI-compatible transcription server (/v1/audio/transcriptions, "
                                     "/v1/audio/translations): concurrent requests decode in one batch. "
                                     "Needs the server extra: pip install 'maxwhisper[server]'.")
    _model_arguments(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on (default %(default)s)")
    srv.add_argument("--max-batch", type=int, default=8,
                     help="requests decoded together, one window each per step (default %(default)s)")
    srv.add_argument("--api-key", default=os.environ.get("MAXWHISPER_API_KEY"),
                     help="require 'Authorization: Bearer KEY' (default: $MAXWHISPER_API_KEY; none: open)")
    srv.add_argument("--max-upload-mb", type=float, default=25.0,
                     help="largest audio file accepted, in MiB (default %(default)s)")
    srv.add_argument("--timeout", type=float, default=600.0,
                     help="seconds a request may queue and decode before it is cancelled; 0: no limit "
                          "(default %(default)s)")
    srv.set_defaults(func=_serve)
    return parser


class _Stderr(logging.StreamHandler):
    """Writes to `sys.stderr` as it is when a record comes, not as it was when the
    handler was made: `main` may run inside a process that swaps stderr between calls
    (a test runner capturing it), and a stream it has closed must not receive notes."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _show_progress_notes() -> None:
    """The library's notes (a cold compile starting and ending) on stderr."""
    log = logging.getLogger("maxwhisper")
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        log.addHandler(_Stderr())
    log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _show_progress_notes()
    try:
        rc = args.func(args)
    except (SpecError, WeightsError, ValueError, RuntimeError, OSError) as e:
        print(f"maxwhisper: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("maxwhisper: interrupted; files already written are complete", file=sys.stderr)
        return 130
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
