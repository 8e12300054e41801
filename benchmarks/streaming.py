"""Live streams against the clock: N clients send clips over `maxwhisper serve`'s
WebSocket in real time (the clock runs while the server decodes); per committed word,
latency = when it was committed minus when its audio ended. Also the committed text's
WER against the reference and against the offline transcript of the same audio; and the
largest stream count run whose streams held a live caption's bounds.

    python -m benchmarks.streaming --model tiny.en --streams 1 2 4
    python -m benchmarks.streaming --model tiny.en --streams 1 2 4 --commit-after-seconds 1.0

Policy flags go to the server in each stream's start message.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import numpy as np

from benchmarks.server_load import _free_port
from tests.helpers import joined, wer

CLIPS = [["01", "02", "03"], ["04", "05", "06"], ["02", "03", "01"], ["05", "06", "04"],
         ["03", "01", "02"], ["06", "04", "05"], ["01", "03", "05"], ["02", "04", "06"]]


def _client(url: str, audio: np.ndarray, policy: dict, frame_s: float = 0.1) -> tuple[list[tuple[float, dict]], float]:
    from websockets.sync.client import connect

    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    n = int(16000 * frame_s)
    events: list[tuple[float, dict]] = []
    with connect(url, open_timeout=60, close_timeout=60, max_size=None) as ws:
        ws.send(json.dumps({"type": "start", "sample_rate": 16000, "format": "pcm16", **policy}))
        ws.recv(timeout=60)
        start = time.monotonic()

        def read():
            for message in ws:
                events.append((time.monotonic() - start, json.loads(message)))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        for k, i in enumerate(range(0, len(pcm), n)):
            wait = start + (k + 1) * frame_s - time.monotonic()  # a frame goes out once spoken
            if wait > 0:
                time.sleep(wait)
            ws.send(pcm[i: i + n].tobytes())
        ws.send(json.dumps({"type": "stop"}))
        reader.join(300)
    return events, len(audio) / 16000


def run(model_name: str, streams: list[int], policy: dict | None = None) -> list[dict]:
    import uvicorn

    import maxwhisper
    from maxwhisper.server import ServerSettings, create_app

    model = maxwhisper.load_model(model_name, device="cpu")
    model.runtime.warmup()
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(ServerSettings(model=model_name, max_batch=8),
                                                      load=lambda: model), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    import httpx

    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    url = f"ws://127.0.0.1:{port}/v1/stream"
    audios = [joined(names, gap_s=1.0) for names in CLIPS]
    offline = [model.transcribe(a, temperature=0.0)["text"] for a, _ in audios]
    rows = []
    for n in streams:
        results: dict[int, tuple] = {}
        threads = [threading.Thread(target=lambda k=k: results.update({k: _client(url, audios[k % len(audios)][0], policy or {})}))
                   for k in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        latency, wers, vs_offline, offline_wers = [], [], [], []
        for k in range(n):
            events, _duration = results[k]
            final = [e for _, e in events if e["type"] == "final"]
            text = final[0]["text"] if final else ""
            latency += [t - w["end"] for t, e in events if e["type"] == "committed" for w in e["words"]]
            reference = audios[k % len(audios)][1]
            wers.append(wer(reference, text))
            offline_wers.append(wer(reference, offline[k % len(audios)]))
            vs_offline.append(wer(offline[k % len(audios)], text))
        rows.append(dict(streams=n, words=len(latency), median_s=float(np.median(latency)),
                         p95_s=float(np.percentile(latency, 95)), wer=float(np.mean(wers)),
                         offline_wer=float(np.mean(offline_wers)), wer_vs_offline=float(np.mean(vs_offline))))
        print(rows[-1], flush=True)
    server.should_exit = True
    return rows


MEDIAN_S, P95_S, WER_POINTS = 2.0, 4.0, 0.02  # a live caption's bounds


def holding(rows: list[dict]) -> list[int]:
    """The stream counts whose row holds every bound."""
    return [r["streams"] for r in rows if r["median_s"] <= MEDIAN_S and r["p95_s"] <= P95_S
            and r["wer"] <= r["offline_wer"] + WER_POINTS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--update-seconds", type=float)
    parser.add_argument("--commit-after-seconds", type=float)
    parser.add_argument("--context-seconds", type=float)
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    policy = {k: v for k, v in (("update_seconds", args.update_seconds),
                                ("commit_after_seconds", args.commit_after_seconds),
                                ("context_seconds", args.context_seconds)) if v is not None}
    rows = run(args.model, args.streams, policy)
    print("| streams | words | median latency | p95 latency | WER (committed) | WER (offline) | committed vs offline |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['streams']} | {r['words']} | {r['median_s']:.2f} s | {r['p95_s']:.2f} s | {100 * r['wer']:.1f}% "
              f"| {100 * r['offline_wer']:.1f}% | {100 * r['wer_vs_offline']:.1f}% |")
    held = holding(rows)
    print(f"streams within the bounds (median <= {MEDIAN_S} s, p95 <= {P95_S} s, committed WER within "
          f"{100 * WER_POINTS:.0f} points of offline): {max(held) if held else 0} of those run {args.streams}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(model=args.model, policy=policy, rows=rows, within_bounds=held), f, indent=1)


if __name__ == "__main__":
    main()
