"""A Serve replica's metrics: reranker/metrics.py's, each also recorded on Ray's metrics (`ray.serve.metrics`).

prometheus_client metrics made in a replica are never scraped: Ray exports only its own metrics, through each
node's metrics agent (the port of `ray start --metrics-export-port`). `RayMirror` tees every metric into one of
those under the same family name, label names and histogram buckets, and Serve adds the `deployment`,
`replica` and `application` labels. The agent prefixes every name with `ray_`
(`ray_reranker_requests_total`); monitoring/prometheus-serve.yml's Ray job renames them back, so the alert
rules and the dashboard read both modes under one set of names. The local registry keeps every value too: the Monitoring
tab and the tests read it. An info becomes a gauge of 1 labelled with its keys, as prometheus_client
exports one.

Ray 2.60 stops exporting a gauge series that nobody set within about two report intervals, so a value set once
(the model's info and load time, the queue's capacity) vanished minutes after the start, and one left alone
while idle (queue depth, requests in flight) 15 s after the load stopped, and with them every alert on them. A
daemon thread sets every gauge again, at its last value, every `refresh_s` (as deploy/ray/gpu.py does for the
GPU gauges) until the replica closes its metrics.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.metrics_core import Metric

from deploy.ray.periodic import Periodic
from reranker.metrics import CounterLike, GaugeLike, HistogramLike, InfoLike, Metrics, MetricSpec

logger = logging.getLogger("reranker.ray")

REFRESH_S = 5.0  # well inside the ~15 s after which Ray 2.60 stopped exporting a gauge nobody set


def replica_metrics(ray_metrics: Any = None, refresh_s: float = REFRESH_S) -> ReplicaMetrics:
    """The Metrics of a Serve replica (model, ingress or UI), exported through Ray, its gauges set again every
    `refresh_s`. `ray_metrics` is a module with Ray's Counter, Gauge and Histogram classes: `ray.serve.metrics`
    unless a test gives its own."""
    if ray_metrics is None:
        from ray.serve import metrics as ray_metrics
    return ReplicaMetrics(RayMirror(ray_metrics), refresh_s)


# The answers of an application's front replica (the ingress, the UI) to Serve's proxy by HTTP status code (Ray Serve
# only): the proxy's count of 429s less this one's is what the proxy refused itself (monitoring/alerts.yml,
# RerankerServeProxyRefusing). reranker_requests_total cannot tell that: a model replica counts each try it refused,
# and the ingress retries such a try.
INGRESS_ANSWERS = MetricSpec("reranker_ingress_answers",
                             "Answers the ingress or the UI replica sent Serve's proxy, by HTTP status code.",
                             ("status_code",))


def ingress_answers(ray_metrics: Any = None) -> Any:
    """The Ray counter of INGRESS_ANSWERS (`ray_metrics` as in replica_metrics); Serve adds the replica's labels."""
    if ray_metrics is None:
        from ray.serve import metrics as ray_metrics
    spec = INGRESS_ANSWERS
    counter = ray_metrics.Counter(spec.name, spec.documentation, tag_keys=spec.labelnames)
    # The series the alert reads starts at 0, as _Counter's do: else a new replica's first 429s are no increase, and
    # the alert takes them for the proxy's own.
    counter._record(0.0, tags={"status_code": "429"})
    return counter


class ReplicaMetrics(Metrics):
    """Metrics on a fresh registry, teed into Ray; a daemon thread keeps the Ray gauges exported until close()."""

    def __init__(self, mirror: RayMirror, refresh_s: float) -> None:
        super().__init__(CollectorRegistry(), process_collector=True, mirror=mirror)
        self.mirror = mirror
        self.refresh_s = refresh_s
        self._refresher = Periodic(mirror.refresh, refresh_s, "replica-gauges")

    def close(self) -> None:
        self._refresher.close()


class RayMirror:
    """Builds the tees and keeps the gauges among them, to set them again (refresh); see reranker.metrics.Mirror."""

    def __init__(self, ray_metrics: Any) -> None:
        self.ray = ray_metrics
        self.gauges: list[_Gauge | _Info] = []

    def refresh(self) -> None:
        """Set every Ray gauge again at its last value, so that Ray keeps exporting it."""
        for gauge in self.gauges:
            gauge.refresh()

    def counter(self, spec: MetricSpec, metric: Counter) -> CounterLike:
        ray_metric = self.ray.Counter(spec.name, spec.documentation, tag_keys=spec.labelnames)
        return _Counter(metric, ray_metric, spec.labelnames, {})

    def gauge(self, spec: MetricSpec, metric: Gauge) -> GaugeLike:
        gauge = _Gauge(metric, self.ray.Gauge(spec.name, spec.documentation, tag_keys=spec.labelnames))
        self.gauges.append(gauge)
        return gauge

    def histogram(self, spec: MetricSpec, metric: Histogram) -> HistogramLike:
        ray_metric = self.ray.Histogram(spec.name, spec.documentation, boundaries=[float(b) for b in spec.buckets],
                                        tag_keys=spec.labelnames)
        return _Histogram(metric, ray_metric, spec.labelnames, {})

    def info(self, spec: MetricSpec, metric: Info) -> InfoLike:
        info = _Info(metric, self.ray, spec)
        self.gauges.append(info)
        return info


def _tags(labelnames: Iterable[str], values: tuple[str, ...], by_name: dict[str, str]) -> dict[str, str]:
    return {k: str(v) for k, v in by_name.items()} if by_name else dict(zip(labelnames, map(str, values), strict=True))


class _Tee:
    def __init__(self, metric: Any) -> None:
        self.metric = metric

    def collect(self) -> Iterable[Metric]:
        return self.metric.collect()


class _Counter(_Tee):
    """Starts every series at 0, as prometheus_client does, so that the first increment is an increase (an alert
    on `increase(...) > 0` sees the first NaN score); Ray's public inc refuses 0, hence `_record`."""

    def __init__(self, metric: Any, ray_metric: Any, labelnames: tuple[str, ...], tags: dict[str, str],
                 started: set[tuple[str, ...]] | None = None) -> None:
        super().__init__(metric)
        self.ray_metric, self.labelnames, self.tags = ray_metric, labelnames, tags
        self.started = set() if started is None else started
        if not labelnames or tags:
            key = tuple(tags.values())
            if key not in self.started:
                self.started.add(key)
                self.ray_metric._record(0.0, tags=dict(tags))

    def labels(self, *values: str, **by_name: str) -> _Counter:
        tags = _tags(self.labelnames, values, by_name)
        child = self.metric.labels(*values, **by_name)
        return _Counter(child, self.ray_metric, self.labelnames, tags, self.started)

    def inc(self, amount: float = 1) -> None:
        self.metric.inc(amount)
        if amount > 0:  # Ray refuses 0
            self.ray_metric.inc(float(amount), tags=dict(self.tags))  # Serve adds its tags into the dict


class _Histogram(_Tee):
    def __init__(self, metric: Any, ray_metric: Any, labelnames: tuple[str, ...], tags: dict[str, str]) -> None:
        super().__init__(metric)
        self.ray_metric, self.labelnames, self.tags = ray_metric, labelnames, tags

    def labels(self, *values: str, **by_name: str) -> _Histogram:
        tags = _tags(self.labelnames, values, by_name)
        return _Histogram(self.metric.labels(*values, **by_name), self.ray_metric, self.labelnames, tags)

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        self.metric.observe(amount, exemplar=exemplar)
        self.ray_metric.observe(float(amount), tags=dict(self.tags))  # Ray takes no exemplar, and no numpy float


class _Gauge(_Tee):
    """Ray's gauge only sets: this one keeps the value that inc and dec move."""

    def __init__(self, metric: Any, ray_metric: Any) -> None:
        super().__init__(metric)
        self.ray_metric = ray_metric
        self._value = 0.0
        self._lock = threading.Lock()
        self.ray_metric.set(0.0, tags={})  # exported from the start, as prometheus_client's

    def inc(self, amount: float = 1) -> None:
        self._move(lambda value: value + amount)

    def dec(self, amount: float = 1) -> None:
        self._move(lambda value: value - amount)

    def set(self, value: float) -> None:
        self._move(lambda _: value)

    def _move(self, change: Any) -> None:
        with self._lock:  # the batcher's thread and the event loop both move the gauges
            self._value = float(change(self._value))
            self.metric.set(self._value)
            self.ray_metric.set(self._value, tags={})

    def refresh(self) -> None:
        with self._lock:
            self.ray_metric.set(self._value, tags={})


class _Info(_Tee):
    """A gauge `<name>_info` of 1 labelled with the info's keys, made on the first info() (when the keys are
    known); the engine sets it once, at load, and refresh() sets it again."""

    def __init__(self, metric: Any, ray_metrics: Any, spec: MetricSpec) -> None:
        super().__init__(metric)
        self.ray, self.spec = ray_metrics, spec
        self.ray_metric: Any = None
        self.tags: dict[str, str] | None = None

    def info(self, val: dict[str, str]) -> None:
        self.metric.info(val)
        if self.ray_metric is None:
            self.ray_metric = self.ray.Gauge(f"{self.spec.name}_info", self.spec.documentation,
                                             tag_keys=tuple(sorted(val)))
        self.tags = {k: str(v) for k, v in val.items()}
        self.ray_metric.set(1, tags=dict(self.tags))

    def refresh(self) -> None:
        tags = self.tags  # one read: info() may replace it meanwhile
        if tags is not None:
            self.ray_metric.set(1, tags=dict(tags))
