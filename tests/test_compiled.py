"""Compiled models as files (compiled.py): written once, read back without compiling,
refused where they may not run, announced while they compile cold."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from max.driver import CPU
from max.graph import Module

from helpers import assert_prebuilt_is_built_now, get_spec, shared_compiled, shared_reference
from maxwhisper import compiled
from maxwhisper.builder import GraphOptions, select_graph

XEON = {"kind": "cpu", "machine": "x86_64", "model": "a", "flags": ["avx2", "avx512f", "sse4_2"]}


def test_a_file_fits_only_a_machine_that_has_every_instruction_it_was_built_with():
    assert compiled.fits(XEON, {**XEON, "model": "another", "flags": XEON["flags"] + ["amx_tile"]})
    assert not compiled.fits(XEON, {**XEON, "flags": ["avx2", "sse4_2"]})  # no AVX-512 here
    assert not compiled.fits(XEON, {**XEON, "machine": "aarch64"})
    assert not compiled.fits(XEON, {**XEON, "flags": []})  # unknown flags: never guess
    gpu = {"kind": "cuda", "arch": "sm_90a"}
    assert compiled.fits(gpu, dict(gpu)) and not compiled.fits(gpu, {**gpu, "arch": "sm_100a"})
    assert not compiled.fits(gpu, XEON)


class FakeArtifact:
    def __init__(self, seconds: float = 0.0):
        self.seconds = seconds

    def export_mef(self, path):
        with open(path, "wb") as f:
            f.write(b"MEF")


class FakeSession:
    """Counts compiles; a compile takes `seconds`."""

    def __init__(self, seconds: float = 0.0):
        self.compiles, self.seconds = 0, seconds

    def compile(self, module, custom_extensions=None):
        self.compiles += 1
        time.sleep(self.seconds)
        return FakeArtifact()


@pytest.fixture
def small_module():
    module = Module()
    select_graph(GraphOptions(), module)
    return module


def test_compiled_once_then_read_from_the_cache(small_module, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MAXWHISPER_CACHE", str(tmp_path))
    monkeypatch.setattr(compiled, "ANNOUNCE_AFTER_S", 0.01)
    reads = []
    monkeypatch.setattr(compiled, "read", lambda path: reads.append(path) or "artifact")
    session = FakeSession(seconds=0.2)
    with caplog.at_level(logging.INFO, logger="maxwhisper"):
        compiled.compile_module(session, small_module, "m-cpu", CPU())
    assert session.compiles == 1 and not reads
    notes = [r.getMessage() for r in caplog.records]
    assert any("compiling m-cpu" in n for n in notes) and any("compiled m-cpu in" in n for n in notes), notes
    path = compiled.mef_path(small_module, "m-cpu", CPU())
    about = json.loads(path.with_suffix(".json").read_text())
    assert path.read_bytes() == b"MEF" and about["module"] == compiled.module_hash(small_module)
    assert about["target"] == compiled.target(CPU())
    assert compiled.compile_module(session, small_module, "m-cpu", CPU()) == "artifact"
    assert session.compiles == 1 and reads == [path]


def test_a_quick_compile_says_nothing(small_module, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MAXWHISPER_CACHE", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="maxwhisper"):
        compiled.compile_module(FakeSession(), small_module, "m-cpu", CPU())
    assert not caplog.records


def test_an_unreadable_file_is_compiled_again(small_module, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MAXWHISPER_CACHE", str(tmp_path))
    path = compiled.mef_path(small_module, "m-cpu", CPU())
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a MEF")
    session = FakeSession()
    compiled.compile_module(session, small_module, "m-cpu", CPU())  # the real reader refuses the file
    assert session.compiles == 1 and path.read_bytes() == b"MEF"
    assert "unreadable compiled model" in caplog.text


def test_an_unwritable_cache_costs_a_compile_not_the_model(small_module, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("MAXWHISPER_CACHE", str(blocker))  # a file where the cache folder should be
    assert isinstance(compiled.compile_module(FakeSession(), small_module, "m-cpu", CPU()), FakeArtifact)
    assert "could not keep the compiled model" in caplog.text


def test_a_prebuilt_file_is_used_only_where_it_fits(small_module, tmp_path, monkeypatch):
    monkeypatch.setenv("MAXWHISPER_CACHE", str(tmp_path / "cache"))
    shipped = tmp_path / "prebuilt"
    shipped.mkdir()
    here = compiled.target(CPU())
    about = {"label": "m-cpu", "max": compiled.max_version(), "module": compiled.module_hash(small_module),
             "target": {**here, "flags": here["flags"][: len(here["flags"]) // 2]}}
    (shipped / "m.json").write_text(json.dumps(about))
    (shipped / "m.mef").write_bytes(b"MEF")
    assert compiled.prebuilt(small_module, "m-cpu", CPU(), shipped) == shipped / "m.mef"
    for wrong in ({"target": {**here, "flags": here["flags"] + ["a_flag_no_cpu_has"]}}, {"max": "0.0"},
                  {"module": "0" * 64}):
        (shipped / "m.json").write_text(json.dumps({**about, **wrong}))
        assert compiled.prebuilt(small_module, "m-cpu", CPU(), shipped) is None, wrong


def test_a_new_process_with_an_empty_max_cache_reads_the_file_and_compiles_nothing(tmp_path):
    """The real thing: a model compiled in this test run, loaded by a new process whose
    MAX compile cache is empty, from maxwhisper's MEF file alone: same logits."""
    from safetensors.numpy import save_file

    rt = shared_compiled("micro-2dec", taps=True)
    weights = {k: v.numpy() for k, v in shared_reference("micro-2dec").state_dict().items()}
    save_file(weights, str(tmp_path / "w.safetensors"))
    mel = np.random.default_rng(5).standard_normal((1, 80, 3000)).astype(np.float32)
    np.save(tmp_path / "mel.npy", mel)
    _, ck, cv = rt.encode(mel)[:3]
    want = rt.decode(np.array([[50257, 50363]]), rt.start(ck, cv))[0]
    code = f"""
import logging, sys, numpy as np
sys.path.insert(0, {str(os.path.dirname(__file__))!r})
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from safetensors.numpy import load_file
from helpers import get_spec
from maxwhisper.runtime import CompiledWhisper
rt = CompiledWhisper(get_spec("micro-2dec"), load_file({str(tmp_path / "w.safetensors")!r}), device="cpu", taps=True)
_, ck, cv = rt.encode(np.load({str(tmp_path / "mel.npy")!r}))[:3]
np.save({str(tmp_path / "got.npy")!r}, rt.decode(np.array([[50257, 50363]]), rt.start(ck, cv))[0])
"""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "empty-max-cache")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiling" not in done.stderr, done.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "got.npy"), want)


def test_the_cli_shows_the_compile_notes_on_stderr(capsys):
    from maxwhisper.cli import main

    assert main(["spec", "show", "tiny"]) == 0
    logging.getLogger("maxwhisper").info("maxwhisper: compiling something")
    assert "maxwhisper: compiling something" in capsys.readouterr().err


def test_warmup_compiles_what_first_use_would(model_cache, capsys):
    from maxwhisper import load_model
    from maxwhisper.cli import main

    assert main(["warmup", "--model", "tiny.en", "--device", "cpu"]) == 0
    assert "tiny.en: compiled for cpu (float32)" in capsys.readouterr().out
    labels = {p.name.rsplit("-", 1)[0] for p in (model_cache / "compiled").glob("*.mef")}
    assert "tiny.en-alignment-float32-unfused-cpu" in labels  # word timestamps' decoder, ahead of use
    rt = load_model("tiny.en", device="cpu").runtime  # the graphs: from the cache or a prebuilt file
    module = Module()
    from maxwhisper.builder import decoder_graph, encoder_graph

    encoder_graph(rt.spec, rt.options, module)
    decoder_graph(rt.spec, rt.options, module=module)
    select_graph(rt.options, module)
    assert "tiny.en-graphs-float32-unfused-cpu" in labels or compiled.prebuilt(module, "", CPU()) is not None


def test_one_module_one_hash_whatever_was_built_before():
    """MLIR numbers ops with a counter that runs on over the process; the hash that names
    a file (and matches a prebuilt one) must not depend on it."""
    spec = get_spec("micro-2dec")

    def built() -> str:
        module = Module()
        from maxwhisper.builder import decoder_graph

        decoder_graph(spec, GraphOptions(), module=module)
        return compiled.module_hash(module)

    first = built()
    select_graph(GraphOptions(), Module())  # other graphs in between move the counter on
    assert built() == first


def test_a_module_has_one_hash_wherever_its_kernel_package_lies(tmp_path):
    """The graphs name their kernel package by path, and the path is the cache's: the
    hash that names a file (and matches a prebuilt one, which holds the compiled kernels)
    keeps the package's file name only, which its sources name."""
    import shutil

    from maxwhisper.kernel_package import kernel_package

    spec = get_spec("micro-2dec")
    here = kernel_package()
    elsewhere = tmp_path / "other" / here.name
    elsewhere.parent.mkdir()
    shutil.copy(here, elsewhere)
    renamed = tmp_path / "kernels_0123456789abcdef0123.mojoc"
    shutil.copy(here, renamed)

    def built(package) -> str:
        module = Module()
        from maxwhisper.builder import decoder_graph

        options = GraphOptions()
        assert options.float32_kernels  # the CPU's float32 step calls the kernels
        with pytest.MonkeyPatch.context() as m:
            m.setattr("maxwhisper.builder.kernel_package", lambda: package)
            decoder_graph(spec, options, module=module)
        assert str(package) in str(module.mlir_module)
        return compiled.module_hash(module)

    assert built(here) == built(elsewhere)
    assert built(renamed) != built(here)


def test_the_shipped_prebuilt_tiny_en_graphs_are_the_ones_built_now():
    """A change to the graphs (or to the kernels they load, whose package name they hold)
    must come with the prebuilt file rebuilt, else every fresh machine compiles them."""
    from maxwhisper.builder import decoder_graph, encoder_graph
    from maxwhisper.spec import load_spec

    spec, options = load_spec("tiny.en"), GraphOptions()

    def build(module):
        encoder_graph(spec, options, module)
        decoder_graph(spec, options, module=module)
        select_graph(options, module)

    assert_prebuilt_is_built_now("tiny.en-graphs-float32-unfused-cpu", build)
