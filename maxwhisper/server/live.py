"""Live transcription over a WebSocket (`/v1/stream`): PCM frames in, streaming events
out. Every stream's decodings go through the server's scheduler, so concurrent streams
share the batched model with each other and with file requests.

Protocol: the client's first message is JSON `{"type": "start", "sample_rate": 16000,
"format": "pcm16" | "float32", "language": null}`, and any of `StreamOptions`' policy
fields (`update_seconds`, `commit_after_seconds`, ...); then binary frames of mono samples
(little-endian PCM16 or float32, any length) and, to end, `{"type": "stop"}`. The server
answers `{"type": "ready"}`, then events `{"type": "interim" | "committed" | "final",
"text", "words": [{"word", "start", "end"}]}` (times in seconds of the stream's audio),
and closes after `final`. A bad message closes the socket with code 1003 (1008 for a
missing API key) and a reason saying what was wrong; so does a minute without audio."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import numpy as np
from fastapi import WebSocket, WebSocketDisconnect
from starlette.concurrency import run_in_threadpool

from ..streaming import SAMPLE_RATE, Stream, StreamOptions, stream_transcribe_options
from ..transcribe import DecodingPlan
from .scheduler import Job

FORMATS = {"pcm16": ("<i2", 32768.0), "float32": ("<f4", 1.0)}
POLICY = tuple(f.name for f in dataclasses.fields(StreamOptions) if f.name != "language")
IDLE_S = 60.0


class _Refused(Exception):
    def __init__(self, reason: str, code: int = 1003):
        super().__init__(reason)
        self.reason, self.code = reason, code


def _start(message: dict, languages: tuple[str, ...], multilingual: bool) -> tuple[StreamOptions, str]:
    if message.get("type") != "start":
        raise _Refused(f'the first message must be {{"type": "start", ...}}, found type {message.get("type")!r}')
    unknown = sorted(set(message) - {"type", "sample_rate", "format", "language", *POLICY})
    if unknown:
        raise _Refused(f"unknown field(s) in the start message: {unknown}")
    rate = message.get("sample_rate", SAMPLE_RATE)
    if rate != SAMPLE_RATE:
        raise _Refused(f"sample_rate must be {SAMPLE_RATE} (mono), found {rate!r}")
    fmt = message.get("format", "pcm16")
    if fmt not in FORMATS:
        raise _Refused(f"format must be one of {sorted(FORMATS)}, found {fmt!r}")
    language = message.get("language")
    if language is not None and (not multilingual and language != "en" or multilingual and language not in languages):
        raise _Refused(f"language {language!r} is not one this model transcribes")
    try:
        return StreamOptions(language=language, **{k: message[k] for k in POLICY if k in message}), fmt
    except ValueError as e:
        raise _Refused(str(e)) from None


def _samples(data: bytes, fmt: str) -> np.ndarray:
    dtype, scale = FORMATS[fmt]
    size = np.dtype(dtype).itemsize
    if len(data) % size:
        raise _Refused(f"a binary frame of {len(data)} bytes does not hold whole {fmt} samples")
    samples = np.frombuffer(data, dtype).astype(np.float32) / scale
    if fmt == "float32" and not (np.isfinite(samples).all() and np.abs(samples).max(initial=0) <= 2.0):
        raise _Refused("float32 frames must hold finite samples in [-1, 1]")
    return samples


def admitted(server, websocket: WebSocket):
    """The model, for a socket that brings the server's API key (if it has one) once the
    model is loaded; else `_Refused` with the close code that says why."""
    key = server.settings.api_key
    if key is not None:
        given = websocket.query_params.get("api_key") or \
            websocket.headers.get("authorization", "").partition(" ")[2].strip()
        if given != key:
            raise _Refused("missing or incorrect API key (send ?api_key=KEY or a bearer token)", 1008)
    if server.model is None:
        raise _Refused("the model is still loading; try again shortly", 1013)
    return server.model


async def live(server, websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        model = admitted(server, websocket)
        try:
            first = json.loads(await asyncio.wait_for(websocket.receive_text(), IDLE_S))
        except asyncio.TimeoutError:
            raise _Refused(f"no start message for {IDLE_S:.0f} s") from None
        except (ValueError, KeyError, TypeError, RecursionError):  # nesting too deep to parse: no JSON here
            raise _Refused('the first message must be JSON text: {"type": "start", ...}') from None
        if not isinstance(first, dict):
            raise _Refused('the first message must be a JSON object: {"type": "start", ...}')
        options, fmt = _start(first, tuple(model.tokenizer.languages), model.is_multilingual)
        from ..vad import detector

        vad = await run_in_threadpool(detector)
        stream = Stream(model.tokenizer.encode, vad.streaming(), options)
        await websocket.send_json({"type": "ready"})
        await _run(server, websocket, model, stream, options, fmt)
    except _Refused as e:
        await websocket.close(code=e.code, reason=e.reason[:120])
    except WebSocketDisconnect:
        pass


async def _run(server, websocket, model, stream: Stream, options: StreamOptions, fmt: str) -> None:
    async def take(message) -> bool:
        """Feed one message to the stream; False when the client has gone."""
        if message["type"] == "websocket.disconnect":
            return False
        if message.get("bytes") is not None:
            await run_in_threadpool(stream.add, _samples(message["bytes"], fmt))
        elif message.get("text") is not None:
            try:
                stop = json.loads(message["text"]).get("type") == "stop"
            except (ValueError, AttributeError, RecursionError):
                stop = False
            if not stop:
                raise _Refused('text messages after start must be {"type": "stop"}')
            for event in stream.finish():
                await websocket.send_json(event.as_dict())
        return True

    while True:
        try:
            message = await asyncio.wait_for(websocket.receive(), IDLE_S)
        except asyncio.TimeoutError:
            raise _Refused(f"no audio for {IDLE_S:.0f} s") from None
        if not await take(message):
            return
        # The frames that came while the last decoding ran go in before the next one: a
        # busy server decodes a stream less often, over more audio, instead of falling
        # further behind with every decoding.
        while not stream.finished and (message := await _waiting(websocket)) is not None:
            if not await take(message):
                return
        while stream.due():
            request = stream.request()
            if request is None:
                break
            result = await decoded(server, model, options, request)
            for event in stream.accept(result, request):
                await websocket.send_json(event.as_dict())
        if stream.finished:
            await websocket.close(code=1000, reason="final")
            return


async def _waiting(websocket: WebSocket, within_s: float = 0.002):
    """A message the client has already sent, or None. Cancelling a receive that found
    none loses nothing: the server's websocket reader keeps what comes next."""
    try:
        return await asyncio.wait_for(websocket.receive(), within_s)
    except asyncio.TimeoutError:
        return None


async def decoded(server, model, options: StreamOptions, request) -> dict:
    """One decoding of a stream's request, through the server's scheduler (batched with
    every other stream's and request's); cancelled there if the caller is."""
    plan = DecodingPlan.of(model, stream_transcribe_options(options, request.prompt))
    job = Job(request.audio, plan, asyncio.get_running_loop())
    server.scheduler.submit(job)
    try:
        return await _done(job)
    except asyncio.CancelledError:
        server.scheduler.cancel(job.key)
        raise


async def _done(job: Job) -> dict:
    while True:
        kind, value = await job.events.get()
        if kind == "done":
            return value
        if kind == "error":
            raise _Refused(f"decoding failed: {type(value).__name__}: {value}"[:120], 1011)

