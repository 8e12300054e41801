"""whisper.cpp's model file from our weights, so that whisper.cpp runs the same weights
as every other system in a benchmark.

The file is the legacy ggml layout whisper.cpp's loader reads (little-endian int32s):
the magic, the ten dimensions and the file type, the mel filter bank (n_mel, n_fft, then
float32s), the text vocabulary (count, then each token's length and bytes; the special
tokens whisper.cpp numbers itself), then every tensor: n_dims, name length, tensor type,
the dimensions innermost first, the name, the data. Which type each tensor has is fixed
by the file type: the loader allocates the tensors before reading them. In a float32
file every tensor is float32; otherwise the linear weights and the token embedding take
the file type (float16 or 32-element blocks of q8_0, q5_0, q4_0), the convolution
weights float16, and the rest (biases, layer norms, positional tables, the convolution
biases stored as (n, 1)) float32: what whisper.cpp's own converter and quantizer write.

    python -m benchmarks.ggml --model tiny.en --ftype q5_0 --out ggml-tiny.en-q5_0.bin
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

MAGIC = 0x67676D6C  # "ggml"
# ggml_ftype of the file and ggml_type of the matrices it stores.
FTYPES = {"float32": (0, 0), "float16": (1, 1), "q4_0": (2, 2), "q8_0": (7, 8), "q5_0": (8, 6)}
QUANT_VERSION = 2  # files of quantized types carry ggml's quantization format version
DIMS = ("n_vocab", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer", "n_text_ctx",
        "n_text_state", "n_text_head", "n_text_layer", "n_mels")
ALWAYS_F32 = {"encoder.conv1.bias", "encoder.conv2.bias", "encoder.positional_embedding",
              "decoder.positional_embedding"}


def _unicode_bytes() -> dict[str, int]:
    """Byte-level BPE's alphabet: each byte as the character its tokens are spelt with
    (printable bytes as themselves, the others shifted past 255)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


def text_vocabulary(tokenizer_json: str | Path, eot: int) -> list[bytes]:
    """The bytes of tokens 0 .. eot - 1 of a tokenizer.json (byte-level BPE)."""
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tokenizer_json)).get_vocab(with_added_tokens=False)
    by_id = {i: t for t, i in vocab.items() if i < eot}
    missing = [i for i in range(eot) if i not in by_id]
    if missing:
        raise ValueError(f"{tokenizer_json}: no text token with id {missing[0]} (of {len(missing)} missing "
                         f"below <|endoftext|> = {eot}); is it this model's tokenizer?")
    alphabet = _unicode_bytes()
    return [bytes(alphabet[c] for c in by_id[i]) for i in range(eot)]


def tensor_type(name: str, shape: tuple[int, ...], ftype: str) -> int:
    """The ggml_type whisper.cpp's loader allocates for a tensor in a file of `ftype`."""
    if ftype == "float32" or name in ALWAYS_F32 or len(shape) < 2:
        return 0
    return 1 if len(shape) == 3 else FTYPES[ftype][1]  # the convolutions stay float16


def encode(name: str, a: np.ndarray, ftype: str) -> tuple[bytes, bytes]:
    """(header, data) of one tensor."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    a = np.asarray(a, np.float32)
    if name in ("encoder.conv1.bias", "encoder.conv2.bias"):
        a = a.reshape(-1, 1)  # whisper.cpp adds them to (channels, frames) as (1, channels) in its order
    kind = tensor_type(name, a.shape, ftype)
    if kind == 0:
        data = a.tobytes()
    elif kind == 1:
        data = a.astype(np.float16).tobytes()
    else:  # 32-element blocks along each row: the layout ggml's reference quantizers write
        if a.shape[-1] % 32:
            raise ValueError(f"{name}: rows of {a.shape[-1]} values cannot be cut into 32-value {ftype} blocks")
        data = quantize(a, GGMLQuantizationType(kind)).tobytes()
    raw = name.encode()
    head = struct.pack(f"<3i{a.ndim}i", a.ndim, len(raw), kind, *reversed(a.shape)) + raw
    return head, data


def write(path: str | Path, weights: dict[str, np.ndarray], spec, tokenizer_json: str | Path,
          ftype: str = "float32") -> Path:
    """Write `weights` (openai-whisper's names, float arrays) as a whisper.cpp model of
    `ftype`: one of FTYPES."""
    from maxwhisper.audio import mel_filters
    from maxwhisper.tokenizer import special_ids

    if ftype not in FTYPES:
        raise ValueError(f"ftype must be one of {sorted(FTYPES)}, found {ftype!r}")
    d, a = spec.dims, spec.audio
    filters = mel_filters(a.sample_rate, a.n_fft, a.n_mels).astype(np.float32)
    tokens = text_vocabulary(tokenizer_json, special_ids(spec)[0])
    file_type = FTYPES[ftype][0] + (QUANT_VERSION * 1000 if FTYPES[ftype][1] > 1 else 0)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # renamed when whole
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<I11i", MAGIC, *(d[k] for k in DIMS), file_type))
            f.write(struct.pack("<2i", *filters.shape) + filters.tobytes())
            f.write(struct.pack("<i", len(tokens)))
            for t in tokens:
                f.write(struct.pack("<i", len(t)) + t)
            for name in sorted(weights):
                head, data = encode(name, weights[name], ftype)
                f.write(head)
                f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def model_file(model: str, ftype: str = "float32") -> Path:
    """A named model's whisper.cpp file in our cache, converted once from our weights."""
    from maxwhisper.registry import cache_dir, ensure_converted
    from maxwhisper.weights import load_weights

    path = cache_dir() / model / f"whispercpp-{ftype}.bin"
    if not path.is_file():
        weights, tokenizer, spec = ensure_converted(model)
        write(path, load_weights(weights, spec), spec, tokenizer, ftype)
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    from maxwhisper.registry import ensure_converted
    from maxwhisper.weights import load_weights

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny.en")
    p.add_argument("--ftype", default="float32", choices=sorted(FTYPES))
    p.add_argument("--out", required=True, help="the whisper.cpp model file to write")
    args = p.parse_args(argv)
    weights, tokenizer, spec = ensure_converted(args.model)
    print(write(args.out, load_weights(weights, spec), spec, tokenizer, args.ftype))
    return 0


if __name__ == "__main__":  # python -m benchmarks.ggml, from the repository root
    raise SystemExit(main())
