"""The Monitoring tab in Serve mode: the model replicas' snapshots and request histories, summed into one view.

A DeploymentHandle reaches one replica per call, whichever Serve picks, so the UI keeps each replica's latest
snapshot (asking a few times a tick) and forgets a replica not heard from for a while (stopped or replaced).
The counters are each replica's own since it started: their sum is the deployment's, as a Prometheus `sum()`
over the replicas would be.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from functools import cache

from ray.serve.handle import DeploymentHandle

from reranker.gpu import Nvml
from reranker.metrics import STATUSES
from web.history import RequestSummary
from web.service import RerankService
from web.snapshots import Snapshot, model_card, take_snapshot

logger = logging.getLogger("reranker.ray")


@dataclass(frozen=True)
class ReplicaView:
    """What one model replica tells the Monitoring tab."""

    replica: str
    snapshot: Snapshot
    latest: list[RequestSummary]
    card: str


@cache
def _nvml() -> Nvml:
    return Nvml()


def replica_view(replica: str, service: RerankService) -> ReplicaView:
    """This replica's view, answered by RerankModel.snapshot."""
    reranker = service.reranker
    return ReplicaView(replica, take_snapshot(reranker, _nvml()), service.history.latest(), model_card(reranker))


def merge(snapshots: list[Snapshot]) -> Snapshot:
    """One snapshot whose counters are the sums of `snapshots`' (at least one)."""
    first = snapshots[0]
    statuses = dict.fromkeys([*STATUSES, *(k for s in snapshots for k in s.requests)])
    requests = {status: sum(s.requests.get(status, 0.0) for s in snapshots) for status in statuses}
    buckets: dict[float, float] = {}
    for s in snapshots:
        for bound, count in s.latency_buckets:
            buckets[bound] = buckets.get(bound, 0.0) + count

    def pair(values: list[tuple[float, float]]) -> tuple[float, float]:
        return sum(v[0] for v in values), sum(v[1] for v in values)

    return replace(first, time=time.time(), requests=requests, latency_buckets=sorted(buckets.items()),
                   docs=pair([s.docs for s in snapshots]), batch=pair([s.batch for s in snapshots]),
                   cache=pair([s.cache for s in snapshots]), queue_pairs=sum(s.queue_pairs for s in snapshots),
                   memory=(*pair([s.memory[:2] for s in snapshots]), first.memory[2]))


class Replicas:
    """The model deployment's replicas as the Monitoring tab sees them. Called from Gradio's worker threads,
    never its event loop (a handle's `result()` blocks)."""

    def __init__(self, handle: DeploymentHandle, *, calls: int = 4, forget_s: float = 30.0,
                 timeout_s: float = 5.0) -> None:
        self.handle = handle
        self.calls = calls
        self.forget_s = forget_s
        self.timeout_s = timeout_s
        self._views: dict[str, tuple[float, ReplicaView]] = {}

    def add(self, view: ReplicaView) -> None:
        self._views[view.replica] = (time.monotonic(), view)

    def refresh(self) -> None:
        """Ask the deployment `calls` times, keeping each answer, and forget replicas gone quiet."""
        responses = [self.handle.snapshot.remote() for _ in range(self.calls)]
        for response in responses:
            try:
                self.add(response.result(timeout_s=self.timeout_s))
            except Exception as err:  # a replica stopping or not yet up: the others still answer
                logger.warning("monitoring: a replica did not answer", extra={"error": type(err).__name__})
        cutoff = time.monotonic() - self.forget_s
        self._views = {k: v for k, v in self._views.items() if v[0] >= cutoff}

    def snapshot(self) -> Snapshot:
        self.refresh()
        views = [view for _, view in self._views.values()]
        if not views:
            return Snapshot(time.time(), dict.fromkeys(STATUSES, 0.0), [], (0.0, 0.0), (0.0, 0.0), (0.0, 0.0), 0.0)
        return merge([v.snapshot for v in views])

    def card(self) -> str:
        views = [view for _, view in self._views.values()]
        if not views:
            return "waiting for the model replicas…"
        return f"{views[0].card}\n\n{len(views)} model replica(s) on Ray Serve: the plots sum them."

    def latest(self) -> list[RequestSummary]:
        rows = [row for _, view in self._views.values() for row in view.latest]
        return sorted(rows, key=lambda r: r.time, reverse=True)[:20]
