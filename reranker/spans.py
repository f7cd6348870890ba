"""The spans of one rerank and of each forward pass: names, attributes (counts only, never text), helpers.

A request is one `reranker.rerank` span with a child per step. A forward pass carries pairs of many requests,
so its `reranker.batch` span is made by the device thread, links to every request span it served, and is the
child of the first sampled one; each request's `reranker.score` span links back to the batches that served it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol

from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, Status, StatusCode, Tracer
from opentelemetry.util.types import AttributeValue

from reranker.errors import CancelledError, OverloadedError, ValidationError
from reranker.tokens import EncodedPair

if TYPE_CHECKING:
    from reranker.results import RerankStats

logger = logging.getLogger(__name__)

REQUEST = "reranker.rerank"
VALIDATE = "reranker.validate"
CLIP = "reranker.clip"  # only for requests with max_doc_tokens
CACHE = "reranker.cache"
TOKENIZE = "reranker.tokenize"
QUEUE = "reranker.queue"
SCORE = "reranker.score"
BATCH = "reranker.batch"
POSTPROCESS = "reranker.postprocess"
OUTCOME = "reranker.outcome"


class Traced(Protocol):
    """What the device thread needs of a batch item (reranker.rounds's `Item`)."""

    @property
    def span_context(self) -> SpanContext | None: ...

    def served_by(self, batch: SpanContext) -> None: ...


def current_span_context() -> SpanContext | None:
    """The caller's active span, to link a queued job to; None when nothing is traced."""
    context = trace.get_current_span().get_span_context()
    return context if context.is_valid else None


def outcome(err: BaseException) -> str:
    """The request's outcome label, as reranker_requests_total counts it (a stop's cut-off, which the engine cannot
    tell from its caller leaving, is `cancelled` here and `error` there)."""
    if isinstance(err, OverloadedError):
        return "overloaded"
    if isinstance(err, CancelledError):
        return "cancelled"
    return "invalid" if isinstance(err, ValidationError) else "error"


def fail(span: Span, err: BaseException, *, cancelled: bool | None = None) -> None:
    """Record an exception on a span (type and message, which never hold request text) with status ERROR; a
    cancellation (its caller left: by default a CancelledError) is recorded without the status: the service did
    not fail, as the 499 of the HTTP server span says too."""
    span.record_exception(err)
    if not (isinstance(err, CancelledError) if cancelled is None else cancelled):
        span.set_status(Status(StatusCode.ERROR, f"{type(err).__name__}: {err}"))


@contextmanager
def step(tracer: Tracer, name: str, attributes: Mapping[str, AttributeValue] | None = None) -> Iterator[Span]:
    """The current span `name` for a block: an exception leaving it is recorded as `fail` records it."""
    with tracer.start_as_current_span(name, attributes=attributes, record_exception=False,
                                      set_status_on_exception=False) as span:
        try:
            yield span
        except Exception as err:
            fail(span, err)
            raise


def describe_plan(span: Span, documents: int, pairs: Sequence[EncodedPair], truncated: int, chunked: int) -> None:
    """The tokenization step: documents not in the cache become pairs (more than one when chunked)."""
    span.set_attributes({"reranker.documents": documents, "reranker.pairs": len(pairs),
                         "reranker.tokens": sum(pair.n_tokens for pair in pairs),
                         "reranker.truncated": truncated, "reranker.chunked": chunked})


def describe_request(span: Span, stats: RerankStats, top_n: int | None) -> None:
    """The request span's summary: once the request succeeded, or ended (failed, cancelled) after its pairs were
    queued, with what it cost by then; the caller sets the outcome of one that did not succeed after this."""
    span.set_attributes({
        "reranker.documents": stats.n_docs, "reranker.pairs": stats.pairs_scored, "reranker.tokens": stats.tokens,
        "reranker.truncated": stats.truncated, "reranker.chunked": stats.chunked,
        "reranker.cache_hits": stats.cache_hits, OUTCOME: "ok",
    })
    if top_n is not None and top_n < 2**63:  # larger than every request (it returns all) and than OTLP's int64
        span.set_attribute("reranker.top_n", top_n)


def epoch_ns(perf_seconds: float) -> int:
    """A time.perf_counter() reading as the epoch nanoseconds spans are stamped with."""
    return time.time_ns() - int((time.perf_counter() - perf_seconds) * 1e9)


def record_wait(tracer: Tracer, pairs: int, submitted: float, started: float | None,
                batches: Sequence[SpanContext], error: BaseException | None) -> None:
    """After the batcher answered: `reranker.queue` (submitted until the worker took the first pair) and
    `reranker.score` (from then until every score was back, linked to the batches that carried the pairs)."""
    if not pairs:
        return
    now = time.time_ns()
    taken = epoch_ns(started) if started is not None else now
    queue = tracer.start_span(QUEUE, start_time=epoch_ns(submitted), attributes={"reranker.pairs": pairs})
    if started is None and error is not None:  # recorded before the span ends: an ended span takes nothing
        fail(queue, error)
    queue.end(end_time=taken)
    if started is None:
        return
    score = tracer.start_span(SCORE, start_time=taken, links=[Link(b) for b in batches],
                              attributes={"reranker.pairs": pairs, "reranker.batches": len(batches)})
    if error is not None:
        fail(score, error)
    score.end(end_time=now)


class BatchSpans:
    """One `reranker.batch` span per forward pass, retried halves included; used by the device thread only."""

    def __init__(self, tracer: Tracer, attributes: Mapping[str, AttributeValue]) -> None:
        self._tracer = tracer
        self._attributes = dict(attributes)

    def start(self, pairs: Sequence[EncodedPair], items: Sequence[Traced], padded_tokens: int) -> Span | None:
        """A span for a pass over `pairs`, or None when no request among `items` is traced."""
        try:
            return self._start(pairs, items, padded_tokens)
        except Exception:  # tracing must never stop the device thread
            logger.exception("starting a batch span failed")
            return None

    def end(self, span: Span | None, *, error: BaseException | None = None,
            inference_seconds: float | None = None) -> None:
        """Close a pass's span (its requests were told of it at its start)."""
        if span is None:
            return
        try:
            self._end(span, error, inference_seconds)
        except Exception:
            logger.exception("ending a batch span failed")

    def _start(self, pairs: Sequence[EncodedPair], items: Sequence[Traced], padded_tokens: int) -> Span | None:
        unique: dict[tuple[int, int], SpanContext] = {}
        for item in items:
            context = item.span_context
            if context is not None:
                unique.setdefault((context.trace_id, context.span_id), context)
        contexts = list(unique.values())
        if not contexts:
            return None
        # Under a sampled request, so that a parent-based sampler keeps the batch whenever one of its
        # requests is kept; the other requests reach it through the links.
        parent = next((c for c in contexts if c.trace_flags.sampled), contexts[0])
        span = self._tracer.start_span(
            BATCH, context=trace.set_span_in_context(NonRecordingSpan(parent)),
            links=[Link(c) for c in contexts],
            attributes={**self._attributes, "reranker.batch.size": len(pairs), "reranker.batch.requests": len(contexts),
                        "reranker.batch.tokens": sum(pair.n_tokens for pair in pairs),
                        "reranker.batch.padded_tokens": padded_tokens},
        )
        # Told now, not when the pass ends: a request given up meanwhile records its score span at once, and it
        # lost the link to the pass still running with its pairs.
        if span.is_recording():
            for item in items:
                item.served_by(span.get_span_context())
        return span

    def _end(self, span: Span, error: BaseException | None,
             inference_seconds: float | None) -> None:
        if error is not None:
            fail(span, error)
        if inference_seconds is not None:
            span.set_attribute("reranker.batch.inference_ms", round(inference_seconds * 1000, 3))
        span.end()
