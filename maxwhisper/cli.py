"""`maxwhisper` command line."""

from __future__ import annotations

import argparse
import sys

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (SpecError, WeightsError, ValueError, FileNotFoundError) as e:
        print(f"maxwhisper: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
