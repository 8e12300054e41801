"""`maxwhisper` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .registry import DEFAULT_MODEL
from .spec import SpecError, load_spec
from .weights import WeightsError


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
    from converters import convert

    out = convert(args.src, load_spec(args.spec), args.out, args.format)
    print(f"wrote {out}")


def _transcribe(args) -> int:
    from tqdm import tqdm

    from .audio import AudioError, load_audio
    from .model import load_model
    from .writers import write

    model = load_model(args.model, device=args.device)  # compiled once for every input
    failed = 0
    for audio_path in args.audio:
        try:
            samples = load_audio(audio_path, model.spec.audio.sample_rate)
        except AudioError as e:
            print(f"maxwhisper: error: {e}", file=sys.stderr)
            failed += 1
            continue
        seconds = len(samples) / model.spec.audio.sample_rate
        frame = model.spec.audio.hop_length / model.spec.audio.sample_rate
        with tqdm(total=round(seconds, 2), unit="s", disable=seconds <= 30 or args.quiet,
                  desc=Path(audio_path).name) as bar:
            result = model.transcribe(
                samples, language=args.language, task=args.task,
                temperature=args.temperature, without_timestamps=args.without_timestamps,
                progress=lambda frames, _total: bar.update(round(frames * frame, 2)))
        for path in write(result, audio_path, args.output_dir, args.output_format):
            print(f"wrote {path}", file=sys.stderr)
        if not args.quiet:
            print(result["text"].strip())
    return 2 if failed else 0


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
    tr.add_argument("--model", default=DEFAULT_MODEL,
                    help=f"model name or converted .safetensors (default {DEFAULT_MODEL})")
    tr.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    tr.add_argument("--language", default=None, help="language code; detected when omitted")
    tr.add_argument("--task", default="transcribe", choices=["transcribe", "translate"])
    tr.add_argument("--temperature", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
                    help="temperatures to fall back through (default 0 0.2 ... 1.0)")
    tr.add_argument("--without-timestamps", action="store_true", help="decode without timestamp tokens")
    tr.add_argument("--output-format", "-f", default="txt", choices=["txt", "json", "srt", "vtt", "all"])
    tr.add_argument("--output-dir", "-o", default=".", help="where to write <audio stem>.<format>")
    tr.add_argument("--quiet", action="store_true", help="no progress bar, no transcript on stdout")
    tr.set_defaults(func=_transcribe)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except (SpecError, WeightsError, ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"maxwhisper: error: {e}", file=sys.stderr)
        return 2
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
