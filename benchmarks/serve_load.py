"""Load test for `ernielab serve` on the bundled model, against a real server process on 127.0.0.1.

Phases (each a fresh `python -m ernielab.serve` process):
  1. batching:  REQUESTS requests from CLIENTS concurrent clients, --max-batch MAX_BATCH
  2. baseline:  the same with --max-batch 1 (BASELINE_REQUESTS of them; fewer keeps the run bounded)
  3. overload:  OVERLOAD clients fire one request each at once into --queue-size 8: 429s, never a 5xx or a
                lost request, the server healthy afterwards
Reported: lost requests (no HTTP answer), 5xx, other statuses, images/s, p50/p95 latency, pipeline calls and
images per call (from /metrics), RSS of the server before and after. Printed, and written as JSON to --out
(default outputs/serve_load/serve_load.json, untracked; pass --out benchmarks/results/... for a tracked one).

    .venv/bin/python benchmarks/serve_load.py [--requests 200] [--clients 16] [--steps 4] [--out FILE]
    .venv/bin/python benchmarks/serve_load.py --smoke    # seconds: 2 requests a phase, 1 step, 32x32 images
                                                         # -> outputs/serve_load/serve_load_smoke.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

SMOKE = dict(requests=2, baseline_requests=2, clients=2, max_batch=2, steps=1, overload=10, size=32,
             out="outputs/serve_load/serve_load_smoke.json")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


class Server:
    def __init__(self, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "ernielab.serve", "--port", str(self.port), *args],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stderr.read().decode())
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        self.startup_s = time.monotonic() - t0

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


async def run_clients(url: str, n: int, clients: int, body, all_at_once: bool = False) -> dict:
    codes, latencies, lost, images = Counter(), [], 0, 0
    todo = iter(range(n))
    gate = asyncio.Event()

    async def client():
        nonlocal lost, images
        async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(900, connect=30)) as c:
            await gate.wait()
            for i in todo:
                t = time.perf_counter()
                try:
                    r = await c.post("/v1/generate", json=body(i))
                except httpx.HTTPError:
                    lost += 1
                    continue
                codes[r.status_code] += 1
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t)
                    images += len(r.json()["images"])
                if all_at_once:
                    return

    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    await asyncio.sleep(0.2)
    t0 = time.perf_counter()
    gate.set()
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else [float("nan")] * 19
    return {"requests": n, "clients": clients, "lost": lost, "status": dict(sorted(codes.items())),
            "5xx": sum(v for k, v in codes.items() if k >= 500), "images": images, "wall_s": round(wall, 2),
            "images_per_s": round(images / wall, 3), "p50_s": round(statistics.median(latencies), 3) if latencies
            else None, "p95_s": round(q[18], 3)}


def phase(name: str, server_args: list[str], n: int, clients: int, body, all_at_once=False) -> dict:
    server = Server(*server_args)
    try:
        before = rss_mib(server.proc.pid)
        result = asyncio.run(run_clients(server.url, n, clients, body, all_at_once))
        result["pipeline_calls"] = metric(server.url, "ernielab_serve_batch_images_count")
        result["images_per_call"] = round(metric(server.url, "ernielab_serve_batch_images_sum")
                                          / max(result["pipeline_calls"], 1), 2)
        result["healthy_after"] = httpx.get(server.url + "/health", timeout=30).json()["status"] == "ok"
        result["rss_mib_before"] = round(before, 1)
        result["rss_mib_after"] = round(rss_mib(server.proc.pid), 1)
        result["startup_s"] = round(server.startup_s, 2)
    finally:
        result["exit_code"] = server.stop()
    print(f"{name}: {json.dumps(result)}", flush=True)
    return result


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--baseline-requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4, help="sampling steps per request (the model's default: 50)")
    ap.add_argument("--size", type=int, default=None, help="image width and height (default: the model's)")
    ap.add_argument("--overload", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="the servers' torch threads (default: torch's)")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--out", default="outputs/serve_load/serve_load.json",
                    help="report JSON (default under outputs/, untracked; a path under benchmarks/results/ to keep)")
    ap.add_argument("--smoke", action="store_true", help="seconds, numbers meaningless: "
                    + ", ".join(f"{k}={v!r}" for k, v in SMOKE.items()))
    args = ap.parse_args(argv)
    if args.smoke:  # the smoke settings become the defaults: options given explicitly still win
        ap.set_defaults(**SMOKE)
        args = ap.parse_args(argv)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    extra = ["--threads", str(args.threads)] if args.threads else []
    size = {"width": args.size, "height": args.size} if args.size else {}

    def body(i):
        return {"prompt": f"a {['red', 'blue', 'green', 'yellow'][i % 4]} circle", "seed": i, "steps": args.steps,
                **size}

    results = {"settings": {k: v for k, v in vars(args).items() if k != "out"},
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpus": os.cpu_count()}
    results["batching"] = phase("batching", ["--max-batch", str(args.max_batch), *extra], args.requests,
                                args.clients, body)
    if not args.skip_baseline:
        results["baseline"] = phase("baseline (--max-batch 1)", ["--max-batch", "1", *extra], args.baseline_requests,
                                    args.clients, body)
        results["speedup"] = round(results["batching"]["images_per_s"] / results["baseline"]["images_per_s"], 2)
    results["overload"] = phase("overload (--queue-size 8)", ["--max-batch", "4", "--queue-size", "8", *extra],
                                args.overload, args.overload, body, all_at_once=True)
    print(json.dumps(results, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
