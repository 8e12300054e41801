"""Streaming with the real model: committed words are never taken back, the committed
text matches the offline transcript closely, and the command line replays files and
reads raw PCM from stdin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import SPEECH_DIR, joined, normalized, wer
from maxwhisper.cli import main
from maxwhisper.streaming import StreamOptions, replay


def _chunks(audio: np.ndarray, seconds: float = 0.1):
    n = int(16000 * seconds)
    return [audio[i: i + n] for i in range(0, audio.size, n)]


@pytest.fixture(scope="module")
def conversation():
    return joined(["01", "02", "03"], gap_s=1.0)


@pytest.fixture(scope="module", params=[None, 1.0], ids=["agreement", "commit-after-1s"])
def streamed(tiny_en, conversation, request):
    audio, _ = conversation
    options = StreamOptions(commit_after_seconds=request.param)
    return [e for e, _ in replay(tiny_en, _chunks(audio), options, speed=None)]


def test_committed_words_are_never_taken_back(streamed):
    """The final text is exactly the committed pieces in order, and every committed word
    is one the final transcript holds at the same place."""
    committed = [w for e in streamed if e.type == "committed" for w in e.words]
    (final,) = [e for e in streamed if e.type == "final"]
    assert streamed[-1] is final
    assert list(final.words) == committed
    assert final.text == "".join(w.word for w in committed).strip()
    assert all(a.start <= b.start for a, b in zip(committed, committed[1:])), "words run forward in time"


def test_committed_text_is_close_to_the_offline_transcript(tiny_en, streamed, conversation):
    audio, reference = conversation
    (final,) = [e for e in streamed if e.type == "final"]
    offline = tiny_en.transcribe(audio, temperature=0.0)["text"]
    assert wer(reference, final.text) <= wer(reference, offline) + 0.2
    assert len(normalized(final.text).split()) >= 0.8 * len(normalized(reference).split())


def test_interim_text_runs_ahead_of_the_committed(streamed):
    interims = [e for e in streamed if e.type == "interim" and e.text]
    assert interims and all(e.words for e in interims)


def test_the_cli_replays_a_file_as_json_lines(tiny_en, monkeypatch, capsys):
    import maxwhisper.model

    monkeypatch.setattr(maxwhisper.model, "load_model", lambda *a, **k: tiny_en)
    assert main(["stream", str(SPEECH_DIR / "03.wav"), "--speed", "20", "--events", "jsonl"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {line["type"] for line in lines} <= {"interim", "committed", "final"}
    assert lines[-1]["type"] == "final" and "Wednesday" in lines[-1]["text"]
    emitted = [line["emitted"] for line in lines]
    assert emitted == sorted(emitted) and all(set(w) == {"word", "start", "end"} for line in lines
                                               for w in line["words"])


def test_the_cli_reads_raw_pcm_from_stdin(tmp_path):
    import soundfile as sf

    audio, _ = sf.read(SPEECH_DIR / "03.wav", dtype="int16")
    out = subprocess.run([sys.executable, "-m", "maxwhisper.cli", "stream", "-", "--model", "tiny.en",
                          "--device", "cpu"], input=audio.astype("<i2").tobytes(), capture_output=True,
                         timeout=600, env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent)))
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert "Wednesday" in out.stdout.decode()


@pytest.mark.parametrize("flags, message", [(["--speed", "0"], "--speed must be > 0"),
                                            (["--update-seconds", "0"], "update_seconds must lie in"),
                                            (["--commit-after-seconds", "-1"], "commit_after_seconds must lie in")])
def test_the_cli_refuses_bad_stream_flags(flags, message, capsys):
    assert main(["stream", str(SPEECH_DIR / "03.wav"), *flags]) == 2
    assert message in capsys.readouterr().err


def test_the_cli_names_a_bad_file_before_loading(tmp_path, capsys):
    (tmp_path / "x.wav").write_bytes(b"nope")
    assert main(["stream", str(tmp_path / "x.wav")]) == 2
    assert "x.wav" in capsys.readouterr().err
