"""Load benchmark of `maxwhisper serve`: the same server batching requests together and
with batching off (`--max-batch 1`), in one run, under 1, 4 and 16 concurrent clients.

    python -m benchmarks.server_load --model tiny.en --clients 1 4 16 --requests 3 --soak 300

Both servers run at once, each its own `maxwhisper serve` process on 127.0.0.1, and
are loaded in turn, one client count at a time, so that the two measurements of a
count are minutes apart at most on a shared machine. Every client sends
--requests transcriptions one after the other (the committed clips, tests/data/speech,
each client starting at another clip) through the official `openai` client; every
answer is checked against the offline transcript of the same clip (`model.transcribe`,
computed first in this process). Throughput is audio seconds transcribed per wall
second; latency is per request, from sending to the whole answer; the server's CPU
seconds (user + system, from /proc) show the work apart from what other processes
take from it. Offline, in this process, the clips are first
transcribed one at a time and --max-batch at a time with the encoder's share timed:
the encoder runs a full 30 s window per clip whatever the batch, so this bounds what
batching can give. The soak then sends
--soak requests from the largest client count to the batching server and reports its
resident memory at the start and after each quarter.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOAK_PARTS = 4
CLIPS = sorted(str(p) for p in (ROOT / "tests" / "data" / "speech").glob("*.wav"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class Server:
    """`maxwhisper serve` in a process of its own, until closed."""

    def __init__(self, model: str, device: str, max_batch: int):
        import httpx

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, "-m", "maxwhisper.cli", "serve", "--model", model,
                                      "--device", device, "--port", str(self.port), "--max-batch", str(max_batch)],
                                     env=env, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 900
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"maxwhisper serve exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise TimeoutError("the server never became ready")

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _durations() -> dict[str, float]:
    import soundfile as sf

    return {c: sf.info(c).frames / sf.info(c).samplerate for c in CLIPS}


def offline_split(model, batch_size: int) -> tuple[float, float]:
    """(encoder seconds, total seconds) of `transcribe_many` over the clips in this
    process, `batch_size` at a time: what batching can share at best."""
    from maxwhisper.audio import load_audio

    audios = [load_audio(c) for c in CLIPS]
    real, spent = model.runtime.encode, [0.0]

    def timed(mel):
        start = time.perf_counter()
        out = real(mel)
        spent[0] += time.perf_counter() - start
        return out

    model.runtime.encode = timed
    try:
        start = time.perf_counter()
        model.transcribe_many(audios, batch_size=batch_size)
        return spent[0], time.perf_counter() - start
    finally:
        del model.runtime.encode


def load(server: Server, clients: int, requests: int, offline: dict[str, str], durations: dict[str, float]) -> dict:
    """`clients` threads sending `requests` each; wall time, latencies, mismatches."""
    import openai

    latencies: list[float] = []
    wrong: list[str] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        api = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0, timeout=600)
        for i in range(requests):
            clip = CLIPS[(k + i) % len(CLIPS)]
            start = time.perf_counter()
            with open(clip, "rb") as f:
                text = api.audio.transcriptions.create(file=f, model="whisper-1").text
            took = time.perf_counter() - start
            with lock:
                latencies.append(took)
                if text != offline[clip]:
                    wrong.append(f"{Path(clip).name}: {text!r}")

    start, cpu = time.perf_counter(), cpu_s(server.proc.pid)
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    cpu = cpu_s(server.proc.pid) - cpu
    audio = sum(durations[CLIPS[(k + i) % len(CLIPS)]] for k in range(clients) for i in range(requests))
    q = statistics.quantiles(latencies, n=20, method="inclusive") if len(latencies) > 1 else latencies * 19
    return dict(clients=clients, requests=len(latencies), audio_s=audio, wall_s=wall, throughput=audio / wall,
                cpu_s=cpu,
                p50=statistics.median(latencies), p95=q[18], wrong=wrong)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny.en")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "gpu"])
    p.add_argument("--max-batch", type=int, default=8, help="the batching server's --max-batch (default 8)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=3, help="requests per client (default 3)")
    p.add_argument("--soak", type=int, default=300, help="requests of the soak; 0: none (default 300)")
    args = p.parse_args(argv)

    import maxwhisper

    model = maxwhisper.load_model(args.model, device=args.device)
    offline = {c: model.transcribe(c)["text"].strip() for c in CLIPS}
    split = {n: offline_split(model, n) for n in (1, args.max_batch)}
    del model
    durations = _durations()
    print(f"{args.model} on {args.device}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); "
          f"{args.requests} requests per client over {len(CLIPS)} clips of {min(durations.values()):.1f}-"
          f"{max(durations.values()):.1f} s", flush=True)

    for n, (encode_s, total_s) in split.items():
        print(f"  offline, {len(CLIPS)} clips {n} at a time: {total_s:.2f} s, of which the encoder {encode_s:.2f} s",
              flush=True)

    rows, soak = [], None
    servers = {}
    try:
        for max_batch in (args.max_batch, 1):
            servers[max_batch] = Server(args.model, args.device, max_batch)
        for clients in args.clients:
            for max_batch, server in servers.items():
                row = load(server, clients, args.requests, offline, durations)
                rows.append(dict(max_batch=max_batch, **row))
                print(f"  --max-batch {max_batch}, {clients} clients: {row['throughput']:.2f} audio s/s", flush=True)
        if args.soak:
            server, clients = servers[args.max_batch], max(args.clients)
            rss = [rss_mib(server.proc.pid)]
            parts = []
            for _ in range(SOAK_PARTS):  # memory read between parts: growth or a plateau
                parts.append(load(server, clients, -(-args.soak // (clients * SOAK_PARTS)), offline, durations))
                rss.append(rss_mib(server.proc.pid))
            soak = dict(rss=rss, clients=clients, requests=sum(p["requests"] for p in parts),
                        wall_s=sum(p["wall_s"] for p in parts), audio_s=sum(p["audio_s"] for p in parts),
                        wrong=[w for p in parts for w in p["wrong"]])
    finally:
        for server in servers.values():
            server.close()

    print()
    print("| server | clients | requests | audio s | wall s | audio s / wall s | audio s / server CPU s | "
          "p50 latency s | p95 latency s | answers equal offline |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| --max-batch {r['max_batch']} | {r['clients']} | {r['requests']} | {r['audio_s']:.1f} | "
              f"{r['wall_s']:.1f} | {r['throughput']:.2f} | {r['audio_s'] / r['cpu_s']:.2f} | {r['p50']:.2f} | {r['p95']:.2f} | "
              f"{r['requests'] - len(r['wrong'])}/{r['requests']} |")
    print()
    for clients in args.clients:
        on = next(r for r in rows if r["clients"] == clients and r["max_batch"] == args.max_batch)
        off = next(r for r in rows if r["clients"] == clients and r["max_batch"] == 1)
        print(f"{clients} clients: batching gives {on['throughput'] / off['throughput']:.2f}x the throughput "
              f"of --max-batch 1 ({(on['audio_s'] / on['cpu_s']) / (off['audio_s'] / off['cpu_s']):.2f}x "
              "per server CPU second)")
    if soak is not None:
        print(f"soak: {soak['requests']} requests from {soak['clients']} clients in {soak['wall_s']:.0f} s "
              f"({soak['audio_s'] / soak['wall_s']:.2f} audio s/s), {soak['requests'] - len(soak['wrong'])} equal "
              f"offline; server RSS (MiB) at the start and after each quarter: "
              f"{', '.join(f'{r:.0f}' for r in soak['rss'])}")
    mismatches = [w for r in rows + ([soak] if soak else []) for w in r["wrong"]]
    for w in mismatches[:10]:
        print(f"differs from offline: {w}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
