"""The Monitoring tab in Serve mode: every replica's counters and request history, summed into one view.

Each model and ingress replica publishes its view to Ray's key-value store every PUBLISH_S (`Publisher`), under
`panel/<model application>/<kind>/<replica>`; the UI replica reads them all each tick and adds its own. So the tab
has every replica, and what the ingress answers itself (bad JSON, 401, 429, 504), and a tick never waits behind
scoring. A view whose snapshot has not changed for FORGET_S, by the UI's own clock (the nodes' clocks may differ),
is a replica gone: its gauges leave the tab, its key is deleted after DELETE_S, and its counters stay in the sums,
so that the plotted rates do not drop below zero when a replica is replaced; a key that comes back (a replica whose
publishing stalled, the store away for a while) brings its counters back, and is counted once. A replica that stops
deletes its own key. The counters are each replica's own since it started: their sum is the application's, as a
Prometheus `sum()` over the replicas would be.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

from deploy.ray.periodic import Periodic
from deploy.ray.stopping import NAMESPACE, kv_store
from reranker.gpu import Nvml
from reranker.metrics import STATUSES, Metrics
from web.history import RequestHistory, RequestSummary
from web.service import RerankService
from web.snapshots import GPU_MEMORY, Snapshot, metrics_snapshot, model_card, take_snapshot

logger = logging.getLogger("reranker.ray")

PUBLISH_S = 1.0  # the tab ticks every 2 s
FORGET_S = 10.0  # a view unchanged this long is a replica gone
DELETE_S = 60.0  # ...and its key is deleted this long after its last change
RETIRED_KEYS = 256  # deleted keys whose counters are kept apart, in case they come back; older ones are summed
KIND_MODEL, KIND_INGRESS, KIND_UI = "model", "ingress", "ui"


@dataclass(frozen=True)
class ReplicaView:
    """What one replica tells the Monitoring tab: a model replica its engine's counters, an ingress or the UI what
    they answered themselves."""

    replica: str
    snapshot: Snapshot
    latest: list[RequestSummary]
    card: str = ""
    kind: str = KIND_MODEL
    node: str = ""  # Ray's node id: NVML reads every GPU of its host, so GPU memory is taken once per node
    info: dict[str, Any] | None = None  # a model replica's GET /info body, which the ingresses answer from


@cache
def _nvml() -> Nvml:
    return Nvml()


def replica_view(replica: str, service: RerankService, node: str = "",
                 info: dict[str, Any] | None = None) -> ReplicaView:
    """A model replica's view."""
    reranker = service.reranker
    return ReplicaView(replica, take_snapshot(reranker, _nvml()), service.history.latest(), model_card(reranker),
                       KIND_MODEL, node, info)


def answers_view(replica: str, kind: str, metrics: Metrics, history: RequestHistory, node: str = "") -> ReplicaView:
    """An ingress's or the UI's view: what it answered itself."""
    return ReplicaView(replica, metrics_snapshot(metrics), history.latest(), kind=kind, node=node)


def view_key(app: str, view: ReplicaView) -> str:
    return f"panel/{app}/{view.kind}/{view.replica}"


class Publisher:
    """Publishes `produce()` for the UI of model application `app` now and every `every_s` on a daemon thread,
    until close(), which deletes it."""

    def __init__(self, app: str, produce: Callable[[], ReplicaView], every_s: float = PUBLISH_S) -> None:
        self.app = app
        self.produce = produce
        self._key: str | None = None
        self._rounds = Periodic(self.publish, every_s, "panel-publisher", now=True)

    def publish(self) -> None:
        view = self.produce()
        self._key = view_key(self.app, view)
        kv_store()._internal_kv_put(self._key, pickle.dumps(view), namespace=NAMESPACE)

    def close(self) -> None:
        self._rounds.close()  # first: a publish under way would write the key again after the delete
        if self._key is not None:
            try:
                kv_store()._internal_kv_del(self._key, namespace=NAMESPACE)
            except Exception:  # Ray is going down too: the UI drops the view once it stops changing
                pass


def published(app: str, kind: str = "") -> dict[str, ReplicaView]:
    """Every view published for model application `app` (of replicas of one `kind`, if given), by key (blocking
    reads of the GCS). A key that cannot be read or unpickled (one from another version of this code, during an
    update) is skipped."""
    kv, views = kv_store(), {}
    for key in kv._internal_kv_list(f"panel/{app}/{kind + '/' if kind else ''}", namespace=NAMESPACE):
        try:
            blob = kv._internal_kv_get(key, namespace=NAMESPACE)
            if blob:  # deleted between the listing and the read: a replica that stopped
                views[key.decode() if isinstance(key, bytes) else str(key)] = pickle.loads(blob)
        except Exception as err:
            logger.debug("monitoring: skipped a view", extra={"key": str(key), "error": repr(err)})
    return views


def delete_view(key: str) -> None:
    kv_store()._internal_kv_del(key, namespace=NAMESPACE)


def merge(counted: list[Snapshot], live: list[ReplicaView]) -> Snapshot:
    """One snapshot: the sums of the `counted` snapshots' counters (at least one), and the gauges of the `live`
    views (queue; memory of the model replicas: each one's process, or the GPUs of each node once)."""
    statuses = dict.fromkeys([*STATUSES, *(k for s in counted for k in s.requests)])
    requests = {status: sum(s.requests.get(status, 0.0) for s in counted) for status in statuses}
    buckets: dict[float, float] = {}
    for s in counted:
        for bound, count in s.latency_buckets:
            buckets[bound] = buckets.get(bound, 0.0) + count

    def pair(values: list[tuple[float, float]]) -> tuple[float, float]:
        return sum(v[0] for v in values), sum(v[1] for v in values)

    models = [view for view in live if view.kind == KIND_MODEL]
    memory = models[0].snapshot.memory if models else counted[0].memory
    if memory[2] == GPU_MEMORY:
        models = list({view.node: view for view in models}.values())
    return replace(counted[0], time=time.time(), requests=requests, latency_buckets=sorted(buckets.items()),
                   docs=pair([s.docs for s in counted]), batch=pair([s.batch for s in counted]),
                   cache=pair([s.cache for s in counted]), queue_pairs=sum(v.snapshot.queue_pairs for v in live),
                   memory=(*pair([view.snapshot.memory[:2] for view in models]), memory[2]))


class Replicas:
    """The application's replicas as the Monitoring tab sees them: the published views of model application `app`
    and `own()`, the UI replica's. Called from Gradio's worker threads, never its event loop (reads block)."""

    def __init__(self, app: str, own: Callable[[], ReplicaView], *, forget_s: float = FORGET_S,
                 delete_s: float = DELETE_S, read: Callable[[str], dict[str, ReplicaView]] = published,
                 delete: Callable[[str], None] = delete_view) -> None:
        self.app = app
        self.own = own
        self.forget_s = forget_s
        self.delete_s = delete_s
        self.read = read
        self.delete = delete
        self._last: dict[str, tuple[ReplicaView, float]] = {}  # key -> latest view, when it last changed
        self._retired: dict[str, Snapshot] = {}  # deleted key -> its last counters, the latest RETIRED_KEYS
        self._folded: list[Snapshot] = []  # the counters of older deleted keys, summed
        self._live: list[ReplicaView] = []

    def refresh(self) -> list[ReplicaView]:
        """The live views, the UI's own last."""
        now = time.monotonic()
        try:
            views = self.read(self.app)
        except Exception as err:  # the GCS away for a while: the last views stand in, and age no further
            logger.debug("monitoring: could not read the replicas' views", extra={"error": repr(err)})
            self._live = [*self._live[:-1], self.own()]
            return self._live
        for key, view in views.items():
            last = self._last.get(key)
            if last is None or last[0].snapshot.time != view.snapshot.time:
                self._last[key] = (view, now)
            self._retired.pop(key, None)  # back: its view has every counter since its replica started
        for key, (view, changed) in list(self._last.items()):
            if now - changed > self.delete_s:
                del self._last[key]
                self._retire(key, view.snapshot)
                try:
                    self.delete(key)
                except Exception as err:
                    logger.debug("monitoring: could not delete a view", extra={"key": key, "error": repr(err)})
        self._live = [view for view, changed in self._last.values() if now - changed <= self.forget_s]
        self._live.append(self.own())
        return self._live

    def _retire(self, key: str, counters: Snapshot) -> None:
        self._retired[key] = counters
        if len(self._retired) > RETIRED_KEYS:
            oldest = next(iter(self._retired))
            self._folded = [merge([*self._folded, self._retired.pop(oldest)], [])]

    def snapshot(self) -> Snapshot:
        """Every key's last counters (gone replicas' included) and the UI's own; the live views' gauges."""
        live = self.refresh()
        counted = [*self._folded, *self._retired.values(), *(view.snapshot for view, _ in self._last.values()),
                   live[-1].snapshot]
        return merge(counted, live)

    def card(self) -> str:
        models = [view for view in self._live if view.kind == KIND_MODEL]
        if not models:
            return "waiting for the model replicas…"
        ingresses = sum(view.kind == KIND_INGRESS for view in self._live)
        memory = "each node's GPUs once" if models[0].snapshot.memory[2] == GPU_MEMORY else "their processes"
        return (f"{models[0].card}\n\n{len(models)} model replica(s) and {ingresses} ingress replica(s) on Ray "
                f"Serve: the plots sum them, with what the ingress and this UI answered themselves (bad requests, "
                f"429, 504); memory is the model replicas' ({memory}). Per replica: Prometheus.")

    def latest(self) -> list[RequestSummary]:
        rows = [row for view in self._live for row in view.latest]
        return sorted(rows, key=lambda r: r.time, reverse=True)[:20]
