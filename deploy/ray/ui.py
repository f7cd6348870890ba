"""The Gradio UI (Rerank and Monitoring tabs) as its own Serve application, `serve.yaml`'s `ui` at /ui.

One replica: Gradio's queue streams an event's result from the process that queued it, and login sessions live
in that process's memory. It scores through a RemoteBackend over the model deployment's DeploymentHandle, as
the JSON ingress does (same retries of a call whose replica died), and its Monitoring tab sums the replicas'
snapshots (deploy/ray/panel.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, cast

import gradio as gr
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from ray import serve
from ray.serve import Application, Deployment
from ray.serve.handle import DeploymentHandle

from deploy.ray.panel import Replicas, ReplicaView
from deploy.ray.remote import RemoteBackend
from reranker import Settings
from reranker.logs import setup_logging
from reranker.metrics import Metrics
from reranker.tracing import Tracing
from web.errors import HttpError
from web.gradio_api import ROUTE, GradioApiStatus, RerankError
from web.gradio_login import find_gradio_app
from web.history import RequestHistory
from web.monitoring import Panel
from web.service import book_refusal
from web.tracing import ui_span
from web.ui import build_blocks, header, ui_answer, ui_call


def remote_predict(backend: RemoteBackend, tracing: Tracing,
                   refused: Callable[[str, HttpError], None]) -> Callable[..., Any]:
    """The Rerank tab's event handler over the model replicas; Gradio cancelling the event cancels the call."""
    settings = backend.settings

    async def rerank(query: str, documents: str, top_n: float | None = None, instruction: str | None = None,
                     raw_scores: bool = False, file: str | None = None,
                     request: gr.Request | None = None) -> tuple[list[list[object]], str]:
        """Rank the documents (one per line, plus any uploaded file) against the query, best first."""
        with ui_span(tracing, request.headers if request is not None else None):
            call = ui_call(query, documents, top_n, instruction, raw_scores, file, settings, refused)
            try:
                return ui_answer(await backend.rerank(None, ROUTE, call))
            except HttpError as err:
                raise RerankError(err) from None

    return rerank


@serve.deployment(name="UI", num_replicas=1)
@serve.ingress()
class UI:
    """Gradio over the model deployment `deployment` of application `app`."""

    # Serve awaits an async constructor: the UI needs a model replica's answer before it is built.
    async def __init__(self, environ: Mapping[str, str] | None = None, app: str = "reranker",  # type: ignore[misc]
                       deployment: str = "RerankModel", tries: int = 3, deadline_s: float = 60.0) -> None:
        self.settings = Settings.from_env({**os.environ, **(environ or {})})
        setup_logging(self.settings.log_level)
        self.metrics = Metrics(CollectorRegistry(), process_collector=True)
        self.tracing = Tracing.from_settings(self.settings, self.metrics)
        self.history = RequestHistory()
        handle: DeploymentHandle = serve.get_deployment_handle(deployment, app)
        self.backend = RemoteBackend(handle, self.settings, tries=tries, deadline_s=deadline_s)
        self.replicas = Replicas(handle)
        self.replicas.add(cast(ReplicaView, await handle.snapshot.remote()))
        self.info = await self.backend.info()

    def refused(self, route: str, error: HttpError) -> None:
        book_refusal(self.metrics, self.history, route, error)

    def __serve_build_asgi_app__(self) -> FastAPI:
        info, settings, replicas = self.info, self.settings, self.replicas
        panel = Panel(replicas.snapshot, replicas.card, replicas.latest)
        demo = build_blocks(remote_predict(self.backend, self.tracing, self.refused),
                            self.refused, header(info["model"], info["device"], info["dtype"], info["max_length"]),
                            panel, takes_instruction=bool(info["accepts_instruction"]))
        # As web/http.py mounts it: no run history, and an input file only from Gradio's upload folder.
        app = gr.mount_gradio_app(FastAPI(), demo, path="/", enable_monitoring=False, footer_links=["api"],
                                  show_error=True, run_history=False,
                                  auth=list(settings.ui_auth) if settings.ui_auth else None,
                                  max_file_size=settings.max_body_bytes)
        demo.has_launched = True
        find_gradio_app(app).startup_events_triggered = True
        app.add_middleware(GradioApiStatus, on_refuse=self.refused)
        return app


def build(args: dict[str, Any] | None = None) -> Application:
    """serve.yaml's `ui` application. `args`: `env` (RERANKER_* over the replica's environment), `app` and
    `deployment` (the model deployment to score on), `tries` and `deadline_s` (retries, as the ingress's)."""
    args = args or {}
    environ = {str(k): str(v) for k, v in (args.get("env") or {}).items()}
    return cast(Deployment, UI).bind(environ, str(args.get("app", "reranker")),
                                     str(args.get("deployment", "RerankModel")), int(args.get("tries", 3)),
                                     float(args.get("deadline_s", 60.0)))
