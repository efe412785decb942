"""The Host-header check against DNS rebinding: a page on evil.example whose name an attacker re-points at
127.0.0.1 reaches a localhost server from the victim's browser, but its requests still say `Host: evil.example`.
A server bound to localhost therefore answers only requests addressed to a localhost name (plus the names
given with --allow-host); every other request gets a JSON 400 before any route runs."""
from __future__ import annotations

import ipaddress
import json
from typing import Iterable

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def normalize(host: str) -> str:
    """'LocalHost.' -> 'localhost'; '[::1]' and '::1' -> '[::1]'; no port."""
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        return host
    return f"[{host}]" if ":" in host else host


def host_of(header: str) -> str:
    """The host name of a Host header, without its port: '127.0.0.1:8000' -> '127.0.0.1', '[::1]:80' -> '[::1]'."""
    header = header.strip()
    if header.startswith("["):
        end = header.find("]")
        return normalize(header[: end + 1]) if end > 0 else ""
    return normalize(header.rsplit(":", 1)[0] if header.count(":") == 1 else header)


def allowed_hosts_for(bind: str, extra: Iterable[str] = ()) -> list[str] | None:
    """The Host names a server bound to `bind` accepts: the localhost names (and `bind`) plus `extra` when
    bound to a loopback address; only when `extra` is given otherwise (then `extra`, the localhost names and the bound address);
    None (no check) for a non-local bind without `extra`, whose names cannot be known."""
    extra = list(extra)
    if is_loopback(bind):
        return [*LOCAL_HOSTS, *([bind] if normalize(bind) not in map(normalize, LOCAL_HOSTS) else []), *extra]
    if extra:
        return [*LOCAL_HOSTS, bind, *extra]
    return None


def is_loopback(bind: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1."""
    if bind.strip().lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind.strip().strip("[]")).is_loopback
    except ValueError:
        return False


class HostCheck:
    """ASGI middleware: 400 (JSON error) for an HTTP request whose Host is not among `allowed`."""

    def __init__(self, app, allowed: Iterable[str]):
        self.app = app
        self.allowed = frozenset(normalize(h) for h in allowed)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            header = dict(scope.get("headers") or ()).get(b"host", b"").decode("latin-1")
            host = host_of(header)
            if host not in self.allowed:
                await self._refuse(send, host)
                return
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(send, host: str) -> None:
        shown = host[:80] or "(none)"
        message = (f"Host {shown!r} is not served here (a localhost server answers only its own names; "
                   "start it with --allow-host NAME to add one)")
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": "Host",
                                     "code": 400}}).encode()
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
