"""The model deployment: each replica owns one Reranker (one device, one batcher) behind a RerankService."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import ray
from opentelemetry import context, propagate
from ray import serve

# Most of a new replica's start, before its model loads, is these imports: Ray Serve and OpenVINO, about 2 s of CPU
# on a 2-core host (torch, transformers and sentence-transformers come only where a model is loaded in full, not
# when it starts from the conversion cache). Python's cyclic GC, run again and again while they fill the heap, was
# a fifth of that CPU; it is paused for them, and collects whatever they left once it resumes.
_gc_was_enabled = gc.isenabled()
gc.disable()
try:
    from deploy.ray.claims import claim_left, forget_claims
    from deploy.ray.environment import on_assigned_device, replica_settings
    from deploy.ray.gpu import replica_gpus
    from deploy.ray.metrics import replica_metrics
    from deploy.ray.panel import Publisher, ReplicaView, replica_view
    from reranker import Reranker, RerankResult
    from reranker.logs import setup_logging
    from reranker.tracing import Tracing
    from web.backend import describe, release_after
    from web.cancel import run_cancellable
    from web.errors import HttpError
    from web.request_id import bound_request_id
    from web.service import RerankCall, RerankService
finally:
    if _gc_was_enabled:
        gc.enable()

logger = logging.getLogger("reranker.ray")


# When the request reached the ingress, beside the trace context in a call's `carrier`: its epoch second, and its
# age when the ingress sent the call. The latency this replica books counts from then, as one process's does, not
# from the call, which left out the wait at the ingress for a free replica, the hop, and an earlier try on a replica
# that died. In the carrier, not arguments of their own, so that replicas and ingresses of two versions (a rolling
# update) still call each other.
ARRIVED, AGE = "x-reranker-arrived", "x-reranker-age"


def arrival(carrier: Mapping[str, str], left_s: float | None) -> float | None:
    """The request's arrival as this process's time.perf_counter; None without one. Its age here is at least its
    age when sent and, whatever this node's clock says, at most that plus `left_s` (what its deadline left then)."""
    try:
        arrived, sent_age = float(carrier[ARRIVED]), float(carrier[AGE])
    except (KeyError, ValueError):
        return None
    age = max(time.time() - arrived, sent_age)
    if left_s is not None:
        age = min(age, sent_age + left_s)
    return time.perf_counter() - age


@dataclass(frozen=True)
class Reply:
    """What a replica answers the ingress: a result, or the error to answer with (already counted here)."""

    replica: str
    result: RerankResult | None = None
    error: tuple[int, str, str] | None = None  # status, type, message of an HttpError
    tei_type: str | None = None  # its TEI error type (an empty input's `Empty`, where the status alone says Validation)
    model: str | None = None  # the model id: the ingress's /readyz and Cohere's `model` need not ask a replica


def replica_id() -> str:
    """This replica's Serve id: the `replica` label of its metrics and the ingress's X-Reranker-Replica."""
    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # outside a replica (a unit test calling the class directly)
        return f"pid-{os.getpid()}"


def application() -> str | None:
    """This replica's Serve application, or None outside one."""
    try:
        return str(serve.get_replica_context().app_name)
    except Exception:
        return None


def assigned_gpus() -> list[object]:
    """The GPUs Ray assigned this replica (none outside Ray)."""
    try:
        return list(ray.get_gpu_ids())
    except Exception:
        return []


def node_id() -> str:
    """The Ray node this process runs on ("" outside Ray)."""
    try:
        return str(ray.get_runtime_context().get_node_id())
    except Exception:
        return ""


class RerankModel:
    """One engine per replica. Settings come from RERANKER_* of the replica's environment (as ./start.sh
    reads them), with `environ` on top: the application's args, for tests and per-app overrides."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        settings = replica_settings(environ)
        setup_logging(settings.log_level)  # this replica's entry point: one JSON object per line
        gpu_ids = assigned_gpus()
        settings = on_assigned_device(settings, gpu_ids)
        self.replica = replica_id()
        self.app = application()
        self.metrics = replica_metrics()  # exported through Ray, with this replica's labels
        self.gpus = replica_gpus(gpu_ids)  # reranker_gpu_* of this replica's GPUs, if it has any
        self.tracing = Tracing.from_settings(settings, self.metrics)
        self.reranker = Reranker.from_settings(settings, metrics=self.metrics, tracing=self.tracing)
        self.service = RerankService(self.reranker)
        self.node = node_id()
        self._info = {**describe(self.service), "replica": self.replica}  # all of it fixed once the model loaded
        # The UI's Monitoring tab reads this replica's view from Ray's key-value store (deploy/ray/panel.py).
        self.panel = None if self.app is None else Publisher(self.app, self.snapshot)
        logger.info("replica ready", extra={"replica": self.replica, "model": self.reranker.model.model_id,
                                            "device": self.reranker.model.device,
                                            "batch_tokens": self.reranker.batch_tokens})

    async def rerank(self, route: str, call: RerankCall, request_id: str, carrier: dict[str, str],
                     deadline_at: float | None = None, deadline_s: float | None = None,
                     call_id: str | None = None) -> Reply:
        """One rerank, booked here (metrics, log line). A cancelled call (the client left the ingress) drops
        its unstarted pairs, as in one process, and is counted here unless the caller, which withdrew it before Ray
        handed it here anyway, claimed `call_id` first (deploy/ray/claims.py); `carrier` continues the caller's
        trace. At `deadline_at` (epoch seconds: the ingress's deadline, which counts the call's wait in Serve's
        queue) it drops them too and answers 504 itself, so that a request that ran out of time is counted once,
        here, not also as the cancellation of the ingress's withdrawal; never later than `deadline_s` (what was
        left when the ingress sent it) from now, whatever this node's clock says."""
        token = context.attach(propagate.extract(carrier))
        left = None if deadline_at is None else max(deadline_at - time.time(), 0.0)
        if left is not None and deadline_s is not None:
            left = min(left, deadline_s)
        expires = None if left is None else time.monotonic() + left
        try:
            with bound_request_id(request_id, arrival(carrier, deadline_s)):
                service = self.service
                counts_left = None if call_id is None or self.app is None else partial(claim_left, self.app, call_id)
                # Admitted on the event loop, as in one process (web/backend.py): with max_ongoing_requests past
                # anyio's 40 worker threads, the calls waiting for one count against RERANKER_MAX_QUEUE, and a full
                # queue answers 429 at once (the ingress tries another replica once).
                with service.admit(route, call) as room:
                    deadline = None if left is None else lambda: release_after(asyncio.sleep(left), room)
                    result = await run_cancellable(
                        lambda cancel: service.rerank(route, call, cancel, expires, counts_left, room), deadline)
            return Reply(self.replica, result=result, model=self.reranker.model.model_id)
        except HttpError as err:
            return Reply(self.replica, error=(err.status, err.type, err.message), tei_type=err.tei_type,
                         model=self.reranker.model.model_id)
        finally:
            context.detach(token)

    def info(self) -> dict[str, Any]:
        return dict(self._info)

    def snapshot(self) -> ReplicaView:
        """This replica's view for the UI's Monitoring tab, and its /info for the ingresses (deploy/ray/panel.py)."""
        return replica_view(self.replica, self.service, self.node, self._info)

    def check_health(self) -> None:
        """Serve's health check: a dead worker or a poisoned device makes the replica unhealthy, and Serve
        replaces it (the engine cannot recover in-process).

        A failed replica also ends its own process, as one process exits on a device fault: it answers every
        call at once with 503, so Serve's routers, which favour the least busy replica, sent it most of the
        traffic (and the ingress's retries) until the controller had seen three failed checks, about 3 s. A dead
        replica is dropped by a router on its first call and by the controller on its next check; the ingress
        retries the calls it held on another replica."""
        reranker = self.reranker
        if reranker.fault is not None:
            logger.error("the scoring device failed: this replica ends", extra={"replica": self.replica,
                                                                               "fault": reranker.fault})
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
        if not reranker.ready:
            raise RuntimeError(f"reranker not ready: {reranker.fault or 'closed'}")

    def __del__(self) -> None:
        # Serve calls this once the replica's graceful shutdown has let accepted requests finish.
        panel = getattr(self, "panel", None)
        if panel is not None:
            panel.close()
        forget_claims()
        reranker = getattr(self, "reranker", None)
        if reranker is not None:
            reranker.close()
            self.tracing.shutdown()
            self.gpus.close()
            self.metrics.close()


# The deployment, under its own name: the class stays importable as deploy.ray.model.RerankModel, so Serve ships it
# to a replica by reference, and the replica imports this module (the GC paused above). Decorated in place, the
# name was the Deployment's, so the class went by value, and unpickling its globals one by one imported torch and
# the rest with the GC running.
RerankModelDeployment = serve.deployment(name="RerankModel")(RerankModel)
