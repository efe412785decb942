"""A real uvicorn server on 127.0.0.1 (free port, in a thread) around a tiny random pipeline from disk."""
from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import uvicorn

API_KEY = "test-key"


class LiveServer:
    def __init__(self, app):
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                                   timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()

    def client(self, **kw) -> httpx.Client:
        kw.setdefault("timeout", 60)
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, **kw)

    def metric(self, name: str) -> float:
        """The value of one unlabelled sample in /metrics (0 when absent)."""
        text = httpx.get(self.url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10).text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

    def healthy(self) -> bool:
        r = httpx.get(self.url + "/health", timeout=10)
        return r.status_code == 200 and r.json()["status"] == "ok"


@pytest.fixture(scope="session")
def make_server(tiny_pipeline_dir, text_encoder):
    """make_server(**create_app kwargs) -> a started LiveServer (stopped at the end of the session). Each
    server loads its own copy of the tiny pipeline (its batcher hooks the transformer)."""
    from ernielab.enhancer.model import PromptEnhancer
    from ernielab.image.pipeline import TextToImagePipeline
    from ernielab.serve.app import create_app

    servers = []

    def make(**kw) -> LiveServer:
        pipe = TextToImagePipeline.from_pretrained(tiny_pipeline_dir, text_encoder=text_encoder)
        kw.setdefault("api_key", API_KEY)
        kw.setdefault("model_name", "tiny")
        kw.setdefault("enhancer_factory", PromptEnhancer.from_pretrained)
        server = LiveServer(create_app(pipe, **kw)).start()
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def server(make_server) -> LiveServer:
    """The default server: max batch 8, queue 64, API key required."""
    return make_server(max_batch=8, queue_size=64)
