"""deploy/ray/metrics.py and gpu.py without a cluster: every metric of a replica is teed into a Ray metric of the
same family name, label names and buckets, what the engine records reaches both, and a model replica sets the
GPU gauges of its own GPUs only (Ray's classes and NVML replaced by fakes)."""

from __future__ import annotations

import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

import deploy.ray.__main__ as launcher
from deploy.ray.gpu import ReplicaGpus
from deploy.ray.metrics import replica_metrics
from reranker.gpu import Nvml
from reranker.metrics import LATENCY_BUCKETS, ROUTES, STATUSES, Metrics
from tests.servers import HANG_S
from tests.test_prometheus import fake_nvml


@dataclass
class FakeRayMetric:
    """What ray.serve.metrics' Counter, Gauge and Histogram are given, and what they record, by tags."""

    kind: str
    name: str
    description: str
    tag_keys: tuple[str, ...] = ()
    boundaries: list[float] | None = None
    values: dict[tuple[tuple[str, str], ...], list[float]] = field(default_factory=lambda: defaultdict(list))

    def record(self, value: float, tags: dict[str, str] | None) -> None:
        assert type(value) in (int, float), f"Ray takes int or float, not {type(value)}"
        tags = tags or {}
        assert set(tags) == set(self.tag_keys), (self.name, tags, self.tag_keys)
        self.values[tuple(sorted(tags.items()))].append(value)

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        assert value > 0, "Ray refuses a counter increment of 0 or less"
        self.record(value, tags)

    def _record(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.record(value, tags)

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.record(value, tags)

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.record(value, tags)


def fake_ray_metrics() -> tuple[Any, dict[str, FakeRayMetric]]:
    made: dict[str, FakeRayMetric] = {}

    def maker(kind: str) -> Any:
        def make(name: str, description: str = "", boundaries: list[float] | None = None,
                 tag_keys: tuple[str, ...] | None = None) -> FakeRayMetric:
            assert name not in made, f"{name} made twice"
            made[name] = FakeRayMetric(kind, name, description, tag_keys or (), boundaries)
            return made[name]
        return make

    module = SimpleNamespace(Counter=maker("counter"), Gauge=maker("gauge"), Histogram=maker("histogram"))
    return module, made


def test_every_metric_has_a_ray_twin_with_the_same_name_labels_and_buckets() -> None:
    module, made = fake_ray_metrics()
    metrics = replica_metrics(module)
    metrics.close()
    metrics.model_info.info({"model": "m", "device": "cpu", "dtype": "float32", "max_length": "64", "compile": "no"})
    single = Metrics(CollectorRegistry())
    single.model_info.info({"model": "m", "device": "cpu", "dtype": "float32", "max_length": "64", "compile": "no"})
    single.requests.labels(route="/v1/rerank", status="ok")  # labelled metrics show samples once a child exists
    single.request_seconds.labels(route="/v1/rerank")
    for family in single.registry.collect():
        ray_name = family.name + ("_info" if family.type == "info" else "")
        twin = made.get(ray_name)
        assert twin is not None, f"{family.name} is not exported through Ray"
        assert twin.kind == {"info": "gauge"}.get(family.type, family.type), family.name
        labelnames = {name for sample in family.samples for name in sample.labels if name != "le"}
        if family.type != "info":
            assert set(twin.tag_keys) >= labelnames, family.name
        if family.type == "histogram":
            bounds = sorted({float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")})
            assert twin.boundaries == bounds[:-1], f"{family.name}: buckets differ from single-process mode"
    assert made["reranker_request_duration_seconds"].boundaries == list(LATENCY_BUCKETS)
    # The process collector stays in the replica's own registry: Ray exports its per-process metrics itself.
    assert metrics.registry.get_sample_value("process_resident_memory_bytes") is not None
    assert not any(name.startswith("process_") for name in made)


def test_what_the_engine_records_reaches_both_the_registry_and_ray() -> None:
    module, made = fake_ray_metrics()
    metrics = replica_metrics(module)
    metrics.close()  # no refresh in between: this test reads every value set
    metrics.requests.labels(route="/v1/rerank", status="ok").inc()
    metrics.requests.labels("/rerank", "invalid").inc()
    metrics.request_seconds.labels(route="/v1/rerank").observe(0.2, exemplar={"trace_id": "ab" * 16})
    metrics.top1_score.observe(np.float32(0.75))  # type: ignore[arg-type]  # the engine's scores are numpy
    metrics.cache_requests.labels(result="hit").inc(0)  # nothing cached: Ray refuses 0, the tee skips it
    metrics.inflight_requests.inc()
    metrics.inflight_requests.inc()
    metrics.inflight_requests.dec()
    metrics.model_info.info({"model": "m", "device": "cpu", "dtype": "float32", "max_length": "64", "compile": "no"})

    value = metrics.registry.get_sample_value
    assert value("reranker_requests_total", {"route": "/v1/rerank", "status": "ok"}) == 1
    assert value("reranker_request_duration_seconds_count", {"route": "/v1/rerank"}) == 1
    assert value("reranker_inflight_requests") == 1
    # Every counter series starts at 0, as in prometheus_client, so that the first increment is an increase; those
    # of every route and status from the start (reranker/metrics.py ROUTES, STATUSES).
    requests = made["reranker_requests"].values
    assert len(requests) == len(ROUTES) * len(STATUSES)
    assert {tags: values for tags, values in requests.items() if values != [0.0]} == {
        (("route", "/v1/rerank"), ("status", "ok")): [0.0, 1.0],
        (("route", "/rerank"), ("status", "invalid")): [0.0, 1.0]}
    assert made["reranker_nonfinite_scores"].values == {(): [0.0]}
    assert made["reranker_request_duration_seconds"].values == {(("route", "/v1/rerank"),): [0.2]}
    assert made["reranker_top1_score"].values == {(): [pytest.approx(0.75)]}
    assert made["reranker_cache_requests"].values == {(("result", "hit"),): [0.0], (("result", "miss"),): [0.0]}
    assert made["reranker_inflight_requests"].values == {(): [0.0, 1.0, 2.0, 1.0]}
    (info,) = made["reranker_model_info"].values.items()
    assert dict(info[0])["model"] == "m" and info[1] == [1]


def test_every_gauge_is_set_again_while_nothing_changes_it_until_close() -> None:
    """Ray 2.60 stops exporting a gauge series nobody set for about two report intervals: the queue's capacity,
    the model's info and load time (set once, at load) and an idle replica's queue depth and requests in flight
    vanished from Prometheus, and the alerts on them with them. The replica sets each again every refresh_s."""
    module, made = fake_ray_metrics()
    metrics = replica_metrics(module, refresh_s=0.02)
    try:
        metrics.queue_capacity_pairs.set(20000)
        metrics.model_load_seconds.set(1.5)
        metrics.inflight_requests.inc()
        metrics.inflight_requests.dec()
        metrics.model_info.info({"model": "m", "device": "cpu", "dtype": "float32", "max_length": "64",
                                 "compile": "no"})
        gauges = [name for name, metric in made.items() if metric.kind == "gauge"]
        assert {"reranker_queue_pairs", "reranker_queue_capacity_pairs", "reranker_inflight_requests",
                "reranker_model_load_seconds", "reranker_model_info"} <= set(gauges)

        def sets(name: str) -> int:
            return sum(len(values) for values in made[name].values.values())

        before = {name: sets(name) for name in gauges}
        deadline = time.monotonic() + HANG_S
        while any(sets(name) < before[name] + 3 for name in gauges) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        metrics.close()
    for name in gauges:
        assert sets(name) >= before[name] + 3, f"{name} was not set again"
    # Each at its last value, under its own tags.
    assert made["reranker_queue_capacity_pairs"].values[()][-1] == 20000
    assert made["reranker_inflight_requests"].values[()][-1] == 0
    (info_tags,) = made["reranker_model_info"].values
    assert dict(info_tags)["model"] == "m" and set(made["reranker_model_info"].values[info_tags]) == {1}
    closed = {name: sets(name) for name in gauges}
    time.sleep(0.1)
    assert {name: sets(name) for name in gauges} == closed  # close() stopped the thread
    assert not any(thread.name == "replica-gauges" for thread in threading.enumerate())


def test_a_replica_exports_the_gpus_ray_gave_it_and_no_others() -> None:
    module, made = fake_ray_metrics()
    gpus = ReplicaGpus(module, Nvml(fake_nvml()), ["0"]).start()  # fake_nvml: one 80 GB GPU, index 0
    try:
        assert made["reranker_gpu_memory_used_bytes"].values == {(("gpu", "0"),): [40e9]}
        assert made["reranker_gpu_memory_total_bytes"].values == {(("gpu", "0"),): [80e9]}
        assert made["reranker_gpu_utilization_ratio"].values == {(("gpu", "0"),): [0.5]}
    finally:
        gpus.close()
    module, made = fake_ray_metrics()
    other = ReplicaGpus(module, Nvml(fake_nvml()), ["1"]).start()  # NVML sees GPU 0, Ray gave this one GPU 1
    other.close()
    assert other._thread is None and all(not metric.values for metric in made.values())
    module, made = fake_ray_metrics()
    ReplicaGpus(module, Nvml(fake_nvml()), []).start().close()  # a CPU replica: no gauges, as one process
    assert all(not metric.values for metric in made.values())


def test_the_launcher_puts_rays_metrics_agent_on_a_fixed_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """monitoring/prometheus-serve.yml's `ray` job needs a known port; Ray would pick a random one."""
    calls: list[dict[str, Any]] = []
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(init=lambda **kwargs: calls.append(kwargs)))
    environ: dict[str, str] = {}
    launcher.start_local_ray(environ)
    launcher.start_local_ray({**environ, "RERANKER_RAY_METRICS_PORT": "18080"})
    launcher.start_local_ray({**environ, "RERANKER_RAY_METRICS_PORT": " 18081 "})  # spaces dropped, as Settings does
    launcher.start_local_ray({**environ, "RERANKER_RAY_METRICS_PORT": "  "})  # blank: unset
    assert [call["_metrics_export_port"] for call in calls] == [8080, 18080, 18081, 8080]
    assert calls[0]["_node_ip_address"] == "127.0.0.1"
    for bad in ("http", "0", "65536", "²"):  # 0 started Ray instead; "²" raised int()'s ValueError
        with pytest.raises(launcher.ConfigError, match=f"RERANKER_RAY_METRICS_PORT='{bad}' is not valid"):
            launcher.start_local_ray({"RERANKER_RAY_METRICS_PORT": bad})
    assert len(calls) == 4
