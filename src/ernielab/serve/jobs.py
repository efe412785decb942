"""Async jobs of `ernielab serve`: `POST /v1/generate?async=true` queues a generation and answers 202 with a
job id at once; the job then runs whether or not anyone watches. `GET /v1/jobs/{id}/events` streams its
server-sent events (queued, started, progress per step, then done with the images or error) from the start,
however late it is opened and as often as it is opened; `GET /v1/jobs/{id}` is its state and result;
`DELETE /v1/jobs/{id}` cancels it. A finished job is kept `ttl` seconds, and finished jobs holding more than
`keep_images` images in all are dropped oldest first (both checked whenever a job is submitted)."""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from typing import Any, AsyncIterator

from ernielab.serve.batcher import Job, Outcome
from ernielab.serve.checks import Generation
from ernielab.serve.errors import APIError
from ernielab.serve.service import Service

ENDPOINT = "generate_async"


class JobRecord:
    """One async job and every event it has sent so far."""

    def __init__(self, job: Job):
        self.job = job
        self.history: list[tuple[str, dict]] = []
        self.outcome: Outcome | None = None
        self.finished: float | None = None  # time.monotonic() when the outcome came
        self.task: asyncio.Task | None = None
        self._changed = asyncio.Event()

    def add(self, name: str, data: dict) -> None:
        self.history.append((name, data))
        self._changed.set()
        self._changed = asyncio.Event()

    def finish(self, outcome: Outcome, final: tuple[str, dict]) -> None:
        self.outcome, self.finished = outcome, time.monotonic()
        self.add(*final)

    async def events(self) -> AsyncIterator[tuple[str, dict]]:
        """Every event from the first, then each new one as it comes, until the final one."""
        i = 0
        while True:
            changed = self._changed
            while i < len(self.history):
                yield self.history[i]
                i += 1
            if self.finished is not None:
                return
            await changed.wait()

    def status(self) -> dict[str, Any]:
        job, out = self.job, self.outcome
        if out is None:
            state = "running" if job.state == "running" else "queued"
        else:
            state = {200: "done", 499: "cancelled"}.get(out.status, "error")
        progress = next((d for n, d in reversed(self.history) if n == "progress"), None)
        body: dict[str, Any] = {"id": job.id, "object": "job", "status": state, "images": len(job.prompts),
                                "step": progress["step"] if progress else 0,
                                "steps": progress["steps"] if progress else job.settings.steps,
                                "events": f"/v1/jobs/{job.id}/events"}
        if out is not None and out.status == 200:
            body["result"] = self.history[-1][1]
        elif out is not None:
            body["error"] = {"message": out.message, "code": out.status}
        return body


class JobStore:
    def __init__(self, service: Service, ttl: float = 600.0, keep_images: int = 256):
        self.service, self.ttl, self.keep_images = service, ttl, keep_images
        self._jobs: OrderedDict[str, JobRecord] = OrderedDict()

    def submit(self, gen: Generation) -> JobRecord:
        self.prune()
        job = self.service.enqueue(gen)  # 429 when the queue is full
        rec = JobRecord(job)
        rec.add("queued", self.service.queued_event(job))
        rec.task = asyncio.get_running_loop().create_task(self._run(rec))
        self._jobs[job.id] = rec
        self._gauge()
        return rec

    async def _run(self, rec: JobRecord) -> None:
        outcome = None
        try:
            async with contextlib.aclosing(self.service.follow(rec.job)) as events:
                async for name, data in events:
                    if name == "outcome":
                        outcome = data
                    else:
                        rec.add(name, data)
        except Exception as e:  # never leave a job (and its watchers) without an end
            self.service.cancel(rec.job)
            outcome = Outcome(500, f"internal error: {type(e).__name__}")
        self.service.record(ENDPOINT, rec.job, outcome)
        rec.finish(outcome, self.service.final_event(rec.job, outcome))

    def get(self, job_id: str) -> JobRecord:
        rec = self._jobs.get(job_id)
        if rec is None:
            raise APIError(404, f"no job {job_id[:64]!r} (unknown, or finished more than {self.ttl:g} s ago)",
                           "id")
        return rec

    def cancel(self, job_id: str) -> JobRecord:
        rec = self.get(job_id)
        if rec.outcome is None and not rec.job.cancelled:
            self.service.cancel(rec.job)
        return rec

    def prune(self) -> None:
        """Drop finished jobs older than `ttl`, then the oldest finished ones while more than `keep_images`
        images are held (the images are the memory)."""
        now = time.monotonic()
        for k in [k for k, r in self._jobs.items() if r.finished is not None and now - r.finished > self.ttl]:
            del self._jobs[k]
        finished = [(k, len(r.job.prompts)) for k, r in self._jobs.items() if r.finished is not None]
        held = sum(n for _, n in finished)
        for k, n in finished:
            if held <= self.keep_images:
                break
            del self._jobs[k]
            held -= n
        self._gauge()

    def close(self) -> None:
        for rec in self._jobs.values():
            if rec.task is not None and not rec.task.done():
                rec.task.cancel()

    def _gauge(self) -> None:
        self.service.metrics.jobs_stored.set(len(self._jobs))
