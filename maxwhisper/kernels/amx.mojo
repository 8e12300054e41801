# y = x @ w.T on Intel AMX: x float32 (M, K) rounded to bfloat16 as it is read, w
# bfloat16 packed at load time into AMX tiles, products accumulated in float32.
#
# Tile registers: 0-3 the four 16x16 float32 accumulators of a 32x32 block of y, 4-5
# two 16-row slices of x (32 values of K each), 6-7 two 16-column tiles of w. w's
# packed layout, (N/16, K/32, 16, 32) bfloat16, holds each 16-column tile of w.T in
# the pairs-of-K ("VNNI") order TDPBF16PS reads, tile after tile along K, so a
# column block streams through memory in order.

from extensibility import register, InputTensor, OutputTensor
from std.memory import alloc
from std.sys import llvm_intrinsic, num_physical_cores
from std.sys.info import CompilationTarget
from max.algorithm import sync_parallelize

from .tiles import configure_tiles, request_tile_state


@register("maxwhisper_amx_matmul")
struct AmxMatmul:
    @staticmethod
    def execute[target: StaticString](output: OutputTensor, x: InputTensor, w: InputTensor) raises:
        # Tile instructions do not compile for a target without AMX (LLVM aborts the
        # process); such a build gets this error instead (precision.AMX_TARGET).
        comptime if CompilationTarget.has_intel_amx():
            _matmul(output, x, w)
        else:
            raise Error("maxwhisper_amx_matmul was compiled for a CPU target without AMX")


def _matmul(output: OutputTensor, x: InputTensor, w: InputTensor) raises:
    var m = x.dim_size(0)
    var k = x.dim_size(1)
    var kb = w.dim_size(1)
    var kp = kb * 32
    var n = output.dim_size(1)
    var xp = x.unsafe_ptr().bitcast[Float32]()
    var wp = w.unsafe_ptr().bitcast[BFloat16]()
    var yp = output.unsafe_ptr().bitcast[Float32]()
    request_tile_state()
    var pairs = n // 32
    var tasks = max(1, min(num_physical_cores(), pairs))

    def work(task: Int) {imm}:
        var first = task * pairs // tasks
        var last = (task + 1) * pairs // tasks
        configure_tiles()
        var a = alloc[BFloat16](32 * kp)
        var spill = alloc[Float32](16 * 16)
        var row = 0
        while row < m:
            var rows = min(32, m - row)
            # 32 rows of x in bfloat16, zero past M and past K.
            for r in range(32):
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
            for p in range(first, last):
                llvm_intrinsic["llvm.x86.tilezero", NoneType](Int8(0))
                llvm_intrinsic["llvm.x86.tilezero", NoneType](Int8(1))
                llvm_intrinsic["llvm.x86.tilezero", NoneType](Int8(2))
                llvm_intrinsic["llvm.x86.tilezero", NoneType](Int8(3))
                var w0 = wp + (2 * p) * kb * 512
                var w1 = w0 + kb * 512
                for j in range(kb):
                    llvm_intrinsic["llvm.x86.tileloadd64", NoneType](Int8(4), a + j * 32, Int64(kp * 2))
                    llvm_intrinsic["llvm.x86.tileloadd64", NoneType](Int8(6), w0 + j * 512, Int64(64))
                    llvm_intrinsic["llvm.x86.tileloadd64", NoneType](Int8(7), w1 + j * 512, Int64(64))
                    llvm_intrinsic["llvm.x86.tdpbf16ps", NoneType](Int8(0), Int8(4), Int8(6))
                    llvm_intrinsic["llvm.x86.tdpbf16ps", NoneType](Int8(1), Int8(4), Int8(7))
                    if rows > 16:
                        llvm_intrinsic["llvm.x86.tileloadd64", NoneType](Int8(5), a + 16 * kp + j * 32,
                                                                        Int64(kp * 2))
                        llvm_intrinsic["llvm.x86.tdpbf16ps", NoneType](Int8(2), Int8(5), Int8(6))
                        llvm_intrinsic["llvm.x86.tdpbf16ps", NoneType](Int8(3), Int8(5), Int8(7))
                var col = 32 * p
                if rows == 32:
                    var at = yp + row * n + col
                    llvm_intrinsic["llvm.x86.tilestored64", NoneType](Int8(0), at, Int64(n * 4))
                    llvm_intrinsic["llvm.x86.tilestored64", NoneType](Int8(1), at + 16, Int64(n * 4))
                    llvm_intrinsic["llvm.x86.tilestored64", NoneType](Int8(2), at + 16 * n, Int64(n * 4))
                    llvm_intrinsic["llvm.x86.tilestored64", NoneType](Int8(3), at + 16 * n + 16, Int64(n * 4))
                    continue
                # The last, partial block of rows: each tile through a spill buffer,
                # so nothing is written past row M.
                for t in range(4):
                    var top = 16 * (t // 2)
                    if top >= rows:
                        break
                    if t == 0:
                        llvm_intrinsic["llvm.x86.tilestored64", NoneType](Int8(0), spill, Int64(64))
                    elif t == 1:
                        llvm_intrinsic["llvm.x86.tilestored64", NoneType](Int8(1), spill, Int64(64))
                    elif t == 2:
                        llvm_intrinsic["llvm.x86.tilestored64", NoneType](Int8(2), spill, Int64(64))
                    else:
                        llvm_intrinsic["llvm.x86.tilestored64", NoneType](Int8(3), spill, Int64(64))
                    for r in range(min(16, rows - top)):
                        var at = yp + (row + top + r) * n + col + 16 * (t % 2)
                        at.store((spill + r * 16).load[width=16]())
            row += 32
        llvm_intrinsic["llvm.x86.tilerelease", NoneType]()
        a.free()
        spill.free()

    sync_parallelize(work, tasks)
