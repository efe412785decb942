"""The `ernielab serve` web app: an OpenAI-compatible Images API, a native API with every pipeline option,
server-sent progress and async jobs, /v1/models, /health, Prometheus /metrics and a web page at `/`.

Every error is a JSON body {"error": {"message", "type", "param", "code"}} with a 4xx/5xx status. Request
bodies are read with a size limit and checked by hand (`checks.py`) before anything is queued; no request
field is ever used as a path. The pieces: `service.py` (what the endpoints share), `routes/` (one module per
endpoint group), `jobs.py` (async jobs), `hosts.py` (the Host-header check), `batcher.py` (the model thread).
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Callable, Iterable

from fastapi import FastAPI

from ernielab.serve.checks import MAX_SEED, ServerLimits
from ernielab.serve.errors import APIError, error_response, install_error_handlers
from ernielab.serve.hosts import LOCAL_HOSTS, HostCheck
from ernielab.serve.jobs import JobStore
from ernielab.serve.routes import jobs as jobs_routes
from ernielab.serve.routes import native, ops, page
from ernielab.serve.routes import openai as openai_routes
from ernielab.serve.service import Service

__all__ = ["APIError", "MAX_SEED", "ServerLimits", "create_app", "error_response"]


def create_app(pipe, *, model_name: str = "ernielab-default", max_batch: int = 8, queue_size: int = 64,
               timeout: float = 300.0, api_key: str | None = None, batch_wait: float = 0.005,
               enhancer_factory: Callable[[], Any] | None = None, limits: ServerLimits | None = None,
               allowed_hosts: Iterable[str] | None = LOCAL_HOSTS, job_ttl: float = 600.0) -> FastAPI:
    """The app around a loaded `TextToImagePipeline`. `timeout`: seconds a request may take in all (504 after);
    `enhancer_factory`: loads the prompt enhancer on first use (None: requests with enhance are refused);
    `allowed_hosts`: the Host names answered (default: localhost's; None: any, for a server bound to a public
    address); `job_ttl`: seconds a finished async job stays readable."""
    svc = Service(pipe, model_name=model_name, max_batch=max_batch, queue_size=queue_size, timeout=timeout,
                  api_key=api_key, batch_wait=batch_wait, enhancer_factory=enhancer_factory,
                  limits=limits or ServerLimits())
    jobs = JobStore(svc, ttl=job_ttl)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        svc.batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(svc.batcher.stop)
            jobs.close()

    app = FastAPI(title="ernielab serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service, app.state.batcher, app.state.metrics, app.state.jobs = svc, svc.batcher, svc.metrics, jobs
    install_error_handlers(app)
    for r in (ops.router(svc), openai_routes.router(svc), native.router(svc, jobs), jobs_routes.router(svc, jobs),
              page.router()):
        app.include_router(r)
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=allowed_hosts)
    return app
