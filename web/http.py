"""The FastAPI application: our routes first, their error handling, a body-size limit, Gradio at `/`."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import gradio as gr
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from reranker import Reranker
from web.errors import HttpError, to_http_error
from web.history import RequestHistory
from web.request_id import RequestIdMiddleware
from web.routes import build_router
from web.service import RerankService
from web.ui import build_ui

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

LIMITED_PATHS = frozenset({"/v1/rerank", "/rerank", "/api/predict"})


class BodyLimit:
    """Refuse bodies over `limit` bytes on the JSON routes with 413, before they are parsed."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], limit: int,
                 on_refuse: Callable[[str, HttpError], None]) -> None:
        self.app = app
        self.limit = limit
        self.on_refuse = on_refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") not in LIMITED_PATHS:
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, receive, send)  # the client went away; let the app see it
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = HttpError(413, "limit_exceeded",
                          f"request body is over {self.limit} bytes; send fewer documents or raise "
                          "RERANKER_MAX_BODY_BYTES")
        self.on_refuse(scope["path"].rstrip("/"), error)
        await JSONResponse(error.body(), status_code=413)(scope, receive, send)


def _validation_error(err: RequestValidationError) -> HttpError:
    problems = err.errors()
    if any(p.get("type") == "json_invalid" for p in problems):
        return HttpError(400, "invalid_json", "the request body is not valid JSON (UTF-8)")
    parts = []
    for problem in problems[:5]:
        where = ".".join(str(x) for x in problem.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {problem.get('msg', 'invalid')}")
    return HttpError(422, "invalid_shape", "; ".join(parts))


def create_app(reranker: Reranker, *, ui: bool = True, history: RequestHistory | None = None) -> FastAPI:
    """Build the whole HTTP surface over one reranker (one worker, one cache, one registry)."""
    service = RerankService(reranker, history)
    app = FastAPI(
        title="Reranker",
        summary="Cross-encoder reranking: Cohere/Jina and TEI compatible routes, Gradio UI at /",
        docs_url="/docs",
        redoc_url=None,
    )

    def refused(route: str, error: HttpError) -> None:
        if route in LIMITED_PATHS and not error.counted:
            service.refused(route, error)

    @app.exception_handler(HttpError)
    async def http_error(request: Request, err: HttpError) -> JSONResponse:
        refused(request.url.path.rstrip("/"), err)
        headers = {"Retry-After": "1"} if err.status == 429 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def framework_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        # Raised by FastAPI itself, e.g. for a body it cannot decode (non-UTF-8).
        kind = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        message = "the request body is not valid JSON (UTF-8)" if err.status_code == 400 else str(err.detail)
        error = HttpError(err.status_code, kind, message)
        if err.status_code < 500:
            refused(request.url.path.rstrip("/"), error)
        return JSONResponse(error.body(), status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        error = _validation_error(err)
        refused(request.url.path.rstrip("/"), error)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        logger.error("unhandled error", exc_info=err, extra={"route": request.url.path})
        error = to_http_error(err)
        return JSONResponse(error.body(), status_code=error.status)

    app.include_router(build_router(service, reranker.settings.api_key))
    app.add_middleware(BodyLimit, limit=reranker.settings.max_body_bytes, on_refuse=refused)
    app.add_middleware(RequestIdMiddleware)  # added last: runs first, so even a 413 carries the id
    if ui:
        app = gr.mount_gradio_app(app, build_ui(service), path="/", enable_monitoring=False,
                                  footer_links=["api"], show_error=True)
    return app
