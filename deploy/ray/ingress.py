"""The FastAPI ingress deployment: web/'s JSON routes, errors, limits and auth over the model replicas.

Late-bound (the factory pattern): `@serve.ingress()` without an app, and `__serve_build_asgi_app__` builds it
in the replica, after the constructor has the model's DeploymentHandle. The routes are web/routes.py's
module-level functions, so `from __future__ import annotations` is safe here; a prototype whose routes were
methods of the ingress class (Serve's class-based views) answered every POST 422 under it, because the body
models' string annotations did not resolve.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from deploy.ray.metrics import replica_metrics
from deploy.ray.remote import REPLICA_STATE, RemoteBackend
from reranker import Settings
from reranker.logs import setup_logging
from reranker.tracing import Tracing
from web.api import build_api, json_refusals
from web.history import RequestHistory
from web.middleware import App, BearerKey, BodyLimit, Message, Receive, Scope, Send
from web.request_id import RequestIdMiddleware
from web.service import book_refusal
from web.tracing import instrument

REPLICA_HEADER = b"x-reranker-replica"


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


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """HTTP in front of the model deployment; owns no model. `tries` and `deadline_s` bound the retries of a
    call whose replica died."""

    def __init__(self, model: DeploymentHandle, environ: Mapping[str, str] | None = None, tries: int = 3,
                 deadline_s: float = 60.0) -> None:
        self.settings = Settings.from_env({**os.environ, **(environ or {})})
        setup_logging(self.settings.log_level)
        self.metrics = replica_metrics()  # exported through Ray, with this replica's labels
        self.tracing = Tracing.from_settings(self.settings, self.metrics)
        self.history = RequestHistory()
        self.backend = RemoteBackend(model, self.settings, tries=tries, deadline_s=deadline_s)

    def __serve_build_asgi_app__(self) -> FastAPI:
        settings, metrics, history = self.settings, self.metrics, self.history
        refused = json_refusals(lambda route, error: book_refusal(metrics, history, route, error))
        app = build_api(self.backend, refused)
        # Starlette runs the last added first: request id, replica header, key, body limit (as web/http.py).
        app.add_middleware(BodyLimit, limit=settings.max_body_bytes, on_refuse=refused)
        app.add_middleware(BearerKey, api_key=settings.api_key, on_refuse=refused)
        app.add_middleware(ReplicaHeader)
        app.add_middleware(RequestIdMiddleware, echo=False)  # Serve's proxy answers X-Request-ID
        instrument(app, self.tracing)
        return app

    def __del__(self) -> None:
        tracing = getattr(self, "tracing", None)
        if tracing is not None:
            tracing.shutdown()
            self.metrics.close()
