"""`maxwhisper batch`: discovery, the results table, the local engine and the Ray engine
on a real local Ray cluster (one per test run), against `model.transcribe`."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from helpers import SPEECH_DIR, joined
from maxwhisper.batch import (Job, ResultsTable, Source, discover, run_local, write_parquet)
from maxwhisper.transcribe import TranscribeOptions
from maxwhisper.writers import FORMATS

try:  # before any model loads: pyarrow loaded after a MAX model has crashed reading Parquet
    import pyarrow.parquet as pq
except ImportError:
    pq = None

OPTIONS = TranscribeOptions(temperature=0.0)
JOB = Job(model="tiny.en", precision="float32", options=OPTIONS, formats=("txt", "json"))
CLIPS = ["01", "02", "03", "04", "05", "06"]
BAD = {"corrupt.wav": "not a readable audio file", "empty.wav": "not a readable audio file",
       "no-samples.wav": "the audio is empty (zero samples)"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """22 files in a tree: 18 copies of the committed clips, a 37 s file of four of them
    joined (two windows), random bytes, a 0-byte file and a WAV with no samples."""
    root = tmp_path_factory.mktemp("corpus")
    for k in range(3):
        folder = root / ("top" if k == 0 else f"deep/{k}")
        folder.mkdir(parents=True)
        for clip in CLIPS:
            (folder / f"{clip}-{k}.wav").write_bytes((SPEECH_DIR / f"{clip}.wav").read_bytes())
    sf.write(root / "long.wav", joined(["01", "02", "03", "04"])[0], 16000)
    (root / "corrupt.wav").write_bytes(np.random.default_rng(0).bytes(4000))
    (root / "empty.wav").write_bytes(b"")
    sf.write(root / "no-samples.wav", np.zeros(0, np.float32), 16000)
    (root / "notes.md").write_text("not audio: not discovered")
    return root


@pytest.fixture(scope="module")
def expected(tiny_en, corpus):
    """`model.transcribe` of each distinct file, by name: what every engine must give."""
    want = {clip: tiny_en.transcribe(str(SPEECH_DIR / f"{clip}.wav"), OPTIONS) for clip in CLIPS}
    want["long"] = tiny_en.transcribe(str(corpus / "long.wav"), OPTIONS)
    return want


def good_files(corpus: Path) -> list[Path]:
    return sorted(p for p in corpus.rglob("*.wav") if p.name not in BAD)


def rows_of(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "results.jsonl").read_text().splitlines()]


def check_complete(corpus: Path, output_dir: Path, expected: dict) -> list[dict]:
    """Every file in the table once; the good ones as `model.transcribe` has them, the
    bad ones failed with the reason; transcripts written where the tree says."""
    rows = rows_of(output_dir)
    by_path = {}
    for row in rows:
        assert row["path"] not in by_path, f"{row['path']} recorded twice"
        by_path[row["path"]] = row
    assert sorted(by_path) == sorted(str(p) for p in corpus.rglob("*.wav"))
    for path in good_files(corpus):
        row = by_path[str(path)]
        assert row["status"] == "ok" and row["error"] is None, row["error"]
        want = expected[path.stem.split("-")[0]]
        assert row["text"] == want["text"], path
        assert [s["tokens"] for s in row["segments"]] == [s["tokens"] for s in want["segments"]], path
        out = output_dir / path.parent.relative_to(corpus)
        assert json.loads((out / f"{path.stem}.json").read_text())["text"] == want["text"]
        assert row["outputs"] == [str(out / f"{path.stem}.txt"), str(out / f"{path.stem}.json")]
        assert row["duration"] == pytest.approx(sf.info(path).duration, abs=1e-3)
    for name, reason in BAD.items():
        row = by_path[str(corpus / name)]
        assert row["status"] == "error" and row["error"].startswith(f"{corpus / name}: {reason}"), row
        assert row["text"] is None and row["outputs"] == []
        assert not (output_dir / f"{Path(name).stem}.txt").exists()
    return rows


# --- discovery and the table (no model) -------------------------------------------------

def test_manifests_list_paths_relative_to_themselves(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"")
    (tmp_path / "list.txt").write_text("# comment\na.wav\n\n/abs/b.wav\nsub/c.wav\n")
    (tmp_path / "list.jsonl").write_text('{"path": "a.wav", "speaker": 1}\n{"file": "x"}\nnot json\n')
    (tmp_path / "list.csv").write_text("id,path\n1,a.wav\n2,\n")
    (tmp_path / "cols.csv").write_text("id,file\n1,a.wav\n")
    got = list(discover([tmp_path / n for n in ("list.txt", "list.jsonl", "list.csv", "cols.csv", "gone.wav")]))
    a = str(tmp_path / "a.wav")
    assert [(s.path, s.subdir) for s in got if s.problem is None] == [
        (a, ""), ("/abs/b.wav", ""), (str(tmp_path / "sub" / "c.wav"), "sub"), (a, ""), (a, "")]
    problems = [s.problem for s in got if s.problem is not None]
    assert problems == [f"{tmp_path / 'list.jsonl'}:2: a JSONL manifest line needs a \"path\" key",
                        f"{tmp_path / 'list.jsonl'}:3: not JSON (Expecting value)",
                        f"{tmp_path / 'list.csv'}:3: expected a path, found ''",
                        f"{tmp_path / 'cols.csv'}: a CSV manifest needs a 'path' column, found columns ['id', 'file']",
                        f"{tmp_path / 'gone.wav'}: input not found"]


def test_ten_thousand_files_are_discovered_in_constant_memory(tmp_path):
    """Discovery holds one directory listing per level, never the list of files: its
    peak over 10,000 files is a small fraction of what the list of them takes."""
    for d in range(100):
        folder = tmp_path / f"{d:03d}"
        folder.mkdir()
        for f in range(100):
            (folder / f"{f:03d}.wav").touch()
    tracemalloc.start()
    count = sum(1 for _ in discover([tmp_path]))
    streamed = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    listed = list(discover([tmp_path]))
    held = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == len(listed) == 10_000 and listed[0].subdir
    assert streamed < 64 * 1024 and streamed < held / 20, (streamed, held)


def test_table_cuts_a_half_written_row_and_can_drop_errors(tmp_path):
    rows = [dict(key="k1", status="ok"), dict(key="k2", status="error")]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"key": "k3", "sta')
    with ResultsTable(tmp_path) as table:
        assert table.done == {"k1", "k2"}
        assert not table.append(dict(key="k1", status="ok")), "a key has one row"
    assert (tmp_path / "results.jsonl").read_text().splitlines() == [json.dumps(r) for r in rows]
    with ResultsTable(tmp_path, retry_errors=True) as table:
        assert table.done == {"k1"}
    assert rows_of(tmp_path) == rows[:1]


@pytest.mark.parametrize("text,kept", [("a\nbb\ncccccccccc", "a\nbb\n"), ("a\nbb\n", "a\nbb\n"),
                                       ("cccccccccc", ""), ("", "")])
def test_partial_line_is_found_past_a_read_block(tmp_path, text, kept):
    from maxwhisper.batch import _cut_partial_line

    path = tmp_path / "t.jsonl"
    path.write_text(text)
    _cut_partial_line(path, chunk=3)
    assert path.read_text() == kept


# --- the local engine -------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_run(tiny_en, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    with ResultsTable(out) as table:
        tally = run_local(tiny_en, [corpus], out, JOB, batch_size=4, table=table, quiet=True)
    return out, tally


def test_local_engine_equals_transcribe_and_records_the_bad_files(corpus, expected, local_run):
    out, tally = local_run
    check_complete(corpus, out, expected)
    assert (tally.ok, tally.failed, tally.skipped) == (19, 3, 0)


def test_local_rerun_does_no_work(tiny_en, corpus, local_run, monkeypatch):
    out, _ = local_run
    before = (out / "results.jsonl").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.txt")}
    monkeypatch.setattr(tiny_en.runtime, "encode", lambda mel: pytest.fail("a rerun ran the encoder"))
    with ResultsTable(out) as table:
        tally = run_local(tiny_en, [corpus], out, JOB, batch_size=4, table=table, quiet=True)
    assert (tally.ok, tally.failed, tally.skipped) == (0, 0, 22)
    assert (out / "results.jsonl").read_text() == before
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.txt")} == stamps


def test_other_options_or_changed_content_are_transcribed_again(tiny_en, tmp_path):
    """The key is path, content and job: a file edited in place, or the same file
    under other options, is not taken as done."""
    clip = tmp_path / "clip.wav"
    clip.write_bytes((SPEECH_DIR / "02.wav").read_bytes())
    with ResultsTable(tmp_path) as table:
        assert run_local(tiny_en, [clip], tmp_path, JOB, batch_size=2, table=table, quiet=True).ok == 1
    clip.write_bytes((SPEECH_DIR / "05.wav").read_bytes())
    srt = Job(model="tiny.en", precision="float32", options=OPTIONS, formats=("srt",))
    with ResultsTable(tmp_path) as table:
        assert run_local(tiny_en, [clip], tmp_path, JOB, batch_size=2, table=table, quiet=True).ok == 1
        assert run_local(tiny_en, [clip], tmp_path, srt, batch_size=2, table=table, quiet=True).ok == 1
    texts = [r["text"] for r in rows_of(tmp_path)]
    assert texts[1] == texts[2] != texts[0] and (tmp_path / "clip.srt").is_file()


def test_a_file_that_breaks_its_batch_fails_alone(tiny_en, expected):
    """Samples the model cannot take (text, as no loader gives) fail the batch they are
    in; its other files are transcribed alone, and only that one fails."""
    from maxwhisper.audio import load_audio
    from maxwhisper.batch import Loaded, transcribe_loaded

    def item(name, samples):
        return Loaded(Source(name), "sha", name, samples=samples, duration=1.0)

    good = [item(clip, load_audio(str(SPEECH_DIR / f"{clip}.wav"))) for clip in ("02", "05")]
    bad = item("bad", "not samples")
    got = {i.key: (result, error) for i, result, error in
           transcribe_loaded(tiny_en, [good[0], bad, good[1]], OPTIONS, batch_size=3)}
    assert sorted(got) == ["02", "05", "bad"]
    assert got["bad"] == (None, "ValueError: could not convert string to float: 'not samples'")
    for clip in ("02", "05"):
        assert got[clip][1] is None and got[clip][0]["text"] == expected[clip]["text"]


def test_parquet_table_holds_the_rows(local_run):
    if pq is None:
        pytest.skip("the Parquet table needs pyarrow (the ray extra): pip install -e '.[ray]'")
    out, _ = local_run
    table = pq.read_table(write_parquet(out / "results.jsonl")).to_pylist()
    rows = rows_of(out)
    assert [(r["path"], r["status"], r["text"]) for r in table] == [(r["path"], r["status"], r["text"]) for r in rows]
    assert [[s["tokens"] for s in r["segments"] or []] for r in table] == [
        [s["tokens"] for s in r["segments"] or []] for r in rows]


def test_cli_batch_writes_every_format_and_exits_2_on_a_bad_file(tiny_en, corpus, tmp_path, monkeypatch, capsys):
    import maxwhisper.model
    from maxwhisper.cli import main

    monkeypatch.setattr(maxwhisper.model, "load_model", lambda *a, **k: tiny_en)
    manifest = tmp_path / "files.csv"
    manifest.write_text(f"path\n{corpus / 'top' / '03-0.wav'}\n{corpus / 'corrupt.wav'}\n")
    rc = main(["batch", str(manifest), "-o", str(tmp_path / "out"), "-f", "all", "--beam-size", "1",
               "--temperature", "0", "--device", "cpu", "--quiet"])
    assert rc == 2
    assert "1 transcribed, 1 failed, 0 already done" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["results.jsonl"] + [f"03-0.{f}" for f in FORMATS])
    assert main(["batch", str(manifest), "-o", str(tmp_path / "out"), "--address", "x"]) == 2
    assert "--address and --workers are for --engine ray" in capsys.readouterr().err


# --- the Ray engine, on a real local cluster ---------------------------------------------

@pytest.fixture(scope="session")
def ray_cluster(tiny_en):
    """Two CPUs. Workers start from this process's environment: the test cache
    (`MAXWHISPER_CACHE`, where `tiny_en` converted the weights) and this checkout."""
    ray = pytest.importorskip("ray", reason="the Ray engine needs the ray extra: pip install -e '.[ray]'")
    root = str(Path(__file__).resolve().parents[1])
    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": root, "MAXWHISPER_CACHE": os.environ["MAXWHISPER_CACHE"]}})
    yield ray
    ray.shutdown()


def run_on_ray(corpus: Path, out: Path, batch_size: int = 4):
    from maxwhisper.batch_ray import run_ray

    with ResultsTable(out) as table:
        return run_ray([corpus], out, JOB, table=table, device="cpu", workers=1, batch_size=batch_size, quiet=True)


@pytest.fixture(scope="module")
def ray_run(ray_cluster, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray")
    return out, run_on_ray(corpus, out)


def test_ray_engine_equals_local_engine_and_transcribe(corpus, expected, ray_run, local_run):
    out, tally = ray_run
    rows = check_complete(corpus, out, expected)
    assert (tally.ok, tally.failed, tally.skipped) == (19, 3, 0)
    local = {r["path"]: r for r in rows_of(local_run[0])}
    for row in rows:
        other = local[row["path"]]
        assert [row[k] for k in ("key", "status", "error", "text", "duration")] == [
            other[k] for k in ("key", "status", "error", "text", "duration")]
        exact = ("id", "seek", "start", "end", "text", "tokens", "temperature")
        assert [[s[k] for k in exact] for s in row["segments"] or []] == [
            [s[k] for k in exact] for s in other["segments"] or []]
        # Other batch neighbours: the same tokens, logits to float rounding (transcribe_many).
        assert [s["avg_logprob"] for s in row["segments"] or []] == pytest.approx(
            [s["avg_logprob"] for s in other["segments"] or []], rel=1e-4)
    for path in good_files(corpus):
        rel = path.parent.relative_to(corpus) / f"{path.stem}.txt"
        assert (out / rel).read_bytes() == (local_run[0] / rel).read_bytes()
    assert not list(out.glob(".pending-*")), "the lists of pending files are removed"


def test_ray_rerun_does_no_work(corpus, ray_run):
    out, _ = ray_run
    before = (out / "results.jsonl").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.txt")}
    tally = run_on_ray(corpus, out)
    assert (tally.ok, tally.failed, tally.skipped) == (0, 0, 22)
    assert (out / "results.jsonl").read_text() == before
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.txt")} == stamps


def _transcriber_pids() -> set[int]:
    """Processes of the model actors (Ray titles them after the class)."""
    pids = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmdline = Path(entry.path, "cmdline").read_bytes()
            except OSError:
                continue
            if b"Transcriber" in cmdline:
                pids.add(int(entry.name))
    return pids


def test_killed_actor_has_its_files_retried_and_each_file_done_once(ray_cluster, corpus, expected, tmp_path):
    """The model actor is killed (SIGKILL) once the first transcripts are written:
    Ray restarts it and retries its batch, and the table still has every file once."""
    seen: dict[str, object] = {"killed": None, "written_at_kill": None, "after": set()}
    stop = threading.Event()

    def killer():
        while not stop.is_set():
            pids = _transcriber_pids()
            written = len(list(tmp_path.rglob("*.txt")))
            if seen["killed"] is None and pids and written:
                pid = min(pids)
                os.kill(pid, signal.SIGKILL)
                seen["killed"], seen["written_at_kill"] = pid, written
            elif seen["killed"] is not None:
                seen["after"] |= pids - {seen["killed"]}
            time.sleep(0.05)

    watcher = threading.Thread(target=killer, daemon=True)
    watcher.start()
    try:
        tally = run_on_ray(corpus, tmp_path, batch_size=2)
    finally:
        stop.set()
        watcher.join()
    assert seen["killed"] is not None, "the actor was never seen running"
    assert seen["written_at_kill"] < 19, "the kill came before the job's end"
    assert seen["after"], "a new actor process took over"
    check_complete(corpus, tmp_path, expected)
    assert (tally.ok, tally.failed) == (19, 3)
