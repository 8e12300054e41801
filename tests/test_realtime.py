"""OpenAI Realtime transcription sessions, driven by the official `openai` client: every
server event parses as the client's own event models, the words come as deltas while
the audio is sent, each utterance completes with its whole transcript (within two words of
the offline one), and a client
event that cannot be taken gets an error event while the session goes on."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import soundfile as sf

from helpers import SPEECH_DIR, wer

openai = pytest.importorskip("openai", reason="the tests drive the server with the openai client: "
                                              "pip install -e '.[test]'")
websockets = pytest.importorskip("websockets", reason="the realtime endpoint needs the server extra: "
                                                    "pip install -e '.[server]'")
from openai.types.realtime import RealtimeServerEvent  # noqa: E402
from pydantic import TypeAdapter  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from test_server import _InProcess, _wait_ready  # noqa: E402

from maxwhisper.server import ServerSettings  # noqa: E402

KEY = "realtime-key"
SERVER_EVENT = TypeAdapter(RealtimeServerEvent)


@pytest.fixture(scope="module")
def server(tiny_en):
    s = _InProcess(ServerSettings(model="tiny.en", max_batch=8, api_key=KEY), lambda: tiny_en)
    _wait_ready(s.url)
    yield s
    s.close()


@pytest.fixture(scope="module")
def offline(tiny_en):
    return {name: tiny_en.transcribe(str(SPEECH_DIR / f"{name}.wav"), temperature=0.0)["text"].strip()
            for name in ("01", "02")}


def _clip(name: str, rate: int) -> np.ndarray:
    import soxr

    audio, sr = sf.read(SPEECH_DIR / f"{name}.wav", dtype="float32")
    return soxr.resample(audio, sr, rate).astype(np.float32)


def _pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def _session(server, **query):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    return client.realtime.connect(model="whisper-1", extra_query={"intent": "transcription", **query})


def _send_audio(conn, data: bytes, chunk: int) -> None:
    for i in range(0, len(data), chunk):
        conn.input_audio_buffer.append(audio=base64.b64encode(data[i: i + chunk]).decode())


def _until(conn, kind: str, events: list) -> object:
    """Events up to the first of `kind`, each checked against the client's models."""
    for event in conn:
        SERVER_EVENT.validate_python(event.to_dict())  # strict: every field the client declares
        events.append(event)
        if event.type == kind:
            return event
    raise AssertionError(f"the session closed before {kind}")


def test_the_openai_client_transcribes_a_live_session(server, offline):
    """24 kHz PCM in 100 ms appends, the server's VAD ending each utterance: the deltas of
    an item add up to its completed transcript, which is the clip's offline one."""
    with _session(server) as conn:
        created = conn.recv()
        assert created.type == "session.created" and created.session.type == "transcription"
        conn.session.update(session={"type": "transcription", "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": 24000},
            "transcription": {"model": "whisper-1", "language": "en"},
            "turn_detection": {"type": "server_vad", "threshold": 0.5, "silence_duration_ms": 800}}}})
        events: list = []
        updated = _until(conn, "session.updated", events)
        assert updated.session.audio.input.turn_detection.silence_duration_ms == 800
        silence = np.zeros(int(1.5 * 24000), np.float32)
        for name in ("01", "02"):
            _send_audio(conn, _pcm16(np.concatenate([_clip(name, 24000), silence])), 4800)
        completed = [_until(conn, "conversation.item.input_audio_transcription.completed", events)]
        completed.append(_until(conn, "conversation.item.input_audio_transcription.completed", events))
    kinds = [e.type for e in events]
    for done, name in zip(completed, ("01", "02")):
        item = [e for e in events if getattr(e, "item_id", None) == done.item_id]
        order = [e.type for e in item]
        assert order[0] == "input_audio_buffer.speech_started", order
        assert "input_audio_buffer.speech_stopped" in order and "input_audio_buffer.committed" in order
        deltas = "".join(e.delta for e in item if e.type.endswith("transcription.delta"))
        assert deltas.strip() == done.transcript, (deltas, done.transcript)
        assert wer(offline[name], done.transcript) <= 0.15, (done.transcript, offline[name])
        assert done.usage.type == "duration" and 3 < done.usage.seconds < 12
    assert kinds.count("input_audio_buffer.speech_started") == 2, kinds
    starts = [e.audio_start_ms for e in events if e.type == "input_audio_buffer.speech_started"]
    first_len = len(_clip("01", 16000)) / 16 + 1500
    assert 0 <= starts[0] < 1000 and first_len <= starts[1] < first_len + 1000, starts


def test_manual_turns_and_g711(server, tiny_en):
    """turn_detection null: an utterance ends when the client commits it (a pause alone
    does not end it); mu-law audio at 8 kHz, as telephony sends it."""
    audioop = pytest.importorskip("audioop", reason="the mu-law reference encoder is the standard library's "
                                                    "audioop (Python before 3.13)")
    manual = {"type": "transcription", "audio": {"input": {"format": {"type": "audio/pcmu"}, "turn_detection": None}}}
    with _session(server) as conn:
        conn.recv()
        conn.session.update(session=manual)
        events: list = []
        _until(conn, "session.updated", events)
        audio = np.concatenate([_clip("01", 8000), np.zeros(16000, np.float32)])
        _send_audio(conn, audioop.lin2ulaw(_pcm16(audio), 2), 800)
        conn.session.update(session=manual)  # answered after every append is taken
        before: list = []
        _until(conn, "session.updated", before)
        assert "input_audio_buffer.committed" not in [e.type for e in before], "a pause ended the turn"
        conn.input_audio_buffer.commit()
        done = _until(conn, "conversation.item.input_audio_transcription.completed", events)
        item = _until(conn, "conversation.item.done", events)
        kinds = [e.type for e in before + events]
        assert "input_audio_buffer.committed" in kinds and "conversation.item.added" in kinds
        assert not {"input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped"} & set(kinds), \
            "no VAD events without turn detection"
        assert item.item.id == done.item_id and item.item.content[0].transcript == done.transcript
        # Against the offline transcript of the same narrowband audio (telephony loses words).
        import soxr

        heard = np.frombuffer(audioop.ulaw2lin(audioop.lin2ulaw(_pcm16(audio), 2), 2), "<i2") / 32768.0
        reference = tiny_en.transcribe(soxr.resample(heard.astype(np.float32), 8000, 16000), temperature=0.0)["text"]
        assert wer(reference, done.transcript) <= 0.15, (done.transcript, reference)
        conn.input_audio_buffer.commit()  # nothing left to commit
        error = _until(conn, "error", events)
        assert error.error.code == "input_audio_buffer_commit_empty"


@pytest.mark.parametrize("event, param", [
    ({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcm", "rate": 16000}}}}}, "session.audio.input.format.rate"),
    ({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/opus"}}}}}, "session.audio.input.format.type"),
    ({"type": "session.update", "session": {"type": "realtime"}}, "session.type"),
    ({"type": "transcription_session.update", "session": {"input_audio_format": "pcm16"}},
     "session.input_audio_format"),
    ({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "turn_detection": {"type": "server_vad", "threshold": 1.5}}}}}, "session.audio.input.turn_detection.threshold"),
    ({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "turn_detection": {"type": "semantic_vad"}}}}}, "session.audio.input.turn_detection.type"),
    ({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "transcription": {"language": "fr"}}}}}, "session.audio.input.transcription.language"),
    ({"type": "input_audio_buffer.append", "audio": "not base64!"}, "audio"),
    ({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\x01\x02\x03").decode()}, "audio"),
    ({"type": "response.create"}, "type"),
    ("[" * 100_000, None),
])
def test_a_bad_client_event_gets_an_error_naming_its_field(server, event, param):
    url = f"ws://127.0.0.1:{server.port}/v1/realtime?intent=transcription&api_key={KEY}"
    with connect(url, open_timeout=30) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "session.created"
        ws.send(json.dumps({"event_id": "evt_1", **event}) if isinstance(event, dict) else event)
        error = json.loads(ws.recv(timeout=30))
        SERVER_EVENT.validate_python(error)
        assert error["type"] == "error" and error["error"]["param"] == param, error
        assert error["error"]["event_id"] == ("evt_1" if isinstance(event, dict) else None)
        ws.send(b"\x00\x01")  # binary frames are no client event either
        assert json.loads(ws.recv(timeout=30))["error"]["code"] == "invalid_event"
        ws.send(json.dumps({"type": "input_audio_buffer.clear"}))  # the session goes on
        assert json.loads(ws.recv(timeout=30))["type"] == "input_audio_buffer.cleared"


@pytest.mark.parametrize("query, code", [("intent=transcription", 1008),
                                         (f"intent=conversation&api_key={KEY}", 1003)])
def test_a_session_without_the_key_or_for_conversation_is_refused(server, query, code):
    with connect(f"ws://127.0.0.1:{server.port}/v1/realtime?{query}", open_timeout=30) as ws:
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            ws.recv(timeout=30)
    assert closed.value.rcvd.code == code and closed.value.rcvd.reason


def test_commits_back_to_back_and_a_clear_after_a_commit_keep_every_utterance(server, offline):
    """Manual turns sent faster than they decode: the second commit waits for the first
    utterance's transcript, and a clear right after a commit leaves the committed audio."""
    with _session(server) as conn:
        conn.recv()
        conn.session.update(session={"type": "transcription", "audio": {"input": {"turn_detection": None}}})
        events: list = []
        _until(conn, "session.updated", events)
        silence = np.zeros(12000, np.float32)
        _send_audio(conn, _pcm16(np.concatenate([_clip("01", 24000), silence])), 4800)
        conn.input_audio_buffer.commit()
        conn.input_audio_buffer.clear()
        _send_audio(conn, _pcm16(np.concatenate([_clip("02", 24000), silence])), 4800)
        conn.input_audio_buffer.commit()
        done = [_until(conn, "conversation.item.input_audio_transcription.completed", events) for _ in range(2)]
    assert done[0].item_id != done[1].item_id
    for d, name in zip(done, ("01", "02")):
        assert wer(offline[name], d.transcript) <= 0.15, (d.transcript, offline[name])
    assert "error" not in [e.type for e in events]
