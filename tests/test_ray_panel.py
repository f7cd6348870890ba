"""deploy/ray/panel.py without a cluster: how the Monitoring tab on Ray Serve sums the replicas' published views
(tests/test_ray_ui.py reads them on a real one)."""

from __future__ import annotations

import pytest

pytest.importorskip("ray.serve", reason="needs requirements-ray.txt")

import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from deploy.ray import panel  # noqa: E402
from deploy.ray.panel import KIND_INGRESS, KIND_UI, Replicas, ReplicaView  # noqa: E402
from reranker.metrics import STATUSES  # noqa: E402
from web.history import RequestSummary  # noqa: E402
from web.snapshots import GPU_MEMORY, PROCESS_MEMORY, Snapshot  # noqa: E402

GIB = 2.0**30


def snapshot(ok: float = 0.0, invalid: float = 0.0, queue: float = 0.0, memory: tuple[float, float, str] = (
        0.0, 0.0, PROCESS_MEMORY), at: float = 0.0) -> Snapshot:
    return Snapshot(at or time.time(), {**dict.fromkeys(STATUSES, 0.0), "ok": ok, "invalid": invalid},
                    [(0.1, ok + invalid), (float("inf"), ok + invalid)], (10.0 * ok, ok), (ok, 1.0), (0.0, ok),
                    queue, memory)


def row(route: str, status: str, at: float) -> RequestSummary:
    return RequestSummary(at, route, 2, 1.0, status, "id", "")


def ui(invalid: float = 0.0) -> ReplicaView:
    return ReplicaView("ui", snapshot(invalid=invalid), [row("ui", "invalid", 1)] if invalid else [], kind=KIND_UI)


def test_the_tab_sums_model_replicas_ingresses_and_its_own_refusals() -> None:
    published = {
        "panel/reranker/model/m1": ReplicaView("m1", snapshot(ok=5, queue=3, memory=(1 * GIB, 0.0, PROCESS_MEMORY)),
                                               [row("/v1/rerank", "ok", 2)], "| card |", node="n1"),
        "panel/reranker/model/m2": ReplicaView("m2", snapshot(ok=7, memory=(2 * GIB, 0.0, PROCESS_MEMORY)),
                                               [row("/rerank", "ok", 3)], "| card |", node="n1"),
        "panel/reranker/ingress/i1": ReplicaView("i1", snapshot(invalid=4), [row("/v1/rerank", "invalid", 4)],
                                                 kind=KIND_INGRESS, node="n1"),
    }
    own = ui(invalid=1)
    replicas = Replicas("reranker", lambda: own, read=lambda app: published if app == "reranker" else {})
    merged = replicas.snapshot()
    # The ingress's and the UI's own answers are in; the ingress counts only those, so nothing twice.
    assert (merged.requests["ok"], merged.requests["invalid"]) == (12, 5)
    assert dict(merged.latency_buckets)[float("inf")] == 17
    assert merged.queue_pairs == 3 and merged.docs == (120.0, 12.0)
    assert merged.memory == (3 * GIB, 0.0, PROCESS_MEMORY)  # each model replica's process
    assert [(r.route, r.status) for r in replicas.latest()] == [
        ("/v1/rerank", "invalid"), ("/rerank", "ok"), ("/v1/rerank", "ok"), ("ui", "invalid")]
    card = replicas.card()
    assert card.startswith("| card |") and "2 model replica(s) and 1 ingress replica(s)" in card


def test_a_replica_gone_leaves_the_gauges_and_the_card_but_its_counters_stay(monkeypatch: pytest.MonkeyPatch) -> None:
    """By the UI's clock: a view unchanged for FORGET_S is a replica gone (its node's clock may be off by more than
    that), its key is deleted after DELETE_S; the sums keep its counters, or the plotted rates would go negative
    when a replica is replaced."""
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(panel, "time", SimpleNamespace(monotonic=lambda: clock.now, time=time.time))
    skewed = 1.0e6  # m2's node's clock is far off: only its changes count
    published = {"m1": ReplicaView("m1", snapshot(ok=5, queue=1), [], "| card |"),
                 "m2": ReplicaView("m2", snapshot(ok=7, queue=2, at=skewed), [row("/rerank", "ok", 3)], "| card |")}
    deleted: list[str] = []
    replicas = Replicas("reranker", ui, read=lambda app: dict(published), delete=deleted.append)
    assert replicas.snapshot().queue_pairs == 3
    for step in range(1, 8):  # m1 publishes every 10 s of the UI's clock; m2 has stopped
        clock.now += 10.0
        published["m1"] = ReplicaView("m1", snapshot(ok=5 + step, queue=1, at=1000.0 + step), [], "| card |")
        merged = replicas.snapshot()
        assert merged.requests["ok"] == 5 + step + 7  # m2's counters stay
        if step >= 2:  # unchanged for more than FORGET_S
            assert merged.queue_pairs == 1 and "1 model replica(s)" in replicas.card()
            assert replicas.latest() == []
    assert deleted == ["m2"]  # after DELETE_S (60 s) without a change
    del published["m2"]  # as the store is now
    clock.now += 10.0
    assert replicas.snapshot().requests["ok"] == 5 + 7 + 7


def test_a_deleted_key_that_comes_back_is_counted_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica whose publishing stalled past DELETE_S, then resumed: its key was deleted and its counters kept,
    and its new view (every counter since its start) was counted besides."""
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(panel, "time", SimpleNamespace(monotonic=lambda: clock.now, time=time.time))
    published = {"m1": ReplicaView("m1", snapshot(ok=5, at=1.0), [], "| card |")}
    deleted: list[str] = []

    def delete(key: str) -> None:
        deleted.append(key)
        published.pop(key)

    replicas = Replicas("reranker", ui, read=lambda app: dict(published), delete=delete)
    assert replicas.snapshot().requests["ok"] == 5
    clock.now += 70.0  # the publisher stalled
    assert replicas.snapshot().requests["ok"] == 5 and deleted == ["m1"]
    published["m1"] = ReplicaView("m1", snapshot(ok=8, at=2.0), [], "| card |")  # and resumed
    clock.now += 1.0
    merged = replicas.snapshot()
    assert merged.requests["ok"] == 8 and "1 model replica(s)" in replicas.card()


def test_while_the_views_cannot_be_read_they_do_not_age(monkeypatch: pytest.MonkeyPatch) -> None:
    """The store away for longer than DELETE_S: the views stood unchanged by the UI's clock, so every replica was
    taken for gone, deleted and then counted twice once the store was back."""
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(panel, "time", SimpleNamespace(monotonic=lambda: clock.now, time=time.time))
    published = {"m1": ReplicaView("m1", snapshot(ok=5, queue=1, at=1.0), [], "| card |")}
    away = SimpleNamespace(on=False)
    deleted: list[str] = []

    def read(app: str) -> dict[str, ReplicaView]:
        if away.on:
            raise ConnectionError("GCS away")
        return dict(published)

    replicas = Replicas("reranker", ui, read=read, delete=deleted.append)
    assert replicas.snapshot().queue_pairs == 1
    away.on = True
    for _ in range(12):
        clock.now += 10.0
        merged = replicas.snapshot()
        assert merged.requests["ok"] == 5 and merged.queue_pairs == 1  # the last views stand in
    away.on = False
    published["m1"] = ReplicaView("m1", snapshot(ok=6, queue=1, at=2.0), [], "| card |")
    clock.now += 1.0
    assert replicas.snapshot().requests["ok"] == 6 and deleted == []


def test_beyond_retired_keys_the_gone_replicas_counters_are_summed(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(panel, "time", SimpleNamespace(monotonic=lambda: clock.now, time=time.time))
    monkeypatch.setattr(panel, "RETIRED_KEYS", 2)
    published = {f"m{i}": ReplicaView(f"m{i}", snapshot(ok=i, at=1.0), [], "| card |") for i in range(1, 5)}
    replicas = Replicas("reranker", ui, read=lambda app: dict(published), delete=published.__delitem__)
    assert replicas.snapshot().requests["ok"] == 10
    clock.now += 70.0  # all four gone
    assert replicas.snapshot().requests["ok"] == 10
    assert len(replicas._retired) == 2 and len(replicas._folded) == 1


def test_gpu_memory_is_taken_once_per_node() -> None:
    """NVML reads every GPU of its host, so two replicas on one node report the same GPUs."""
    gpus = (10 * GIB, 80 * GIB, GPU_MEMORY)
    published = {name: ReplicaView(name, snapshot(ok=1, memory=gpus), [], "| card |", node=node)
                 for name, node in (("a", "n1"), ("b", "n1"), ("c", "n2"))}
    replicas = Replicas("reranker", ui, read=lambda app: published)
    assert replicas.snapshot().memory == (20 * GIB, 160 * GIB, GPU_MEMORY)
    card = replicas.card()
    assert "3 model replica(s) and 0 ingress replica(s)" in card and "each node's GPUs once" in card


def test_before_any_model_replica_published_the_card_says_so_and_a_failed_read_keeps_the_last_views() -> None:
    views: dict[str, ReplicaView] = {}

    def read(app: str) -> dict[str, ReplicaView]:
        if not views:
            raise ConnectionError("GCS away")
        return views

    replicas = Replicas("reranker", lambda: ui(invalid=2), read=read)
    assert replicas.snapshot().requests["invalid"] == 2  # nothing read: the UI's own answers, no crash
    assert replicas.card() == "waiting for the model replicas…"
    views["m1"] = ReplicaView("m1", snapshot(ok=1), [], "| card |")
    assert replicas.snapshot().requests["ok"] == 1
    views.clear()
    assert replicas.snapshot().requests["ok"] == 1  # the read failed: the last views stay
