"""The Gradio UI (Rerank and Monitoring tabs) as its own Serve application, `serve.yaml`'s `ui` at /ui.

One replica: Gradio's queue streams an event's result from the process that queued it, and login sessions live
in that process's memory. It scores through a RemoteBackend over the model deployment's DeploymentHandle, as
the JSON ingress does (same retries of a call whose replica died), and its Monitoring tab sums the replicas'
snapshots (deploy/ray/panel.py). The guards are web/http.py's: RERANKER_UI_AUTH's login on every Gradio API
route, the body limit, and the drain gate, which closes when Serve starts stopping the replica.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, cast

import gradio as gr
from fastapi import FastAPI
from gradio.routes import App as GradioApp
from ray import serve
from ray.serve import Application, Deployment
from ray.serve.handle import DeploymentHandle

from deploy.ray.claims import forget_claims
from deploy.ray.environment import replica_settings
from deploy.ray.ingress import CountAnswers
from deploy.ray.metrics import ingress_answers, replica_metrics
from deploy.ray.panel import KIND_UI, Replicas, ReplicaView, answers_view
from deploy.ray.remote import RemoteBackend, quiet_router_refusals
from deploy.ray.stopping import cut_off, drain, until_stopping
from reranker.logs import setup_logging
from reranker.tracing import Tracing
from web.api import json_refusals
from web.errors import HttpError
from web.gradio_api import (
    ROUTE,
    GradioApiStatus,
    RerankError,
    RerankEvents,
    counted_route,
)
from web.gradio_login import GradioLogin, LoginThrottle
from web.history import RequestHistory
from web.lifecycle import CutOff, DrainGate, Lifecycle
from web.middleware import BodyLimit
from web.monitoring import Panel
from web.service import book_refusal
from web.tracing import ui_span
from web.ui import build_blocks, header, mount_ui, ui_answer, ui_call
from web.uploads import private_upload_folder

logger = logging.getLogger("reranker.ray")


def remote_predict(backend: RemoteBackend, tracing: Tracing, refused: Callable[[str, HttpError], None],
                   lifecycle: Lifecycle) -> Callable[..., Any]:
    """The Rerank tab's event handler over the model replicas; Gradio cancelling the event cancels the call.
    `lifecycle` counts the events in flight, as one process's RerankService does, so a drain waits for them."""
    settings = backend.settings

    async def rerank(query: str, documents: str, top_n: float | None = None, instruction: str | None = None,
                     raw_scores: bool = False, file: str | None = None,
                     request: gr.Request | None = None) -> tuple[list[list[object]], str]:
        """Rank the documents (one per line, plus any uploaded file) against the query, best first."""
        with ui_span(tracing, request.headers if request is not None else None):
            with lifecycle.serving():  # from the start: reading an uploaded file is part of the call
                call = ui_call(query, documents, top_n, instruction, raw_scores, file, settings, refused)
                try:
                    return ui_answer(await backend.rerank(None, ROUTE, call))
                except HttpError as err:
                    if not err.counted:  # answered here, not by a model replica: an ingress's refusals are counted
                        refused(ROUTE, err)
                    raise RerankError(err) from None

    return rerank


@serve.deployment(name="UI", num_replicas=1)
@serve.ingress()
class UI:
    """Gradio over the model deployment `deployment` of application `app`."""

    # Serve awaits an async constructor: the UI needs a model replica's answer before it is built.
    async def __init__(self, environ: Mapping[str, str] | None = None, app: str = "reranker",  # type: ignore[misc]
                       deployment: str = "RerankModel", tries: int = 3, deadline_s: float = 60.0) -> None:
        self.settings = replica_settings(environ)
        setup_logging(self.settings.log_level)
        quiet_router_refusals()  # its handle's router refuses a call, and the event's line answers it
        self.metrics = replica_metrics()  # exported through Ray: the UI's refusals (401, 413, 503) are seen
        # Every answer by status code, as the ingress counts them: RerankerServeProxyRefusing takes the 429s the UI
        # answers itself (its login throttle, an overloaded Gradio API call) off the proxy's count of 429s.
        self.answers = ingress_answers()
        self.tracing = Tracing.from_settings(self.settings, self.metrics)
        self.history = RequestHistory()
        self.lifecycle = Lifecycle()
        handle: DeploymentHandle = serve.get_deployment_handle(deployment, app)
        self.backend = RemoteBackend(handle, self.settings, tries=tries, deadline_s=deadline_s, book=self.refused)
        self.info = await self.backend.info()  # a model replica runs, and has published its view
        self.replicas = Replicas(handle.app_name, self.view)
        await asyncio.to_thread(self.replicas.refresh)  # the Monitoring tab's card names the model from the start
        self.gradio: GradioApp | None = None  # mounted by __serve_build_asgi_app__
        self._stop_watch = asyncio.get_running_loop().create_task(self._drain_when_stopping())

    def refused(self, route: str, error: HttpError) -> None:
        book_refusal(self.metrics, self.history, route, error)

    def view(self) -> ReplicaView:
        """What this replica answered itself, for its own Monitoring tab."""
        return answers_view("ui", KIND_UI, self.metrics, self.history)

    def refused_while_draining(self, route: str, error: HttpError) -> None:
        """As web/http.py: a call of the Rerank tab's event is counted on the `ui` route; the UI's other events are
        not."""
        if route == ROUTE:
            self.refused(ROUTE, error)

    async def _drain_when_stopping(self) -> None:
        """Once Serve starts stopping this replica, or its application's drain is announced, drain as one process
        does on SIGTERM (deploy/ray/stopping.py): new Gradio work gets 503, the events in flight finish within
        RERANKER_DRAIN_SECONDS, then the heartbeat streams of open browser tabs end, which Serve's own drain
        waits for: without that, a tab kept the replica until graceful_shutdown_timeout_s killed it."""
        await until_stopping()
        drained = await drain(self.lifecycle, "this UI replica is stopping", self.settings.drain_seconds)
        if self.gradio is not None:  # None if Serve stopped the replica before it built its app
            self.gradio.stop_event.set()  # Gradio's own signal to its heartbeat streams that the server stops
        await cut_off(self.lifecycle, self.backend, drained)

    def __del__(self) -> None:
        # Serve calls this once the replica's graceful shutdown is over: the gauge refresher and the span exporter
        # stop with it.
        forget_claims()
        tracing = getattr(self, "tracing", None)
        if tracing is not None:
            tracing.shutdown()
            self.metrics.close()

    def __serve_build_asgi_app__(self) -> FastAPI:
        info, settings, replicas = self.info, self.settings, self.replicas
        panel = Panel(replicas.snapshot, replicas.card, replicas.latest)
        private_upload_folder()
        demo = build_blocks(remote_predict(self.backend, self.tracing, self.refused, self.lifecycle),
                            self.refused, header(info["model"], info["device"], info["dtype"], info["max_length"]),
                            panel, takes_instruction=bool(info["accepts_instruction"]), lifecycle=self.lifecycle,
                            traced=self.tracing.enabled)
        app, self.gradio = mount_ui(FastAPI(), demo, settings)
        # web/http.py's guards, in its order (the last added runs first): cut-off, Rerank events, drain gate,
        # Gradio API status, Gradio login, body limit. No JSON routes here (the ingress serves them), so no bearer
        # key, and the login need not guard /api/predict.
        refused = json_refusals(self.refused)  # books nothing here: the Gradio API's refusals are booked below
        app.add_middleware(BodyLimit, limit=settings.max_body_bytes, on_refuse=refused,
                           timeout=settings.body_timeout_seconds)
        if settings.ui_auth:
            app.add_middleware(GradioLogin, gradio=self.gradio, guard_predict=False, on_refuse=refused)
            app.add_middleware(LoginThrottle, attempts=settings.ui_login_attempts)
        app.add_middleware(GradioApiStatus, on_refuse=self.refused)  # outside the login: counts its refusals
        app.add_middleware(DrainGate, lifecycle=self.lifecycle, on_refuse=self.refused_while_draining,
                           route=counted_route)
        app.add_middleware(RerankEvents, blocks=demo, body_timeout=settings.body_timeout_seconds)
        # Serve drains and stops this replica (no forced stop cancels its requests here): it ends the event
        # streams Gradio breaks off with an HTTP error (an unknown event id).
        app.add_middleware(CutOff, lifecycle=self.lifecycle)
        app.add_middleware(CountAnswers, counter=self.answers)  # outermost: every answer, as the proxy sees it
        return app


def build(args: dict[str, Any] | None = None) -> Application:
    """serve.yaml's `ui` application. `args`: `env` (RERANKER_* over the replica's environment), `app` and
    `deployment` (the model deployment to score on), `tries` and `deadline_s` (retries, as the ingress's)."""
    args = args or {}
    environ = {str(k): str(v) for k, v in (args.get("env") or {}).items()}
    return cast(Deployment, UI).bind(environ, str(args.get("app", "reranker")),
                                     str(args.get("deployment", "RerankModel")), int(args.get("tries", 3)),
                                     float(args.get("deadline_s", 60.0)))
