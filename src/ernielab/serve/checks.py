"""Request checking for `ernielab serve`, in one place: bodies are read with a size limit and checked by hand
(types, ranges, this server's limits, the pipeline's own `check_arguments`) before anything is queued. No
request field is ever used as a path."""
from __future__ import annotations

import dataclasses
import json
import math
import re
import secrets

from fastapi import Request

from ernielab.serve.batcher import Settings
from ernielab.serve.errors import APIError

MAX_SEED = 2**32 - 1


class ServerLimits:
    def __init__(self, max_side: int = 256, max_steps: int = 200, max_images: int = 16, max_body: int = 65536):
        self.max_side, self.max_steps, self.max_images, self.max_body = max_side, max_steps, max_images, max_body


@dataclasses.dataclass
class Generation:
    """A checked generation request: what goes into the queue."""

    prompts: list[str]
    seed: int
    settings: Settings


# ---- single fields -------------------------------------------------------------------------------------------
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


def _opt_int(body: dict, name: str, lo: int, hi: int) -> int | None:
    return _int(body, name, None, lo, hi) if body.get(name) is not None else None


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


# ---- the body ------------------------------------------------------------------------------------------------
async def read_json(request: Request, max_body: int) -> dict:
    """The body as a JSON object, read with a size limit (413) whether or not Content-Length is sent."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise APIError(400, "bad Content-Length")
        if int(length) > max_body:
            raise APIError(413, f"request body larger than {max_body} bytes")
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype not in ("application/json", ""):  # no form posts: a web page elsewhere cannot post here unasked
        raise APIError(415, "send the request body as application/json")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body:
            raise APIError(413, f"request body larger than {max_body} bytes")
    try:
        data = json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    return data


class Checker:
    """Turns request bodies into `Generation`s or raises `APIError` (400) saying which field is wrong."""

    def __init__(self, pipe, limits: ServerLimits, max_batch: int, has_enhancer: bool):
        self.pipe, self.limits, self.max_batch, self.has_enhancer = pipe, limits, max_batch, has_enhancer

    def openai(self, body: dict) -> Generation:
        """POST /v1/images/generations: prompt, n, size "WxH", response_format b64_json, seed, enhance."""
        prompt = _prompt(_str(body, "prompt"), "prompt")
        n = _int(body, "n", 1, 1, self.limits.max_images)
        fmt = _str(body, "response_format", "b64_json")
        if fmt == "url":
            raise APIError(400, "response_format 'url' is not supported: this server stores no images; "
                           "use 'b64_json'", "response_format")
        if fmt != "b64_json":
            raise APIError(400, f"response_format must be 'b64_json', got {fmt!r}", "response_format")
        width, height = self._size(_str(body, "size", "auto"))
        seed = _int(body, "seed", None, 0, MAX_SEED) if body.get("seed") is not None else secrets.randbelow(2**31)
        return self.generation([prompt] * n, height=height, width=width, steps=None, guidance=None, shift=None,
                               negative=None, seed=seed, enhance=_bool(body, "enhance", False))

    def _size(self, size: str | None) -> tuple[int, int]:
        if size in ("auto", None):
            return self.pipe.config.width, self.pipe.config.height
        m = re.fullmatch(r"\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*", size)
        if not m:
            raise APIError(400, f"size must look like '256x256' (width x height), got {size!r}", "size")
        return int(m.group(1)), int(m.group(2))

    def native(self, body: dict) -> Generation:
        """POST /v1/generate: prompt or prompts, n, width, height, steps, guidance, shift, negative_prompt,
        seed, enhance."""
        texts = self._texts(body)
        n = _int(body, "n", 1, 1, self.limits.max_images)
        prompts = [t for t in texts for _ in range(n)]
        big = max(self.limits.max_side, 1) * 4
        return self.generation(
            prompts, height=_opt_int(body, "height", 1, big), width=_opt_int(body, "width", 1, big),
            steps=_opt_int(body, "steps", 1, 10**6), guidance=_float(body, "guidance", body.get("guidance_scale")),
            shift=_float(body, "shift", None), negative=_str(body, "negative_prompt", None),
            seed=_int(body, "seed", 0, 0, MAX_SEED), enhance=_bool(body, "enhance", False))

    def _texts(self, body: dict) -> list[str]:
        if ("prompt" in body) == ("prompts" in body):
            raise APIError(400, "give exactly one of 'prompt' (a string) or 'prompts' (a list of strings)", "prompt")
        if "prompt" in body:
            return [_prompt(_str(body, "prompt"), "prompt")]
        texts = body["prompts"]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise APIError(400, "'prompts' must be a non-empty list of strings", "prompts")
        if len(texts) > self.limits.max_images:
            raise APIError(400, f"at most {self.limits.max_images} images per request", "prompts")
        return [_prompt(t if len(t) <= 4000 else None, "prompts") for t in texts]

    def generation(self, prompts: list[str], *, height, width, steps, guidance, shift, negative, seed,
                   enhance: bool) -> Generation:
        """This server's limits, then the pipeline's own checks; the defaults filled in."""
        lim = self.limits
        if (height is not None and height > lim.max_side) or (width is not None and width > lim.max_side):
            raise APIError(400, f"width and height must be at most {lim.max_side} pixels on this server", "size")
        if steps is not None and steps > lim.max_steps:
            raise APIError(400, f"'steps' must be at most {lim.max_steps} on this server", "steps")
        if len(prompts) > lim.max_images:
            raise APIError(400, f"at most {lim.max_images} images per request", "n")
        if enhance and not self.has_enhancer:
            raise APIError(400, "this server has no prompt enhancer", "enhance")
        if seed + len(prompts) - 1 > MAX_SEED:
            raise APIError(400, f"'seed' + n - 1 must be at most {MAX_SEED}", "seed")
        try:
            args = self.pipe.check_arguments(prompts, negative_prompt=negative, height=height, width=width,
                                             num_inference_steps=steps, guidance_scale=guidance, shift=shift,
                                             seed=seed, batch_size=self.max_batch)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        settings = Settings(height=args["height"], width=args["width"], steps=args["num_inference_steps"],
                            guidance_scale=float(args["guidance_scale"]), shift=float(args["shift"]),
                            negative_prompt=args["negative_prompt"], enhance=enhance)
        return Generation(prompts, seed, settings)
