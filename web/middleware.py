"""ASGI middleware of the JSON routes: the bearer key and the body-size limit, both before any parsing."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from reranker.settings import Settings
from web.errors import HttpError, client_left

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]
OnRefuse = Callable[[str, HttpError], None]

# The JSON rerank routes: bearer key, body limit and drain gate apply to them.
LIMITED_PATHS = frozenset({"/v1/rerank", "/v2/rerank", "/rerank", "/api/predict"})
# What a Gradio upload may carry beyond RERANKER_MAX_BODY_BYTES: the multipart boundaries and part headers around
# its one file (which Gradio caps at the limit itself).
UPLOAD_FRAMING_BYTES = 64 * 1024
# Any other request body (the UI's login form, whatever else the mounted Gradio app takes): Starlette would keep up
# to 1,000 form fields of 1 MB each in memory, unauthenticated, for a login of a few dozen bytes.
OTHER_BODY_BYTES = 64 * 1024
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def route_path(scope: Scope) -> str:
    """The request's path below the app's mount point, without a trailing slash. A proxy that mounts the app
    under a prefix (Ray Serve's route_prefix: the UI at /ui) puts it in `root_path` and leaves it in `path`."""
    path, root = str(scope["path"]), str(scope.get("root_path") or "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] in ("", "/"):
        path = path[len(root):]
    return path.rstrip("/")


def rerank_route(scope: Scope) -> str | None:
    """The JSON rerank route that the request calls: a POST to one of LIMITED_PATHS. Another method or a trailing
    slash is no rerank request, whoever answers it: the routes answer it 405 or 404, uncounted."""
    if scope["type"] != "http" or scope.get("method") != "POST" or str(scope["path"]).endswith("/"):
        return None
    path = route_path(scope)
    return path if path in LIMITED_PATHS else None


def _bounded(scope: Scope) -> str | None:
    """The path of a request whose body BodyLimit caps: every request that may carry one (the JSON routes and the
    Gradio API at RERANKER_MAX_BODY_BYTES, the rest at OTHER_BODY_BYTES)."""
    route = rerank_route(scope)
    if route is None and scope["type"] == "http" and scope.get("method") in _BODY_METHODS:
        return route_path(scope)
    return route


def _small(path: str) -> bool:
    """A path outside the JSON routes and the Gradio API, whose body is capped at OTHER_BODY_BYTES."""
    return path not in LIMITED_PATHS and not path.startswith("/gradio_api/")


def _is_upload(path: str) -> bool:
    return path.endswith("/upload")


# In the ASGI scope: when the request's body must have arrived (time.monotonic()), from its first read.
BODY_DEADLINE = "reranker.body_deadline"
# The last message read_body returns when that deadline passed first.
TIMED_OUT = "reranker.body_timed_out"


def body_deadline(scope: Scope, seconds: float) -> float | None:
    """When the request's body must have arrived: `seconds` (RERANKER_BODY_TIMEOUT_SECONDS) from the first middleware
    that reads it, the same for every later reader; None for no limit (0)."""
    if seconds <= 0:
        return None
    return float(scope.setdefault(BODY_DEADLINE, time.monotonic() + seconds))


async def read_body(receive: Receive, limit: int, deadline: float | None = None) -> tuple[list[Message], int]:
    """The request's body messages as they come, and their bytes: up to the last one, or the disconnect that ends
    them early (then the last message), or the first to pass `limit` bytes (then bytes > limit), or until
    `deadline` (then a last message of type TIMED_OUT: a client sending a byte a minute held a connection, and up to
    `limit` bytes of memory, for as long as it liked)."""
    read: list[Message] = []
    size = 0
    try:
        # One timeout over the whole read (no task per message, as wait_for made): None is none.
        async with asyncio.timeout(None if deadline is None else max(deadline - time.monotonic(), 0.0)):
            while size <= limit:
                message = await receive()
                read.append(message)
                if message["type"] != "http.request":
                    break
                size += len(message.get("body", b""))
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        read.append({"type": TIMED_OUT})
    return read, size


def replaying(read: list[Message], receive: Receive) -> Receive:
    """A `receive` that hands on the messages already `read`, then the server's next ones (a TIMED_OUT mark is not
    handed on: the next reader, given the same deadline, finds it passed)."""
    pending = deque(message for message in read if message["type"] != TIMED_OUT)

    async def replay() -> Message:
        return pending.popleft() if pending else await receive()

    return replay


async def _answer(error: HttpError, scope: Scope, receive: Receive, send: Send,
                  headers: dict[str, str] | None = None) -> None:
    await error.response(route_path(scope), headers)(scope, receive, send)


class BearerKey:
    """With RERANKER_API_KEY set, the JSON routes need `Authorization: Bearer <key>`; checked first."""

    def __init__(self, app: App, api_key: str | None, on_refuse: OnRefuse) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.on_refuse = on_refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = rerank_route(scope)
        if self.key is None or route is None:
            await self.app(scope, receive, send)
            return
        sent = [value for name, value in scope.get("headers") or [] if name == b"authorization"]
        header = sent[0] if len(sent) == 1 else b""
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self.key):
            await self.app(scope, receive, send)
            return
        # What was sent is never echoed: it may be a real key, of another service. Two or more headers are refused
        # whatever they hold: a proxy in front that checks one of them and this check another must not disagree.
        if len(sent) > 1:
            message = (f"send one Authorization header, 'Authorization: Bearer <RERANKER_API_KEY>'; this request "
                       f"had {len(sent)}")
        elif header.strip():
            message = ("the API key sent was not accepted; send the one set as RERANKER_API_KEY, as "
                       "'Authorization: Bearer <key>'")
        else:
            message = "send the API key as 'Authorization: Bearer <RERANKER_API_KEY>'"
        error = HttpError(401, "unauthorized", message)
        self.on_refuse(route, error)
        await _answer(error, scope, receive, send, {"WWW-Authenticate": "Bearer"})


def declared_length(scope: Scope) -> int | None:
    """The request's Content-Length, None without one. A number longer than any body (uvicorn's parsers refuse
    one past 2**64 themselves; another server may not) reads as too big, not as an error from int()."""
    header = dict(scope.get("headers") or []).get(b"content-length", b"")
    if not header.isdigit():
        return None
    return int(header) if len(header) <= 18 else 10**18


class BodyLimit:
    """Refuse bodies over `limit` bytes on the JSON routes and the Gradio API, and over OTHER_BODY_BYTES anywhere
    else, with 413, before they are parsed."""

    def __init__(self, app: App, limit: int, on_refuse: OnRefuse,
                 timeout: float = Settings.body_timeout_seconds) -> None:
        self.app = app
        self.limit = limit
        self.on_refuse = on_refuse
        self.timeout = timeout  # RERANKER_BODY_TIMEOUT_SECONDS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = _bounded(scope)
        if route is None:
            await self.app(scope, receive, send)
            return
        # An upload: Gradio caps each file at the limit, not how many files one request carries (30 files of the
        # limit each were taken whole), so the request is capped at one file's worth.
        small = _small(route)
        upload = _is_upload(route) and not small
        limit = OTHER_BODY_BYTES if small else self.limit + UPLOAD_FRAMING_BYTES if upload else self.limit
        declared = declared_length(scope)
        if declared is not None and declared > limit:
            await self._refuse(route, self._too_big(small), scope, receive, send)
            return
        if upload:
            # Streamed on to Gradio, which writes it to disk as it comes: the server delivers no more than the
            # declared length. Without one (chunked), nothing would bound it short of reading it all here.
            if declared is None:
                await self._refuse(route, HttpError(411, "length_required", "send an upload with a Content-Length "
                                                    "header"), scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        read, size = await read_body(receive, limit, body_deadline(scope, self.timeout))
        if size > limit:
            await self._refuse(route, self._too_big(small), scope, receive, send)
        elif read[-1]["type"] == TIMED_OUT:
            error = HttpError(408, "body_timeout", f"the request body did not arrive within {self.timeout:g} s "
                              "(RERANKER_BODY_TIMEOUT_SECONDS); send it at once", headers={"Connection": "close"})
            await self._refuse(route, error, scope, receive, send)
        elif read[-1]["type"] != "http.request":
            # Counted as the request it was: left to the app, a body cut short read as invalid JSON (400).
            await self._refuse(route, client_left("the client closed the connection before sending the whole body"),
                               scope, receive, send)
        else:
            await self.app(scope, replaying(read, receive), send)

    def _too_big(self, small: bool) -> HttpError:
        if small:
            return HttpError(413, "limit_exceeded", f"request body is over {OTHER_BODY_BYTES} bytes, the most this "
                             "path takes")
        return HttpError(413, "limit_exceeded", f"request body is over {self.limit} bytes; send fewer documents or "
                         "raise RERANKER_MAX_BODY_BYTES")

    async def _refuse(self, route: str, error: HttpError, scope: Scope, receive: Receive, send: Send) -> None:
        """Book `error` and answer it (to nobody, when the client has gone: the server drops the answer)."""
        self.on_refuse(route, error)
        await _answer(error, scope, receive, send)
