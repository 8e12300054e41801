"""Live streams over the server's WebSocket: words come back as the audio is sent,
several streams at once share the model, and a client that sends the wrong thing (or
nothing) is told why while the others go on."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import soundfile as sf

from helpers import SPEECH_DIR, joined

websockets = pytest.importorskip("websockets", reason="the live endpoint needs the server extra: "
                                                    "pip install -e '.[server]'")
from websockets.sync.client import connect  # noqa: E402

from test_server import _InProcess, _wait_ready  # noqa: E402

from maxwhisper.server import ServerSettings  # noqa: E402
from maxwhisper.server import live as live_module  # noqa: E402

KEY = "live-key"


@pytest.fixture(scope="module")
def server(tiny_en):
    s = _InProcess(ServerSettings(model="tiny.en", max_batch=8, api_key=KEY), lambda: tiny_en)
    _wait_ready(s.url)
    s.ws = f"ws://127.0.0.1:{s.port}/v1/stream?api_key={KEY}"
    yield s
    s.close()


def _pcm16(path) -> bytes:
    audio, _ = sf.read(path, dtype="int16")
    return audio.astype("<i2").tobytes()


def _send_stream(url: str, pcm: bytes, frame_bytes: int = 3200, pace_s: float = 0.0, start=None) -> list[dict]:
    events = []
    with connect(url, open_timeout=30, close_timeout=30) as ws:
        ws.send(json.dumps(start or {"type": "start", "sample_rate": 16000, "format": "pcm16"}))
        assert json.loads(ws.recv(timeout=30)) == {"type": "ready"}
        done = threading.Event()

        def read():
            try:
                for message in ws:
                    events.append(json.loads(message))
            except websockets.exceptions.ConnectionClosed:
                pass
            done.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        for i in range(0, len(pcm), frame_bytes):
            ws.send(pcm[i: i + frame_bytes])
            if pace_s:
                time.sleep(pace_s)
        ws.send(json.dumps({"type": "stop"}))
        assert done.wait(300), "the stream never ended"
    return events


def _closed_with(url: str, *messages, wait: float = 30) -> tuple[int, str]:
    with connect(url, open_timeout=30) as ws:
        try:
            for m in messages:
                ws.send(m)
            while True:
                ws.recv(timeout=wait)
        except websockets.exceptions.ConnectionClosed as e:
            return e.rcvd.code, e.rcvd.reason
    raise AssertionError("the server did not close the socket")


def test_a_stream_gives_the_clips_words(server, tiny_en):
    events = _send_stream(server.ws, _pcm16(SPEECH_DIR / "03.wav"), pace_s=0.005)
    assert events[-1]["type"] == "final"
    committed = [w for e in events if e["type"] == "committed" for w in e["words"]]
    assert events[-1]["words"] == committed, "committed words are never taken back"
    offline = tiny_en.transcribe(str(SPEECH_DIR / "03.wav"), temperature=0.0)["text"]
    assert "Wednesday" in events[-1]["text"] and "station" in events[-1]["text"]
    assert len(events[-1]["text"].split()) >= len(offline.split()) - 2


def test_a_start_message_sets_the_stream_policy(server, monkeypatch):
    """Policy fields of the start message reach the stream's options."""
    made, original = [], live_module.Stream
    monkeypatch.setattr(live_module, "Stream", lambda *a, **k: made.append(a[2]) or original(*a, **k))
    start = {"type": "start", "sample_rate": 16000, "format": "pcm16", "commit_after_seconds": 0.8,
             "update_seconds": 0.5}
    events = _send_stream(server.ws, _pcm16(SPEECH_DIR / "03.wav"), pace_s=0.005, start=start)
    assert made[-1].commit_after_seconds == 0.8 and made[-1].update_seconds == 0.5
    assert "Wednesday" in events[-1]["text"]
    committed = [w for e in events if e["type"] == "committed" for w in e["words"]]
    assert events[-1]["words"] == committed, "committed words are never taken back"


def test_concurrent_streams_share_the_model_and_get_their_own_words(server):
    clips = {"01": "computers", "03": "Wednesday", "04": "children", "06": "library"}
    results = {}

    def run(name):
        results[name] = _send_stream(server.ws, _pcm16(SPEECH_DIR / f"{name}.wav"), pace_s=0.01)

    threads = [threading.Thread(target=run, args=(n,)) for n in clips]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    for name, word in clips.items():
        assert results[name][-1]["type"] == "final" and word in results[name][-1]["text"], name
    metrics = dict(line.rsplit(" ", 1) for line in __import__("httpx").get(f"{server.url}/metrics").text.splitlines()
                   if line.startswith("maxwhisper_batch_windows_"))
    steps, windows = float(metrics["maxwhisper_batch_windows_count"]), float(metrics["maxwhisper_batch_windows_sum"])
    assert windows > steps, "some steps encoded several streams' windows together"


@pytest.mark.parametrize("messages, reason", [
    (["not json"], "must be JSON"),
    (["[" * 100_000], "must be JSON"),
    ([json.dumps({"type": "start"}), "[" * 100_000], 'must be {"type": "stop"}'),
    ([json.dumps({"type": "hello"})], "first message must be"),
    ([json.dumps({"type": "start", "sample_rate": 44100})], "sample_rate must be 16000"),
    ([json.dumps({"type": "start", "format": "mp3"})], "format must be one of"),
    ([json.dumps({"type": "start", "commit_after_seconds": -1})], "commit_after_seconds must lie in"),
    ([json.dumps({"type": "start", "update_seconds": "soon"})], "update_seconds must lie in"),
    ([json.dumps({"type": "start", "language": "fr"})], "language 'fr'"),
    ([json.dumps({"type": "start"}), b"\x01\x02\x03"], "does not hold whole pcm16 samples"),
    ([json.dumps({"type": "start", "format": "float32"}), np.full(8, np.nan, "<f4").tobytes()], "finite samples"),
    ([json.dumps({"type": "start"}), "garbage"], 'must be {"type": "stop"}'),
])
def test_bad_messages_close_with_a_reason(server, messages, reason):
    code, why = _closed_with(server.ws, *messages)
    assert code == 1003 and reason in why


def test_a_missing_key_is_refused(server):
    code, why = _closed_with(f"ws://127.0.0.1:{server.port}/v1/stream", json.dumps({"type": "start"}))
    assert code == 1008 and "API key" in why


def test_a_silent_client_is_closed_and_the_others_go_on(server, monkeypatch):
    monkeypatch.setattr(live_module, "IDLE_S", 1.0)
    results = {}
    other = threading.Thread(target=lambda: results.update(
        e=_send_stream(server.ws, _pcm16(SPEECH_DIR / "03.wav"), pace_s=0.01)))
    other.start()
    code, why = _closed_with(server.ws, json.dumps({"type": "start"}))
    other.join(600)
    assert code == 1003 and "no audio for 1 s" in why
    assert "Wednesday" in results["e"][-1]["text"]


def test_a_client_that_vanishes_mid_stream_harms_no_one(server):
    pcm = _pcm16(SPEECH_DIR / "01.wav")
    with connect(server.ws, open_timeout=30) as ws:
        ws.send(json.dumps({"type": "start"}))
        ws.recv(timeout=30)
        for i in range(0, len(pcm) // 2, 3200):
            ws.send(pcm[i: i + 3200])
        ws.socket.close()  # gone without a close handshake
    events = _send_stream(server.ws, _pcm16(SPEECH_DIR / "03.wav"))
    assert "Wednesday" in events[-1]["text"]


def test_the_page_is_served(server):
    import httpx

    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "getUserMedia" in page.text and "/v1/stream" in page.text


def test_audio_sent_during_a_decoding_goes_into_the_next_one(server, monkeypatch):
    """A stream whose audio comes faster than it decodes (a busy server) is decoded less
    often, over all the audio that has come, instead of one second at a time with the
    rest queueing behind: a clip sent at once takes a few decodings, not one a second."""
    from maxwhisper.streaming import Stream

    sizes = []
    request = Stream.request

    def counted(self):
        got = request(self)
        sizes.append(None if got is None else len(got.audio))
        return got

    monkeypatch.setattr(Stream, "request", counted)
    pcm = _pcm16(SPEECH_DIR / "03.wav")
    events = _send_stream(server.ws, pcm)
    assert "Wednesday" in events[-1]["text"] and "station" in events[-1]["text"]
    seconds = len(pcm) / 2 / 16000
    assert seconds > 7 and len(sizes) <= 3, (seconds, sizes)
