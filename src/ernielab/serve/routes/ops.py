"""Operations: GET /health (always open, for load balancers), GET /metrics (Prometheus; behind the API key
when one is set), GET /v1/models and GET /v1/config."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ernielab.serve.service import Service


def router(svc: Service) -> APIRouter:
    r = APIRouter()

    @r.get("/health")
    async def health():
        b = svc.batcher
        return {"status": "ok" if b.alive else "degraded", "model": svc.model_name,
                "queue_length": b.queue_length(), "max_batch": svc.max_batch, "queue_size": svc.queue_size,
                "pipeline_calls": b.pipeline_calls}

    @r.get("/metrics")
    async def prometheus(request: Request):
        svc.check_key(request)
        return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @r.get("/v1/models")
    async def models(request: Request):
        svc.check_key(request)
        return {"object": "list", "data": [{"id": svc.model_name, "object": "model", "created": svc.started,
                                            "owned_by": "ernielab"}]}

    @r.get("/v1/config")
    async def config(request: Request):
        """The model's defaults and this server's limits (the web page fills its form from them)."""
        svc.check_key(request)
        cfg, lim = svc.cfg, svc.limits
        return {"model": svc.model_name, "height": cfg.height, "width": cfg.width, "steps": cfg.steps,
                "guidance_scale": cfg.guidance_scale, "shift": cfg.shift, "negative_prompt": cfg.negative_prompt,
                "max_side": lim.max_side, "max_steps": lim.max_steps, "max_images": lim.max_images,
                "max_batch": svc.max_batch, "enhancer": svc.has_enhancer, "size_multiple": size_multiple(svc.pipe)}

    return r


def size_multiple(pipe) -> int:
    """The smallest side step the latent space accepts (e.g. the patch size), found by trying."""
    for m in (1, 2, 4, 8, 16, 32, 64):
        try:
            pipe.latent_space.latent_shape(m, m)
            return m
        except (ValueError, AssertionError):
            continue
    return 1
