"""whisper.cpp as a benchmark peer, from pywhispercpp's wheel (whisper.cpp built in), on
our weights written as its model file (benchmarks/ggml.py): its own long-form loop for
the speech and long-form workloads, and its C API for the forced one. pywhispercpp's
binding of `whisper_get_logits` returns one float, not the row, so the forced loop
calls the wheel's libwhisper through ctypes.

A float32 file loads but aborts in whisper.cpp's first convolution on the CPU (its
im2col takes float16 kernels only, and a float32 file holds them in float32), so its
highest precision here is float16, as in the files whisper.cpp publishes.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

TYPES = ("float16", "q8_0", "q5_0", "q4_0")
_SHORT = {"float16": "fp16"}
NO_FLOAT32 = ("float32 files abort in its CPU convolution (im2col takes float16 kernels only); "
              "float16 is its top precision")


def check_type(ftype: str) -> None:
    if ftype == "float32":
        raise ValueError(f"whisper.cpp: {NO_FLOAT32}")
    if ftype not in TYPES:
        raise ValueError(f"whisper.cpp model type must be one of {list(TYPES)}, found {ftype!r}")


def label(ftype: str, threads: int, note: str = "") -> str:
    return f"whisper.cpp ({_SHORT.get(ftype, ftype)}, {threads} threads{note})"


def system_info() -> str:
    """whisper.cpp's build flags (the CPU features its kernels were compiled for)."""
    import _pywhispercpp as pw

    return pw.whisper_print_system_info().strip()


def transcriber(model: str, ftype: str, threads: int, beam_size: int = 1, path: str | Path | None = None):
    """A function from 16 kHz samples to text: whisper.cpp's long-form loop at
    temperature 0 without fallback, timestamps on, non-speech symbols suppressed, each
    window conditioned on the text before it in the same call (whisper.cpp's no_context,
    left on, clears that text between calls): openai-whisper's defaults. Greedy or
    `beam_size` beams. `path`: a model file (default: `model`'s, converted once)."""
    from pywhispercpp.model import Model

    from benchmarks.ggml import model_file

    check_type(ftype)
    beam = dict(params_sampling_strategy=1, beam_search={"beam_size": beam_size, "patience": -1.0}) \
        if beam_size > 1 else {}
    m = Model(str(path or model_file(model, ftype)), n_threads=threads, redirect_whispercpp_logs_to=None,
              print_progress=False, print_realtime=False, language="en", temperature=0.0, temperature_inc=0.0,
              suppress_nst=True, **beam)
    return lambda audio: " ".join(s.text for s in m.transcribe(np.ascontiguousarray(audio, np.float32))).strip()


class Context:
    """One whisper.cpp context (model and its single decoding state) through the C API."""

    def __init__(self, path: str | Path, threads: int):
        self.lib, self.threads = _library(), threads
        self.ptr = self.lib.whisper_init_from_file(str(path).encode())
        if not self.ptr:
            raise RuntimeError(f"{path}: whisper.cpp could not load it")
        self.n_vocab = self.lib.whisper_n_vocab(self.ptr)

    def __del__(self):
        if getattr(self, "ptr", None):
            self.lib.whisper_free(self.ptr)

    def encode(self, mel: np.ndarray) -> None:
        mel = np.ascontiguousarray(mel, np.float32)  # (n_mels, frames), as whisper.cpp stores it
        if self.lib.whisper_set_mel(self.ptr, mel.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), mel.shape[1],
                                    mel.shape[0]) or self.lib.whisper_encode(self.ptr, 0, self.threads):
            raise RuntimeError("whisper.cpp: encoding failed")

    def decode(self, tokens: list[int], past: int) -> np.ndarray:
        """The last token's logits after feeding `tokens` at positions past, past + 1, ..."""
        ids = (ctypes.c_int * len(tokens))(*tokens)
        if self.lib.whisper_decode(self.ptr, ids, len(tokens), past, self.threads):
            raise RuntimeError("whisper.cpp: decoding failed")
        rows = np.ctypeslib.as_array(self.lib.whisper_get_logits(self.ptr), (len(tokens), self.n_vocab))
        return rows[-1].copy()


def forced_model(model: str, ftype: str, threads: int):
    from benchmarks.ggml import model_file

    check_type(ftype)
    return Context(model_file(model, ftype), threads), None


def forced(ctx: Context, _, mel: np.ndarray, prompt: list[int], n: int, eot: int) -> np.ndarray:
    """The forced greedy loop (exactly `n` tokens, <|endoftext|> never taken); the
    windows one after another: the C API holds one sequence per state."""
    out = []
    for window in mel:
        ctx.encode(window)
        feed, past, got = list(prompt), 0, []
        while True:
            logits = ctx.decode(feed, past)
            past += len(feed)
            logits[eot] = -np.inf
            got.append(int(np.argmax(logits)))
            if len(got) == n:
                break
            feed = got[-1:]
        out.append(got)
    return np.array(out)


_LIB = None


def _library():
    """The libwhisper pywhispercpp's extension is linked against, with the C signatures
    the forced loop uses."""
    global _LIB
    if _LIB is None:
        import _pywhispercpp  # loads the wheel's libraries

        libs = sorted((Path(_pywhispercpp.__file__).parent / "pywhispercpp.libs").glob("libwhisper*.so*"))
        if not libs:
            raise ImportError("pywhispercpp's wheel holds no libwhisper", name="pywhispercpp")
        lib = ctypes.CDLL(str(libs[0]))
        p, i = ctypes.c_void_p, ctypes.c_int
        for name, res, args in [("whisper_init_from_file", p, [ctypes.c_char_p]), ("whisper_free", None, [p]),
                                ("whisper_n_vocab", i, [p]),
                                ("whisper_set_mel", i, [p, ctypes.POINTER(ctypes.c_float), i, i]),
                                ("whisper_encode", i, [p, i, i]),
                                ("whisper_decode", i, [p, ctypes.POINTER(i), i, i, i]),
                                ("whisper_get_logits", ctypes.POINTER(ctypes.c_float), [p])]:
            getattr(lib, name).restype, getattr(lib, name).argtypes = res, args
        # whisper.cpp logs every load to stderr; a callback that drops them keeps reports readable
        log = ctypes.CFUNCTYPE(None, i, ctypes.c_char_p, p)(lambda level, text, data: None)
        lib.whisper_log_set.argtypes = [type(log), p]
        lib.whisper_log_set(log, None)
        _LIB = (lib, log)
    return _LIB[0]
