"""The OpenAI Images API: POST /v1/images/generations (b64_json only)."""
from __future__ import annotations

import time

from fastapi import APIRouter, Request

from ernielab.serve.errors import error_response
from ernielab.serve.service import Service


def router(svc: Service) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/images/generations")
    async def openai_generations(request: Request):
        svc.check_key(request)
        gen = svc.checker.openai(await svc.read_json(request))
        job = svc.enqueue(gen)
        outcome = await svc.wait(job, request)
        svc.record("openai", job, outcome)
        if outcome.status != 200:
            return error_response(outcome.status, outcome.message)
        return {"created": int(time.time()),
                "data": [{"b64_json": im["b64_png"], "revised_prompt": im["revised_prompt"]} for im in outcome.images]}

    return r
