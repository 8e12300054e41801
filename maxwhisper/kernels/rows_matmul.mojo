# y = x @ w.T in float32 for the few rows of a decoder step: x (M, K), w (N, K) as the
# checkpoint lays it out, y (M, N); K a multiple of 16.
#
# With few rows the product reads every weight once and does little with it, and MAX's
# float32 matmul, made for many rows, leaves much of the arithmetic and the memory's
# speed unused there. Each thread takes a share of w's rows, NB at a time: they are read
# from memory once (fetched DIST blocks ahead, while the block before is computed), then
# from L1 for every block of MB rows of x, whose MB x NB sums of 16 lanes stay in
# registers while K streams through and are added across their lanes at the end.

from extensibility import register, InputTensor, OutputTensor
from std.utils import StaticTuple
from std.sys import num_physical_cores
from std.sys.intrinsics import prefetch, PrefetchOptions
from max.algorithm import sync_parallelize

comptime LANES = 16
comptime F16x = SIMD[DType.float32, LANES]
comptime MB = 6
comptime NB = 4
comptime DIST = 2


@register("maxwhisper_rows_matmul")
struct RowsMatmul:
    @staticmethod
    def execute[target: StaticString](output: OutputTensor, x: InputTensor, w: InputTensor) raises:
        _matmul(output, x, w)


@always_inline
def _sum(x: F16x) -> Float32:
    var a = x.slice[8, offset=0]() + x.slice[8, offset=8]()
    var b = a.slice[4, offset=0]() + a.slice[4, offset=4]()
    var c = b.slice[2, offset=0]() + b.slice[2, offset=2]()
    return c[0] + c[1]


@always_inline
def _block[mb: Int, nb: Int, ahead: Bool](xp: UnsafePointer[Float32, _], wp: UnsafePointer[Float32, _], k: Int,
                                          y: UnsafePointer[mut=True, Float32, _], n: Int):
    """mb rows of x (stride k) by nb rows of w (stride k) into y (stride n); `ahead`
    fetches the rows of w DIST blocks on (a prefetch past the end is harmless)."""
    var acc = StaticTuple[F16x, mb * nb](fill=F16x(0))
    var c = 0
    while c < k:
        var b = StaticTuple[F16x, nb](fill=F16x(0))
        comptime for j in range(nb):
            b[j] = (wp + j * k + c).load[width=LANES]()
        comptime if ahead:
            comptime for j in range(nb):
                prefetch[PrefetchOptions().for_read().high_locality()](wp + (DIST * nb + j) * k + c)
        comptime for r in range(mb):
            var a = (xp + r * k + c).load[width=LANES]()
            comptime for j in range(nb):
                acc[r * nb + j] = a.fma(b[j], acc[r * nb + j])
        c += LANES
    comptime for r in range(mb):
        comptime for j in range(nb):
            y[r * n + j] = _sum(acc[r * nb + j])


@always_inline
def _columns[nb: Int](xp: UnsafePointer[Float32, _], wp: UnsafePointer[Float32, _], m: Int, k: Int,
                      y: UnsafePointer[mut=True, Float32, _], n: Int):
    """Every row of x against nb rows of w: nb columns of y."""
    var r = 0
    if m >= MB:
        _block[MB, nb, True](xp, wp, k, y, n)
        r = MB
    while r + MB <= m:
        _block[MB, nb, False](xp + r * k, wp, k, y + r * n, n)
        r += MB
    var rest = m - r
    comptime for i in range(1, MB):
        if rest == i:
            _block[i, nb, True](xp + r * k, wp, k, y + r * n, n)


def _matmul(output: OutputTensor, x: InputTensor, w: InputTensor) raises:
    var m = x.dim_size(0)
    var k = x.dim_size(1)
    var n = w.dim_size(0)
    if w.dim_size(1) != k or k % LANES != 0:
        raise Error("maxwhisper_rows_matmul needs x (M, K) and w (N, K) with K a multiple of 16")
    var xp = x.unsafe_ptr().bitcast[Float32]()
    var wp = w.unsafe_ptr().bitcast[Float32]()
    var yp = output.unsafe_ptr().bitcast[Float32]()
    var units = n // NB
    var tasks = max(1, min(num_physical_cores(), units))

    def work(task: Int) {imm}:
        for u in range(task * units // tasks, (task + 1) * units // tasks):
            _columns[NB](xp, wp + u * NB * k, m, k, yp + u * NB, n)
        if task == tasks - 1:  # the rows of w past a multiple of NB
            for col in range(units * NB, n):
                _columns[1](xp, wp + col * k, m, k, yp + col, n)

    sync_parallelize(work, tasks)
