"""Fixtures and the end-of-run summary tables; the helpers themselves are in helpers.py."""

from __future__ import annotations

import pytest

from helpers import PARITY_ROWS, PRECISION_ROWS, WER_ROWS, WORD_ROWS, real_model


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """A private cache (converted weights, compiled models) for the whole test run, so
    tests never depend on the user's, nor write to it. The precompiled kernels go to a
    folder of their own that outlives the run: the graphs hold its path, so MAX's compile
    cache serves them again in the next run (kernel_package.kernels_dir)."""
    import os
    import tempfile
    from pathlib import Path

    os.environ.setdefault("MAXWHISPER_KERNELS", str(Path(tempfile.gettempdir()) / f"maxwhisper-test-kernels-{os.getuid()}"))
    path = tmp_path_factory.mktemp("maxwhisper-cache")
    old = os.environ.get("MAXWHISPER_CACHE")
    os.environ["MAXWHISPER_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("MAXWHISPER_CACHE", None)
    else:
        os.environ["MAXWHISPER_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_en(model_cache):
    return real_model("tiny.en")


@pytest.fixture(scope="session")
def base_model(model_cache):
    return real_model("base")


def pytest_terminal_summary(terminalreporter):
    if PARITY_ROWS:
        tr = terminalreporter
        tr.section("layer-by-layer parity against openai-whisper (fp32, CPU)")
        tr.write_line(f"| {'model':<10} | {'stage':<34} | {'max abs err':>11} | {'rel err':>9} |")
        tr.write_line(f"|{'-' * 12}|{'-' * 36}|{'-' * 13}|{'-' * 11}|")
        for model, stage, a, r in PARITY_ROWS:
            tr.write_line(f"| {model:<10} | {stage:<34} | {a:11.3e} | {r:9.2e} |")
    _markdown(terminalreporter, "tiny.en word error rate on tests/data/speech (greedy, fallback on)",
              ["clip", "WER", "transcript"], [(c, f"{r:.1%}", t) for c, r, t in WER_ROWS])
    _markdown(terminalreporter, "word timestamps against faster-whisper (same weights, beam 5)",
              ["model", "clip", "words", "within 0.2 s", "median error", "max error"],
              [(m, c, n, f"{close:.0%}", f"{med:.3f} s", f"{worst:.3f} s") for m, c, n, close, med, worst in WORD_ROWS])
    _markdown(terminalreporter, "tiny.en in low precision against float32 (CPU)",
              ["precision", "check", "result"], PRECISION_ROWS)


def _markdown(tr, title: str, header: list[str], rows: list[tuple]) -> None:
    if rows:
        tr.section(title)
        for line in ([header, ["---"] * len(header)] + [list(map(str, r)) for r in rows]):
            tr.write_line("| " + " | ".join(line) + " |")


