"""The native API: POST /v1/generate with every pipeline option; `?stream=true` answers with server-sent
progress, `?async=true` with a job id at once (202; see `ernielab.serve.jobs`)."""
from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ernielab.serve.errors import APIError, error_response
from ernielab.serve.jobs import JobStore
from ernielab.serve.service import Service

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def router(svc: Service, jobs: JobStore) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/generate")
    async def generate(request: Request, stream: bool = False, async_: bool = Query(False, alias="async")):
        svc.check_key(request)
        if stream and async_:
            raise APIError(400, "ask for either ?stream=true or ?async=true, not both", "async")
        gen = svc.checker.native(await svc.read_json(request))
        if async_:
            rec = jobs.submit(gen)
            return JSONResponse({**rec.status(), "position": rec.job.position}, status_code=202,
                                headers={"Location": f"/v1/jobs/{rec.job.id}"})
        job = svc.enqueue(gen)
        if stream:
            return StreamingResponse(svc.stream(job, "generate_stream"), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        outcome = await svc.wait(job, request)
        svc.record("generate", job, outcome)
        if outcome.status != 200:
            return error_response(outcome.status, outcome.message)
        return svc.result(job, outcome)

    return r
