"""Where the JSON routes send their work: the Backend protocol, and LocalBackend over this process's engine.

A route needs four things of whatever scores: a rerank that stops when its client leaves, readiness, the
model id and the service's description. deploy/ray implements the same protocol over a Ray Serve
DeploymentHandle, so the same routes serve both modes.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Protocol

from starlette.requests import Request

from reranker import RerankResult, Settings
from reranker.jobs import Room
from web.cancel import client_gone, run_cancellable
from web.errors import HttpError
from web.service import RerankCall, RerankService
from web.versions import package_versions


class Backend(Protocol):
    """What the routes call. Every method raises HttpError (already counted in the metrics) on failure."""

    settings: Settings

    async def rerank(self, request: Request | None, route: str, call: RerankCall) -> RerankResult:
        """Score `call` for `route`; a client of `request` that disconnects meanwhile cancels its unstarted pairs,
        as does cancelling the awaiting task (how the UI's events are cancelled: they have no request to watch)."""
        ...

    async def readiness(self) -> HttpError | None:
        """None when requests can be served, else the 503 to answer on /readyz."""
        ...

    async def model_id(self) -> str:
        ...

    async def info(self) -> dict[str, Any]:
        """GET /info: model, device, dtype, limits, versions."""
        ...


class LocalBackend:
    """The engine of this process, through the RerankService that books every call."""

    def __init__(self, service: RerankService) -> None:
        self.service = service
        self.settings = service.reranker.settings

    async def rerank(self, request: Request | None, route: str, call: RerankCall) -> RerankResult:
        service = self.service
        # Admitted here, on the event loop: a burst waits for no worker thread to be refused (RerankService.admit).
        with service.admit(route, call) as room:
            gone = None if request is None else lambda: release_after(client_gone(request), room)
            return await run_cancellable(lambda cancel: service.rerank(route, call, cancel, room=room), gone,
                                         service.lifecycle.answered_before_cut_off)

    async def readiness(self) -> HttpError | None:
        return readiness(self.service)

    async def model_id(self) -> str:
        return self.service.reranker.model.model_id

    async def info(self) -> dict[str, Any]:
        return describe(self.service)


async def release_after(event: Awaitable[None], room: Room) -> None:
    """Return once `event` has happened (the client left, the deadline passed), the request's queue room given back:
    now, not once a worker thread it may still be waiting for finds it over. The room is abandoned: the request
    cannot take room again, in the moment before its cancellation is set."""
    await event
    room.abandon()


def readiness(service: RerankService) -> HttpError | None:
    """Draining, a failed device or a closed engine is not ready; otherwise None."""
    if service.lifecycle.draining:
        return HttpError(503, "shutting_down", service.lifecycle.reason)
    reranker = service.reranker
    if not reranker.ready:
        reason = f"the scoring device failed: {reranker.fault}" if reranker.fault else "the model is not ready"
        return HttpError(503, "not_ready", reason)
    return None


def describe(service: RerankService) -> dict[str, Any]:
    """The body of GET /info for one engine."""
    reranker = service.reranker
    s = reranker.settings
    model = reranker.model
    return {
        "model": model.model_id,
        "device": model.device,
        "dtype": model.dtype,
        "dtype_reason": model.dtype_reason,
        "backend": model.backend.name,
        "backend_reason": model.backend_reason,
        "compile": model.compiled,
        "max_length": model.max_length,
        "long_docs": s.long_docs,
        "accepts_instruction": model.accepts_instruction,
        "model_load_seconds": round(model.load_seconds, 3),
        "model_convert_seconds": round(model.convert_seconds, 3),
        "model_from_cache": model.from_cache,
        "cpu_streams": getattr(model.backend, "streams", None),  # OpenVINO's, in use; None on other backends
        "cut_ins": s.cut_ins,
        # Whether each guard is on, never what it holds: RERANKER_API_KEY (the JSON routes) and RERANKER_UI_AUTH.
        "auth": {"api_key": s.api_key is not None, "ui_login": s.ui_auth is not None},
        "tracing": s.tracing,
        "limits": {
            "max_docs": s.max_docs, "max_doc_chars": s.max_doc_chars, "max_query_chars": s.max_query_chars,
            "max_queue": s.max_queue, "batch_tokens": reranker.batch_tokens, "cache_size": s.cache_size,
            "max_body_bytes": s.max_body_bytes, "stall_seconds": reranker.stall_seconds,
        },
        "versions": package_versions(),
    }
