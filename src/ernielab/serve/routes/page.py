"""The web page: GET / and its two static files (a fixed list: no path comes from the request)."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

from ernielab.serve.errors import APIError

STATIC = Path(str(resources.files("ernielab.serve") / "static"))
FILES = {"app.js": "text/javascript", "style.css": "text/css"}


def router() -> APIRouter:
    r = APIRouter()

    @r.get("/")
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @r.get("/favicon.ico")
    async def favicon():
        return Response(status_code=204)

    @r.get("/static/{name}")
    async def static(name: str):
        if name not in FILES:
            raise APIError(404, "not found")
        return FileResponse(STATIC / name, media_type=FILES[name])

    return r
