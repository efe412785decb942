"""Async jobs (queued with POST /v1/generate?async=true): GET /v1/jobs/{id} (state and result),
GET /v1/jobs/{id}/events (server-sent events from the first) and DELETE /v1/jobs/{id} (cancel). Unknown or
expired ids: 404. Leaving the event stream does not cancel the job."""
from __future__ import annotations

import contextlib

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ernielab.serve.jobs import JobRecord, JobStore
from ernielab.serve.routes.native import SSE_HEADERS
from ernielab.serve.service import Service, sse


async def _replay(rec: JobRecord):
    async with contextlib.aclosing(rec.events()) as events:
        async for name, data in events:
            yield sse(name, data)


def router(svc: Service, jobs: JobStore) -> APIRouter:
    r = APIRouter()

    @r.get("/v1/jobs/{job_id}")
    async def job_status(job_id: str, request: Request):
        svc.check_key(request)
        return jobs.get(job_id).status()

    @r.get("/v1/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request):
        svc.check_key(request)
        rec = jobs.get(job_id)  # 404 before the stream starts
        return StreamingResponse(_replay(rec), media_type="text/event-stream", headers=SSE_HEADERS)

    @r.delete("/v1/jobs/{job_id}")
    async def job_cancel(job_id: str, request: Request):
        svc.check_key(request)
        return jobs.cancel(job_id).status()

    return r
