# softmax(q k.T / sqrt(W)) v for each head, without a mask (the encoder's self-attention),
# with AVX-512 BF16 dot products: q, k, v float32 (B, T or S, H*W), rounded to bfloat16
# as they are packed, products accumulated and the softmax computed in float32; out
# float32 (B, T, H*W).
#
# kernels/attention.mojo's scheme with kernels/dot_bf16.mojo's micro-kernel in place of
# the AMX tiles: one thread takes whole (batch, head) pairs, packs the head's keys and
# values once in the tiles' pairs-of-K order, then for each block of QUERIES queries
# computes the QUERIES x S scores, a float32 softmax per row, its probabilities in
# bfloat16 and their product with the values, each row divided by its sum after.

from extensibility import register, InputTensor, OutputTensor
from std.math import sqrt
from std.memory import alloc
from std.sys import num_physical_cores
from std.sys.info import CompilationTarget
from max.algorithm import sync_parallelize

from .attention import LOG2E, exp2_nonpositive
from .dot_bf16 import ROWS, dot_tile

comptime QUERIES = 3 * ROWS


@register("maxwhisper_dot_bf16_attention")
struct DotBf16Attention:
    @staticmethod
    def execute[target: StaticString, n_head: Int](output: OutputTensor, q: InputTensor, k: InputTensor,
                                                   v: InputTensor) raises:
        comptime if CompilationTarget._has_feature["avx512bf16"]():
            _attention[n_head](output, q, k, v)
        else:
            raise Error("maxwhisper_dot_bf16_attention was compiled for a CPU target without AVX-512 BF16")


def _attention[n_head: Int](output: OutputTensor, q: InputTensor, k: InputTensor, v: InputTensor) raises:
    var batch = q.dim_size(0)
    var t = q.dim_size(1)
    var d = q.dim_size(2)
    var s = k.dim_size(1)
    var w = d // n_head
    if w % 32 != 0:
        raise Error("maxwhisper_dot_bf16_attention needs a head width that is a multiple of 32")
    var sp = (s + 31) // 32 * 32
    var qp = q.unsafe_ptr().bitcast[Float32]()
    var kp = k.unsafe_ptr().bitcast[Float32]()
    var vp = v.unsafe_ptr().bitcast[Float32]()
    var op = output.unsafe_ptr().bitcast[Float32]()
    var scale = LOG2E / sqrt(Float32(w))  # exp(a) = 2**(a log2 e)
    var pairs = batch * n_head
    var tasks = max(1, min(num_physical_cores(), pairs))

    def work(task: Int) {imm}:
        var first = task * pairs // tasks
        var last = (task + 1) * pairs // tasks
        var kt = alloc[BFloat16](sp * w)
        var vt = alloc[BFloat16](sp * w)
        var scores = alloc[Float32](QUERIES * sp)
        var probs = alloc[BFloat16](QUERIES * sp)
        var qa = alloc[BFloat16](QUERIES * w)
        var inv = alloc[Float32](QUERIES)
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
                var rows = min(QUERIES, t - row)
                for r in range(QUERIES):
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
                    var k0 = kt + (2 * p) * steps * 512
                    var r = 0
                    while r < rows:
                        dot_tile(qa + r * w, w, k0, w // 2, scores + r * sp + 32 * p, sp, min(ROWS, rows - r))
                        r += ROWS
                # Softmax of each row over the S real keys; the padded keys get 0.
                for r in range(QUERIES):
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
                # Probabilities x values, 32 columns at a time, then each row over its sum.
                for cp in range(w // 32):
                    var v0 = vt + (2 * cp) * blocks * 512
                    var r = 0
                    while r < rows:
                        var at = op + (b * t + row + r) * d + h * w + 32 * cp
                        dot_tile(probs + r * sp, sp, v0, sp // 2, at, d, min(ROWS, rows - r))
                        r += ROWS
                for r in range(rows):
                    var at = op + (b * t + row + r) * d + h * w
                    for c in range(0, w, 16):
                        (at + c).store((at + c).load[width=16]() * inv[r])
                row += QUERIES
        kt.free()
        vt.free()
        scores.free()
        probs.free()
        qa.free()
        inv.free()
        row16.free()

    sync_parallelize(work, tasks)
