"""The benchmark harness measures equal work: every system, forced to the same token
count, produces the same tokens from the same weights; the report renders."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import bench, peers
from maxwhisper.audio import log_mel_spectrogram

pytest.importorskip("whisper", reason="the benchmark's peers need openai-whisper: pip install -e '.[test]'")


def test_forced_workload_is_the_same_work_for_every_system(tiny_en):
    weights, spec, ct2_dir = peers.converted_weights("tiny.en")
    tok = tiny_en.tokenizer
    prompt = tok.sot_sequence + [tok.no_timestamps]
    mel = log_mel_spectrogram(bench.speech_audio(30.0), spec.audio)[None, :, : spec.audio.n_frames]
    mel = np.ascontiguousarray(np.repeat(mel, 2, 0), np.float32)
    ours = peers.forced_maxwhisper(tiny_en, mel, prompt, 12, tok.eot)
    assert ours.shape == (2, 12) and tok.eot not in ours
    other = tiny_en.placed(greedy_on_device=not tiny_en.runtime.greedy_on_device)  # the other greedy loop
    np.testing.assert_array_equal(peers.forced_maxwhisper(other, mel, prompt, 12, tok.eot), ours)
    model, torch = peers.openai_model(weights, spec)
    np.testing.assert_array_equal(peers.forced_openai(model, torch, torch.from_numpy(mel), prompt, 12, tok.eot), ours)
    model, torch = peers.hf_model(weights, spec)
    np.testing.assert_array_equal(peers.forced_hf(model, torch, torch.from_numpy(mel), prompt, 12, tok.eot), ours)
    compiled, torch = peers.hf_compiled_model(weights, spec, "cpu", mel, prompt, 12, tok.eot)
    np.testing.assert_array_equal(
        peers.forced_hf_static(compiled, torch, torch.from_numpy(mel), prompt, 12, tok.eot), ours)
    model, ct2 = peers.ct2_model(ct2_dir, "float32", 2)
    np.testing.assert_array_equal(peers.forced_ct2(model, ct2, mel, prompt, 12, tok.eot), ours)


def test_report_table_json_and_chart(tiny_en, tmp_path, monkeypatch):
    import maxwhisper

    monkeypatch.setattr(maxwhisper, "load_model", lambda *a, **k: tiny_en)
    report = bench.run("tiny.en", workload="forced", batch=1, tokens=4, repeats=1,
                       peers=("openai-whisper", "faster-whisper"))
    systems = [r["system"] for r in report["rows"]]
    assert systems[0].startswith("maxwhisper") and len(systems) == 4
    assert all(r["skipped"] is None and r["tokens"] == 4 and r["median_s"] > 0 for r in report["rows"]), report
    text = bench.table(report)
    assert all(s in text for s in systems) and "peer time / maxwhisper time" in text
    json.loads(json.dumps(report))
    pytest.importorskip("matplotlib", reason="the chart needs matplotlib: pip install -e '.[test]'")
    bench.chart(report, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_several_precisions_one_row_each(model_cache):
    report = bench.run("tiny.en", workload="forced", tokens=4, repeats=1, peers=(), precision=("float32", "q4_0"))
    assert [r["system"] for r in report["rows"]] == ["maxwhisper (cpu, fp32, host loop)",
                                                     "maxwhisper (cpu, q4_0, host loop)"]
    assert report["precisions"] == ["float32", "q4_0"] and all(r["tokens"] == 4 for r in report["rows"])


def test_attention_kernels_are_rows_and_reach_the_startup_program(model_cache):
    """--attention fused unfused gives a row per kernel on a GPU; on the CPU the fused
    kernel is refused with the reason, and a new process is told which kernel to load."""
    with pytest.raises(ValueError, match="attention 'fused' runs on a GPU only"):
        bench.run("tiny.en", workload="forced", tokens=2, repeats=1, peers=(), precision="float32",
                  attention=("unfused", "fused"))
    (name, code), = bench._startup_scripts("tiny.en", "gpu", [("bfloat16", "fused")], 5.0, None, 2, ())
    assert name == "maxwhisper (gpu, bfloat16, fused attention)"
    assert "load_model('tiny.en', device='gpu', precision='bfloat16', attention='fused')" in code


def test_random_weights_are_the_same_weights_for_every_system(model_cache):
    """--weights random (sizes no package carries, e.g. small): ours and the PyTorch
    peers run openai-whisper's seeded initialisation and produce the same tokens;
    CTranslate2, which needs a converted checkpoint, says why it cannot run."""
    from maxwhisper.spec import load_spec

    spec = load_spec("tiny.en")
    weights = peers.random_weights(spec)
    ours = peers.random_model(spec, weights, "cpu", "float32")
    tok = ours.tokenizer
    prompt = tok.sot_sequence + [tok.no_timestamps]
    mel = log_mel_spectrogram(bench.speech_audio(30.0), spec.audio)[None, :, : spec.audio.n_frames]
    mel = np.ascontiguousarray(mel, np.float32)
    got = peers.forced_maxwhisper(ours, mel, prompt, 6, tok.eot)
    model, torch = peers.openai_model(weights, spec)
    np.testing.assert_array_equal(peers.forced_openai(model, torch, torch.from_numpy(mel), prompt, 6, tok.eot), got)

    report = bench.run("tiny.en", weights="random", workload="forced", tokens=4, repeats=1, precision="float32",
                       peers=("openai-whisper", "faster-whisper"))
    rows = {r["system"]: r for r in report["rows"]}
    assert rows["maxwhisper (cpu, fp32, host loop)"]["tokens"] == rows["openai-whisper (PyTorch, cpu, fp32)"]["tokens"] == 4
    assert "random weights have none" in rows["CTranslate2"]["skipped"]
    assert report["weights"].startswith("random")
    with pytest.raises(ValueError, match="forced workload only"):
        bench.run("tiny.en", weights="random", workload="speech")


def test_random_weights_take_a_tokenizer_file(model_cache, tmp_path):
    """A machine without the weight packages (a GPU host, say) names a tokenizer.json."""
    from maxwhisper.registry import package_files
    from maxwhisper.tokenizer import TokenizerError

    copy = tmp_path / "tokenizer.json"
    copy.write_bytes(package_files("tiny.en")[1].read_bytes())
    report = bench.run("tiny.en", weights="random", workload="forced", tokens=2, repeats=1, precision="float32",
                       peers=(), tokenizer=str(copy))
    assert report["rows"][0]["tokens"] == 2
    with pytest.raises(TokenizerError, match="missing.json: tokenizer.json not found"):
        bench.run("tiny.en", weights="random", workload="forced", tokens=2, repeats=1, precision="float32",
                  peers=(), tokenizer=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="--tokenizer goes with --weights random"):
        bench.run("tiny.en", workload="forced", tokenizer=str(copy))


def test_the_step_parts_benchmark_builds_each_part_at_its_shapes():
    """benchmarks/step_parts.py: every part builds (no compile here) with the step's
    shapes in its inputs, and the cache alternatives give a grown cache."""
    from benchmarks import step_parts

    graphs = step_parts.parts(windows := 3, beams := 2, cached := 5, prefix := 7)
    assert len(graphs) == 11
    rows = windows * beams
    step = graphs["cache K or V: the step's, each layer reordered and grown in one gather, stack"]
    assert [int(d) for d in step.output_types[0].shape] == [step_parts.L, rows, cached + 1, step_parts.D]
    cache = graphs["cache K or V: reorder, grow each layer, stack (L,B,P,D)"]
    assert [int(d) for d in cache.inputs[0].tensor.shape] == [step_parts.L, rows, cached, step_parts.D]
    assert [int(d) for d in cache.output_types[0].shape] == [step_parts.L, rows, cached + 1, step_parts.D]
    other = graphs["cache K or V laid out (B,L,P,D): gather on axis 0, one concat"]
    assert [int(d) for d in other.output_types[0].shape] == [rows, step_parts.L, cached + 1, step_parts.D]
    attention = graphs["self-attention after the prefix (per layer)"]
    assert [int(d) for d in attention.inputs[3].tensor.shape] == [windows, prefix, step_parts.D]


def test_the_cross_attention_benchmark_builds_both_forms_at_a_steps_shapes():
    """benchmarks/cross_attention.py: the kernel and MAX's form build (no compile here)
    with a step's queries against 1500 keys, and give the queries' shape."""
    from benchmarks import cross_attention

    for kind in ("kernel", "max"):
        g = cross_attention.graph(kind, windows := 2, queries := 5, width := 384, n_head := 6)
        assert [int(d) for d in g.inputs[1].tensor.shape] == [windows, cross_attention.S, width]
        assert [int(d) for d in g.output_types[0].shape] == [windows, queries, width]


def test_the_rows_matmul_benchmark_builds_both_forms_at_a_steps_shapes():
    """benchmarks/rows_matmul.py: the kernel and MAX's product build (no compile here)
    for one row and for a step's many, with the product's shape."""
    from benchmarks import rows_matmul

    for kind in ("kernel", "max"):
        for rows in (1, 40):
            g = rows_matmul.graph(kind, rows, n_out := 1536, n_in := 384)
            assert [int(d) for d in g.inputs[1].tensor.shape] == [n_out, n_in]
            assert [int(d) for d in g.output_types[0].shape] == [rows, n_out]


def test_the_streaming_benchmark_counts_the_streams_that_hold_every_bound():
    from benchmarks.streaming import holding

    def row(n, median, p95, wer, offline=0.03):
        return dict(streams=n, median_s=median, p95_s=p95, wer=wer, offline_wer=offline)

    rows = [row(1, 1.9, 2.6, 0.03), row(2, 1.95, 4.2, 0.03), row(3, 2.1, 3.0, 0.03), row(4, 1.5, 3.0, 0.06),
            row(5, 2.0, 4.0, 0.045)]
    assert holding(rows) == [1, 5]
