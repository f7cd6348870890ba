"""X-Request-ID: taken from the caller when sane, else generated; echoed on the response. Also when the
request arrived, for timing requests refused before they reach the engine."""

from __future__ import annotations

import contextvars
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

HEADER = b"x-request-id"
_SANE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
_arrived: contextvars.ContextVar[float | None] = contextvars.ContextVar("request_arrived", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex


def current_request_id() -> str | None:
    return _current.get()


def request_age() -> float | None:
    """Seconds since the HTTP request being served arrived; None outside one."""
    arrived = _arrived.get()
    return None if arrived is None else time.perf_counter() - arrived


class RequestIdMiddleware:
    """Bind a request id for the request's context and add it to the response headers (unless `echo` is off:
    behind Ray Serve's proxy, which takes the caller's X-Request-ID, or makes one, and answers it itself)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], echo: bool = True) -> None:
        self.app = app
        self.echo = echo

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(HEADER, b"").decode("latin-1")
        request_id = given if _SANE.fullmatch(given) else new_request_id()
        token, arrived = _current.set(request_id), _arrived.set(time.perf_counter())
        # Also the request's header onward: Gradio's queue runs the UI handler apart from the request that queued
        # it, and the request headers are what survive (given_request_id).
        scope["headers"] = [*((k, v) for k, v in scope.get("headers") or [] if k.lower() != HEADER),
                            (HEADER, request_id.encode("latin-1"))]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER]
                message["headers"] = [*headers, (HEADER, request_id.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id if self.echo else send)
        finally:
            _current.reset(token)
            _arrived.reset(arrived)


def given_request_id(headers: Mapping[str, str] | None) -> str | None:
    """The id RequestIdMiddleware gave a request, from its headers (those Gradio keeps for a queued event)."""
    given = (headers or {}).get(HEADER.decode(), "")
    return given if _SANE.fullmatch(given) else None


@contextmanager
def bound_request_id(request_id: str | None, arrived: float | None = None) -> Iterator[None]:
    """Serve a request whose id was bound elsewhere (a Ray Serve replica, behind the ingress that bound it; a
    Gradio event, apart from the request that queued it), and, given `arrived` (time.perf_counter), time it."""
    token = _current.set(request_id) if request_id is not None else None
    since = _arrived.set(arrived) if arrived is not None else None
    try:
        yield
    finally:
        if since is not None:
            _arrived.reset(since)
        if token is not None:
            _current.reset(token)
