"""The FastAPI application: our routes first, their error handling, a body-size limit, Gradio at `/`."""

from __future__ import annotations

from fastapi import FastAPI
from gradio.route_utils import API_PREFIX

from reranker import Reranker
from web.api import build_api, json_refusals
from web.backend import LocalBackend
from web.errors import HttpError
from web.gradio_api import ROUTE, GradioApiStatus, RerankEvents, counted_route
from web.gradio_login import GradioLogin, LoginThrottle
from web.history import RequestHistory
from web.lifecycle import CutOff, DrainGate, Lifecycle
from web.middleware import App, BearerKey, BodyLimit, Receive, Scope, Send, route_path
from web.request_id import RequestIdMiddleware
from web.routes import no_route
from web.service import RerankService
from web.tracing import instrument
from web.ui import build_ui, mount_ui
from web.uploads import private_upload_folder


def json_not_found(gradio_not_found: App) -> App:
    """Gradio's answer for a path none of its routes match: this API's 404 outside Gradio's API prefix."""
    async def not_found(scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope)
        if scope["type"] != "http" or path == API_PREFIX or path.startswith(API_PREFIX + "/"):
            await gradio_not_found(scope, receive, send)
            return
        await no_route().response(path)(scope, receive, send)
    return not_found


def create_app(reranker: Reranker, *, ui: bool = True, history: RequestHistory | None = None,
               lifecycle: Lifecycle | None = None) -> FastAPI:
    """Build the whole HTTP surface over one reranker (one worker, one cache, one registry)."""
    lifecycle = lifecycle or Lifecycle()
    service = RerankService(reranker, history, lifecycle=lifecycle)
    refused = json_refusals(service.refused)

    def refused_while_draining(route: str, error: HttpError) -> None:
        """A JSON route, or a call of the Rerank tab's event (`ui`): the Gradio API's, or one queued from a browser
        or gradio_client. The UI's other events are not counted."""
        if route == ROUTE:
            service.refused(ROUTE, error)
        else:
            refused(route, error)

    app = build_api(LocalBackend(service), refused)
    settings = reranker.settings
    if ui:
        # GradioLogin (below) extends RERANKER_UI_AUTH's login to every Gradio API route. The JSON routes keep their
        # own bearer key.
        private_upload_folder()
        demo = build_ui(service)
        app, gradio = mount_ui(app, demo, settings)
        # Gradio's app, mounted at /, answers every path no route of ours serves: its bare 404 for those would not
        # have this API's error shape (a mistyped /v1/rank). Paths under Gradio's API prefix keep Gradio's answer.
        gradio.router.default = json_not_found(gradio.router.default)
        # An open tab's heartbeat stream ends only on Gradio's stop event: without it every stop waited out
        # uvicorn's graceful timeout for the tab, then cut the stream (an error logged for each).
        lifecycle.on_stop(gradio.stop_event.set)
    # Starlette runs the last added first: request id, cut-off, Rerank events, drain gate, Gradio API status, Gradio
    # login, key, body limit.
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, on_refuse=refused,
                       timeout=settings.body_timeout_seconds)
    app.add_middleware(BearerKey, api_key=settings.api_key, on_refuse=refused)
    if ui and settings.ui_auth:
        app.add_middleware(GradioLogin, gradio=gradio, guard_predict=settings.api_key is None,
                           on_refuse=refused)
        app.add_middleware(LoginThrottle, attempts=settings.ui_login_attempts)  # before the login form is read
    if ui:  # outside the login, so that it counts the Gradio API calls the login refuses
        app.add_middleware(GradioApiStatus, on_refuse=service.refused)
    # While draining, new work is refused before anything else looks at it.
    app.add_middleware(DrainGate, lifecycle=lifecycle, on_refuse=refused_while_draining, route=counted_route)
    if ui:  # outside the drain gate: which event a Gradio call runs is in its body
        app.add_middleware(RerankEvents, blocks=demo, body_timeout=settings.body_timeout_seconds)
    # A request that a stop cuts off gets 503 with Retry-After, not the server's bare 500.
    app.add_middleware(CutOff, lifecycle=lifecycle)
    # Outermost: every answer carries X-Request-ID and every refusal its request's id and latency, the drain's too.
    app.add_middleware(RequestIdMiddleware)
    instrument(app, reranker.tracing)  # last: the server span and traceresponse wrap everything above
    return app
