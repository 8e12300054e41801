"""The tiled precisions: every matrix product through maxwhisper's own kernels, on bfloat16
tiles of the weights and bfloat16 roundings of the activations, accumulated in float32;
everything else float32. amx_bf16 and amx_q4_0 on Intel AMX (kernels/amx.mojo,
kernels/attention.mojo), avx512_bf16 and avx512_q4_0 with AVX-512 BF16 dot products
(kernels/dot_bf16.mojo). Each family's checks run where the CPU has its instructions."""

import numpy as np
import pytest

from helpers import PRECISION_ROWS, clips_wer, get_spec, prompt_logits, real_model
from maxwhisper import precision
from maxwhisper.cpuinfo import missing_flags
from maxwhisper.manifest import manifest
from maxwhisper.kernel_package import kernel_package
from maxwhisper.precision import AMX, DOT_BF16, bf16_tiles, bfloat16_bits, resolve_precision, tile_shape

needs_amx = pytest.mark.skipif(bool(missing_flags(AMX.flags)), reason="this CPU lacks flags of the AMX target "
                               "(cpuinfo.AMX_TARGET_FLAGS); the tiles' layout and the refusals are still tested")
needs_dot = pytest.mark.skipif(bool(missing_flags(DOT_BF16.flags)), reason="this CPU lacks AVX-512 BF16 "
                               "(precision.DOT_BF16.flags); the tiles' layout and the refusals are still tested")
# Each kernel family's precisions and the mark that skips them where the CPU cannot run them.
FAMILIES = [pytest.param(AMX, ("amx_bf16", "amx_q4_0"), marks=needs_amx, id="amx"),
            pytest.param(DOT_BF16, ("avx512_bf16", "avx512_q4_0"), marks=needs_dot, id="avx512")]


def _as_float(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def test_tiles_hold_each_weight_where_the_kernel_reads_it():
    """Tile (b, s), row r, column c holds w[16 b + c // 2, 32 s + 2 r + c % 2]; padding is zero."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 70)).astype(np.float32)
    tiles = bf16_tiles(w)
    assert tiles.shape == tile_shape(40, 70) == (4, 3, 16, 32) and tiles.dtype == np.uint16
    want = np.zeros((64, 96), np.float32)
    want[:40, :70] = _as_float(bfloat16_bits(w))
    for b, s, r, c in np.ndindex(tiles.shape):
        assert _as_float(tiles[b, s, r, c : c + 1])[0] == want[16 * b + c // 2, 32 * s + 2 * r + c % 2]


@pytest.mark.parametrize("bf16, q4_0, hardware, lacking", [
    ("amx_bf16", "amx_q4_0", "Intel AMX", ["amx_tile", "amx_bf16"]),
    ("avx512_bf16", "avx512_q4_0", "AVX-512 BF16", ["avx512_bf16"])])
def test_tiled_precisions_refused_without_their_instructions(monkeypatch, bf16, q4_0, hardware, lacking):
    with pytest.raises(ValueError, match=f"precision '{bf16}' runs on CPUs with {hardware} only, not on a GPU"):
        resolve_precision(bf16, "gpu")
    with pytest.raises(ValueError, match=f"precision '{q4_0}' runs on the CPU only"):
        resolve_precision(q4_0, "gpu")
    asked = []
    monkeypatch.setattr(precision, "missing_flags", lambda flags: asked.append(flags) or lacking)
    for name in (bf16, q4_0):
        with pytest.raises(ValueError, match=rf"precision '{name}' runs on CPUs with {hardware} only, not on this "
                                             rf"CPU, whose flags lack {', '.join(lacking)}; use 'float32' or 'q4_0'"):
            resolve_precision(name, "cpu")
    assert asked == [precision.PRECISIONS[bf16].tiles.flags] * 2


def _kernel_model(k: int, n: int, tiles=AMX, target: str | None = None):
    """A family's matmul kernel alone in a graph, (rows, k) x its tiles of an (n, k)
    matrix, compiled for the family's target or, given `target`, for that CPU."""
    from max import driver
    from max.driver import CPU
    from max.dtype import DType
    from max.engine import InferenceSession
    from max.graph import DeviceRef, Graph, TensorType, ops

    cpu = DeviceRef.CPU()
    shape = tile_shape(n, k)
    with Graph(f"{tiles.matmul}_{k}_{n}", input_types=[TensorType(DType.float32, ["rows", k], cpu),
                                                       TensorType(DType.uint16, list(shape), cpu)],
               custom_extensions=[kernel_package()]) as g:
        x, w = (v.tensor for v in g.inputs)
        g.output(ops.custom(tiles.matmul, cpu, [x, w], [TensorType(DType.float32, [x.shape[0], shape[0] * 16], cpu)])[0])
    if target is None:
        with precision.compile_target(tiles):
            return InferenceSession(devices=[CPU()]).load(g)
    driver.set_virtual_cpu_target(target)
    try:
        return InferenceSession(devices=[CPU()]).load(g)
    finally:
        driver.set_virtual_cpu_target("")


@pytest.mark.parametrize("tiles, lacking", [(AMX, "AMX"), (DOT_BF16, "AVX-512 BF16")], ids=["amx", "avx512"])
def test_a_kernel_compiled_without_its_instructions_raises_instead(tiles, lacking):
    """Compiled for a CPU without them (as MAX does where a virtual machine reports such
    a model), a kernel has none of its instructions and says why it cannot run."""
    from max import driver
    from max.driver import Buffer

    model = _kernel_model(64, 32, tiles, target="x86-64-v3")
    assert driver.get_virtual_cpu_target() == ""
    with pytest.raises(Exception, match=f"{tiles.matmul} was compiled for a CPU target without {lacking}"):
        model.execute(Buffer.from_numpy(np.ones((2, 64), np.float32)),
                      Buffer.from_numpy(bf16_tiles(np.ones((32, 64), np.float32))))


@pytest.mark.parametrize("tiles, names", FAMILIES)
@pytest.mark.parametrize("k, n", [(384, 48), (64, 64), (1536, 96)])
def test_kernel_equals_the_products_of_bfloat16_roundings(k, n, tiles, names):
    """Rows 1, 13, 17, 33, 70 and 200 cover, for AMX, one tile of rows, a partial second
    tile, a partial block of 32 and several blocks, and for the dot kernel a partial
    block of 12 rows, several, and more than one thread's 96 (then its threads split
    the rows, below that the columns); 48 outputs a padded column block; 64 inputs, 384
    and 1536 several tiles along K. Against float64 products of the same bfloat16 values."""
    from max import driver
    from max.driver import Buffer

    shape = tile_shape(n, k)
    model = _kernel_model(k, n, tiles)
    assert driver.get_virtual_cpu_target() == ""  # the family's target ends with the load
    rng = np.random.default_rng(1)
    w = rng.standard_normal((n, k)).astype(np.float32)
    for rows in (1, 13, 17, 33, 70, 200):
        x = rng.standard_normal((rows, k)).astype(np.float32)
        got = model.execute(Buffer.from_numpy(x), Buffer.from_numpy(bf16_tiles(w)))[0].to_numpy()
        want = _as_float(bfloat16_bits(x)).astype(np.float64) @ _as_float(bfloat16_bits(w)).astype(np.float64).T
        assert got.shape == (rows, shape[0] * 16)
        np.testing.assert_allclose(got[:, :n], want, rtol=0, atol=1e-5 * np.abs(want).max())
        assert not got[:, n:].any()  # the padded outputs: zero weights


@pytest.mark.parametrize("tiles, names", FAMILIES)
@pytest.mark.parametrize("batch, t, keys, n_head", [(2, 70, 70, 2), (1, 33, 45, 3)])
def test_attention_kernel_equals_softmax_attention_on_bfloat16_roundings(batch, t, keys, n_head, tiles, names):
    """Query rows past a block (AMX's 32, the dot kernel's 36) and keys past one of 32
    (padded), several heads and windows, against float64 attention of the same bfloat16
    values. The kernel rounds the probabilities to bfloat16 too, which is most of the
    difference left."""
    from max.driver import CPU, Buffer
    from max.dtype import DType
    from max.engine import InferenceSession
    from max.graph import DeviceRef, Graph, TensorType, ops

    cpu, width = DeviceRef.CPU(), 64
    d = n_head * width
    types = [TensorType(DType.float32, [batch, n, d], cpu) for n in (t, keys, keys)]
    with Graph(f"{tiles.attention}_{t}_{keys}", input_types=types, custom_extensions=[kernel_package()]) as g:
        g.output(ops.custom(tiles.attention, cpu, [v.tensor for v in g.inputs],
                            [TensorType(DType.float32, [batch, t, d], cpu)], parameters={"n_head": n_head})[0])
    with precision.compile_target(tiles):
        model = InferenceSession(devices=[CPU()]).load(g)
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((batch, n, d)).astype(np.float32) * 2 for n in (t, keys, keys))
    got = model.execute(*(Buffer.from_numpy(a) for a in (q, k, v)))[0].to_numpy()

    def heads(a):
        return _as_float(bfloat16_bits(a)).astype(np.float64).reshape(batch, -1, n_head, width).transpose(0, 2, 1, 3)

    scores = heads(q) @ heads(k).transpose(0, 1, 3, 2) / np.sqrt(width)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    want = ((p / p.sum(-1, keepdims=True)) @ heads(v)).transpose(0, 2, 1, 3).reshape(batch, t, d)
    err = np.abs(got - want).max() / np.abs(want).max()
    # Measured 8e-4; keys or values off by one position, or a wrong head, give ~1.
    assert err < 5e-3, err


@pytest.mark.parametrize("windows, queries, keys, n_head", [(1, 1, 1500, 6), (3, 5, 37, 2), (2, 16, 1500, 8)])
def test_cross_attention_kernel_equals_softmax_attention(windows, queries, keys, n_head):
    """The decoder's cross-attention kernel (the tiled precisions' step) against float64
    attention: one query, a window's beams, the most queries it takes; keys past a
    multiple of 16, one thread's share of heads and whole windows per thread. It needs
    no special instructions, so it runs on every CPU."""
    from max.driver import CPU, Buffer
    from max.dtype import DType
    from max.engine import InferenceSession
    from max.graph import DeviceRef, Graph, TensorType, ops

    from maxwhisper.builder import CROSS_KERNEL, CROSS_KERNEL_QUERIES, CROSS_KERNEL_WIDTH

    assert queries <= CROSS_KERNEL_QUERIES
    cpu, width = DeviceRef.CPU(), CROSS_KERNEL_WIDTH
    d = n_head * width
    types = [TensorType(DType.float32, [windows, n, d], cpu) for n in (queries, keys, keys)]
    with Graph(f"cross_{windows}_{queries}_{keys}", input_types=types, custom_extensions=[kernel_package()]) as g:
        g.output(ops.custom(CROSS_KERNEL, cpu, [v.tensor for v in g.inputs],
                            [TensorType(DType.float32, [windows, queries, d], cpu)], parameters={"n_head": n_head})[0])
    model = InferenceSession(devices=[CPU()]).load(g)
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((windows, n, d)).astype(np.float32) * 2 for n in (queries, keys, keys))
    got = model.execute(*(Buffer.from_numpy(a) for a in (q, k, v)))[0].to_numpy()

    def heads(a):
        return a.astype(np.float64).reshape(windows, -1, n_head, width).transpose(0, 2, 1, 3)

    scores = heads(q) @ heads(k).transpose(0, 1, 3, 2) / np.sqrt(width)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    want = ((p / p.sum(-1, keepdims=True)) @ heads(v)).transpose(0, 2, 1, 3).reshape(windows, queries, d)
    err = np.abs(got - want).max() / np.abs(want).max()
    # float32's rounding (measured about 1e-6); a key, value or head out of place gives ~1.
    assert err < 1e-5, err


def _graph_text(build, name: str) -> str:
    """The MLIR text of the graphs `build(options, module)` makes in precision `name`."""
    from max.graph import Module

    from maxwhisper.builder import GraphOptions

    module = Module()
    build(GraphOptions(precision.PRECISIONS[name]), module)
    return str(module.mlir_module)


def test_cpu_steps_in_float32_call_the_cross_attention_kernel_for_few_queries():
    """On the CPU with float32 activations (the tiled precisions, float32, q4_0) the
    decoder step's cross-attention is the kernel, chosen by the queries a window has (a
    prompt pass's many take MAX's matmuls); the greedy loop's one query per window takes
    it with no choice; graphs in float16 or bfloat16 never call it."""
    from maxwhisper.builder import CROSS_KERNEL, decoder_graph
    from maxwhisper.loop import greedy_graph

    spec = get_spec("tiny.en")
    step = lambda o, m: decoder_graph(spec, o, module=m)
    loop = lambda o, m: greedy_graph(spec, 50256, 50363, o, m)
    tiled = _graph_text(step, "avx512_q4_0")
    # One call in the block; two choices there: the prefix's product, and the kernel or
    # MAX's matmuls (tiled products choose nothing).
    assert tiled.count(CROSS_KERNEL) == 1 and tiled.count("mo.if") == 2
    for name in ("float32", "q4_0"):
        assert _graph_text(step, name).count(CROSS_KERNEL) == 1, name
    assert CROSS_KERNEL not in _graph_text(step, "bfloat16")
    for name in ("avx512_q4_0", "float32"):
        assert _graph_text(loop, name).count(CROSS_KERNEL) == spec.decoder.n_layer, name
    assert CROSS_KERNEL not in _graph_text(loop, "float16")


@pytest.mark.parametrize("rows, n, k", [(2, 1, 16), (5, 4, 64), (6, 1003, 384), (13, 37, 512), (64, 130, 1536)])
def test_rows_matmul_kernel_equals_the_float64_product(rows, n, k):
    """The decoder step's float32 product of few rows against float64: rows past a
    multiple of the kernel's blocks of 6, outputs past its blocks of 4 (the last
    thread's remainder), one output, the widths of tiny to base and an MLP's. It needs
    no special instructions, so it runs on every CPU."""
    from max.driver import CPU, Buffer
    from max.dtype import DType
    from max.engine import InferenceSession
    from max.graph import DeviceRef, Graph, TensorType, ops

    from maxwhisper.builder import ROWS_KERNEL, ROWS_KERNEL_MAX

    assert rows <= ROWS_KERNEL_MAX
    cpu = DeviceRef.CPU()
    types = [TensorType(DType.float32, shape, cpu) for shape in ((rows, k), (n, k))]
    with Graph(f"rows_{rows}_{n}_{k}", input_types=types, custom_extensions=[kernel_package()]) as g:
        g.output(ops.custom(ROWS_KERNEL, cpu, [v.tensor for v in g.inputs],
                            [TensorType(DType.float32, [rows, n], cpu)])[0])
    model = InferenceSession(devices=[CPU()]).load(g)
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((rows, k)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)
    got = model.execute(Buffer.from_numpy(x), Buffer.from_numpy(w))[0].to_numpy()
    want = x.astype(np.float64) @ w.astype(np.float64).T
    err = np.abs(got - want).max() / np.abs(want).max()
    # float32's rounding (measured about 1e-7); a row or column out of place gives ~1.
    assert err < 1e-5, err


def test_cpu_steps_in_float32_call_the_rows_kernel_for_their_float32_products():
    """On the CPU in float32 every matrix product of a decoder step goes to the rows
    kernel (the block's eight and the vocabulary's), chosen by the rows' count (one row
    and a prompt pass's many take MAX's); q4_0's step has no float32 product left, the
    encoder's rows are known to be many, the greedy loop makes no choice, and bfloat16's
    and avx512_q4_0's steps never call it."""
    from maxwhisper.builder import ROWS_KERNEL, decoder_graph, encoder_graph
    from maxwhisper.loop import greedy_graph

    spec = get_spec("tiny.en")
    step = lambda o, m: decoder_graph(spec, o, module=m)
    assert _graph_text(step, "float32").count(ROWS_KERNEL) == 8 + 1
    for name in ("q4_0", "bfloat16", "avx512_q4_0"):
        assert ROWS_KERNEL not in _graph_text(step, name), name
    assert ROWS_KERNEL not in _graph_text(lambda o, m: encoder_graph(spec, o, m), "float32")
    assert ROWS_KERNEL not in _graph_text(lambda o, m: greedy_graph(spec, 50256, 50363, o, m), "float32")


@pytest.mark.parametrize("bf16, q4_0", [("amx_bf16", "amx_q4_0"), ("avx512_bf16", "avx512_q4_0")])
def test_tiled_q4_0_quantizes_q4_0s_matrices_and_tiles_the_rest(tiny_en, bf16, q4_0):
    spec = tiny_en.spec
    both = precision.PRECISIONS[q4_0]
    quantized, tiled = set(precision.quantized_matrices(spec)), set(precision.tiled_matrices(spec, both))
    every = {n for n, info in manifest(spec).items() if precision.is_matrix(n, info.shape)}
    assert quantized | tiled == every and not quantized & tiled
    assert all(n.startswith("encoder.") or ".cross_attn.key." in n or ".cross_attn.value." in n for n in tiled)
    # The tied embedding: 4-bit for the logits, float32 for the lookup.
    assert "decoder.token_embedding.weight" in precision.float_weights(spec, both)
    assert set(precision.tiled_matrices(spec, precision.PRECISIONS[bf16])) == every
    assert not precision.tiled_matrices(spec, precision.PRECISIONS["q4_0"])


@pytest.mark.parametrize("tiles, names", FAMILIES)
@pytest.mark.parametrize("which, against", [(0, "float32"), (1, "q4_0")], ids=["bf16", "q4_0"])
def test_logits_close_to_the_same_model_untiled(which, against, tiles, names, model_cache, tiny_en):
    """amx_bf16 and avx512_bf16 against float32, amx_q4_0 and avx512_q4_0 against q4_0
    (the same 4-bit decoder). Measured on clip 01 with AMX: 1.2e-2 and 2.7e-2 (bfloat16
    keeps 8 bits of mantissa; under the q4_0 pair the decoder rounds its activations to
    8 bits too, inside MAX's Q4_0 matmul). A misplaced tile or a wrong pair order puts
    it at the logits' own scale (about 1)."""
    name = names[which]
    ref = tiny_en if against == "float32" else real_model("tiny.en", against)
    want, got = prompt_logits(ref), prompt_logits(real_model("tiny.en", name))
    err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    PRECISION_ROWS.append((name, f"prompt logits, rel. error vs {against}", f"{err:.1e}"))
    assert err < 0.05, err


@pytest.mark.parametrize("tiles, names", FAMILIES)
@pytest.mark.parametrize("which", [0, 1], ids=["bf16", "q4_0"])
def test_wer_within_half_a_point_of_float32(which, tiles, names, model_cache, tiny_en):
    name = names[which]
    rates = {name: clips_wer(real_model("tiny.en", name)), "float32": clips_wer(tiny_en)}
    PRECISION_ROWS.append((name, "WER on tests/data/speech (float32's)",
                           f"{rates[name]:.1%} ({rates['float32']:.1%})"))
    assert rates[name] <= rates["float32"] + 0.005, rates


@pytest.mark.parametrize("tiles, names", FAMILIES)
def test_a_tiled_model_loads_again_from_its_compiled_file(tiles, names, model_cache, monkeypatch):
    """The tiled graphs are one module, compiled once into a MEF file like every other
    precision's (compiled.py): a second load reads it and compiles nothing."""
    from max.engine import InferenceSession

    import maxwhisper
    from maxwhisper import compiled

    first = real_model("tiny.en", names[1])
    label = f"tiny.en-graphs-{names[1]}-unfused-cpu"
    assert any(p.name.startswith(label) for p in compiled.compiled_dir().glob("*.mef"))

    def refuse(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(InferenceSession, "compile", refuse)
    again = maxwhisper.load_model("tiny.en", device="cpu", precision=names[1])
    np.testing.assert_array_equal(prompt_logits(again), prompt_logits(first))
