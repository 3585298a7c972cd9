"""A middleware for Serve's HTTP proxy: request bodies are read from the client no faster than the limit allows.

Serve's proxy reads each request body from the socket as fast as the client sends it and queues it for the replica
without bound, so a 300 MiB upload was held in the proxy's memory before the replica's 413 came. With this
middleware the proxy stops reading a request once its body has passed the replica's limit (app.MAX_BODY_BYTES):
the client is held back by TCP flow control until the replica's 413 ends the request (and the connection).

Serve loads it from the environment of the proxy's process, so set it before Ray starts (`emu3-rt serve` does):
    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=runtime.serve.proxy:middlewares
"""

from __future__ import annotations

import asyncio

from starlette.middleware import Middleware

CALLBACK = "runtime.serve.proxy:middlewares"
ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"


def middlewares() -> list[Middleware]:
    from .app import MAX_BODY_BYTES

    return [Middleware(BoundedBody, limit=MAX_BODY_BYTES)]


class BoundedBody:
    """Pure ASGI middleware: after `limit` body bytes of one request, receive() blocks until the request ends
    (the replica has everything it needs to refuse it; more would only queue up in this process)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        seen = 0

        async def bounded():
            nonlocal seen
            if seen > self.limit:
                await asyncio.Event().wait()   # cancelled when the response ends
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
            return message

        return await self.app(scope, bounded, send)
