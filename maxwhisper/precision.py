"""Precision: how a model's weights are stored and its activations computed.

One `Precision` value names it ("float32", "float16", "bfloat16", "q4_0", "amx_bf16",
"amx_q4_0", "avx512_bf16", "avx512_q4_0"), gives the activations' MAX `DType` and says
how the matrices are bound: the decoder's as 4-bit blocks (q4_0), every matrix as
bfloat16 tiles that maxwhisper's own kernels multiply by (on Intel AMX: amx_bf16; with
AVX-512 BF16 dot products: avx512_bf16), or the decoder's as 4-bit blocks and the rest
as such tiles (amx_q4_0, avx512_q4_0). This module owns everything that follows from it:
which tensors are quantized or tiled, bfloat16 rounding, Q4_0 and tile packing and the
arrays bound to the graphs' weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from max import driver
from max.driver import Buffer
from max.dtype import DType

from .cpuinfo import AMX_TARGET_FLAGS, missing_flags
from .manifest import manifest
from .spec import ModelSpec

@dataclass(frozen=True)
class TileKernels:
    """maxwhisper's CPU kernels (kernels/) that multiply float32 activations by bfloat16
    tiles of the weights, and what a CPU needs to run them."""
    hardware: str                 # as a refusal names it
    matmul: str                   # the custom op of every tiled matrix product
    attention: str | None         # the encoder's self-attention op; None: MAX's float32 ops
    flags: tuple[str, ...]        # the /proc/cpuinfo flags the compiled code needs
    target: str | None            # MAX's CPU target for these graphs; None: the host's


# MAX compiles CPU code for the CPU model that CPUID reports, with that model's features
# only. A virtual machine may report another model than its CPU's (seen: model 167, a
# desktop part without AMX, on a Xeon with AMX), and the tile instructions then do not
# compile. The AMX graphs are compiled for Sapphire Rapids instead, whose features
# `cpuinfo.AMX_TARGET_FLAGS` lists.
AMX = TileKernels("Intel AMX", "maxwhisper_amx_matmul", "maxwhisper_amx_attention", AMX_TARGET_FLAGS,
                  "sapphirerapids")
# VDPBF16PS (AMD Zen 4 and later, Intel Cooper Lake and later), on the same tiles.
DOT_BF16 = TileKernels("AVX-512 BF16", "maxwhisper_dot_bf16_matmul", "maxwhisper_dot_bf16_attention",
                       ("avx512f", "avx512bw", "avx512vl", "avx512_bf16"), None)


@dataclass(frozen=True)
class Precision:
    name: str
    dtype: DType          # activations and every float weight
    quantized: bool       # the decoder's matrices as Q4_0 blocks (CPU only)
    tiles: TileKernels | None = None  # every other matrix as bfloat16 tiles for these kernels

    @property
    def tiled(self) -> bool:
        return self.tiles is not None


FLOAT32 = Precision("float32", DType.float32, False)
PRECISIONS = {p.name: p for p in (
    FLOAT32,
    Precision("float16", DType.float16, False),
    Precision("bfloat16", DType.bfloat16, False),
    # The decoder's matrices in 4-bit blocks, everything else float32.
    Precision("q4_0", DType.float32, True),
    # Every matrix product in bfloat16 on AMX, accumulated and everything else float32.
    Precision("amx_bf16", DType.float32, False, AMX),
    # q4_0's decoder, whose steps are bound by memory traffic, and amx_bf16's encoder,
    # bound by arithmetic.
    Precision("amx_q4_0", DType.float32, True, AMX),
    # The same two with AVX-512 BF16 dot products in place of AMX.
    Precision("avx512_bf16", DType.float32, False, DOT_BF16),
    Precision("avx512_q4_0", DType.float32, True, DOT_BF16),
)}

# Q4_0 (GGML's layout): blocks of 32 weights along a row, each an fp16 scale and 32
# 4-bit values, 18 bytes. MAX's CPU kernel wants rows (outputs) in multiples of 32 too.
Q4_0_BLOCK, Q4_0_BYTES = 32, 18
Q4_0_SUFFIX = ".q4_0"

# bfloat16 tiles: a matrix (out, in) as (out/16, in/32, 16, 32) (kernels/amx.mojo), out
# padded with zero rows to a multiple of 32 and in with zero columns to one of 32.
TILES_SUFFIX = ".tiles"


def resolve_precision(precision: str | Precision | None, device_name: str) -> Precision:
    """None or 'auto': bfloat16 on a GPU, float32 on the CPU, where MAX 26.7 has no fast
    bfloat16 kernels (docs/benchmarks.md). q4_0 is for the CPU only: MAX's Q4_0 matmul
    is a CPU kernel."""
    if isinstance(precision, Precision):
        precision = precision.name
    if precision in (None, "auto"):
        return PRECISIONS["bfloat16" if device_name == "gpu" else "float32"]
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'auto', {', '.join(map(repr, PRECISIONS))}, found {precision!r}")
    if PRECISIONS[precision].quantized and device_name != "cpu":
        raise ValueError(f"precision {precision!r} runs on the CPU only (MAX's Q4_0 matmul is a CPU kernel); "
                         "use 'bfloat16' or 'float16' on a GPU")
    tiles = PRECISIONS[precision].tiles
    missing = missing_flags(tiles.flags) if tiles and device_name == "cpu" else []
    if tiles and (device_name != "cpu" or missing):
        where = "a GPU" if device_name != "cpu" else f"this CPU, whose flags lack {', '.join(missing)}"
        raise ValueError(f"precision {precision!r} runs on CPUs with {tiles.hardware} only, not on {where}; "
                         "use 'float32' or 'q4_0' on the CPU, 'bfloat16' on a GPU")
    return PRECISIONS[precision]


@contextmanager
def compile_target(tiles: TileKernels | None):
    """Within it, MAX compiles CPU code for the kernels' target, where they name one
    (process-wide: hold the build lock). Only compiles (and loads, which compile a bare
    graph) belong inside."""
    if tiles is None or tiles.target is None:
        yield
        return
    before = driver.get_virtual_cpu_target()
    driver.set_virtual_cpu_target(tiles.target)
    try:
        yield
    finally:
        driver.set_virtual_cpu_target(before)


def is_matrix(name: str, shape) -> bool:
    """Linear weights and the token embedding: bound in the checkpoint's (out, in) layout."""
    return name.endswith(".weight") and len(shape) == 2


def quantized_matrices(spec: ModelSpec) -> list[str]:
    """The matrices q4_0 binds as 4-bit blocks: the decoder's, which every token reads
    again (its step is bound by memory traffic, and the logits projection is most of
    it). The encoder, run once per window and bound by arithmetic, and the cross K/V
    projections it holds stay float32."""
    return [name for name, info in manifest(spec).items()
            if name.startswith("decoder.") and is_matrix(name, info.shape)
            and ".cross_attn.key." not in name and ".cross_attn.value." not in name]


def tiled_matrices(spec: ModelSpec, precision: Precision) -> list[str]:
    """The matrices bound as bfloat16 tiles: under amx_bf16 and avx512_bf16 every matrix
    of both stacks, under amx_q4_0 and avx512_q4_0 those they do not quantize. The conv
    stem's kernels (3-D) stay float32."""
    if not precision.tiled:
        return []
    skip = set(quantized_matrices(spec)) if precision.quantized else set()
    return [name for name, info in manifest(spec).items() if is_matrix(name, info.shape) and name not in skip]


def float_weights(spec: ModelSpec, precision: Precision) -> list[str]:
    """The names bound in the float dtype: all but the quantized and tiled matrices,
    save the token embedding, which the embedding lookup still gathers from."""
    packed = (quantized_matrices(spec) if precision.quantized else []) + tiled_matrices(spec, precision)
    skip = set(packed) - {"decoder.token_embedding.weight"}
    return [name for name in manifest(spec) if name not in skip]


def q4_0_rows(n: int) -> int:
    """Rows (outputs) of a matrix as bound in Q4_0: padded with zero rows to a multiple of 32."""
    return -(-n // Q4_0_BLOCK) * Q4_0_BLOCK


def bfloat16_bits(a: np.ndarray) -> np.ndarray:
    """numpy has no bfloat16: float32 rounded to its top 16 bits (to nearest, ties to
    even), as uint16, for MAX to read as bfloat16."""
    bits = np.ascontiguousarray(a, np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def weight_array(a: np.ndarray, dtype: DType) -> np.ndarray | Buffer:
    """A checkpoint tensor as the graph binds it: in its own layout, in `dtype`."""
    if dtype == DType.bfloat16:
        return Buffer.from_numpy(bfloat16_bits(a)).view(DType.bfloat16, list(a.shape))
    return np.ascontiguousarray(a, dtype=np.float16 if dtype == DType.float16 else np.float32)


def q4_0_blocks(name: str, a: np.ndarray) -> np.ndarray:
    """A checkpoint matrix (out, in) as MAX's Q4_0 matmul binds it: rows of 18-byte
    blocks (GGML's Q4_0, quantized by the gguf package), zero rows added up to a
    multiple of 32."""
    from gguf import GGMLQuantizationType, quants

    n_out, n_in = a.shape
    if n_in % Q4_0_BLOCK:
        raise ValueError(f"{name}: q4_0 needs the input width to be a multiple of {Q4_0_BLOCK}, "
                         f"found shape {a.shape}")
    padded = np.zeros((q4_0_rows(n_out), n_in), np.float32)
    padded[:n_out] = a
    return quants.quantize(padded, GGMLQuantizationType.Q4_0)


def tile_shape(n_out: int, n_in: int) -> tuple[int, int, int, int]:
    """The bound shape of an (out, in) matrix's bfloat16 tiles."""
    return -(-n_out // 32) * 2, -(-n_in // 32), 16, 32


def bf16_tiles(a: np.ndarray) -> np.ndarray:
    """A checkpoint matrix (out, in) as kernels/amx.mojo and kernels/dot_bf16.mojo read
    it: bfloat16 (as uint16) tiles of 16 outputs x 32 inputs, each 16 rows of input
    pairs, both inputs of a pair side by side for each output (the order TDPBF16PS and
    VDPBF16PS read), zero-padded."""
    n_out, n_in = a.shape
    blocks, steps, _, _ = tile_shape(n_out, n_in)
    padded = np.zeros((blocks * 16, steps * 32), np.float32)
    padded[:n_out, :n_in] = a
    tiles = bfloat16_bits(padded).reshape(blocks, 16, steps, 16, 2).transpose(0, 2, 3, 1, 4)
    return np.ascontiguousarray(tiles.reshape(blocks, steps, 16, 32))


def bound_weights(spec: ModelSpec, weights: dict[str, np.ndarray], precision: Precision) -> dict:
    """{graph weight name: array} for every weight the graphs declare in `precision`."""
    registry = {k: weight_array(weights[k], precision.dtype) for k in float_weights(spec, precision)}
    if precision.quantized:
        registry.update({k + Q4_0_SUFFIX: q4_0_blocks(k, weights[k]) for k in quantized_matrices(spec)})
    registry.update({k + TILES_SUFFIX: bf16_tiles(weights[k]) for k in tiled_matrices(spec, precision)})
    return registry
