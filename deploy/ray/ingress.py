"""The FastAPI ingress deployment: web/'s JSON routes, errors, limits and auth over the model replicas.

Late-bound (the factory pattern): `@serve.ingress()` without an app, and `__serve_build_asgi_app__` builds it
in the replica, after the constructor has the model's DeploymentHandle. The routes are web/routes.py's
module-level functions, so `from __future__ import annotations` is safe here; a prototype whose routes were
methods of the ingress class (Serve's class-based views) answered every POST 422 under it, because the body
models' string annotations did not resolve.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from deploy.ray.claims import forget_claims
from deploy.ray.environment import replica_settings
from deploy.ray.metrics import ingress_answers, replica_metrics
from deploy.ray.model import node_id, replica_id
from deploy.ray.panel import KIND_INGRESS, Publisher, ReplicaView, answers_view
from deploy.ray.remote import REPLICA_STATE, RemoteBackend, quiet_router_refusals
from deploy.ray.stopping import cut_off, drain, until_stopping
from reranker.logs import setup_logging
from reranker.metrics import Metrics
from reranker.tracing import Tracing
from web.api import build_api, json_refusals
from web.errors import HttpError
from web.history import RequestHistory
from web.lifecycle import DrainGate, Lifecycle
from web.middleware import App, BearerKey, BodyLimit, Message, OnRefuse, Receive, Scope, Send, route_path
from web.request_id import RequestIdMiddleware
from web.service import book_refusal
from web.tracing import instrument

REPLICA_HEADER = b"x-reranker-replica"
PREDICT = "/api/predict"


class ReplicaHeader:
    """Name the model replica that served a rerank in `X-Reranker-Replica` (operators, and the tests that
    check every replica serves)."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_replica(message: Message) -> None:
            replica = scope.get("state", {}).get(REPLICA_STATE)
            if message["type"] == "http.response.start" and replica:
                message["headers"] = [*message.get("headers", []), (REPLICA_HEADER, replica.encode("latin-1"))]
            await send(message)

        await self.app(scope, receive, send_with_replica)


class CountAnswers:
    """Count every answer by its HTTP status code (deploy/ray/metrics.py's INGRESS_ANSWERS), outermost, so that a
    refusal of any middleware is counted as the proxy sees it."""

    def __init__(self, app: App, counter: Any) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = False

        async def counting(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.counter.inc(1, tags={"status_code": str(message["status"])})
            await send(message)

        try:
            await self.app(scope, receive, counting)
        except Exception:
            if not started:  # Starlette's outermost ServerErrorMiddleware answers it 500 (web/api.py's `unexpected`)
                self.counter.inc(1, tags={"status_code": "500"})
            raise


class UiLoginOnly:
    """With RERANKER_UI_AUTH set and no RERANKER_API_KEY, one process serves the Gradio-style /api/predict only to
    a logged-in UI session (web/gradio_login.py), and answers anyone else 401. Here no session can be checked: they
    live in the UI replica (serve.yaml's `ui` application), and its login cookie is sent only under its route. So
    /api/predict is refused here to everyone, with one process's status and error type; the message says where to
    go instead. Without this, the route was open to anonymous callers in this mode only."""

    def __init__(self, app: App, on_refuse: OnRefuse) -> None:
        self.app = app
        self.on_refuse = on_refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_path(scope) != PREDICT:
            await self.app(scope, receive, send)
            return
        error = HttpError(401, "unauthorized", "log in to the UI first (RERANKER_UI_AUTH) and call the UI's Gradio "
                          "API; on Ray Serve, /api/predict takes only RERANKER_API_KEY")
        self.on_refuse(PREDICT, error)
        await error.response(PREDICT)(scope, receive, send)


def ingress_app(backend: RemoteBackend, metrics: Metrics, history: RequestHistory, tracing: Tracing,
                lifecycle: Lifecycle | None = None, answers: Any = None) -> FastAPI:
    """web/'s JSON routes over the model replicas, with one process's guards (web/http.py) in its order."""
    settings = backend.settings
    refused = json_refusals(lambda route, error: book_refusal(metrics, history, route, error))
    app = build_api(backend, refused)
    # Starlette runs the last added first: request id, drain gate, UI login, replica header, key, body limit.
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, on_refuse=refused,
                       timeout=settings.body_timeout_seconds)
    app.add_middleware(BearerKey, api_key=settings.api_key, on_refuse=refused)
    app.add_middleware(ReplicaHeader)
    if settings.ui_auth and settings.api_key is None:
        app.add_middleware(UiLoginOnly, on_refuse=refused)
    if lifecycle is not None:
        # As in one process: while draining, new work gets 503 and Retry-After; what is in flight is counted until
        # its last byte.
        app.add_middleware(DrainGate, lifecycle=lifecycle, on_refuse=refused)
    # Outermost: a refusal's request line has the request's id (the one Serve's proxy answers) and latency.
    app.add_middleware(RequestIdMiddleware, echo=False)
    if answers is not None:
        app.add_middleware(CountAnswers, counter=answers)
    instrument(app, tracing)
    return app


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """HTTP in front of the model deployment; owns no model. `tries` and `deadline_s` bound the retries of a
    call whose replica died."""

    # Async, as Serve allows: the drain watch is a task on the replica's event loop.
    async def __init__(self, model: DeploymentHandle, environ: Mapping[str, str] | None = None,  # type: ignore[misc]
                       tries: int = 3, deadline_s: float = 60.0) -> None:
        self.settings = replica_settings(environ)
        setup_logging(self.settings.log_level)
        quiet_router_refusals()  # its handle's router refuses a call, and the request line answers the 429
        self.metrics = replica_metrics()  # exported through Ray, with this replica's labels
        self.answers = ingress_answers()
        self.tracing = Tracing.from_settings(self.settings, self.metrics)
        self.history = RequestHistory()
        self.lifecycle = Lifecycle()
        self.backend = RemoteBackend(model, self.settings, tries=tries, deadline_s=deadline_s,
                                     lifecycle=self.lifecycle, book=self.refused)
        self._drain_watch = asyncio.get_running_loop().create_task(self._drain_when_told())
        self.replica, self.node = replica_id(), node_id()
        # What it answers itself (bad requests, 401, 429, 504), for the UI's Monitoring tab (deploy/ray/panel.py).
        self.panel = Publisher(model.app_name, self.view)

    def view(self) -> ReplicaView:
        return answers_view(self.replica, KIND_INGRESS, self.metrics, self.history, self.node)

    async def _drain_when_told(self) -> None:
        """Once its application's drain is announced, drain as one process does on SIGTERM: the requests it holds,
        those still waiting for a model replica included, are answered while the model replicas still run; new
        ones get 503 `shutting_down` with Retry-After, and /readyz 503. Not when Serve stops this replica alone
        (an update, say): Serve's proxy still sends a stopping ingress requests until its replacement runs, and
        refusing them failed a rolling update's load 566 times. At the drain's deadline, what still waits for a model
        replica is answered 503 `shutting_down`, and on a second signal everything it holds, as one process answers
        what its stop cuts off."""
        await until_stopping(stopping=False)
        drained = await drain(self.lifecycle, "the service is shutting down", self.settings.drain_seconds)
        await cut_off(self.lifecycle, self.backend, drained)

    def refused(self, route: str, error: HttpError) -> None:
        book_refusal(self.metrics, self.history, route, error)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return ingress_app(self.backend, self.metrics, self.history, self.tracing, self.lifecycle, self.answers)

    def __del__(self) -> None:
        panel = getattr(self, "panel", None)
        if panel is not None:
            panel.close()
        forget_claims()
        tracing = getattr(self, "tracing", None)
        if tracing is not None:
            tracing.shutdown()
            self.metrics.close()
