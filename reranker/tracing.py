"""OpenTelemetry setup: a tracer provider exporting over OTLP in batches, drops counted, a bounded shutdown.

Only the on/off switch and the transport come from Settings; the SDK reads every other OTEL_* variable itself
(endpoint, headers, timeout, compression, sampler, resource attributes, batch processor sizes).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from reranker.metrics import Metrics
from reranker.settings import Settings

logger = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME = "reranker"
SCOPE = "reranker"
SHUTDOWN_SECONDS = 5.0


def service_resource() -> Resource:
    """The resource the SDK builds from OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME; `reranker` unless
    they name the service."""
    resource = Resource.create()
    if SERVICE_NAME in OTELResourceDetector().detect().attributes:
        return resource
    return resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))


def otlp_exporter(protocol: str) -> SpanExporter:
    """The SDK's OTLP span exporter for `protocol` (`http/protobuf` or `grpc`), configured by OTEL_* variables."""
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter

        return GrpcSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


class CountingExporter(SpanExporter):
    """Wraps the real exporter: counts the spans of every failed export, and can abort one that hangs."""

    def __init__(self, inner: SpanExporter, metrics: Metrics) -> None:
        self.inner = inner
        self._failed = metrics.trace_spans_dropped.labels(reason="export_failed")
        self._lock = threading.Lock()
        self._stopped = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception:
            self._failed.inc(len(spans))
            raise  # the batch processor logs it
        if result is not SpanExportResult.SUCCESS:
            self._failed.inc(len(spans))
        return result

    def shutdown(self) -> None:
        """Stop the inner exporter once; the OTLP exporters also cut short a retry in progress."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class _QueueDrops:
    """The batch processor's own drop accounting (its internal-metrics hook), also counted in our registry."""

    REASONS = {"queue_full": "queue_full", "already_shutdown": "shutdown"}

    def __init__(self, inner: object, metrics: Metrics) -> None:
        self._inner = inner
        self._counter = metrics.trace_spans_dropped

    def register_queue_size(self, get_queue_size: Callable[[], int]) -> None:
        self._inner.register_queue_size(get_queue_size)  # type: ignore[attr-defined]

    def drop_items(self, count: int, error_type: str = "queue_full") -> None:
        self._inner.drop_items(count, error_type)  # type: ignore[attr-defined]
        self._counter.labels(reason=self.REASONS.get(error_type, "queue_full")).inc(count)

    def finish_items(self, count: int) -> None:
        self._inner.finish_items(count)  # type: ignore[attr-defined]


def _count_queue_drops(processor: BatchSpanProcessor, metrics: Metrics) -> None:
    # The SDK reports a full queue only through this private hook (or through OTel metrics behind
    # OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED and a meter provider); opentelemetry-sdk is pinned, and
    # tests/test_tracing.py fails if the hook moves.
    batch = getattr(processor, "_batch_processor", None)
    if batch is None or not hasattr(batch, "_metrics"):
        logger.warning("this opentelemetry-sdk hides its span queue drops; reranker_trace_spans_dropped_total"
                       "{reason=\"queue_full\"} will stay at 0")
        return
    batch._metrics = _QueueDrops(batch._metrics, metrics)


class Tracing:
    """The service's tracer and, when tracing is on, the provider and exporter behind it.

    Off (the default) the tracer is the API's no-op tracer: no span is created and nothing is exported.
    """

    def __init__(self, provider: TracerProvider | None = None, exporter: CountingExporter | None = None) -> None:
        self.provider = provider
        self._exporter = exporter
        self.tracer: trace.Tracer = provider.get_tracer(SCOPE) if provider is not None else trace.NoOpTracer()

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics) -> Tracing:
        """Off, or exporting over OTLP (RERANKER_TRACING, OTEL_EXPORTER_OTLP_*)."""
        if not settings.tracing:
            return cls()
        return cls.exporting_to(otlp_exporter(settings.tracing_protocol), metrics)

    @classmethod
    def exporting_to(cls, exporter: SpanExporter, metrics: Metrics) -> Tracing:
        """Finished spans go through a batch span processor (OTEL_BSP_*) to `exporter`; the sampler comes
        from OTEL_TRACES_SAMPLER and its argument (default: parent-based, always on)."""
        counting = CountingExporter(exporter, metrics)
        processor = BatchSpanProcessor(counting)
        _count_queue_drops(processor, metrics)
        # Not at exit: the SDK's own exit hook could wait 30 s per stuck export; shutdown() is bounded.
        provider = TracerProvider(resource=service_resource(), shutdown_on_exit=False)
        provider.add_span_processor(processor)
        return cls(provider, counting)

    def flush(self, timeout: float = SHUTDOWN_SECONDS) -> bool:
        """Export every finished span now (tests, benchmarks); False if it did not finish in time."""
        return self.provider is None or self.provider.force_flush(int(timeout * 1000))

    def shutdown(self, timeout: float = SHUTDOWN_SECONDS) -> bool:
        """Export what is queued within `timeout` seconds, then stop; what a dead collector kept back is
        dropped and counted. True when everything left in time."""
        if self.provider is None:
            return True
        stopper = threading.Thread(target=self.provider.shutdown, name="otel-shutdown", daemon=True)
        stopper.start()
        stopper.join(timeout)
        if not stopper.is_alive():
            return True
        logger.warning("the trace collector did not take the last spans within %.1f s; dropping them", timeout,
                       extra={"error_type": "trace_export"})
        assert self._exporter is not None
        self._exporter.shutdown()  # every export still to come fails at once, and is counted
        stopper.join(1.0)
        return False
