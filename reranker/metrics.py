"""Every Prometheus metric of the service, defined once on one registry (SPEC section 6)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.process_collector import ProcessCollector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
SCORE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
STDDEV_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)

STATUSES = ("ok", "invalid", "overloaded", "error", "cancelled")  # `status` label values
# Why a finished span never reached the collector: the export queue was full, the export failed, or it
# ended after the tracer shut down.
SPAN_DROP_REASONS = ("queue_full", "export_failed", "shutdown")


class Metrics:
    """The metric objects; build one per registry (the app's, or a fresh one per test)."""

    def __init__(self, registry: CollectorRegistry, *, process_collector: bool = False) -> None:
        self.registry = registry
        if process_collector:
            ProcessCollector(registry=registry)
        ns = "reranker"
        self.requests = Counter(
            "requests", "Requests by route and outcome.", ["route", "status"], namespace=ns, registry=registry
        )
        self.request_seconds = Histogram(
            "request_duration_seconds", "Time from request to response.", ["route"],
            namespace=ns, buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.queue_seconds = Histogram(
            "queue_duration_seconds", "Time a request's pairs waited for the worker.",
            namespace=ns, buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.inference_seconds = Histogram(
            "inference_duration_seconds", "Time of one forward pass.",
            namespace=ns, buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.documents_per_request = Histogram(
            "documents_per_request", "Documents in one request.",
            namespace=ns, buckets=COUNT_BUCKETS, registry=registry,
        )
        self.batch_size = Histogram(
            "batch_size", "Pairs in one forward pass.", namespace=ns, buckets=COUNT_BUCKETS, registry=registry
        )
        self.batch_tokens = Histogram(
            "batch_tokens", "Padded tokens in one forward pass.",
            namespace=ns, buckets=TOKEN_BUCKETS, registry=registry,
        )
        self.input_tokens = Counter(
            "input_tokens", "Tokens of the pairs sent to the model.", namespace=ns, registry=registry
        )
        self.pairs_scored = Counter(
            "pairs_scored", "Query-document pairs run through the model.", namespace=ns, registry=registry
        )
        self.truncated_documents = Counter(
            "truncated_documents", "Documents cut to fit max_length.", namespace=ns, registry=registry
        )
        self.chunked_documents = Counter(
            "chunked_documents", "Documents split into windows (long-doc mode chunk).",
            namespace=ns, registry=registry,
        )
        self.cache_requests = Counter(
            "cache_requests", "Pair-score cache lookups.", ["result"], namespace=ns, registry=registry
        )
        self.oom_retries = Counter(
            "oom_retries", "Batches halved and retried after running out of memory.", namespace=ns, registry=registry
        )
        self.nonfinite_scores = Counter(
            "nonfinite_scores", "Scores that came out NaN or infinite.", namespace=ns, registry=registry
        )
        self.cancelled_pairs = Counter(
            "cancelled_pairs", "Pairs dropped unscored because their caller gave up (client gone).",
            namespace=ns, registry=registry,
        )
        self.device_faults = Counter(
            "device_faults", "Times the worker died or the device failed every batch; the process then exits.",
            namespace=ns, registry=registry,
        )
        self.queue_pairs = Gauge(
            "queue_pairs", "Pairs waiting for or in the worker.", namespace=ns, registry=registry
        )
        self.queue_capacity_pairs = Gauge(
            "queue_capacity_pairs", "RERANKER_MAX_QUEUE: pairs the queue holds before refusing work.",
            namespace=ns, registry=registry,
        )
        self.inflight_requests = Gauge(
            "inflight_requests", "Requests being served.", namespace=ns, registry=registry
        )
        self.top1_score = Histogram(
            "top1_score", "Best score of each request (sigmoid), for drift.",
            namespace=ns, buckets=SCORE_BUCKETS, registry=registry,
        )
        self.score_stddev = Histogram(
            "score_stddev", "Standard deviation of each request's scores (sigmoid), for drift.",
            namespace=ns, buckets=STDDEV_BUCKETS, registry=registry,
        )
        self.model_info = Info("model", "The loaded model.", namespace=ns, registry=registry)
        self.model_load_seconds = Gauge(
            "model_load_seconds", "Time to load and warm the model.", namespace=ns, registry=registry
        )
        self.trace_spans_dropped = Counter(
            "trace_spans_dropped", "Finished trace spans lost before the collector got them, by reason.",
            ["reason"], namespace=ns, registry=registry,
        )
        for result in ("hit", "miss"):
            self.cache_requests.labels(result=result)
        for reason in SPAN_DROP_REASONS:
            self.trace_spans_dropped.labels(reason=reason)

