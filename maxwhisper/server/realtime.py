"""OpenAI Realtime transcription sessions (`/v1/realtime?intent=transcription`): the
message shapes of OpenAI's Realtime API, so that its clients (the official `openai`
package's `client.realtime.connect`, browser code written against it) transcribe live
audio here. The stream policy, the speech detector and the shared decoding are the
ones of `/v1/stream` (live.py).

Client events: `session.update` (`session.audio.input`: `format`, `transcription.language`,
`turn_detection`), `input_audio_buffer.append` (base64 audio), `input_audio_buffer.commit`,
`input_audio_buffer.clear`. Server events: `session.created` / `session.updated`,
`input_audio_buffer.speech_started` / `speech_stopped` / `committed` / `cleared`,
`conversation.item.input_audio_transcription.delta` (words as they are committed, never
retracted) and `.completed` (an utterance's whole transcript), and `error` for a client
event that cannot be taken (the session goes on)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import itertools
import json
import uuid

import numpy as np
from fastapi import WebSocket, WebSocketDisconnect
from starlette.concurrency import run_in_threadpool

from ..streaming import LEAD_IN_SECONDS, SAMPLE_RATE, Stream, StreamOptions
from .live import IDLE_S, _Refused, _waiting, admitted, decoded

RATES = {"audio/pcm": 24000, "audio/pcmu": 8000, "audio/pcma": 8000}
_ERROR = "invalid_request_error"


def _g711(kind: str) -> np.ndarray:
    """The 256 decoded values of G.711 mu-law or A-law bytes, in [-1, 1]."""
    code = np.arange(256, dtype=np.int32)
    if kind == "audio/pcmu":
        u = ~code & 0xFF
        magnitude = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
        value = np.where(u & 0x80, 0x84 - magnitude, magnitude - 0x84)
    else:
        a = code ^ 0x55
        exponent, mantissa = (a & 0x70) >> 4, a & 0x0F
        magnitude = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0))
        value = np.where(a & 0x80, magnitude, -magnitude)
    return (value / 32768.0).astype(np.float32)


_TABLES = {kind: _g711(kind) for kind in ("audio/pcmu", "audio/pcma")}


class _BadEvent(Exception):
    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


@dataclasses.dataclass
class _Session:
    """What `session.update` set: the input format and the stream policy."""
    format: str = "audio/pcm"
    options: StreamOptions = StreamOptions()
    model: str = ""

    def describe(self, session_id: str) -> dict:
        o = self.options
        fmt = {"type": self.format, **({"rate": RATES[self.format]} if self.format == "audio/pcm" else {})}
        turns = None if o.end_silence_seconds is None else {
            "type": "server_vad", "threshold": o.speech_threshold, "prefix_padding_ms": int(LEAD_IN_SECONDS * 1000),
            "silence_duration_ms": int(round(o.end_silence_seconds * 1000))}
        return {"type": "transcription", "object": "realtime.transcription_session", "id": session_id,
                "audio": {"input": {"format": fmt, "noise_reduction": None, "turn_detection": turns,
                                    "transcription": {"model": self.model, "language": o.language}}},
                "include": []}

    def updated(self, session, languages: tuple[str, ...], multilingual: bool) -> _Session:
        if not isinstance(session, dict):
            raise _BadEvent("session must be an object", "session")
        kind = session.get("type", "transcription")
        if kind != "transcription":
            raise _BadEvent(f"only transcription sessions are served here, found type {kind!r}", "session.type")
        unknown = sorted(set(session) - {"type", "audio", "include", "id", "object"})
        if unknown:  # the beta shape (input_audio_format, ...) among them
            raise _BadEvent(f"unknown session field(s) {unknown}: a transcription session takes type, audio.input "
                            f"(format, transcription, turn_detection) and include", f"session.{unknown[0]}")
        audio = session.get("audio") or {}
        inp = audio.get("input") if isinstance(audio, dict) else None
        if inp is None:
            return self
        if not isinstance(inp, dict):
            raise _BadEvent("session.audio.input must be an object", "session.audio.input")
        fmt, options, model = self.format, self.options, self.model
        if "format" in inp:
            f = inp["format"] or {}
            fmt = f.get("type", "audio/pcm") if isinstance(f, dict) else None
            if not isinstance(fmt, str) or fmt not in RATES:
                raise _BadEvent(f"the input format must be one of {sorted(RATES)}, found {fmt!r}",
                                "session.audio.input.format.type")
            rate = f.get("rate", RATES[fmt])
            if rate != RATES[fmt]:
                raise _BadEvent(f"{fmt} comes at {RATES[fmt]} Hz, found rate {rate!r}", "session.audio.input.format.rate")
        changes = {}
        if "transcription" in inp:
            t = inp["transcription"] or {}
            if not isinstance(t, dict):
                raise _BadEvent("session.audio.input.transcription must be an object",
                                "session.audio.input.transcription")
            model = str(t.get("model") or model)
            language = t.get("language") or None
            if language is not None and (not multilingual and language != "en"
                                         or multilingual and language not in languages):
                raise _BadEvent(f"language {language!r} is not one this model transcribes",
                                "session.audio.input.transcription.language")
            changes["language"] = language
        if "turn_detection" in inp:
            turns = inp["turn_detection"]
            if turns is None:
                changes["end_silence_seconds"] = None
            elif not isinstance(turns, dict) or turns.get("type", "server_vad") != "server_vad":
                kind = turns.get("type") if isinstance(turns, dict) else turns
                raise _BadEvent(f"turn_detection must be server_vad or null, found {kind!r}",
                                "session.audio.input.turn_detection.type")
            else:
                changes["speech_threshold"] = turns.get("threshold", options.speech_threshold)
                ms = turns.get("silence_duration_ms", 1000 * (options.end_silence_seconds
                                                              or StreamOptions().end_silence_seconds))
                if isinstance(ms, bool) or not isinstance(ms, (int, float)):
                    raise _BadEvent(f"silence_duration_ms must be a number, found {ms!r}",
                                    "session.audio.input.turn_detection.silence_duration_ms")
                changes["end_silence_seconds"] = ms / 1000
        try:
            options = dataclasses.replace(options, **changes)
        except ValueError as e:
            param = {"speech_threshold": "threshold", "end_silence_seconds": "silence_duration_ms"}
            name = next((v for k, v in param.items() if str(e).startswith(k)), None)
            raise _BadEvent(str(e), name and f"session.audio.input.turn_detection.{name}") from None
        return _Session(fmt, options, model)


class _Audio:
    """Input bytes of the session's format -> float32 samples at 16 kHz, resampled as a
    stream (soxr keeps its state from one append to the next)."""

    def __init__(self, fmt: str):
        import soxr

        self.format = fmt
        self._resampler = soxr.ResampleStream(RATES[fmt], SAMPLE_RATE, 1, dtype="float32")

    def samples(self, data: bytes) -> np.ndarray:
        if self.format == "audio/pcm":
            if len(data) % 2:
                raise _BadEvent(f"audio of {len(data)} bytes does not hold whole 16-bit samples", "audio")
            pcm = np.frombuffer(data, "<i2").astype(np.float32) / 32768.0
        else:
            pcm = _TABLES[self.format][np.frombuffer(data, np.uint8)]
        return self._resampler.resample_chunk(pcm)


async def realtime(server, websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        model = admitted(server, websocket)
        intent = websocket.query_params.get("intent", "transcription")
        if intent != "transcription":
            raise _Refused(f"only transcription sessions are served here (intent=transcription), found {intent!r}")
        from ..vad import detector

        vad = await run_in_threadpool(detector)
        await _Realtime(server, websocket, model, vad, websocket.query_params.get("model") or server.settings.model).run()
    except _Refused as e:
        await websocket.close(code=e.code, reason=e.reason[:120])
    except WebSocketDisconnect:
        pass


class _Realtime:
    def __init__(self, server, websocket: WebSocket, model, vad, model_name: str):
        self.server, self.websocket, self.model, self.vad = server, websocket, model, vad
        self.session = _Session(model=model_name)
        self.id = f"sess_{uuid.uuid4().hex[:20]}"
        self._events = itertools.count()
        self.stream = self._new_stream()
        self.audio = _Audio(self.session.format)
        self.item: str | None = None  # the utterance under way
        self.previous: str | None = None
        self.words: list = []  # its committed words
        self.started = self.ended = 0.0  # where its speech began and where it was ended, in seconds
        self.pending_commit = False  # a commit that came while the last one was decoding

    def _new_stream(self) -> Stream:
        return Stream(self.model.tokenizer.encode, self.vad.streaming(), self.session.options)

    async def send(self, kind: str, **fields) -> None:
        await self.websocket.send_json({"type": kind, "event_id": f"event_{next(self._events)}", **fields})

    async def error(self, e: _BadEvent, event_id=None) -> None:
        await self.send("error", error={"type": _ERROR, "code": e.code, "message": e.message, "param": e.param,
                                        "event_id": event_id})

    async def run(self) -> None:
        await self.send("session.created", session=self.session.describe(self.id))
        while True:
            try:
                message = await asyncio.wait_for(self.websocket.receive(), IDLE_S)
            except asyncio.TimeoutError:
                raise _Refused(f"no client event for {IDLE_S:.0f} s") from None
            if message["type"] == "websocket.disconnect":
                return
            await self.take(message)
            # Events that came while the last decoding ran are taken before the next
            # one (live.py: a busy server decodes less often, over more audio).
            while (message := await _waiting(self.websocket)) is not None:
                if message["type"] == "websocket.disconnect":
                    return
                await self.take(message)
            await self.decode()

    async def take(self, message: dict) -> None:
        event_id = None
        try:
            if message.get("text") is None:
                raise _BadEvent("client events are JSON text; audio goes base64 in input_audio_buffer.append",
                                code="invalid_event")
            try:
                event = json.loads(message["text"])
            except (ValueError, RecursionError):
                raise _BadEvent("a client event must be JSON", code="invalid_json") from None
            if not isinstance(event, dict):
                raise _BadEvent("a client event must be a JSON object", code="invalid_event")
            event_id, kind = event.get("event_id"), event.get("type")
            if kind in ("session.update", "transcription_session.update"):
                await self.update(event.get("session"))
            elif kind == "input_audio_buffer.append":
                audio = event.get("audio")
                try:
                    data = base64.b64decode(audio, validate=True) if isinstance(audio, str) else None
                except (binascii.Error, ValueError):
                    data = None
                if data is None:
                    raise _BadEvent("audio must be base64-encoded bytes of the session's input format", "audio")
                before = self.stream.utterance
                await run_in_threadpool(self.stream.add, self.audio.samples(data))
                await self.turns(before)
            elif kind == "input_audio_buffer.commit":
                before = self.stream.utterance
                if before == "closing":  # the one committed last is still decoding: this one waits
                    self.pending_commit = True
                elif self.stream.end_utterance():
                    await self.turns(before)
                else:
                    raise _BadEvent("the input audio buffer holds no speech to commit",
                                    code="input_audio_buffer_commit_empty")
            elif kind == "input_audio_buffer.clear":
                if self.stream.utterance != "closing":  # a committed utterance is kept
                    self.item, self.words = None, []
                self.stream.clear()
                self.pending_commit = False
                await self.send("input_audio_buffer.cleared")
            else:
                raise _BadEvent(f"unknown or unsupported client event type {kind!r}", "type", "invalid_event")
        except _BadEvent as e:
            await self.error(e, event_id)

    async def update(self, session) -> None:
        new = self.session.updated(session, tuple(self.model.tokenizer.languages), self.model.is_multilingual)
        if new.format != self.session.format:
            self.audio = _Audio(new.format)
        self.session = new
        if self.stream.received == 0:
            self.stream = self._new_stream()
        else:  # the policy changes from here on; the audio and words so far stay
            self.stream.options = new.options
        await self.send("session.updated", session=self.session.describe(self.id))

    async def turns(self, before: str) -> None:
        """The speech detector's turns since `before`, as speech_started / speech_stopped
        / committed events."""
        now = self.stream.utterance
        vad = self.stream.options.end_silence_seconds is not None  # manual turns: no VAD events
        if before == "silence" and now != "silence":
            self.item, self.words, self.started = f"item_{uuid.uuid4().hex[:20]}", [], self.stream.speech_start()
            if vad:
                await self.send("input_audio_buffer.speech_started", item_id=self.item,
                                audio_start_ms=int(self.started * 1000))
        if now == "closing" and before != "closing":
            self.ended = self.stream.received
            if vad:
                await self.send("input_audio_buffer.speech_stopped", item_id=self.item,
                                audio_end_ms=int(self.ended * 1000))
            await self.send("input_audio_buffer.committed", item_id=self.item, previous_item_id=self.previous)
            await self.send("conversation.item.added", previous_item_id=self.previous, item=self._item(None))

    async def decode(self) -> None:
        stream = self.stream
        while stream.due():
            request = stream.request()
            if request is None:
                return
            result = await decoded(self.server, self.model, stream.options, request)
            ended = stream.utterances
            for event in stream.accept(result, request):
                if event.type == "committed" and self.item is not None:
                    delta = "".join(w.word for w in event.words)
                    await self.send("conversation.item.input_audio_transcription.delta", item_id=self.item,
                                    content_index=0, delta=delta if self.words else delta.lstrip())
                    self.words += event.words
            if stream.utterances > ended:
                await self.complete()
                await self.turns("silence")  # the next utterance may be under way (or over) already
                if self.pending_commit:
                    self.pending_commit = False
                    before = stream.utterance
                    if stream.end_utterance():
                        await self.turns(before)
                    else:
                        await self.error(_BadEvent("the input audio buffer held no speech to commit",
                                                   code="input_audio_buffer_commit_empty"))

    async def complete(self) -> None:
        if self.item is None:
            return
        transcript = "".join(w.word for w in self.words).strip()
        await self.send("conversation.item.input_audio_transcription.completed", item_id=self.item, content_index=0,
                        transcript=transcript,
                        usage={"type": "duration", "seconds": round(max(0.0, self.ended - self.started), 3)})
        await self.send("conversation.item.done", previous_item_id=self.previous, item=self._item(transcript))
        self.previous, self.item, self.words = self.item, None, []

    def _item(self, transcript: str | None) -> dict:
        return {"id": self.item, "object": "realtime.item", "type": "message", "role": "user",
                "status": "in_progress" if transcript is None else "completed",
                "content": [{"type": "input_audio", "transcript": transcript}]}

