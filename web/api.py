"""The JSON routes as a FastAPI app with their error handling, over any Backend; no Gradio in here, so that a
Ray Serve ingress (deploy/ray) builds the same app without loading the UI's framework."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from web.backend import Backend
from web.errors import HttpError, to_http_error
from web.lifecycle import RETRY_AFTER_SECONDS
from web.middleware import LIMITED_PATHS, OnRefuse
from web.routes import build_router, no_route
from web.strict_json import REASON_PREFIX
from web.swagger import add_docs_page

logger = logging.getLogger(__name__)


def _not_json(headers: Mapping[str, str], unreadable: bool = False, reason: str = "") -> str:
    """`unreadable`: JSON the parser could not take for another reason than its syntax; `reason`: what
    web.strict_json refused in it."""
    hint = "; send it uncompressed" if headers.get("content-encoding") else ""
    if reason.startswith(REASON_PREFIX):
        return f"the request body is {reason}"
    if unreadable:  # FastAPI's own 400: not UTF-8, nested past Python's recursion limit, or a 4,301-digit number
        return f"the request body could not be read as JSON: it is not UTF-8, nests too deeply, or holds a number " \
               f"of over 4,300 digits{hint}"
    return f"the request body is not valid JSON (UTF-8){hint}"


def _validation_error(err: RequestValidationError, headers: Mapping[str, str]) -> HttpError:
    problems = err.errors()
    for problem in problems:
        if problem.get("type") == "json_invalid":
            reason = str(problem.get("ctx", {}).get("error", ""))
            return HttpError(400, "invalid_json", _not_json(headers, reason=reason))
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json" and any(tuple(p.get("loc", ())) == ("body",) for p in problems):
        # FastAPI reads a body it was not told is JSON as something else, and says only that it is no object.
        return HttpError(422, "invalid_shape", "send the body as a JSON object with 'Content-Type: application/json'")
    parts = []
    for problem in problems[:5]:
        where = ".".join(str(x) for x in problem.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {problem.get('msg', 'invalid')}")
    return HttpError(422, "invalid_shape", "; ".join(parts))


def json_refusals(book: OnRefuse) -> OnRefuse:
    """`book` for the JSON routes' refusals not yet counted; other paths (Gradio's) are counted elsewhere."""
    def refused(route: str, error: HttpError) -> None:
        if route in LIMITED_PATHS and not error.counted:
            book(route, error)
    return refused


def build_api(backend: Backend, refused: OnRefuse) -> FastAPI:
    """The JSON routes over `backend` with their error handling; `refused` books what they answer before the
    engine. The caller adds the middleware (web.middleware) and, in one process, the Gradio UI."""
    app = FastAPI(
        title="Reranker",
        summary="Cross-encoder reranking: Cohere/Jina and TEI compatible routes, Gradio UI at /",
        docs_url=None,  # web.swagger's page: FastAPI's loads Swagger UI from a CDN
        redoc_url=None,
    )
    add_docs_page(app)

    @app.exception_handler(HttpError)
    async def http_error(request: Request, err: HttpError) -> JSONResponse:
        refused(request.url.path.rstrip("/"), err)
        headers = {"Retry-After": "1"} if err.status == 429 else None
        if err.type == "shutting_down":  # a drain's cut-off (Ray Serve's ingress): as one process answers it
            headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        return err.response(request.url.path, headers)

    @app.exception_handler(StarletteHTTPException)
    async def framework_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        # Raised by FastAPI itself, e.g. for a body it cannot decode (non-UTF-8), or a path no route serves.
        kind = {400: "invalid_json", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        message = _not_json(request.headers, unreadable=True) if err.status_code == 400 else str(err.detail)
        # A method no route takes is no rerank request, as those routes.py refuses itself.
        error = no_route() if err.status_code == 404 else HttpError(err.status_code, kind, message,
                                                                     counted=err.status_code == 405)
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
        # A bug outside the engine's bookkeeping (which answers HttpError): its 500 counts as an error, or the error
        # ratio alerts would never see it. Where the engine had already counted the request `ok`, it counts twice.
        logger.error("unhandled error", exc_info=err, extra={"route": request.url.path})
        error = to_http_error(err)
        refused(request.url.path.rstrip("/"), error)
        return error.response(request.url.path)

    app.include_router(build_router(backend))
    _declare_bearer_key(app)
    return app


def _declare_bearer_key(app: FastAPI) -> None:
    """The rerank routes' bearer key in the schema (checked by web.middleware, outside FastAPI's view): Swagger UI
    gets its Authorize button and generated clients their token. Optional (`{}`): a service without
    RERANKER_API_KEY takes any key or none."""
    generate = app.openapi

    def openapi() -> dict[str, object]:
        schema = generate()  # FastAPI's, built once and kept
        components = schema.setdefault("components", {})
        components.setdefault("securitySchemes", {})["apiKey"] = {
            "type": "http", "scheme": "bearer", "description": "RERANKER_API_KEY, where the service sets one"}
        for path in LIMITED_PATHS:
            for operation in schema.get("paths", {}).get(path, {}).values():
                operation["security"] = [{"apiKey": []}, {}]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


