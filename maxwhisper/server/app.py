"""The HTTP side: OpenAI's audio endpoints, health, models and metrics, on FastAPI.
Requests are checked and their audio decoded here; decoding is the scheduler's."""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..audio import AudioError
from ..registry import DEFAULT_MODEL
from ..transcribe import DecodingPlan
from . import forms
from .errors import APIError, api_error_handler, error_response, http_error_handler, unexpected_error_handler
from .metrics import Metrics
from .responses import duration_of, render, sse, text_delta, text_done
from .scheduler import Job, Scheduler
from .uploads import decode_upload

log = logging.getLogger("maxwhisper.server")
ALIAS = "whisper-1"
# Room for the multipart framing and the text fields around the file itself.
FORM_OVERHEAD = 64 * 1024
KNOWN_PATHS = ("/v1/audio/transcriptions", "/v1/audio/translations", "/v1/models", "/health", "/metrics", "/")
PAGE = Path(__file__).resolve().parent / "static" / "index.html"


@dataclass(frozen=True)
class ServerSettings:
    """`model`: what `load_model` is given, and the name clients ask for (besides
    whisper-1). `max_batch`: requests decoded together. `timeout_s`: longest time a
    request may wait and decode (None: no limit)."""
    model: str = DEFAULT_MODEL
    device: str = "auto"
    precision: str | None = None
    attention: str = "unfused"
    max_batch: int = 8
    api_key: str | None = None
    max_upload_mb: float = 25.0
    timeout_s: float | None = 600.0

    def __post_init__(self):
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, found {self.max_batch}")
        if self.max_upload_mb <= 0:
            raise ValueError(f"max_upload_mb must be > 0, found {self.max_upload_mb}")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, found {self.timeout_s}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class _ClientGone(Exception):
    pass


class _Server:
    """What the routes share: the settings, the model once loaded, its scheduler."""

    def __init__(self, settings: ServerSettings, load: Callable):
        self.settings, self.load = settings, load
        self.metrics = Metrics()
        self.model = self.scheduler = self.error = None
        self.created = int(time.time())

    def start(self) -> None:
        """Load and compile the model (word-timestamp alignment too, so that no request
        waits on a compile), then start decoding."""
        try:
            model = self.load()
            model.runtime.warmup()
            self.scheduler = Scheduler(model, self.settings.max_batch, self.metrics).start()
            self.model = model
            log.info("maxwhisper: %s ready on %s (%s), up to %d requests per batch", self.settings.model,
                     model.device, model.precision, self.settings.max_batch)
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            log.error("maxwhisper: the model failed to load: %s", self.error)

    def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()

    @property
    def names(self) -> tuple[str, ...]:
        names = [self.settings.model, ALIAS]
        if self.model is not None and self.model.spec.name not in names:
            names.insert(1, self.model.spec.name)
        return tuple(names)

    def authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send it as 'Authorization: Bearer KEY'", code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    def ready(self):
        if self.model is None:
            if self.error is not None:
                raise APIError(503, f"the model failed to load: {self.error}", type="server_error",
                               code="model_unavailable")
            raise APIError(503, "the model is still loading; try again shortly", type="server_error",
                           code="model_loading")
        return self.model


def _limited(receive, limit: int):
    """The request body, refused with 413 as soon as it outgrows `limit` bytes."""
    seen = 0

    async def wrapped():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise APIError(413, f"the request is larger than the server's upload limit of "
                               f"{limit - FORM_OVERHEAD} bytes", param="file", code="file_too_large")
        return message

    return wrapped


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class _AccessLog:
    """One log line and the request metrics for every HTTP request (plain ASGI, so the
    routes still read the client's disconnect)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def watched(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            elapsed = time.perf_counter() - start
            path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
            self.metrics.requests.labels(path, str(status[0])).inc()
            self.metrics.latency.labels(path).observe(elapsed)
            audio = scope.get("state", {}).get("audio_seconds")
            client = scope.get("client") or ("-", 0)
            log.info('%s "%s %s" %d %.3fs%s', client[0], scope["method"], scope["path"], status[0], elapsed,
                     "" if audio is None else f" audio={audio:.2f}s")


def create_app(settings: ServerSettings | None = None, load: Callable | None = None) -> FastAPI:
    """The server as an ASGI app. `load()` returns the model (default: `load_model` of
    the settings' model); it runs in the background, `/health` saying loading until then."""
    settings = settings or ServerSettings()
    if load is None:
        def load():
            from ..model import load_model
            return load_model(settings.model, device=settings.device, precision=settings.precision,
                              attention=settings.attention)
    server = _Server(settings, load)

    @asynccontextmanager
    async def lifespan(_app):
        threading.Thread(target=server.start, name="maxwhisper-load", daemon=True).start()
        yield
        # uvicorn has let every request in flight finish by now.
        await run_in_threadpool(server.stop)

    app = FastAPI(title="maxwhisper", lifespan=lifespan, openapi_url=None)
    app.state.server = server
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(RequestValidationError, lambda _r, e: error_response(400, str(e)))
    app.add_exception_handler(Exception, unexpected_error_handler)
    app.add_middleware(_AccessLog, metrics=server.metrics)

    @app.get("/health")
    async def health():
        if server.model is not None:
            return {"status": "ready", "model": settings.model}
        if server.error is not None:
            return JSONResponse({"status": "error", "error": server.error}, status_code=503)
        return JSONResponse({"status": "loading", "model": settings.model}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": server.created, "owned_by": "maxwhisper"}

    @app.get("/v1/models")
    async def models(request: Request):
        server.authorize(request)
        return {"object": "list", "data": [model_card(n) for n in server.names]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        server.authorize(request)
        if name not in server.names:
            raise APIError(404, f"model {name!r} is not served here", param="model", code="model_not_found")
        return model_card(name)

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        return await _audio(server, request, "transcribe")

    @app.post("/v1/audio/translations")
    async def translations(request: Request):
        return await _audio(server, request, "translate")

    @app.websocket("/v1/stream")
    async def stream(websocket: WebSocket):
        from .live import live

        await live(server, websocket)

    @app.websocket("/v1/realtime")
    async def realtime_session(websocket: WebSocket):
        from .realtime import realtime

        await realtime(server, websocket)

    @app.get("/")
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    return app


async def _audio(server: _Server, request: Request, task: str) -> Response:
    server.authorize(request)
    model = server.ready()
    settings = server.settings
    limit = settings.max_upload_bytes + FORM_OVERHEAD
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"the request ({int(length)} bytes) is larger than the server's upload limit of "
                       f"{settings.max_upload_bytes} bytes", param="file", code="file_too_large")
    try:
        form = await Request(request.scope, _limited(request.receive, limit)).form(max_files=4, max_fields=64)
    except APIError:
        raise
    except Exception as e:  # a malformed multipart body
        raise APIError(400, f"the body is not a readable multipart form ({e})") from None
    try:
        req = forms.parse(form, task, server.names, tuple(model.tokenizer.languages), model.is_multilingual,
                          settings.model)
        data = await form["file"].read()
    finally:
        await form.close()
    if len(data) > settings.max_upload_bytes:
        raise APIError(413, f"{req.filename}: {len(data)} bytes is larger than the server's upload limit of "
                       f"{settings.max_upload_bytes} bytes", param="file", code="file_too_large")
    try:
        plan = DecodingPlan.of(model, req.options)
    except ValueError as e:
        raise APIError(400, str(e)) from None
    rate = model.spec.audio.sample_rate
    try:
        audio = await run_in_threadpool(decode_upload, data, req.filename, rate)
    except AudioError as e:
        raise APIError(400, str(e), param="file", code="invalid_audio") from None
    duration = duration_of(len(audio), rate)
    request.state.audio_seconds = duration
    deadline = None if settings.timeout_s is None else time.monotonic() + settings.timeout_s
    job = Job(audio, plan, asyncio.get_running_loop())
    try:
        server.scheduler.submit(job)
    except RuntimeError as e:
        raise APIError(503, str(e), type="server_error", code="shutting_down") from None
    if req.stream:
        return StreamingResponse(_events(server, job, deadline, duration), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    try:
        result = await _result(server, request, job, deadline)
    except _ClientGone:
        return Response(status_code=499)
    server.metrics.audio_seconds.inc(duration)
    body, media_type = render(result, req.response_format, task, duration, req.words)
    return Response(body, media_type=media_type)


def _timeout(server: _Server) -> APIError:
    return APIError(504, f"the transcription took longer than the server's timeout of {server.settings.timeout_s} s",
                    type="timeout_error", code="timeout")


def _failure(error: Exception) -> APIError:
    return APIError(500, f"decoding failed: {type(error).__name__}: {error}", type="server_error")


async def _result(server: _Server, request: Request, job: Job, deadline: float | None) -> dict:
    """The finished transcript; the work is cancelled if the client leaves or time runs out."""
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        while True:
            get = asyncio.ensure_future(job.events.get())
            done, _ = await asyncio.wait({get, gone}, timeout=_remaining(deadline),
                                         return_when=asyncio.FIRST_COMPLETED)
            if get in done:
                kind, value = get.result()
                if kind == "done":
                    return value
                if kind == "error":
                    raise _failure(value)
                continue
            get.cancel()
            server.scheduler.cancel(job.key)
            if gone in done:
                raise _ClientGone()
            raise _timeout(server)
    finally:
        gone.cancel()


async def _events(server: _Server, job: Job, deadline: float | None, duration: float):
    """Server-sent events: a text delta per decoded window, then the whole text."""
    finished = False
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(job.events.get(), _remaining(deadline))
            except asyncio.TimeoutError:
                server.scheduler.cancel(job.key)
                finished = True
                e = _timeout(server)
                yield sse({"type": "error", "error": {"message": e.message, "type": e.type, "code": e.code}})
                return
            if kind == "segments":
                event = text_delta(value)
                if event is not None:
                    yield sse(event)
                continue
            finished = True
            if kind == "error":
                e = _failure(value)
                yield sse({"type": "error", "error": {"message": e.message, "type": e.type, "code": None}})
                return
            server.metrics.audio_seconds.inc(duration)
            yield sse(text_done(value, duration))
            return
    finally:
        if not finished:  # the client left mid-stream
            server.scheduler.cancel(job.key)


def serve(settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the server until interrupted; on SIGINT/SIGTERM uvicorn stops taking requests
    and lets those in flight finish before the scheduler ends."""
    import uvicorn

    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", access_log=False)
