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


def _above_one(n: int) -> int | None:
    return n if n > 1 else None


def _transcribe(args) -> int:
    from tqdm import tqdm

    from .audio import AudioError, load_audio
    from .model import load_model
    from .transcribe import transcribe_batch
    from .writers import write

    if args.word_timestamps and args.task == "translate":
        raise ValueError("--word-timestamps aligns spoken words; it does not work with --task translate")

    # Compiled once for every input.
    model = load_model(args.model, device=args.device, precision=args.precision, attention=args.attention)
    rate, hop = model.spec.audio.sample_rate, model.spec.audio.hop_length
    loaded: list[str] = []
    failed = 0
    bar = tqdm(total=0, unit="s", disable=args.quiet or not sys.stderr.isatty(), desc="transcribing")

    def inputs():
        nonlocal failed
        for audio_path in args.audio:
            try:
                samples = load_audio(audio_path, rate)
            except AudioError as e:
                print(f"maxwhisper: error: {e}", file=sys.stderr)
                failed += 1
                continue
            loaded.append(audio_path)
            bar.total = round(bar.total + len(samples) / rate, 2)
            bar.refresh()
            yield samples

    options = TranscribeOptions(
        language=args.language, task=args.task, temperature=tuple(args.temperature),
        beam_size=_above_one(args.beam_size), best_of=_above_one(args.best_of),
        patience=args.patience, length_penalty=args.length_penalty, initial_prompt=args.initial_prompt,
        condition_on_previous_text=args.condition_on_previous_text,
        compression_ratio_threshold=args.compression_ratio_threshold,
        logprob_threshold=args.logprob_threshold, no_speech_threshold=args.no_speech_threshold,
        without_timestamps=args.without_timestamps, word_timestamps=args.word_timestamps,
        prepend_punctuations=args.prepend_punctuations, append_punctuations=args.append_punctuations)
    results = transcribe_batch(model, inputs(), options, batch_size=args.batch_size,
                               progress=lambda _i, frames, _total: bar.update(round(frames * hop / rate, 2)))
    with bar:
        for index, result in results:
            for path in write(result, loaded[index], args.output_dir, args.output_format):
                bar.write(f"wrote {path}", file=sys.stderr)
            if not args.quiet:
                bar.write(result["text"].strip(), file=sys.stdout)
    return 2 if failed else 0


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
                        "q4_0: CPU only, the decoder's matrices in 4-bit blocks, faster, words may differ)")
    p.add_argument("--attention", default="unfused", choices=ATTENTION,
                   help="fused: MAX's flash-attention kernel (GPU only)")


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
    d = TranscribeOptions()
    tr.add_argument("--language", default=d.language, help="language code; detected when omitted")
    tr.add_argument("--task", default=d.task, choices=["transcribe", "translate"])
    tr.add_argument("--temperature", type=float, nargs="+", default=list(d.temperature),
                    help="temperatures to fall back through (default 0 0.2 ... 1.0)")
    # Beams and samples: 5 each, as openai-whisper's command line has them (its API: one).
    tr.add_argument("--beam-size", type=int, default=CLI_SEARCH,
                    help="beams for beam search at temperature 0; 0 or 1 decodes greedily (default 5)")
    tr.add_argument("--best-of", type=int, default=CLI_SEARCH,
                    help="samples per window at temperatures above 0; 0 or 1 takes one (default 5)")
    tr.add_argument("--patience", type=float, default=d.patience,
                    help="beam search stops after beam_size * patience finished candidates (default 1)")
    tr.add_argument("--length-penalty", type=float, default=d.length_penalty,
                    help="rank candidates by logprob / ((5 + length) / 6) ** alpha; default: by mean logprob")
    tr.add_argument("--initial-prompt", default=d.initial_prompt, help="text to condition the first window on")
    tr.add_argument("--no-condition-on-previous-text", dest="condition_on_previous_text",
                    action="store_false", help="do not prompt each window with the text before it")
    tr.add_argument("--compression-ratio-threshold", type=float, default=d.compression_ratio_threshold,
                    help="retry hotter when the text compresses better than this (default %(default)s)")
    tr.add_argument("--logprob-threshold", type=float, default=d.logprob_threshold,
                    help="retry hotter when the mean token logprob is below this (default %(default)s)")
    tr.add_argument("--no-speech-threshold", type=float, default=d.no_speech_threshold,
                    help="skip a window whose no-speech probability is above this and whose text is unlikely")
    tr.add_argument("--without-timestamps", action="store_true", help="decode without timestamp tokens")
    tr.add_argument("--word-timestamps", action="store_true",
                    help="align every word (json segments then carry `words`)")
    tr.add_argument("--prepend-punctuations", default=d.prepend_punctuations,
                    help="with --word-timestamps, merge these symbols into the next word")
    tr.add_argument("--append-punctuations", default=d.append_punctuations,
                    help="with --word-timestamps, merge these symbols into the previous word")
    tr.add_argument("--output-format", "-f", default="txt", choices=[*FORMATS, "all"],
                    help="file format to write; 'all' writes every one (default txt)")
    tr.add_argument("--output-dir", "-o", default=".", help="where to write <audio stem>.<format>")
    tr.add_argument("--batch-size", type=int, default=8,
                    help="audio files decoded together, one window each per step (default 8)")
    tr.add_argument("--quiet", action="store_true", help="no progress bar, no transcript on stdout")
    tr.set_defaults(func=_transcribe)

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


def _show_progress_notes() -> None:
    """The library's notes (a cold compile starting and ending) on stderr."""
    log = logging.getLogger("maxwhisper")
    if not any(getattr(h, "maxwhisper_cli", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.maxwhisper_cli = True
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _show_progress_notes()
    try:
        rc = args.func(args)
    except (SpecError, WeightsError, ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"maxwhisper: error: {e}", file=sys.stderr)
        return 2
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
