"""The `ernielab serve` web app: an OpenAI-compatible Images API, a native API with every pipeline option and
server-sent progress, /v1/models, /health, Prometheus /metrics and a web page at `/`.

Every error is a JSON body {"error": {"message", "type", "param", "code"}} with a 4xx/5xx status. Request
bodies are read with a size limit and checked by hand (types, ranges, the pipeline's own `check_arguments`)
before anything is queued; no request field is ever used as a path.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import re
import secrets
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ernielab.serve.batcher import Batcher, Job, Outcome, QueueFull, Settings

STATIC = Path(str(resources.files("ernielab.serve") / "static"))
MAX_SEED = 2**32 - 1
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
               429: "rate_limit_error", 499: "cancelled", 503: "server_error", 504: "timeout_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status, headers=headers)


class Metrics:
    """Prometheus metrics in a registry of the app's own (several apps can live in one process)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        p = "ernielab_serve_"
        self.queue_length = Gauge(p + "queue_length", "requests waiting for the model", registry=r)
        self.batch_images = Histogram(p + "batch_images", "images per pipeline call", registry=r,
                                      buckets=(1, 2, 4, 8, 16, 32, 64))
        self.batch_requests = Histogram(p + "batch_requests", "requests per pipeline call", registry=r,
                                        buckets=(1, 2, 4, 8, 16, 32, 64))
        self.pipeline_seconds = Histogram(p + "pipeline_seconds", "time of one pipeline call", registry=r,
                                          buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
        self.queue_wait = Histogram(p + "queue_wait_seconds", "time from queued to running", registry=r,
                                    buckets=(.005, .01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
        self.latency = Histogram(p + "request_seconds", "request latency (accepted generation requests)",
                                 ["endpoint"], registry=r,
                                 buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.images = Counter(p + "images_generated", "images generated", registry=r)
        self.requests = Counter(p + "requests", "generation requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.rejected = Counter(p + "rejected_queue_full", "requests refused with 429 (queue full)", registry=r)
        self.cancelled = Counter(p + "cancelled", "requests cancelled (client gone or time limit)", registry=r)
        self.timeouts = Counter(p + "timeouts", "requests that ran past the time limit (504)", registry=r)
        self.aborted_batches = Counter(p + "aborted_batches", "pipeline calls stopped because every request in "
                                       "them was cancelled", registry=r)


# ---- request checking ------------------------------------------------------------------------------------
def _int(body: dict, name: str, default, lo: int, hi: int) -> int:
    value = body.get(name, default)
    if value is None:
        value = default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{name}' must be an integer, got {json.dumps(value)[:40]}", name)
    if not lo <= value <= hi:
        raise APIError(400, f"'{name}' must be between {lo} and {hi}, got {value}", name)
    return value


def _float(body: dict, name: str, default) -> float | None:
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise APIError(400, f"'{name}' must be a finite number, got {json.dumps(value)[:40]}", name)
    return float(value)


def _str(body: dict, name: str, default=None, max_len: int = 4000) -> str | None:
    value = body.get(name, default)
    if value is None:
        return None
    if not isinstance(value, str):
        raise APIError(400, f"'{name}' must be a string", name)
    if len(value) > max_len:
        raise APIError(400, f"'{name}' is longer than {max_len} characters", name)
    return value


def _bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(400, f"'{name}' must be true or false", name)
    return value


def _prompt(text: str | None, name: str) -> str:
    if text is None:
        raise APIError(400, f"'{name}' is required", name)
    if not text.strip():
        raise APIError(400, f"'{name}' must not be empty", name)
    return text


class ServerLimits:
    def __init__(self, max_side: int = 256, max_steps: int = 200, max_images: int = 16, max_body: int = 65536):
        self.max_side, self.max_steps, self.max_images, self.max_body = max_side, max_steps, max_images, max_body


def create_app(pipe, *, model_name: str = "ernielab-default", max_batch: int = 8, queue_size: int = 64,
               timeout: float = 300.0, api_key: str | None = None, batch_wait: float = 0.005,
               enhancer_factory: Callable[[], Any] | None = None, limits: ServerLimits | None = None) -> FastAPI:
    """The app around a loaded `TextToImagePipeline`. `timeout`: seconds a request may take in all (504 after);
    `enhancer_factory`: loads the prompt enhancer on first use (None: requests with enhance are refused)."""
    limits = limits or ServerLimits()
    metrics = Metrics()
    batcher = Batcher(pipe, max_batch=max_batch, queue_size=queue_size, batch_wait=batch_wait,
                      enhancer_factory=enhancer_factory, metrics=metrics)
    cfg = pipe.config
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(batcher.stop)

    app = FastAPI(title="ernielab serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    app.state.metrics = metrics

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _any_error(request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}")

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)")

    async def read_json(request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise APIError(400, "bad Content-Length")
            if int(length) > limits.max_body:
                raise APIError(413, f"request body larger than {limits.max_body} bytes")
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if ctype not in ("application/json", ""):  # no form posts: a web page elsewhere cannot post here unasked
            raise APIError(415, "send the request body as application/json")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body:
                raise APIError(413, f"request body larger than {limits.max_body} bytes")
        try:
            data = json.loads(body.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        return data

    def settings_for(prompts: list[str], *, height, width, steps, guidance, shift, negative, seed,
                     enhance: bool) -> Settings:
        if (height is not None and height > limits.max_side) or (width is not None and width > limits.max_side):
            raise APIError(400, f"width and height must be at most {limits.max_side} pixels on this server", "size")
        if steps is not None and steps > limits.max_steps:
            raise APIError(400, f"'steps' must be at most {limits.max_steps} on this server", "steps")
        if len(prompts) > limits.max_images:
            raise APIError(400, f"at most {limits.max_images} images per request", "n")
        if enhance and enhancer_factory is None:
            raise APIError(400, "this server has no prompt enhancer", "enhance")
        if seed + len(prompts) - 1 > MAX_SEED:
            raise APIError(400, f"'seed' + n - 1 must be at most {MAX_SEED}", "seed")
        try:
            args = pipe.check_arguments(prompts, negative_prompt=negative, height=height, width=width,
                                        num_inference_steps=steps, guidance_scale=guidance, shift=shift, seed=seed,
                                        batch_size=max_batch)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return Settings(height=args["height"], width=args["width"], steps=args["num_inference_steps"],
                        guidance_scale=float(args["guidance_scale"]), shift=float(args["shift"]),
                        negative_prompt=args["negative_prompt"], enhance=enhance)

    def enqueue(prompts: list[str], seed: int, settings: Settings) -> Job:
        job = Job(prompts, seed, settings, asyncio.get_running_loop())
        try:
            job.position = batcher.submit(job)
        except QueueFull as e:
            metrics.rejected.inc()
            raise APIError(429, str(e)) from None
        return job

    async def wait(job: Job, request: Request) -> Outcome:
        """The job's outcome; cancels it when the client goes away or the time limit passes."""
        deadline = job.enqueued + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                batcher.cancel(job)
                metrics.timeouts.inc()
                metrics.cancelled.inc()
                return Outcome(504, f"the request took longer than the server's limit of {timeout:g} s")
            done, _ = await asyncio.wait({job.future}, timeout=min(0.2, left))
            if done:
                return job.future.result()
            if await request.is_disconnected():
                batcher.cancel(job)
                metrics.cancelled.inc()
                return Outcome(499, "client disconnected")

    def record(endpoint: str, job: Job, outcome: Outcome) -> None:
        metrics.requests.labels(endpoint, str(outcome.status)).inc()
        if outcome.status == 200:
            metrics.latency.labels(endpoint).observe(time.monotonic() - job.enqueued)

    # ---- routes ------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok" if batcher.alive else "degraded", "model": model_name,
                "queue_length": batcher.queue_length(), "max_batch": max_batch, "queue_size": queue_size,
                "pipeline_calls": batcher.pipeline_calls}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                            "owned_by": "ernielab"}]}

    @app.get("/v1/config")
    async def config(request: Request):
        """The model's defaults and this server's limits (the web page fills its form from them)."""
        check_key(request)
        return {"model": model_name, "height": cfg.height, "width": cfg.width, "steps": cfg.steps,
                "guidance_scale": cfg.guidance_scale, "shift": cfg.shift, "negative_prompt": cfg.negative_prompt,
                "max_side": limits.max_side, "max_steps": limits.max_steps, "max_images": limits.max_images,
                "max_batch": max_batch, "enhancer": enhancer_factory is not None,
                "size_multiple": _size_multiple(pipe)}

    @app.post("/v1/images/generations")
    async def openai_generations(request: Request):
        check_key(request)
        body = await read_json(request)
        prompt = _prompt(_str(body, "prompt"), "prompt")
        n = _int(body, "n", 1, 1, limits.max_images)
        fmt = _str(body, "response_format", "b64_json")
        if fmt == "url":
            raise APIError(400, "response_format 'url' is not supported: this server stores no images; "
                           "use 'b64_json'", "response_format")
        if fmt != "b64_json":
            raise APIError(400, f"response_format must be 'b64_json', got {fmt!r}", "response_format")
        size = _str(body, "size", "auto")
        if size in ("auto", None):
            width, height = cfg.width, cfg.height
        else:
            m = re.fullmatch(r"\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*", size)
            if not m:
                raise APIError(400, f"size must look like '256x256' (width x height), got {size!r}", "size")
            width, height = int(m.group(1)), int(m.group(2))
        seed = _int(body, "seed", None, 0, MAX_SEED) if body.get("seed") is not None else secrets.randbelow(2**31)
        enhance = _bool(body, "enhance", False)
        settings = settings_for([prompt] * n, height=height, width=width, steps=None, guidance=None, shift=None,
                                negative=None, seed=seed, enhance=enhance)
        job = enqueue([prompt] * n, seed, settings)
        outcome = await wait(job, request)
        record("openai", job, outcome)
        if outcome.status != 200:
            return error_response(outcome.status, outcome.message)
        return {"created": int(time.time()),
                "data": [{"b64_json": im["b64_png"], "revised_prompt": im["revised_prompt"]} for im in outcome.images]}

    @app.post("/v1/generate")
    async def generate(request: Request, stream: bool = False):
        check_key(request)
        body = await read_json(request)
        if ("prompt" in body) == ("prompts" in body):
            raise APIError(400, "give exactly one of 'prompt' (a string) or 'prompts' (a list of strings)", "prompt")
        if "prompt" in body:
            texts = [_prompt(_str(body, "prompt"), "prompt")]
        else:
            texts = body["prompts"]
            if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
                raise APIError(400, "'prompts' must be a non-empty list of strings", "prompts")
            if len(texts) > limits.max_images:
                raise APIError(400, f"at most {limits.max_images} images per request", "prompts")
            texts = [_prompt(t if len(t) <= 4000 else None, "prompts") for t in texts]
        n = _int(body, "n", 1, 1, limits.max_images)
        prompts = [t for t in texts for _ in range(n)]
        big = max(limits.max_side, 1) * 4
        height = _int(body, "height", None, 1, big) if body.get("height") is not None else None
        width = _int(body, "width", None, 1, big) if body.get("width") is not None else None
        steps = _int(body, "steps", None, 1, 10**6) if body.get("steps") is not None else None
        guidance = _float(body, "guidance", body.get("guidance_scale"))
        shift = _float(body, "shift", None)
        negative = _str(body, "negative_prompt", None)
        seed = _int(body, "seed", 0, 0, MAX_SEED)
        enhance = _bool(body, "enhance", False)
        settings = settings_for(prompts, height=height, width=width, steps=steps, guidance=guidance, shift=shift,
                                negative=negative, seed=seed, enhance=enhance)
        job = enqueue(prompts, seed, settings)

        def result(outcome: Outcome) -> dict:
            return {"id": job.id, "created": int(time.time()), "model": model_name, "width": settings.width,
                    "height": settings.height, "steps": settings.steps, "guidance": settings.guidance_scale,
                    "shift": settings.shift, "negative_prompt": settings.negative_prompt, "enhance": enhance,
                    "seed": seed, "images": outcome.images}

        if not stream:
            outcome = await wait(job, request)
            record("generate", job, outcome)
            if outcome.status != 200:
                return error_response(outcome.status, outcome.message)
            return result(outcome)

        async def events():
            outcome, getter = None, None
            try:
                yield _sse("queued", {"id": job.id, "position": job.position, "steps": settings.steps,
                                      "images": len(prompts)})
                deadline = job.enqueued + timeout
                while True:
                    getter = asyncio.ensure_future(job.events.get())
                    done, _ = await asyncio.wait({getter, job.future}, timeout=max(0.0, deadline - time.monotonic()),
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if getter in done:
                        name, data = getter.result()
                        yield _sse(name, data)
                        continue
                    getter.cancel()
                    if job.future.done():
                        while not job.events.empty():
                            name, data = job.events.get_nowait()
                            yield _sse(name, data)
                        outcome = job.future.result()
                    else:  # the time limit
                        batcher.cancel(job)
                        metrics.timeouts.inc()
                        metrics.cancelled.inc()
                        outcome = Outcome(504, f"the request took longer than the server's limit of {timeout:g} s")
                    break
                record("generate_stream", job, outcome)
                if outcome.status == 200:
                    yield _sse("done", result(outcome))
                else:
                    yield _sse("error", {"error": {"message": outcome.message, "code": outcome.status}})
            finally:
                if getter is not None and not getter.done():
                    getter.cancel()
                if outcome is None:  # the client went away mid-stream
                    batcher.cancel(job)
                    metrics.cancelled.inc()
                    metrics.requests.labels("generate_stream", "499").inc()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/favicon.ico")
    async def favicon():
        return Response(status_code=204)

    @app.get("/static/{name}")
    async def static(name: str):
        files = {"app.js": "text/javascript", "style.css": "text/css"}  # a fixed list: no path from the request
        if name not in files:
            raise APIError(404, "not found")
        return FileResponse(STATIC / name, media_type=files[name])

    return app


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def _size_multiple(pipe) -> int:
    """The smallest side step the latent space accepts (e.g. the patch size), found by trying."""
    for m in (1, 2, 4, 8, 16, 32, 64):
        try:
            pipe.latent_space.latent_shape(m, m)
            return m
        except (ValueError, AssertionError):
            continue
    return 1
