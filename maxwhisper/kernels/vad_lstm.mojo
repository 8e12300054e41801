# Silero VAD's LSTM cell carried over a block of windows in order (vad.py): for window t,
# gates = gates_in[t] + h @ w_hh (input gate, forget gate, cell candidate, output gate,
# 128 each), c = sigmoid(f) c + sigmoid(i) tanh(g), h = sigmoid(o) tanh(c).
# gates_in (N, 512) holds the input projection with both biases, w_hh (128, 512) the
# recurrent matrix transposed, state (2, 128) h and c before the block; out (N, 256) h
# and c after each window, all float32.
#
# Each window depends on the one before, so one thread runs them all. A window's
# product reads w_hh (256 KB, cache-resident across windows) row by row, each row
# multiplied by one entry of h into the 512 sums, 16 registers of 16 lanes at a time.

from extensibility import register, InputTensor, OutputTensor
from std.math import exp, tanh
from std.memory import alloc
from std.utils import StaticTuple

comptime HIDDEN = 128
comptime GATES = 4 * HIDDEN
comptime LANES = 16
comptime BLOCKS = 16  # registers of sums per pass over w_hh: two passes cover the 512 gates
comptime F16x = SIMD[DType.float32, LANES]


@always_inline
def _sigmoid(x: F16x) -> F16x:
    return 1.0 / (1.0 + exp(-x))


@register("maxwhisper_vad_lstm")
struct VadLstm:
    @staticmethod
    def execute[target: StaticString](output: OutputTensor, gates_in: InputTensor, w_hh: InputTensor,
                                      state: InputTensor) raises:
        if gates_in.dim_size(1) != GATES or w_hh.dim_size(0) != HIDDEN or w_hh.dim_size(1) != GATES:
            raise Error("maxwhisper_vad_lstm needs gates (N, 512) and a recurrent matrix (128, 512)")
        if state.dim_size(0) != 2 or state.dim_size(1) != HIDDEN or output.dim_size(1) != 2 * HIDDEN:
            raise Error("maxwhisper_vad_lstm needs a state (2, 128) and an output (N, 256)")
        _lstm(output, gates_in, w_hh, state)


def _lstm(output: OutputTensor, gates_in: InputTensor, w_hh: InputTensor, state: InputTensor):
    var n = gates_in.dim_size(0)
    var gp = gates_in.unsafe_ptr().bitcast[Float32]()
    var wp = w_hh.unsafe_ptr().bitcast[Float32]()
    var sp = state.unsafe_ptr().bitcast[Float32]()
    var op = output.unsafe_ptr().bitcast[Float32]()
    var h = alloc[Float32](HIDDEN)
    var c = alloc[Float32](HIDDEN)
    var gates = alloc[Float32](GATES)
    for j in range(HIDDEN):
        h[j] = sp[j]
        c[j] = sp[HIDDEN + j]
    for t in range(n):
        comptime for half in range(2):
            var acc = StaticTuple[F16x, BLOCKS](fill=F16x(0))
            comptime for b in range(BLOCKS):
                acc[b] = (gp + t * GATES + (half * BLOCKS + b) * LANES).load[width=LANES]()
            for i in range(HIDDEN):
                var x = F16x(h[i])
                var row = wp + i * GATES + half * BLOCKS * LANES
                comptime for b in range(BLOCKS):
                    acc[b] += x * (row + b * LANES).load[width=LANES]()
            comptime for b in range(BLOCKS):
                (gates + (half * BLOCKS + b) * LANES).store(acc[b])
        for j in range(0, HIDDEN, LANES):
            var i_gate = _sigmoid((gates + j).load[width=LANES]())
            var f_gate = _sigmoid((gates + HIDDEN + j).load[width=LANES]())
            var g_gate = tanh((gates + 2 * HIDDEN + j).load[width=LANES]())
            var o_gate = _sigmoid((gates + 3 * HIDDEN + j).load[width=LANES]())
            var cell = f_gate * (c + j).load[width=LANES]() + i_gate * g_gate
            var hid = o_gate * tanh(cell)
            (c + j).store(cell)
            (h + j).store(hid)
            (op + t * 2 * HIDDEN + j).store(hid)
            (op + t * 2 * HIDDEN + HIDDEN + j).store(cell)
    h.free()
    c.free()
    gates.free()
