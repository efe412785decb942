"""`ernielab serve` as a user starts it: a real process on 127.0.0.1, answering within seconds."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_serve(*args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "ernielab.serve", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_serve_command_starts_serves_and_stops(tiny_pipeline_dir):
    port = free_port()
    proc = run_serve("--model", tiny_pipeline_dir, "--port", port, "--max-batch", 4, "--api-key", "k",
                     "--threads", 1, "--allow-host", "box.lan")
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() - t0 < 60, "no answer within 60 s"
            time.sleep(0.1)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/generate", json={"prompt": "a cat", "steps": 2},
                       headers={"Authorization": "Bearer k"}, timeout=30)
        assert r.status_code == 200 and len(r.json()["images"]) == 1
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer k"},
                         timeout=5).json()["data"][0]["id"] == tiny_pipeline_dir.name
        for host, status in (("box.lan", 200), (f"localhost:{port}", 200), ("evil.example", 400)):  # DNS rebinding
            assert httpx.get(f"http://127.0.0.1:{port}/health", headers={"Host": host}, timeout=5).status_code == status
        assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 401
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0


def test_serve_command_bad_options():
    for args, words in ((["--port", "0"], "--port"), (["--max-batch", "0"], "--max-batch"),
                        (["--enhancer", "/nonexistent/x"], "no such folder")):
        proc = run_serve(*args)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2 and err.startswith("error:") and words in err, (args, err)
        assert "Traceback" not in err
