"""Every Prometheus metric of the service, defined once on one registry (SPEC section 6).

A `Mirror` (deploy/ray/metrics.py in Ray Serve mode) may wrap each metric as it is built, so that every value
recorded also reaches another exporter under the same name; this module stays free of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.process_collector import ProcessCollector

NAMESPACE = "reranker"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
SCORE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
STDDEV_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)

STATUSES = ("ok", "invalid", "overloaded", "error", "cancelled")  # `status` label values
ROUTES = ("/v1/rerank", "/v2/rerank", "/rerank", "/api/predict", "ui")  # `route` label values: the UI and Gradio API
# Why a finished span never reached the collector: the export queue was full, the export failed, or it
# ended after the tracer shut down.
SPAN_DROP_REASONS = ("queue_full", "export_failed", "shutdown")


class CounterLike(Protocol):
    def labels(self, *values: str, **by_name: str) -> CounterLike: ...
    def inc(self, amount: float = 1) -> None: ...


class GaugeLike(Protocol):
    def inc(self, amount: float = 1) -> None: ...
    def dec(self, amount: float = 1) -> None: ...
    def set(self, value: float) -> None: ...


class HistogramLike(Protocol):
    def labels(self, *values: str, **by_name: str) -> HistogramLike: ...
    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None: ...


class InfoLike(Protocol):
    def info(self, val: dict[str, str]) -> None: ...


@dataclass(frozen=True)
class MetricSpec:
    """A metric as exported: `name` is the family name (`reranker_requests`; a counter's samples add `_total`,
    a histogram's `_bucket`/`_sum`/`_count`, an info's `_info`)."""

    name: str
    documentation: str
    labelnames: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


class Mirror(Protocol):
    """Wraps each metric so that what is recorded on it is also recorded elsewhere; the wrapper must still
    `collect()` from the wrapped metric (the Monitoring tab reads the metric objects)."""

    def counter(self, spec: MetricSpec, metric: Counter) -> CounterLike: ...
    def gauge(self, spec: MetricSpec, metric: Gauge) -> GaugeLike: ...
    def histogram(self, spec: MetricSpec, metric: Histogram) -> HistogramLike: ...
    def info(self, spec: MetricSpec, metric: Info) -> InfoLike: ...


class Metrics:
    """The metric objects; build one per registry (the app's, or a fresh one per test)."""

    def __init__(self, registry: CollectorRegistry, *, process_collector: bool = False,
                 mirror: Mirror | None = None) -> None:
        self.registry = registry
        self._mirror = mirror
        if process_collector:
            ProcessCollector(registry=registry)
        counter, gauge, histogram = self._counter, self._gauge, self._histogram
        self.requests = counter("requests", "Requests by route and outcome.", ("route", "status"))
        self.request_seconds = histogram("request_duration_seconds", "Time from request to response.",
                                         LATENCY_BUCKETS, ("route",))
        self.queue_seconds = histogram("queue_duration_seconds", "Time a request's pairs waited for the worker.",
                                       LATENCY_BUCKETS)
        self.inference_seconds = histogram("inference_duration_seconds", "Time of one forward pass.",
                                           LATENCY_BUCKETS)
        self.documents_per_request = histogram("documents_per_request", "Documents in one request.", COUNT_BUCKETS)
        self.batch_size = histogram("batch_size", "Pairs in one forward pass.", COUNT_BUCKETS)
        self.batch_tokens = histogram("batch_tokens", "Padded tokens in one forward pass.", TOKEN_BUCKETS)
        self.input_tokens = counter("input_tokens", "Tokens of the pairs sent to the model.")
        self.pairs_scored = counter("pairs_scored", "Query-document pairs run through the model.")
        self.truncated_documents = counter("truncated_documents", "Documents cut to fit max_length.")
        self.chunked_documents = counter("chunked_documents", "Documents split into windows (long-doc mode chunk).")
        self.cache_requests = counter("cache_requests", "Pair-score cache lookups.", ("result",))
        self.oom_retries = counter("oom_retries", "Batches halved and retried after running out of memory.")
        self.nonfinite_scores = counter("nonfinite_scores", "Scores that came out NaN or infinite.")
        self.cancelled_pairs = counter("cancelled_pairs",
                                       "Pairs dropped unscored because their caller gave up (client gone).")
        self.device_faults = counter(
            "device_faults", "Times the worker died or the device failed every batch; the process then exits.")
        self.queue_pairs = gauge("queue_pairs", "Pairs waiting for or in the worker.")
        self.queue_capacity_pairs = gauge("queue_capacity_pairs",
                                          "RERANKER_MAX_QUEUE: pairs the queue holds before refusing work.")
        self.inflight_requests = gauge("inflight_requests", "Requests being served.")
        self.top1_score = histogram("top1_score", "Best score of each request (sigmoid), for drift.", SCORE_BUCKETS)
        self.score_stddev = histogram("score_stddev",
                                      "Standard deviation of each request's scores (sigmoid), for drift.",
                                      STDDEV_BUCKETS)
        info = Info("model", "The loaded model.", namespace=NAMESPACE, registry=registry)
        self.model_info: InfoLike = info if mirror is None else mirror.info(
            MetricSpec(f"{NAMESPACE}_model", "The loaded model."), info)
        self.model_load_seconds = gauge("model_load_seconds", "Time to load and warm the model.")
        self.model_convert_seconds = gauge(
            "model_convert_seconds",
            "Time this start spent converting the model for its backend (OpenVINO, int8); 0 when it came from "
            "the conversion cache or needs none.")
        self.trace_spans_dropped = counter(
            "trace_spans_dropped", "Finished trace spans lost before the collector got them, by reason.", ("reason",))
        # Every labelled series starts at 0, as unlabelled ones do: a series born at its first count hides that
        # count from rate() and increase(), so the first 429s or errors of each route after a start raised no alert.
        for route in ROUTES:
            self.request_seconds.labels(route=route)
            for status in STATUSES:
                self.requests.labels(route=route, status=status)
        for result in ("hit", "miss"):
            self.cache_requests.labels(result=result)
        for reason in SPAN_DROP_REASONS:
            self.trace_spans_dropped.labels(reason=reason)

    def _counter(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> CounterLike:
        metric = Counter(name, documentation, labelnames, namespace=NAMESPACE, registry=self.registry)
        spec = MetricSpec(f"{NAMESPACE}_{name}", documentation, labelnames)
        return metric if self._mirror is None else self._mirror.counter(spec, metric)

    def _gauge(self, name: str, documentation: str) -> GaugeLike:
        metric = Gauge(name, documentation, namespace=NAMESPACE, registry=self.registry)
        spec = MetricSpec(f"{NAMESPACE}_{name}", documentation)
        return metric if self._mirror is None else self._mirror.gauge(spec, metric)

    def _histogram(self, name: str, documentation: str, buckets: tuple[float, ...],
                   labelnames: tuple[str, ...] = ()) -> HistogramLike:
        metric = Histogram(name, documentation, labelnames, namespace=NAMESPACE, buckets=buckets,
                           registry=self.registry)
        spec = MetricSpec(f"{NAMESPACE}_{name}", documentation, labelnames, buckets)
        return metric if self._mirror is None else self._mirror.histogram(spec, metric)
