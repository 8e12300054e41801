# softmax(q k.T / sqrt(W)) v for each head, without a mask (the encoder's self-attention),
# on Intel AMX: q, k, v float32 (B, T or S, H*W), rounded to bfloat16 as they are packed,
# products accumulated and the softmax computed in float32; out float32 (B, T, H*W).
#
# One thread takes whole (batch, head) pairs. For each it packs the head's keys and
# values into AMX tiles once (the same pairs-of-K order as kernels/amx.mojo's weights),
# then for each block of 32 queries: the 32 x S scores on the tiles, a float32 softmax
# per row, its probabilities in bfloat16, and their product with the values, each row
# divided by its sum on the way out. Tile registers: 0-3 the accumulators of a 32x32
# block, 4-5 two 16-row slices of the left operand, 6-7 two 16-column tiles of the right.

from extensibility import register, InputTensor, OutputTensor
from std.math import floor, sqrt
from std.memory import alloc, bitcast
from std.sys import llvm_intrinsic, num_physical_cores
from std.sys.info import CompilationTarget
from max.algorithm import sync_parallelize

from .tiles import configure_tiles, request_tile_state

comptime LOG2E = 1.4426950408889634


@always_inline
def exp2_nonpositive[n: Int](x: SIMD[DType.float32, n]) -> SIMD[DType.float32, n]:
    """2**x for x <= 0, to 1e-5 relative: a quartic on the fraction, the integer part
    added to the exponent bits. The probabilities are rounded to bfloat16 (4e-3) after,
    and this is a fraction of the library exp's work."""
    var y = max(x, -126.0)
    var whole = floor(y)
    var f = y - whole
    var p = 1.0 + f * (0.69304348 + f * (0.24124981 + f * (0.05235283 + f * 0.01334154)))
    return bitcast[DType.float32, n](bitcast[DType.int32, n](p) + (whole.cast[DType.int32]() << 23))


@register("maxwhisper_amx_attention")
struct AmxAttention:
    @staticmethod
    def execute[target: StaticString, n_head: Int](output: OutputTensor, q: InputTensor, k: InputTensor,
                                                   v: InputTensor) raises:
        comptime if CompilationTarget.has_intel_amx():
            _attention[n_head](output, q, k, v)
        else:
            raise Error("maxwhisper_amx_attention was compiled for a CPU target without AMX")


def _attention[n_head: Int](output: OutputTensor, q: InputTensor, k: InputTensor, v: InputTensor) raises:
    var batch = q.dim_size(0)
    var t = q.dim_size(1)
    var d = q.dim_size(2)
    var s = k.dim_size(1)
    var w = d // n_head
    if w % 32 != 0:
        raise Error("maxwhisper_amx_attention needs a head width that is a multiple of 32")
    var sp = (s + 31) // 32 * 32
    var qp = q.unsafe_ptr().bitcast[Float32]()
    var kp = k.unsafe_ptr().bitcast[Float32]()
    var vp = v.unsafe_ptr().bitcast[Float32]()
    var op = output.unsafe_ptr().bitcast[Float32]()
    request_tile_state()
    var scale = LOG2E / sqrt(Float32(w))  # exp(a) = 2**(a log2 e)
    var pairs = batch * n_head
    var tasks = max(1, min(num_physical_cores(), pairs))

    def work(task: Int) {imm}:
        var first = task * pairs // tasks
        var last = (task + 1) * pairs // tasks
        configure_tiles()
        var kt = alloc[BFloat16](sp * w)
        var vt = alloc[BFloat16](sp * w)
        var scores = alloc[Float32](32 * sp)
        var probs = alloc[BFloat16](32 * sp)
        var qa = alloc[BFloat16](32 * w)
        var spill = alloc[Float32](16 * 16)
        var inv = alloc[Float32](32)
        var row16 = alloc[BFloat16](w)
        var row32 = row16.bitcast[UInt32]()
        var kt32 = kt.bitcast[UInt32]()
        var steps = w // 32     # tiles along W for the scores
        var blocks = sp // 32   # tiles along S for the values
        for pair in range(first, last):
            var b = pair // n_head
            var h = pair % n_head
            var kb = kp + b * s * d + h * w
            var vb = vp + b * s * d + h * w
            # Keys as the scores' right operand: key n's width pair i (two bfloat16, one
            # 32-bit word) at word [(n / 16) * steps + i / 16][i % 16][n % 16].
            for n in range(sp):
                var at = kt32 + (n // 16) * steps * 256 + n % 16
                if n < s:
                    for c in range(0, w, 16):
                        (row16 + c).store((kb + n * d + c).load[width=16]().cast[DType.bfloat16]())
                    for i in range(w // 2):
                        at[(i // 16) * 256 + (i % 16) * 16] = row32[i]
                else:
                    for i in range(w // 2):
                        at[(i // 16) * 256 + (i % 16) * 16] = 0
            # Values as the product's right operand: keys n and n + 1 of column c side by
            # side at [(c / 16) * blocks + n / 32][(n % 32) / 2][2 * (c % 16) + 0..1].
            var zero = SIMD[DType.float32, 16](0)
            for n in range(0, sp, 2):
                var at = vt + (n // 32) * 512 + ((n % 32) // 2) * 32
                for c in range(0, w, 16):
                    var even = (vb + n * d + c).load[width=16]() if n < s else zero
                    var odd = (vb + (n + 1) * d + c).load[width=16]() if n + 1 < s else zero
                    (at + (c // 16) * blocks * 512).store(even.interleave(odd).cast[DType.bfloat16]())
            var row = 0
            while row < t:
                var rows = min(32, t - row)
                for r in range(32):
                    var dst = qa + r * w
                    if r < rows:
                        var src = qp + (b * t + row + r) * d + h * w
                        for c in range(0, w, 16):
                            (dst + c).store((src + c).load[width=16]().cast[DType.bfloat16]())
                    else:
                        for c in range(w):
                            dst[c] = BFloat16(0)
                # Scores, 32 keys at a time.
                for p in range(blocks):
                    llvm_intrinsic["llvm.x86.tilezero", NoneType](Int8(0))
                    llvm_intrinsic["llvm.x86.tilezero", NoneType](Int8(1))
                    llvm_intrinsic["llvm.x86.tilezero", NoneType](Int8(2))
                    llvm_intrinsic["llvm.x86.tilezero", NoneType](Int8(3))
                    var k0 = kt + (2 * p) * steps * 512
                    var k1 = k0 + steps * 512
                    for j in range(steps):
                        llvm_intrinsic["llvm.x86.tileloadd64", NoneType](Int8(4), qa + j * 32, Int64(w * 2))
                        llvm_intrinsic["llvm.x86.tileloadd64", NoneType](Int8(5), qa + 16 * w + j * 32, Int64(w * 2))
                        llvm_intrinsic["llvm.x86.tileloadd64", NoneType](Int8(6), k0 + j * 512, Int64(64))
                        llvm_intrinsic["llvm.x86.tileloadd64", NoneType](Int8(7), k1 + j * 512, Int64(64))
                        llvm_intrinsic["llvm.x86.tdpbf16ps", NoneType](Int8(0), Int8(4), Int8(6))
                        llvm_intrinsic["llvm.x86.tdpbf16ps", NoneType](Int8(1), Int8(4), Int8(7))
                        llvm_intrinsic["llvm.x86.tdpbf16ps", NoneType](Int8(2), Int8(5), Int8(6))
                        llvm_intrinsic["llvm.x86.tdpbf16ps", NoneType](Int8(3), Int8(5), Int8(7))
                    var at = scores + 32 * p
                    llvm_intrinsic["llvm.x86.tilestored64", NoneType](Int8(0), at, Int64(sp * 4))
                    llvm_intrinsic["llvm.x86.tilestored64", NoneType](Int8(1), at + 16, Int64(sp * 4))
                    llvm_intrinsic["llvm.x86.tilestored64", NoneType](Int8(2), at + 16 * sp, Int64(sp * 4))
                    llvm_intrinsic["llvm.x86.tilestored64", NoneType](Int8(3), at + 16 * sp + 16, Int64(sp * 4))
                # Softmax of each row over the S real keys; the padded keys get 0.
                for r in range(32):
                    var src = scores + r * sp
                    var dst = probs + r * sp
                    if r >= rows:
                        for c in range(sp):
                            dst[c] = BFloat16(0)
                        continue
                    var top = SIMD[DType.float32, 16](-3.0e38)
                    var c = 0
                    while c + 16 <= s:
                        top = max(top, (src + c).load[width=16]())
                        c += 16
                    var m = top.reduce_max()
                    while c < s:
                        m = max(m, src[c])
                        c += 1
                    var acc = SIMD[DType.float32, 16](0)
                    c = 0
                    while c + 16 <= s:
                        var e = exp2_nonpositive[16](((src + c).load[width=16]() - m) * scale)
                        acc += e
                        (dst + c).store(e.cast[DType.bfloat16]())
                        c += 16
                    var total = acc.reduce_add()
                    while c < s:
                        var e = exp2_nonpositive[1](SIMD[DType.float32, 1](src[c] - m) * scale)
                        total += e
                        dst[c] = e.cast[DType.bfloat16]()
                        c += 1
                    while c < sp:
                        dst[c] = BFloat16(0)
                        c += 1
                    inv[r] = 1.0 / total
                # Probabilities x values, 32 columns at a time.
                for cp in range(w // 32):
                    llvm_intrinsic["llvm.x86.tilezero", NoneType](Int8(0))
                    llvm_intrinsic["llvm.x86.tilezero", NoneType](Int8(1))
                    llvm_intrinsic["llvm.x86.tilezero", NoneType](Int8(2))
                    llvm_intrinsic["llvm.x86.tilezero", NoneType](Int8(3))
                    var v0 = vt + (2 * cp) * blocks * 512
                    var v1 = v0 + blocks * 512
                    for j in range(blocks):
                        llvm_intrinsic["llvm.x86.tileloadd64", NoneType](Int8(4), probs + j * 32, Int64(sp * 2))
                        llvm_intrinsic["llvm.x86.tileloadd64", NoneType](Int8(5), probs + 16 * sp + j * 32,
                                                                        Int64(sp * 2))
                        llvm_intrinsic["llvm.x86.tileloadd64", NoneType](Int8(6), v0 + j * 512, Int64(64))
                        llvm_intrinsic["llvm.x86.tileloadd64", NoneType](Int8(7), v1 + j * 512, Int64(64))
                        llvm_intrinsic["llvm.x86.tdpbf16ps", NoneType](Int8(0), Int8(4), Int8(6))
                        llvm_intrinsic["llvm.x86.tdpbf16ps", NoneType](Int8(1), Int8(4), Int8(7))
                        llvm_intrinsic["llvm.x86.tdpbf16ps", NoneType](Int8(2), Int8(5), Int8(6))
                        llvm_intrinsic["llvm.x86.tdpbf16ps", NoneType](Int8(3), Int8(5), Int8(7))
                    for tile in range(4):
                        var first_row = 16 * (tile // 2)
                        if first_row >= rows:
                            break
                        if tile == 0:
                            llvm_intrinsic["llvm.x86.tilestored64", NoneType](Int8(0), spill, Int64(64))
                        elif tile == 1:
                            llvm_intrinsic["llvm.x86.tilestored64", NoneType](Int8(1), spill, Int64(64))
                        elif tile == 2:
                            llvm_intrinsic["llvm.x86.tilestored64", NoneType](Int8(2), spill, Int64(64))
                        else:
                            llvm_intrinsic["llvm.x86.tilestored64", NoneType](Int8(3), spill, Int64(64))
                        for r in range(min(16, rows - first_row)):
                            var at = op + (b * t + row + first_row + r) * d + h * w + 32 * cp + 16 * (tile % 2)
                            at.store((spill + r * 16).load[width=16]() * inv[first_row + r])
                row += 32
        llvm_intrinsic["llvm.x86.tilerelease", NoneType]()
        kt.free()
        vt.free()
        scores.free()
        probs.free()
        qa.free()
        spill.free()
        inv.free()
        row16.free()

    sync_parallelize(work, tasks)
