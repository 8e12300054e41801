# y = x @ w.T with AVX-512 BF16 dot products (VDPBF16PS): x float32 (M, K) rounded to
# bfloat16 as it is packed, w the same bfloat16 tiles as kernels/amx.mojo's, products
# accumulated in float32.
#
# A tile row of w holds 16 columns of w.T for one pair of K, the pairs side by side: one
# 512-bit register, which VDPBF16PS multiplies by a pair of x broadcast to all 16 lanes
# and adds into 16 float32 sums. A micro-kernel keeps ROWS rows of y by 32 columns (two
# tile columns) in 2 * ROWS registers while K streams through; a thread takes blocks of
# BLOCK rows of x, packed once, and runs them against every column pair, so that a pair's
# weights are read from cache BLOCK / ROWS times for each fetch from memory.

from extensibility import register, InputTensor, OutputTensor
from std.utils import StaticTuple
from std.memory import alloc, bitcast
from std.sys import llvm_intrinsic, num_physical_cores
from std.sys.info import CompilationTarget
from max.algorithm import sync_parallelize

comptime ROWS = 12
comptime BLOCK = 96  # a multiple of ROWS

comptime F16x = SIMD[DType.float32, 16]
comptime B32x = SIMD[DType.bfloat16, 32]


@register("maxwhisper_dot_bf16_matmul")
struct DotBf16Matmul:
    @staticmethod
    def execute[target: StaticString](output: OutputTensor, x: InputTensor, w: InputTensor) raises:
        comptime if CompilationTarget._has_feature["avx512bf16"]():
            _matmul(output, x, w)
        else:
            raise Error("maxwhisper_dot_bf16_matmul was compiled for a CPU target without AVX-512 BF16")


@always_inline
def _dot(acc: F16x, a: B32x, b: B32x) -> F16x:
    return llvm_intrinsic["llvm.x86.avx512bf16.dpbf16ps.512", F16x](acc, a, b)


@always_inline
def dot_tile(a: UnsafePointer[BFloat16, _], kp: Int, w0: UnsafePointer[BFloat16, _],
          pairs: Int, y: UnsafePointer[mut=True, Float32, _], n: Int, rows: Int):
    """ROWS rows of a (bfloat16, stride kp) against one column pair's tiles (w0, then
    the second column's at w0 + pairs * 32), into y (stride n), rows < ROWS stored."""
    var acc = StaticTuple[F16x, 2 * ROWS](fill=F16x(0))
    var a32 = a.bitcast[UInt32]()
    var w1 = w0 + pairs * 32
    for j in range(pairs):
        var b0 = (w0 + j * 32).load[width=32]()
        var b1 = (w1 + j * 32).load[width=32]()
        comptime for r in range(ROWS):
            var xr = bitcast[DType.bfloat16, 32](SIMD[DType.uint32, 16](a32[r * (kp // 2) + j]))
            acc[2 * r] = _dot(acc[2 * r], xr, b0)
            acc[2 * r + 1] = _dot(acc[2 * r + 1], xr, b1)
    comptime for r in range(ROWS):
        if r < rows:
            (y + r * n).store(acc[2 * r])
            (y + r * n + 16).store(acc[2 * r + 1])


def _matmul(output: OutputTensor, x: InputTensor, w: InputTensor) raises:
    var m = x.dim_size(0)
    var k = x.dim_size(1)
    var kb = w.dim_size(1)
    var kp = kb * 32
    var pairs = kp // 2  # K pairs per tile column
    var n = output.dim_size(1)
    var xp = x.unsafe_ptr().bitcast[Float32]()
    var wp = w.unsafe_ptr().bitcast[BFloat16]()
    var yp = output.unsafe_ptr().bitcast[Float32]()
    var col_pairs = n // 32
    var blocks = (m + BLOCK - 1) // BLOCK
    # Few rows (a decoder step): split the columns between the threads instead.
    var by_rows = blocks >= num_physical_cores()
    var units = blocks if by_rows else col_pairs
    var tasks = max(1, min(num_physical_cores(), units))

    def work(task: Int) {imm}:
        var first = task * units // tasks
        var last = (task + 1) * units // tasks
        var a = alloc[BFloat16](BLOCK * kp)
        var block = first if by_rows else 0
        var block_end = last if by_rows else blocks
        var p_first = 0 if by_rows else first
        var p_last = col_pairs if by_rows else last
        while block < block_end:
            var row = block * BLOCK
            var rows = min(BLOCK, m - row)
            # BLOCK rows of x in bfloat16, zero past M and past K.
            for r in range(BLOCK):
                var dst = a + r * kp
                var c = 0
                if r < rows:
                    var src = xp + (row + r) * k
                    while c + 16 <= k:
                        (dst + c).store((src + c).load[width=16]().cast[DType.bfloat16]())
                        c += 16
                    while c < k:
                        dst[c] = src[c].cast[DType.bfloat16]()
                        c += 1
                while c < kp:
                    dst[c] = BFloat16(0)
                    c += 1
            for p in range(p_first, p_last):
                var w0 = wp + (2 * p) * kb * 512
                var r = 0
                while r < rows:
                    dot_tile(a + r * kp, kp, w0, pairs, yp + (row + r) * n + 32 * p, n, min(ROWS, rows - r))
                    r += ROWS
            block += 1
        a.free()

    sync_parallelize(work, tasks)
