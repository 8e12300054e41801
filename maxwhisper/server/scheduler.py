"""The thread that owns the model: requests queue up, join the shared batch between
decoding steps (up to `max_batch` streams), and leave it when finished or cancelled."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..transcribe import DecodingPlan, StreamBatch

log = logging.getLogger("maxwhisper.server")


@dataclass(eq=False)
class Job:
    """One request's audio and options, and the queue its events come back on:
    ("segments", [...]) as windows are decoded, then ("done", result) or ("error", exc)."""
    audio: np.ndarray
    plan: DecodingPlan
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    key: int = -1

    def send(self, kind: str, value) -> None:
        """From the scheduler thread to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop has closed: nobody is waiting any more
            pass


class Scheduler:
    """Runs one `StreamBatch` for every request. A request arriving while the batch
    decodes waits for the end of the current step (one window of every stream), then
    joins; nothing ever blocks the thread but an empty queue."""

    def __init__(self, model, max_batch: int, metrics=None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, found {max_batch}")
        self.model, self.max_batch, self.metrics = model, max_batch, metrics
        self._lock = threading.Condition()
        self._queue: deque[Job] = deque()
        self._cancelled: set[int] = set()
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="maxwhisper-scheduler", daemon=True)

    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Finish what was submitted, then end the thread."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join(timeout)

    def submit(self, job: Job) -> int:
        with self._lock:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            job.key = next(self._ids)
            self._queue.append(job)
            self._gauge_queue()
            self._lock.notify()
        return job.key

    def cancel(self, key: int) -> None:
        """Drop a request's work: at once if it is still queued, else before the next step."""
        with self._lock:
            for job in self._queue:
                if job.key == key:
                    self._queue.remove(job)
                    self._gauge_queue()
                    self._count_cancelled()
                    break
            else:
                self._cancelled.add(key)
            self._lock.notify()

    def _count_cancelled(self) -> None:
        if self.metrics is not None:
            self.metrics.cancelled.inc()

    def _gauge_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._queue))

    def _run(self) -> None:
        batch = StreamBatch(self.model, on_segments=self._on_segments)
        while True:
            with self._lock:
                while not self._queue and not len(batch) and not self._cancelled and not self._stopping:
                    self._lock.wait()
                if self._stopping and not self._queue and not len(batch):
                    return
                cancelled, self._cancelled = self._cancelled, set()
                arrivals = []
                while self._queue and len(batch) + len(arrivals) < self.max_batch:
                    arrivals.append(self._queue.popleft())
                self._gauge_queue()
            for key in cancelled:
                if batch.cancel(key):
                    self._count_cancelled()
                self._jobs.pop(key, None)
            if arrivals:
                for job in arrivals:
                    self._jobs[job.key] = job
                batch.admit([(job.key, job.audio, job.plan) for job in arrivals])
            self._settle(batch)
            if len(batch):
                try:
                    rows = batch.step()
                except Exception as e:  # StreamBatch keeps its failures to the streams they touch
                    log.exception("decoding step failed")
                    for key in list(self._jobs):
                        batch.cancel(key)
                        self._jobs.pop(key).send("error", e)
                    continue
                if self.metrics is not None:
                    self.metrics.active_streams.set(len(batch))
                    if rows:
                        self.metrics.batch_size.observe(rows)
                self._settle(batch)

    def _settle(self, batch: StreamBatch) -> None:
        for key, result in batch.done():
            job = self._jobs.pop(key, None)
            if job is not None:
                job.send("error" if isinstance(result, Exception) else "done", result)
        if self.metrics is not None:
            self.metrics.active_streams.set(len(batch))

    def _on_segments(self, key: int, segments: list[dict]) -> None:
        job = self._jobs.get(key)
        if job is not None:
            job.send("segments", [dict(s) for s in segments])
