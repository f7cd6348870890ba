"""The FastAPI application: our routes first, their error handling, a body-size limit, Gradio at `/`."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import gradio as gr
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from reranker import Reranker
from web.errors import HttpError, to_http_error
from web.gradio_api import ROUTE, GradioApiStatus, is_api_path
from web.gradio_login import GradioLogin, find_gradio_app
from web.history import RequestHistory
from web.lifecycle import DrainGate, Lifecycle
from web.middleware import LIMITED_PATHS, BearerKey, BodyLimit
from web.request_id import RequestIdMiddleware
from web.routes import build_router
from web.service import RerankService
from web.tracing import instrument
from web.ui import build_ui

logger = logging.getLogger(__name__)

def _not_json(headers: Mapping[str, str]) -> str:
    hint = "; send it uncompressed" if headers.get("content-encoding") else ""
    return f"the request body is not valid JSON (UTF-8){hint}"


def _validation_error(err: RequestValidationError, headers: Mapping[str, str]) -> HttpError:
    problems = err.errors()
    if any(p.get("type") == "json_invalid" for p in problems):
        return HttpError(400, "invalid_json", _not_json(headers))
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json" and any(tuple(p.get("loc", ())) == ("body",) for p in problems):
        # FastAPI reads a body it was not told is JSON as something else, and says only that it is no object.
        return HttpError(422, "invalid_shape", "send the body as a JSON object with 'Content-Type: application/json'")
    parts = []
    for problem in problems[:5]:
        where = ".".join(str(x) for x in problem.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {problem.get('msg', 'invalid')}")
    return HttpError(422, "invalid_shape", "; ".join(parts))


def create_app(reranker: Reranker, *, ui: bool = True, history: RequestHistory | None = None,
               lifecycle: Lifecycle | None = None) -> FastAPI:
    """Build the whole HTTP surface over one reranker (one worker, one cache, one registry)."""
    lifecycle = lifecycle or Lifecycle()
    service = RerankService(reranker, history, lifecycle=lifecycle)
    app = FastAPI(
        title="Reranker",
        summary="Cross-encoder reranking: Cohere/Jina and TEI compatible routes, Gradio UI at /",
        docs_url="/docs",
        redoc_url=None,
    )

    def refused(route: str, error: HttpError) -> None:
        if route in LIMITED_PATHS and not error.counted:
            service.refused(route, error)

    def refused_while_draining(path: str, error: HttpError) -> None:
        """A JSON route, or a Gradio API call (route `ui`); the browser UI's queued events are not told apart
        from its other events, so they are not counted."""
        if ui and is_api_path(path):
            service.refused(ROUTE, error)
        else:
            refused(path, error)

    @app.exception_handler(HttpError)
    async def http_error(request: Request, err: HttpError) -> JSONResponse:
        refused(request.url.path.rstrip("/"), err)
        headers = {429: {"Retry-After": "1"}, 405: {"Allow": "POST"}}.get(err.status)
        return err.response(request.url.path, headers)

    @app.exception_handler(StarletteHTTPException)
    async def framework_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        # Raised by FastAPI itself, e.g. for a body it cannot decode (non-UTF-8).
        kind = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        message = _not_json(request.headers) if err.status_code == 400 else str(err.detail)
        error = HttpError(err.status_code, kind, message)
        if err.status_code < 500:
            refused(request.url.path.rstrip("/"), error)
        return error.response(request.url.path, getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        error = _validation_error(err, request.headers)
        refused(request.url.path.rstrip("/"), error)
        return error.response(request.url.path)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        logger.error("unhandled error", exc_info=err, extra={"route": request.url.path})
        return to_http_error(err).response(request.url.path)

    app.include_router(build_router(service))
    settings = reranker.settings
    if ui:
        # RERANKER_UI_AUTH puts Gradio's login page in front of the UI; GradioLogin (below) extends it
        # to every Gradio API route. The JSON routes keep their own bearer key.
        # No run history: it uploads each run (query and documents) to a Hugging Face bucket named by a
        # request header, with the host's saved HF token for loopback callers (a same-host proxy is one).
        demo = build_ui(service)
        app = gr.mount_gradio_app(app, demo, path="/", enable_monitoring=False,
                                  footer_links=["api"], show_error=True, run_history=False,
                                  auth=list(settings.ui_auth) if settings.ui_auth else None,
                                  max_file_size=settings.max_body_bytes)
        # Gradio accepts an input file only from its upload folder once the Blocks "has launched", which
        # launch() records and mount_gradio_app does not: without it, a Gradio API call naming any server
        # path as its file had that file read and ranked (tests/test_gradio_api.py).
        demo.has_launched = True
        # The mounted app's lifespan runs Gradio's startup events (the queue's loops, its limiter), but
        # mount_gradio_app does not record that, so anyone's GET /gradio_api/startup-events ran them again: a
        # second queue loop, its running jobs forgotten, a new limiter.
        find_gradio_app(app).startup_events_triggered = True
    # Starlette runs the last added first: drain gate, request id, Gradio login, Gradio API status, key, body limit.
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, on_refuse=refused)
    app.add_middleware(BearerKey, api_key=settings.api_key, on_refuse=refused)
    if ui:
        app.add_middleware(GradioApiStatus, on_refuse=service.refused)
    if ui and settings.ui_auth:
        app.add_middleware(GradioLogin, gradio=find_gradio_app(app), guard_predict=settings.api_key is None,
                           on_refuse=refused)
    app.add_middleware(RequestIdMiddleware)
    # Outermost: while draining, new work is refused before anything else looks at it.
    app.add_middleware(DrainGate, lifecycle=lifecycle, on_refuse=refused_while_draining)
    instrument(app, reranker.tracing)  # last: the server span and traceresponse wrap everything above
    return app
