"""deploy/ray/panel.py without a cluster: how the Monitoring tab on Ray Serve sums the replicas' published views
(tests/test_ray_ui.py reads them on a real one)."""

from __future__ import annotations

import pytest

pytest.importorskip("ray.serve", reason="needs requirements-ray.txt")

import time  # noqa: E402

from deploy.ray.panel import KIND_INGRESS, KIND_UI, Replicas, ReplicaView  # noqa: E402
from reranker.metrics import STATUSES  # noqa: E402
from web.history import RequestSummary  # noqa: E402
from web.snapshots import GPU_MEMORY, PROCESS_MEMORY, Snapshot  # noqa: E402

GIB = 2.0**30


def snapshot(ok: float = 0.0, invalid: float = 0.0, queue: float = 0.0, memory: tuple[float, float, str] = (
        0.0, 0.0, PROCESS_MEMORY), age_s: float = 0.0) -> Snapshot:
    return Snapshot(time.time() - age_s, {**dict.fromkeys(STATUSES, 0.0), "ok": ok, "invalid": invalid},
                    [(0.1, ok + invalid), (float("inf"), ok + invalid)], (10.0 * ok, ok), (ok, 1.0), (0.0, ok),
                    queue, memory)


def row(route: str, status: str, at: float) -> RequestSummary:
    return RequestSummary(at, route, 2, 1.0, status, "id", "")


def test_the_tab_sums_model_replicas_ingresses_and_its_own_refusals_and_forgets_a_silent_replica() -> None:
    published = [
        ReplicaView("m1", snapshot(ok=5, queue=3, memory=(1 * GIB, 0.0, PROCESS_MEMORY)), [row("/v1/rerank", "ok", 2)],
                    "| card |", node="n1"),
        ReplicaView("m2", snapshot(ok=7, memory=(2 * GIB, 0.0, PROCESS_MEMORY)), [row("/rerank", "ok", 3)],
                    "| card |", node="n1"),
        ReplicaView("i1", snapshot(invalid=4), [row("/v1/rerank", "invalid", 4)], kind=KIND_INGRESS, node="n1"),
        ReplicaView("gone", snapshot(ok=100, age_s=60), [row("/v1/rerank", "ok", 9)], "| card |", node="n2"),
    ]
    own = ReplicaView("ui", snapshot(invalid=1), [row("ui", "invalid", 1)], kind=KIND_UI)
    replicas = Replicas("reranker", lambda: own, read=lambda app: published if app == "reranker" else [])
    merged = replicas.snapshot()
    # The replica killed a minute ago is gone; the ingress's and the UI's own answers are in.
    assert (merged.requests["ok"], merged.requests["invalid"]) == (12, 5)
    assert dict(merged.latency_buckets)[float("inf")] == 17
    assert merged.queue_pairs == 3 and merged.docs == (120.0, 12.0)
    assert merged.memory == (3 * GIB, 0.0, PROCESS_MEMORY)  # each model replica's process
    assert [(r.route, r.status) for r in replicas.latest()] == [
        ("/v1/rerank", "invalid"), ("/rerank", "ok"), ("/v1/rerank", "ok"), ("ui", "invalid")]
    card = replicas.card()
    assert card.startswith("| card |") and "2 model replica(s) and 1 ingress replica(s)" in card


def test_gpu_memory_is_taken_once_per_node() -> None:
    """NVML reads every GPU of its host, so two replicas on one node report the same GPUs."""
    gpus = (10 * GIB, 80 * GIB, GPU_MEMORY)
    published = [ReplicaView(name, snapshot(ok=1, memory=gpus), [], "| card |", node=node)
                 for name, node in (("a", "n1"), ("b", "n1"), ("c", "n2"))]
    replicas = Replicas("reranker", lambda: ReplicaView("ui", snapshot(), [], kind=KIND_UI),
                        read=lambda app: published)
    assert replicas.snapshot().memory == (20 * GIB, 160 * GIB, GPU_MEMORY)
    assert "3 model replica(s) and 0 ingress replica(s)" in replicas.card() and "each node's GPUs once" in (
        replicas.card())


def test_before_any_model_replica_published_the_card_says_so_and_a_failed_read_keeps_the_last_views() -> None:
    own = ReplicaView("ui", snapshot(invalid=2), [], kind=KIND_UI)
    views: list[ReplicaView] = []

    def read(app: str) -> list[ReplicaView]:
        if not views:
            raise ConnectionError("GCS away")
        return views

    replicas = Replicas("reranker", lambda: own, read=read)
    assert replicas.snapshot().requests["invalid"] == 2  # nothing read: the UI's own answers, no crash
    assert replicas.card() == "waiting for the model replicas…"
    views.append(ReplicaView("m1", snapshot(ok=1), [], "| card |"))
    assert replicas.snapshot().requests["ok"] == 1
    views.clear()
    assert replicas.snapshot().requests["ok"] == 1  # the read failed: the last views stay
