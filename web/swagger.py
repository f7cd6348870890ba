"""The /docs page: FastAPI's Swagger UI with its script, stylesheet and icon served by this app (the copy of
swagger-ui-dist in the fastapi-swagger package), not fetched from a CDN: the page works where the service has no
internet, and loads no script from another host onto the origin of the UI's login."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

from fastapi import FastAPI, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse

DOCS_PATH = "/docs"
ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon-32x32.png": "image/png"}


def _asset(name: str, media_type: str) -> Callable[[], Awaitable[Response]]:
    content = (resources.files("fastapi_swagger.resources") / name).read_bytes()

    async def serve() -> Response:
        return Response(content, media_type=media_type, headers={"Cache-Control": "public, max-age=86400"})
    return serve


def add_docs_page(app: FastAPI) -> None:
    """GET /docs and its assets, outside the OpenAPI schema. Under a proxy's prefix (Ray Serve's route_prefix)
    the page links the schema and the assets under that prefix."""
    @app.get(DOCS_PATH, include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = str(request.scope.get("root_path") or "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{DOCS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_PATH}/favicon-32x32.png")

    for name, media_type in ASSETS.items():
        app.add_api_route(f"{DOCS_PATH}/{name}", _asset(name, media_type), methods=["GET"], include_in_schema=False)
