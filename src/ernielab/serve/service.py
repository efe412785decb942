"""What every endpoint group of `ernielab serve` shares: the model, the batcher, the metrics, the request
checks and the API key, with the steps of a generation request (queue it, follow it, wait for it, record it)."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from typing import Any, AsyncIterator, Callable

from fastapi import Request

from ernielab.serve.batcher import Batcher, Job, Outcome, QueueFull
from ernielab.serve.checks import Checker, Generation, ServerLimits, read_json
from ernielab.serve.errors import APIError
from ernielab.serve.metrics import Metrics


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


class Service:
    def __init__(self, pipe, *, model_name: str, max_batch: int, queue_size: int, timeout: float,
                 api_key: str | None, batch_wait: float, enhancer_factory: Callable[[], Any] | None,
                 limits: ServerLimits):
        self.pipe, self.cfg, self.model_name = pipe, pipe.config, model_name
        self.max_batch, self.queue_size, self.timeout, self.api_key = max_batch, queue_size, timeout, api_key
        self.limits, self.has_enhancer = limits, enhancer_factory is not None
        self.metrics = Metrics()
        self.batcher = Batcher(pipe, max_batch=max_batch, queue_size=queue_size, batch_wait=batch_wait,
                               enhancer_factory=enhancer_factory, metrics=self.metrics)
        self.checker = Checker(pipe, limits, max_batch, self.has_enhancer)
        self.started = int(time.time())

    # ---- requests ------------------------------------------------------------------------------------------
    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)")

    async def read_json(self, request: Request) -> dict:
        return await read_json(request, self.limits.max_body)

    # ---- a generation's life -------------------------------------------------------------------------------
    def enqueue(self, gen: Generation) -> Job:
        job = Job(gen.prompts, gen.seed, gen.settings, asyncio.get_running_loop())
        try:
            job.position = self.batcher.submit(job)
        except QueueFull as e:
            self.metrics.rejected.inc()
            raise APIError(429, str(e)) from None
        return job

    def cancel(self, job: Job) -> None:
        self.batcher.cancel(job)
        self.metrics.cancelled.inc()

    def time_out(self, job: Job) -> Outcome:
        self.cancel(job)
        self.metrics.timeouts.inc()
        return Outcome(504, f"the request took longer than the server's limit of {self.timeout:g} s")

    async def wait(self, job: Job, request: Request) -> Outcome:
        """The job's outcome; cancels it when the client goes away or the time limit passes."""
        deadline = job.enqueued + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return self.time_out(job)
            done, _ = await asyncio.wait({job.future}, timeout=min(0.2, left))
            if done:
                return job.future.result()
            if await request.is_disconnected():
                self.cancel(job)
                return Outcome(499, "client disconnected")

    async def follow(self, job: Job) -> AsyncIterator[tuple[str, Any]]:
        """The job's progress events (started, progress) as they come, then ("outcome", Outcome); cancels the
        job at the time limit. Close it with `contextlib.aclosing`."""
        deadline, getter = job.enqueued + self.timeout, None
        try:
            while True:
                getter = asyncio.ensure_future(job.events.get())
                done, _ = await asyncio.wait({getter, job.future}, timeout=max(0.0, deadline - time.monotonic()),
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                    continue
                getter.cancel()
                if not job.future.done():
                    yield "outcome", self.time_out(job)
                    return
                while not job.events.empty():
                    yield job.events.get_nowait()
                yield "outcome", job.future.result()
                return
        finally:
            if getter is not None and not getter.done():
                getter.cancel()

    def record(self, endpoint: str, job: Job, outcome: Outcome) -> None:
        self.metrics.requests.labels(endpoint, str(outcome.status)).inc()
        if outcome.status == 200:
            self.metrics.latency.labels(endpoint).observe(time.monotonic() - job.enqueued)

    def result(self, job: Job, outcome: Outcome) -> dict:
        """The native API's answer for a finished job."""
        s = job.settings
        return {"id": job.id, "created": int(time.time()), "model": self.model_name, "width": s.width,
                "height": s.height, "steps": s.steps, "guidance": s.guidance_scale, "shift": s.shift,
                "negative_prompt": s.negative_prompt, "enhance": s.enhance, "seed": job.seed,
                "images": outcome.images}

    def queued_event(self, job: Job) -> dict:
        return {"id": job.id, "position": job.position, "steps": job.settings.steps, "images": len(job.prompts)}

    def final_event(self, job: Job, outcome: Outcome) -> tuple[str, dict]:
        if outcome.status == 200:
            return "done", self.result(job, outcome)
        return "error", {"error": {"message": outcome.message, "code": outcome.status}}

    async def stream(self, job: Job, endpoint: str) -> AsyncIterator[str]:
        """Server-sent events of a job whose client waits on the stream: queued, started, progress..., then done
        or error. The job is cancelled when the client goes away first."""
        outcome = None
        try:
            yield sse("queued", self.queued_event(job))
            async with contextlib.aclosing(self.follow(job)) as events:
                async for name, data in events:
                    if name == "outcome":
                        outcome = data
                    else:
                        yield sse(name, data)
            self.record(endpoint, job, outcome)
            yield sse(*self.final_event(job, outcome))
        finally:
            if outcome is None:  # the client went away mid-stream
                self.cancel(job)
                self.metrics.requests.labels(endpoint, "499").inc()
