"""The server's Prometheus metrics, in a registry of their own (one per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("maxwhisper_requests", "HTTP requests answered", ["path", "status"], registry=r)
        self.latency = Histogram("maxwhisper_request_seconds", "time from request to the last byte answered",
                                 ["path"], buckets=LATENCY_BUCKETS, registry=r)
        self.audio_seconds = Counter("maxwhisper_audio_seconds", "seconds of audio transcribed", registry=r)
        self.queue_depth = Gauge("maxwhisper_queue_depth", "requests waiting to join the batch", registry=r)
        self.active_streams = Gauge("maxwhisper_active_streams", "requests in the batch", registry=r)
        self.batch_size = Histogram("maxwhisper_batch_windows", "windows encoded per decoding step",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.cancelled = Counter("maxwhisper_cancelled", "requests cancelled (client gone or timed out)", registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
