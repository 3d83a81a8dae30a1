"""ASGI middleware, outermost first: the Host check (DNS rebinding), the body-size limit; and the API key check the
routes run before they read a body. Errors here are OpenAI-style bodies written straight to the ASGI channel."""

from __future__ import annotations

import ipaddress
import json
import secrets
from collections.abc import Iterable

from .openai import APIError, error_body

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


async def _send_error(send, status: int, message: str, code: str | None = None) -> None:
    body = json.dumps(error_body(message, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware: refuse bodies over `limit` bytes (by Content-Length, or while streaming in) with a 413."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_big = False
        if length is not None:
            try:
                too_big = int(length) > self.limit
            except ValueError:
                return await _send_error(send, 400, "invalid Content-Length header")
        if too_big:
            return await _send_error(send, 413, f"request body over {self.limit} bytes", code="body_too_large")
        # No (trusted) length: read the body here, up to the limit, then replay it to the app.
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.limit:
                return await _send_error(send, 413, f"request body over {self.limit} bytes", code="body_too_large")
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def host_name(header: str) -> str:
    """The name part of a Host header value, lowercased: "LocalHost:8000" -> "localhost", "[::1]:80" -> "::1"."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0].rstrip(".") if header.count(":") == 1 else header.rstrip(".")


class HostCheck:
    """ASGI middleware: answer 400 to a Host header this server is not known by. A web page that rebinds its own
    DNS name to 127.0.0.1 still sends that name, so it cannot reach a keyless local server this way."""

    def __init__(self, app, names: Iterable[str], any_ip: bool):
        self.app, self.names, self.any_ip = app, {host_name(n) for n in names}, any_ip

    def allowed(self, name: str) -> bool:
        if name in self.names:
            return True
        if not self.any_ip:
            return False
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = dict(scope.get("headers") or []).get(b"host")
            name = host_name(host.decode("latin-1")) if host is not None else None
            if name is not None and not self.allowed(name):
                return await _send_error(send, 400, f"Host {name!r} is not served here (see --allowed-host)",
                                         code="invalid_host")
        return await self.app(scope, receive, send)


def host_policy(bind_host: str, extra: Iterable[str] = ()) -> tuple[set[str], bool] | None:
    """(names, any IP literal) that the Host header may carry for a server bound to `bind_host`; None: any."""
    extra = [e.strip() for e in extra if e.strip()]
    if "*" in extra:
        return None
    wildcard = bind_host in ("", "0.0.0.0", "::")
    names = {bind_host, *extra}
    try:
        loopback = ipaddress.ip_address(bind_host).is_loopback
    except ValueError:
        loopback = bind_host.lower() == "localhost"
    if loopback or wildcard:
        names.update(LOOPBACK_NAMES)
    return names, wildcard  # bound to every interface: any of its addresses, as an IP literal


def authorize(api_key: str | None, authorization: str) -> None:
    """Authorization: Bearer KEY (scheme case-insensitive), checked before anything reads the body."""
    if api_key is None:
        return
    scheme, _, token = authorization.strip().partition(" ")
    if not (scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), api_key.encode())):
        raise APIError(401, "missing or invalid API key (send Authorization: Bearer <key>)",
                       type="authentication_error", code="invalid_api_key")
