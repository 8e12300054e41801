"""The kernels precompiled once into a package in the cache (kernel_package.py): built
on first use, read afterwards, built anew when a source changes, and a source the Mojo
compiler refuses is an error that names the folder and the compiler's message."""

from __future__ import annotations

import shutil

import pytest

from maxwhisper import kernel_package as kp


@pytest.fixture
def sources(tmp_path):
    copy = tmp_path / "kernels"
    shutil.copytree(kp.KERNELS, copy)
    return copy


@pytest.fixture(autouse=True)
def no_kernels_folder(monkeypatch):
    """The packages in the cache, as by default (the test run names a folder of its own)."""
    monkeypatch.delenv("MAXWHISPER_KERNELS", raising=False)


def test_built_once_then_read_and_rebuilt_when_a_source_changes(sources, tmp_path, monkeypatch):
    monkeypatch.setenv("MAXWHISPER_CACHE", str(tmp_path / "cache"))
    first = kp.kernel_package(sources)
    assert first.is_file() and first.suffix == ".mojoc" and first.parent == tmp_path / "cache" / "kernels"
    built = first.stat().st_mtime_ns
    kp._package.cache_clear()  # a new process: the file is found, not built again
    assert kp.kernel_package(sources) == first and first.stat().st_mtime_ns == built
    with open(sources / "dot_bf16.mojo", "a") as f:
        f.write("\n# an edit\n")
    kp._package.cache_clear()
    second = kp.kernel_package(sources)
    assert second != first and second.is_file() and first.is_file()
    assert not list(second.parent.glob(".staging*"))


def test_a_source_the_compiler_refuses_names_the_folder(sources, tmp_path, monkeypatch):
    monkeypatch.setenv("MAXWHISPER_CACHE", str(tmp_path / "cache"))
    (sources / "dot_bf16.mojo").write_text("def broken(:\n")
    with pytest.raises(kp.KernelBuildError, match="refused the kernels in .*kernels") as e:
        kp.kernel_package(sources)
    assert "dot_bf16.mojo" in str(e.value)
    assert not list((tmp_path / "cache" / "kernels").glob("*.mojoc"))


def test_an_unwritable_cache_falls_back_to_the_sources(sources, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("MAXWHISPER_CACHE", str(blocker))  # a file where the cache folder should be
    assert kp.kernel_package(sources) == sources


def test_maxwhisper_kernels_names_the_folder(sources, tmp_path, monkeypatch):
    monkeypatch.setenv("MAXWHISPER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MAXWHISPER_KERNELS", str(tmp_path / "kept"))
    built = kp.kernel_package(sources)
    assert built.parent == tmp_path / "kept" and built.is_file()
    assert not (tmp_path / "cache" / "kernels").exists()
