# softmax(q k.T / sqrt(W)) v of each window's few queries (a decoder step's beams)
# against its S audio positions: the decoder's cross-attention. q (N, G, H*W), k and v
# (N, S, H*W), out (N, G, H*W), all float32 and computed in float32; heads 64 wide.
#
# A step does little arithmetic per key and value it reads, so it is bound by reading
# them. A thread takes a window's heads (or, with fewer windows than threads, a share of
# them) and reads its keys in order, each key's slice once for the G queries' scores;
# then a softmax per (head, query); then the values in order, each added into the G
# queries' sums. MAX's batched matmuls read each head's keys and values through a
# transposed layout instead.

from extensibility import register, InputTensor, OutputTensor
from std.math import floor, sqrt
from std.memory import alloc, bitcast
from std.sys import num_physical_cores
from max.algorithm import sync_parallelize

from .attention import LOG2E

comptime LANES = 16
comptime F16x = SIMD[DType.float32, LANES]


@always_inline
def exp_nonpositive[n: Int](x: SIMD[DType.float32, n]) -> SIMD[DType.float32, n]:
    """exp(x) for x <= 0, to 2e-7 relative (float32's own rounding): 2**(x log2 e) as 2
    to the nearest integer, added to the exponent bits, times a degree-6 polynomial for
    2 to the remaining fraction in [-0.5, 0.5]."""
    var y = max(x * LOG2E, -126.0)
    var whole = floor(y + 0.5)
    var f = (y - whole) * 0.6931471805599453
    var p = 1.0 + f * (1.0 + f * (0.5 + f * (0.16666666666666666 + f * (0.041666666666666664 + f * (
        0.008333333333333333 + f * 0.001388888888888889)))))
    return bitcast[DType.float32, n](bitcast[DType.int32, n](p) + (whole.cast[DType.int32]() << 23))


@always_inline
def _sum(x: F16x) -> Float32:
    """The lanes' sum, as a tree of adds."""
    var a = x.slice[8, offset=0]() + x.slice[8, offset=8]()
    var b = a.slice[4, offset=0]() + a.slice[4, offset=4]()
    var c = b.slice[2, offset=0]() + b.slice[2, offset=2]()
    return c[0] + c[1]


@register("maxwhisper_cross_attention")
struct CrossAttention:
    @staticmethod
    def execute[target: StaticString, n_head: Int](output: OutputTensor, q: InputTensor, k: InputTensor,
                                                   v: InputTensor) raises:
        _cross_attention[n_head](output, q, k, v)


def _cross_attention[n_head: Int](output: OutputTensor, q: InputTensor, k: InputTensor, v: InputTensor) raises:
    var windows = q.dim_size(0)
    var g = q.dim_size(1)
    var d = q.dim_size(2)
    var s = k.dim_size(1)
    var w = d // n_head
    if w != 4 * LANES:
        raise Error("maxwhisper_cross_attention needs heads 64 wide")
    if k.dim_size(0) != windows or v.dim_size(0) != windows or v.dim_size(1) != s:
        raise Error("maxwhisper_cross_attention: q, k and v must have the same windows, k and v the same keys")
    var qp = q.unsafe_ptr().bitcast[Float32]()
    var kp = k.unsafe_ptr().bitcast[Float32]()
    var vp = v.unsafe_ptr().bitcast[Float32]()
    var op = output.unsafe_ptr().bitcast[Float32]()
    var scale = 1.0 / sqrt(Float32(w))
    # Units of work: a window's heads, or with fewer windows than cores a share of them.
    var cores = num_physical_cores()
    var groups = 1 if windows >= cores else min(n_head, cores)
    var units = windows * groups
    var tasks = max(1, min(cores, units))

    def work(task: Int) {imm}:
        var first = task * units // tasks
        var last = (task + 1) * units // tasks
        var most = (n_head + groups - 1) // groups
        var scores = alloc[Float32](max(most * g * s, 1))
        var sums = alloc[Float32](max(most * g * w, 1))
        var inv = alloc[Float32](max(most * g, 1))
        for unit in range(first, last):
            var b = unit // groups
            var h0 = (unit % groups) * n_head // groups
            var heads = ((unit % groups) + 1) * n_head // groups - h0
            var kb = kp + b * s * d + h0 * w
            var vb = vp + b * s * d + h0 * w
            var qb = qp + b * g * d + h0 * w
            var ob = op + b * g * d + h0 * w
            # Scores of (head, query) row i at scores[i * s + key]: the keys are read in
            # order, each row's slice of these heads once.
            for n in range(s):
                var key = kb + n * d
                for h in range(heads):
                    var k0 = (key + h * w).load[width=LANES]()
                    var k1 = (key + h * w + LANES).load[width=LANES]()
                    var k2 = (key + h * w + 2 * LANES).load[width=LANES]()
                    var k3 = (key + h * w + 3 * LANES).load[width=LANES]()
                    for r in range(g):
                        var query = qb + r * d + h * w
                        var acc = (query.load[width=LANES]() * k0 + (query + LANES).load[width=LANES]() * k1) + (
                            (query + 2 * LANES).load[width=LANES]() * k2 + (query + 3 * LANES).load[width=LANES]() * k3)
                        scores[(h * g + r) * s + n] = _sum(acc) * scale
            for i in range(heads * g):
                var row = scores + i * s
                var top = F16x(-3.0e38)
                var n = 0
                while n + LANES <= s:
                    top = max(top, (row + n).load[width=LANES]())
                    n += LANES
                var m = top.reduce_max()
                while n < s:
                    m = max(m, row[n])
                    n += 1
                var acc = F16x(0)
                n = 0
                while n + LANES <= s:
                    var e = exp_nonpositive[LANES]((row + n).load[width=LANES]() - m)
                    acc += e
                    (row + n).store(e)
                    n += LANES
                var total = _sum(acc)
                while n < s:
                    var e = exp_nonpositive[1](SIMD[DType.float32, 1](row[n] - m))
                    total += e[0]
                    row[n] = e[0]
                    n += 1
                inv[i] = 1.0 / total
            # Each (head, query)'s sum of the value rows, the values read in order.
            for i in range(heads * g * w):
                sums[i] = 0.0
            for n in range(s):
                var value = vb + n * d
                for h in range(heads):
                    for c in range(0, w, LANES):
                        var x = (value + h * w + c).load[width=LANES]()
                        for r in range(g):
                            var at = sums + (h * g + r) * w + c
                            at.store(at.load[width=LANES]() + scores[(h * g + r) * s + n] * x)
            for h in range(heads):
                for r in range(g):
                    var at = sums + (h * g + r) * w
                    var to = ob + r * d + h * w
                    for c in range(0, w, LANES):
                        (to + c).store((at + c).load[width=LANES]() * inv[h * g + r])
        scores.free()
        sums.free()
        inv.free()

    sync_parallelize(work, tasks)
