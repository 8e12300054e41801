"""`maxwhisper serve`: the real server on uvicorn (127.0.0.1, a free port), spoken to
with the official `openai` client, and with httpx where a raw request is the point.
Every transcript must equal `model.transcribe` of the same file and options."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from helpers import SPEECH_DIR, audioeval_sample, joined

fastapi = pytest.importorskip("fastapi", reason="the server needs the server extra: pip install -e '.[server]'")
uvicorn = pytest.importorskip("uvicorn", reason="the server needs the server extra: pip install -e '.[server]'")
openai = pytest.importorskip("openai", reason="the tests speak through the official client: pip install -e '.[test]'")
httpx = pytest.importorskip("httpx")

from maxwhisper.server import ServerSettings, create_app  # noqa: E402
from maxwhisper.server.responses import SEGMENT_KEYS  # noqa: E402
from maxwhisper.writers import to_srt, to_vtt  # noqa: E402

KEY = "test-key"
ROOT = Path(__file__).resolve().parent.parent
CLIPS = [str(SPEECH_DIR / f"0{i}.wav") for i in range(1, 7)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, limit_s: float = 900) -> None:
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} never became ready")


class _InProcess:
    """uvicorn.Server in a thread of the test process, serving `create_app(...)`."""

    def __init__(self, settings: ServerSettings, load):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(settings, load=load)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        end = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < end, "uvicorn did not start"
            time.sleep(0.05)

    def client(self, **kw):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, **kw)

    def close(self):
        self.server.should_exit = True
        self.thread.join(60)


@pytest.fixture(scope="module")
def server(tiny_en):
    s = _InProcess(ServerSettings(model="tiny.en", max_batch=4, api_key=KEY, max_upload_mb=4), lambda: tiny_en)
    _wait_ready(s.url)
    yield s
    s.close()


@pytest.fixture(scope="module")
def gated(tiny_en):
    """A server whose model arrives when the test says so, with a short request timeout."""
    gate = threading.Event()

    def load():
        gate.wait(300)
        return tiny_en

    s = _InProcess(ServerSettings(model="tiny.en", max_batch=2, timeout_s=0.5), load)
    s.gate = gate
    yield s
    gate.set()
    s.close()


@pytest.fixture(scope="module")
def expected(tiny_en):
    """Offline transcripts, computed while no server decodes."""
    cache = {}

    def get(path, **options):
        key = (str(path), tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = tiny_en.transcribe(str(path), **options)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def long_wav(tmp_path_factory):
    """Four clips with pauses (about 37 s): more than one 30 s window."""
    import soundfile as sf

    audio, _ = joined(["01", "02", "03", "04"], gap_s=1.0)
    path = tmp_path_factory.mktemp("server") / "long.wav"
    sf.write(str(path), audio, 16000, subtype="PCM_16")
    return path


def _same_segments(got: list, want: list) -> None:
    assert [s["tokens"] for s in got] == [s["tokens"] for s in want]
    assert [s["text"] for s in got] == [s["text"] for s in want]
    for g, w in zip(got, want):
        assert set(g) >= set(SEGMENT_KEYS)
        assert (g["id"], g["seek"], g["temperature"]) == (w["id"], w["seek"], w["temperature"])
        assert (g["start"], g["end"]) == pytest.approx((w["start"], w["end"]), abs=0.011)
        # A lone row and a batch row round differently on the CPU, never by more than this.
        assert (g["avg_logprob"], g["compression_ratio"], g["no_speech_prob"]) == pytest.approx(
            (w["avg_logprob"], w["compression_ratio"], w["no_speech_prob"]), rel=1e-3, abs=1e-4)


def _post(server, path="/v1/audio/transcriptions", files=None, data=None, headers=None, **kw):
    headers = {"Authorization": f"Bearer {KEY}"} if headers is None else headers
    if files is None:
        files = {"file": ("01.wav", Path(CLIPS[0]).read_bytes(), "audio/wav")}
    kw.setdefault("timeout", 120)
    return httpx.post(f"{server.url}{path}", files=files, data={"model": "tiny.en", **(data or {})},
                      headers=headers, **kw)


def _error(response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert body["param"] == param
    return body


def _metric(server, name: str, labels: str = "") -> float:
    text = httpx.get(f"{server.url}/metrics").text
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


# --- responses, one format at a time ---------------------------------------------------

def test_json_and_text_equal_the_offline_transcript(server, expected):
    client = server.client()
    with open(CLIPS[1], "rb") as f:
        got = client.audio.transcriptions.create(file=f, model="whisper-1")
    assert got.text == expected(CLIPS[1])["text"].strip()
    with open(CLIPS[1], "rb") as f:
        text = client.audio.transcriptions.create(file=f, model="tiny.en", response_format="text")
    assert text.strip() == expected(CLIPS[1])["text"].strip()


def test_subtitles_are_the_writers_files(server, expected):
    client = server.client()
    want = expected(CLIPS[2])
    for fmt, render in (("srt", to_srt), ("vtt", to_vtt)):
        with open(CLIPS[2], "rb") as f:
            got = client.audio.transcriptions.create(file=f, model="tiny.en", response_format=fmt)
        assert got == render(want), fmt


def test_verbose_json_has_openais_shape(server, expected, long_wav):
    with open(long_wav, "rb") as f:
        got = server.client().audio.transcriptions.create(file=f, model="tiny.en", response_format="verbose_json",
                                                          prompt="Speech, coffee.", temperature=0.0)
    with_prompt = expected(long_wav, initial_prompt="Speech, coffee.")
    body = got.model_dump()
    assert (body["task"], body["language"]) == ("transcribe", "english")
    assert body["duration"] == pytest.approx(len(joined(["01", "02", "03", "04"])[0]) / 16000, abs=1e-3)
    assert body["text"] == with_prompt["text"].strip()
    assert len(body["segments"]) >= 2, "more than one window"
    _same_segments(body["segments"], with_prompt["segments"])
    assert body["usage"] == {"type": "duration", "seconds": body["duration"]}
    assert body.get("words") is None, "words only when asked for"


def test_word_timestamps_both_spellings(server, expected):
    want = expected(CLIPS[3], word_timestamps=True)
    want_words = [w for s in want["segments"] for w in s["words"]]
    with open(CLIPS[3], "rb") as f:
        got = server.client().audio.transcriptions.create(
            file=f, model="tiny.en", response_format="verbose_json", timestamp_granularities=["word", "segment"])
    raw = _post(server, files={"file": ("04.wav", Path(CLIPS[3]).read_bytes())},
                data={"response_format": "verbose_json", "timestamp_granularities": "word"}).json()
    for body in (got.model_dump(), raw):
        assert [w["word"] for w in body["words"]] == [w["word"] for w in want_words]
        assert [t for w in body["words"] for t in (w["start"], w["end"])] == pytest.approx(
            [t for w in want_words for t in (w["start"], w["end"])], abs=0.011)
        _same_segments(body["segments"], want["segments"])


def test_streaming_sends_text_window_by_window(server, expected, long_wav):
    want = expected(long_wav)
    with open(long_wav, "rb") as f:
        events = list(server.client().audio.transcriptions.create(file=f, model="tiny.en", stream=True))
    deltas = [e for e in events if e.type == "transcript.text.delta"]
    assert [e.type for e in events[-1:]] == ["transcript.text.done"]
    assert len(deltas) >= 2, "one event per decoded window"
    assert "".join(e.delta for e in deltas).strip() == events[-1].text == want["text"].strip()


def test_models_and_health(server):
    ids = [m.id for m in server.client().models.list()]
    assert ids[0] == "tiny.en" and "whisper-1" in ids
    assert server.client().models.retrieve("whisper-1").id == "whisper-1"
    assert httpx.get(f"{server.url}/health").json() == {"status": "ready", "model": "tiny.en"}


# --- batching across requests ----------------------------------------------------------

def test_concurrent_requests_share_steps_and_equal_their_own_transcripts(server, expected):
    """Six requests with three different sets of options, and one of broken audio, at
    once: each gets its own transcript, the broken one its own error."""
    cases = [(CLIPS[i], opts) for i, opts in enumerate(
        [{}, {}, {"initial_prompt": "Stella."}, {"word_timestamps": True}, {}, {"word_timestamps": True}])]
    wants = [expected(path, **opts) for path, opts in cases]
    steps_before = _metric(server, "maxwhisper_batch_windows_count")
    wide_before = steps_before - _metric(server, "maxwhisper_batch_windows_bucket", '{le="1.0"}')

    def ask(case):
        path, opts = case
        kw = dict(response_format="verbose_json")
        if "initial_prompt" in opts:
            kw["prompt"] = opts["initial_prompt"]
        if opts.get("word_timestamps"):
            kw["timestamp_granularities"] = ["word"]
        with open(path, "rb") as f:
            return server.client().audio.transcriptions.create(file=f, model="tiny.en", **kw).model_dump()

    def broken(_):
        return _post(server, files={"file": ("broken.wav", b"RIFF....WAVEfmt not really")})

    with ThreadPoolExecutor(len(cases) + 1) as pool:
        bad = pool.submit(broken, None)
        answers = list(pool.map(ask, cases))
    for (path, opts), want, got in zip(cases, wants, answers):
        assert got["text"] == want["text"].strip(), path
        _same_segments(got["segments"], want["segments"])
        if opts.get("word_timestamps"):
            assert [w["word"] for w in got["words"]] == [w["word"] for s in want["segments"] for w in s["words"]]
    assert "broken.wav" in _error(bad.result(), 400, "file")["message"]
    wide = (_metric(server, "maxwhisper_batch_windows_count")
            - _metric(server, "maxwhisper_batch_windows_bucket", '{le="1.0"}'))
    assert wide > wide_before, "some step encoded windows of several requests together"


def test_a_client_that_leaves_has_its_work_cancelled(server, expected, tmp_path):
    import soundfile as sf

    audio, _ = joined(["01", "02", "03", "04", "05", "06"], gap_s=1.0, repeat=2)  # about two minutes
    path = tmp_path / "long.wav"
    sf.write(str(path), audio, 16000, subtype="PCM_16")
    before = _metric(server, "maxwhisper_cancelled_total")
    with pytest.raises(httpx.ReadTimeout):
        _post(server, files={"file": ("long.wav", path.read_bytes())}, timeout=httpx.Timeout(60, read=1.5))
    end = time.monotonic() + 60
    while _metric(server, "maxwhisper_cancelled_total") == before or _metric(server, "maxwhisper_active_streams"):
        assert time.monotonic() < end, "the work was never cancelled"
        time.sleep(0.1)
    with open(CLIPS[4], "rb") as f:  # and the server carries on
        assert server.client().audio.transcriptions.create(file=f, model="tiny.en").text == \
            expected(CLIPS[4])["text"].strip()


# --- errors ----------------------------------------------------------------------------

def test_bad_audio_is_refused_by_name(server):
    assert "empty" in _error(_post(server, files={"file": ("empty.wav", b"")}), 400, "file")["message"]
    silent = io.BytesIO()
    import soundfile as sf
    sf.write(silent, np.zeros(0, np.float32), 16000, format="WAV")
    msg = _error(_post(server, files={"file": ("none.wav", silent.getvalue())}), 400, "file")["message"]
    assert "none.wav" in msg and "empty" in msg
    msg = _error(_post(server, files={"file": ("notes.txt", b"hello, not audio")}), 400, "file")["message"]
    assert "notes.txt" in msg and "not a readable audio file" in msg


@pytest.mark.parametrize("data, param", [
    ({"colour": "blue"}, "colour"),
    ({"response_format": "xml"}, "response_format"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": "1.5"}, "temperature"),
    ({"language": "fr"}, "language"),
    ({"timestamp_granularities[]": "word"}, "timestamp_granularities[]"),
    ({"timestamp_granularities[]": "sentence", "response_format": "verbose_json"}, "timestamp_granularities[]"),
    ({"stream": "maybe"}, "stream"),
    ({"stream": "true", "response_format": "srt"}, "stream"),
])
def test_bad_fields_are_refused_by_name(server, data, param):
    _error(_post(server, data=data), 400, param)


def test_missing_file_or_model(server):
    _error(httpx.post(f"{server.url}/v1/audio/transcriptions", data={"model": "tiny.en"},
                      headers={"Authorization": f"Bearer {KEY}"}), 400, "file")
    r = httpx.post(f"{server.url}/v1/audio/transcriptions", files={"file": ("a.wav", b"x")},
                   headers={"Authorization": f"Bearer {KEY}"})
    _error(r, 400, "model")


def test_unknown_model_is_404(server):
    with open(CLIPS[0], "rb") as f, pytest.raises(openai.NotFoundError) as e:
        server.client().audio.transcriptions.create(file=f, model="large-v9")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


def test_upload_over_the_limit_is_413(server):
    body = _error(_post(server, files={"file": ("big.wav", b"\0" * (5 * 1024 * 1024))}), 413, "file")
    assert "limit" in body["message"]
    # Without a Content-Length (chunked), the body is counted as it arrives.
    b = "limitboundary"
    head = (f'--{b}\r\nContent-Disposition: form-data; name="model"\r\n\r\ntiny.en\r\n--{b}\r\n'
            f'Content-Disposition: form-data; name="file"; filename="big.wav"\r\n\r\n').encode()
    chunks = [head] + [b"\0" * (1024 * 1024)] * 5 + [f"\r\n--{b}--\r\n".encode()]
    r = httpx.post(f"{server.url}/v1/audio/transcriptions", content=iter(chunks), timeout=60,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": f"multipart/form-data; boundary={b}"})
    assert "limit" in _error(r, 413, "file")["message"]


def test_api_key_is_required(server):
    _error(_post(server, headers={}), 401)
    _error(_post(server, headers={"Authorization": "Bearer wrong"}), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_english_only_model_does_not_translate(server):
    with open(CLIPS[0], "rb") as f, pytest.raises(openai.BadRequestError) as e:
        server.client().audio.translations.create(file=f, model="tiny.en")
    assert e.value.body["param"] == "model" and "English-only" in e.value.body["message"]


def test_unknown_route_in_openais_shape(server):
    _error(httpx.get(f"{server.url}/v1/nothing"), 404)


def test_health_says_loading_then_ready_and_requests_time_out(gated, expected, long_wav):
    r = httpx.get(f"{gated.url}/health")
    assert (r.status_code, r.json()["status"]) == (503, "loading")
    body = _error(_post(gated, headers={}), 503)
    assert body["code"] == "model_loading"
    gated.gate.set()
    _wait_ready(gated.url)
    r = _post(gated, files={"file": ("long.wav", long_wav.read_bytes())}, headers={})
    assert _error(r, 504)["code"] == "timeout"


def test_metrics_count_requests_audio_and_latency(server):
    before = _metric(server, "maxwhisper_audio_seconds_total")
    assert _post(server).status_code == 200
    assert _metric(server, "maxwhisper_audio_seconds_total") == pytest.approx(before + 297470 / 32000, abs=0.1)
    text = httpx.get(f"{server.url}/metrics").text
    assert re.search(r'^maxwhisper_requests_total\{path="/v1/audio/transcriptions",status="200"\} [1-9]', text, re.M)
    assert re.search(r'^maxwhisper_requests_total\{path="/v1/audio/transcriptions",status="400"\} [1-9]', text, re.M)
    assert 'maxwhisper_request_seconds_bucket{le="1.0",path="/v1/audio/transcriptions"}' in text
    assert "maxwhisper_queue_depth 0.0" in text


# --- translation, on a multilingual model ----------------------------------------------

def test_translation_on_a_multilingual_model(base_model):
    """Spanish speech on base: translated to English, and transcribed with its
    language detected and named as OpenAI names it."""
    wav, _ = audioeval_sample("es", "pangrama")
    want = base_model.transcribe(wav, task="translate")
    want_es = base_model.transcribe(wav)
    s = _InProcess(ServerSettings(model="base"), lambda: base_model)
    try:
        _wait_ready(s.url)
        with open(wav, "rb") as f:
            got = s.client().audio.translations.create(file=f, model="whisper-1", response_format="verbose_json")
        body = got.model_dump()
        assert (body["task"], body["language"]) == ("translate", "spanish")
        assert body["text"] == want["text"].strip()
        _same_segments(body["segments"], want["segments"])
        with open(wav, "rb") as f:
            got = s.client().audio.transcriptions.create(file=f, model="base", response_format="verbose_json")
        assert (got.language, got.text) == ("spanish", want_es["text"].strip())
    finally:
        s.close()


# --- the command, its log and its shutdown ----------------------------------------------

def test_serve_command_logs_each_request_and_finishes_in_flight_work_on_sigterm(tiny_en, expected, long_wav):
    """`maxwhisper serve` in its own process: SIGTERM while a request decodes still
    answers it in full, then the process exits."""
    want = expected(long_wav)["text"].strip()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "maxwhisper.cli", "serve", "--model", "tiny.en", "--device",
                             "cpu", "--port", str(port), "--max-batch", "2"],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        _wait_ready(url, 600)
        answer = {}

        def ask():
            with open(long_wav, "rb") as f:
                answer["text"] = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0) \
                    .audio.transcriptions.create(file=f, model="tiny.en").text

        asker = threading.Thread(target=ask)
        asker.start()
        end = time.monotonic() + 60
        while _metric(SimpleNamespace(url=url), "maxwhisper_active_streams") < 1:
            assert time.monotonic() < end and asker.is_alive(), "the request never started decoding"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        asker.join(120)
        assert answer.get("text") == want
        # uvicorn re-raises the signal it caught once shut down: the usual status of a stopped service.
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stderr.read()
    assert re.search(r'127\.0\.0\.1 "POST /v1/audio/transcriptions" 200 [\d.]+s audio=3\d\.\d\ds', log), log
