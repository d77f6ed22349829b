"""The checks every request passes before routing, in this order, each answered in OpenAI's error shape:

    Host     without an API key, only loopback names and --allowed_hosts are served (400): a web page whose own
             domain an attacker re-points at 127.0.0.1 (DNS rebinding) must not reach an open local server
    API key  on /v1/* and /stats (401), before a byte of the body is read
    size     a declared Content-Length over `max_body_bytes` is refused before reading (413); a chunked body is
             counted as it arrives and refused the moment it passes the cap, so memory stays bounded either way

The body is then handed on from a buffer of at most `max_body_bytes`; later reads (the disconnect watch) go to
the client again.
"""
from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nanochat.server.errors import APIError, error_response

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
KEYED_PATH_PREFIXES = ("/v1/", "/stats")


def host_name(host_header: str) -> str:
    """'Example.com:8000' -> 'example.com', '[::1]:8000' -> '[::1]' (brackets kept, as the allow-list spells it)."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[:host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def key_matches(api_key: str | None, headers: Headers) -> bool:
    """True when no key is set or the request carries 'Authorization: Bearer <key>' (compared in constant time)."""
    if api_key is None:
        return True
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


class RequestGuard:
    def __init__(self, app: ASGIApp, api_key: str | None, allowed_hosts: list[str], max_body_bytes: int):
        self.app = app
        self.api_key = api_key
        self.allowed_hosts = {host_name(h) for h in (*LOOPBACK_HOSTS, *allowed_hosts)}
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            self.check_host(headers)
            if scope["path"].startswith(KEYED_PATH_PREFIXES):
                self.check_key(headers)
            body = await self.read_body(headers, receive)
        except APIError as refusal:
            await error_response(refusal)(scope, receive, send)
            return
        await self.app(scope, replay(body, receive), send)

    def check_host(self, headers: Headers) -> None:
        if self.api_key is not None:
            return  # a page on another site cannot know the key, so a rebound name gains it nothing
        host = host_name(headers.get("host", ""))
        if host not in self.allowed_hosts:
            raise APIError(400, f"Host {host!r} is not served without an API key; add it with --allowed_hosts "
                                "or set --api_key", code="host_not_allowed")

    def check_key(self, headers: Headers) -> None:
        if not key_matches(self.api_key, headers):
            raise APIError(401, "missing or wrong API key; send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than {self.max_body_bytes} bytes (--max_body_bytes)",
                        code="request_too_large")

    async def read_body(self, headers: Headers, receive: Receive) -> bytes:
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self.too_large()
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self.too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def receive_again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again
