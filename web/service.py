"""What every surface (JSON routes, Gradio API, UI) does around one rerank call: metrics, log line, history."""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from opentelemetry import trace

from reranker import ClosedError, OverloadedError, Reranker, RerankerError, RerankResult, ValidationError
from reranker.jobs import Room
from reranker.logs import query_fields, should_log, trace_fields
from reranker.metrics import Metrics
from web.errors import CLIENT_CLOSED, HttpError, to_http_error
from web.history import RequestHistory
from web.lifecycle import ANSWERED, Lifecycle, Served
from web.request_id import current_request_id, new_request_id, request_age

logger = logging.getLogger("reranker.requests")
LINE_BREAK = re.compile(r"\r\n|\r|\n")

# Every request line carries these (SPEC section 7), null where they do not apply (a refused request scored
# nothing), so a log pipeline can rely on the schema.
OPTIONAL_FIELDS = ("n_docs", "query_chars", "query_hash", "top_n", "latency_ms", "queue_ms", "inference_ms", "tokens",
                   "truncated", "chunked", "cache_hits", "top1_score", "score_std", "error_type")


@dataclass(frozen=True)
class RerankCall:
    query: object
    documents: object
    top_n: object = None
    instruction: object = None
    raw_scores: bool = False
    max_doc_tokens: object = None  # Cohere v2's max_tokens_per_doc
    max_chunks: object = None  # Cohere's max_chunks_per_doc: in chunk mode, the windows scored per document
    documents_field: str = "documents"  # what the route's API calls the documents (TEI: texts), for its errors
    truncate: bool = True  # False (TEI's truncate: false): a document max_length would cut is refused


def form_top_n(value: object) -> object:
    """top_n as a form or a Gradio client sends it: 0, empty or null is all documents, and a whole float (a
    Number field's 2.0) is the integer it holds; a negative number is refused in those terms (HttpError), where the
    engine would say "a positive integer or null"; anything else goes on for the engine to check."""
    if value is None or value == "" or (value == 0 and not isinstance(value, bool)):
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
        raise to_http_error(ValidationError(
            f"top_n must be a whole number, 0 or more (0 or empty: every document), got {value:g}"))
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def split_lines(text: str) -> list[str]:
    """Documents one per line, without the blank lines. A line ends at \\n, \\r\\n or \\r only: str.splitlines also
    breaks at a form feed, U+2028, U+0085 and others that text from PDFs and JSON strings carry inside a line, and
    every later document's index would shift."""
    return [line.strip() for line in LINE_BREAK.split(text) if line.strip()]


class RerankService:
    """One reranker behind every surface, with the bookkeeping each request gets."""

    def __init__(self, reranker: Reranker, history: RequestHistory | None = None,
                 rng: random.Random | None = None, lifecycle: Lifecycle | None = None) -> None:
        self.reranker = reranker
        # Counts every rerank in flight, Gradio's included, so a drain waits for them.
        self.lifecycle = lifecycle or Lifecycle()
        self.history = history or RequestHistory()
        self._rng = rng or random.Random()

    def admit(self, route: str, call: RerankCall) -> Room:
        """Queue room for a valid `call`'s documents the score cache lacks, taken on the event loop before the call
        waits for a worker thread (anyio lends 40 to all callers): a burst past RERANKER_MAX_QUEUE is refused 429 at
        once, and the admitted requests that wait for a thread count against the bound. Pass the room on to
        `rerank`. Only a full queue is refused here (booked as the engine's refusal is); the engine refuses anything
        else in its own order, an invalid request before a full queue."""
        room = self.reranker.room()
        try:
            self.reranker.validate(call.query, call.documents, call.top_n, call.instruction, call.max_doc_tokens,
                                   documents_field=call.documents_field, max_chunks=call.max_chunks)
            self.reranker.hold(room, call.query, call.documents, call.instruction,  # type: ignore[arg-type]
                               call.max_doc_tokens, call.max_chunks)  # type: ignore[arg-type]
        except OverloadedError as err:
            error = to_http_error(err)
            error.counted = True
            self._book(route, call, current_request_id() or new_request_id(), request_age() or 0.0, None, error)
            raise error from None
        except RerankerError:
            pass  # invalid, over the queue's bound, or the engine closed: refused by the engine, in its order
        return room

    def rerank(self, route: str, call: RerankCall, cancel: threading.Event | None = None,
               deadline: float | None = None, counts_left: Callable[[], bool] | None = None,
               room: Room | None = None) -> RerankResult:
        """Run one rerank for `route`; raise HttpError on any failure. Metrics, log and history either way.

        Setting `cancel` (the client went away) drops the request's unstarted pairs; it is counted `cancelled`,
        or, once the monotonic `deadline` has passed (its caller set `cancel` for that), 504 `timeout`, or, when a
        stop that does not wait cut it off, 503 `shutting_down`. A call its caller cancelled is counted at all only
        if `counts_left()` says so (on Ray Serve the ingress may have counted it: deploy/ray/claims.py). `room`:
        what `admit` held for it.
        """
        # The drain waits for it (once, if the drain gate counts its request).
        with self.lifecycle.serving() as served:
            if not served.claim():  # a stop cut it off before it got here, and answered and recorded that
                raise self.lifecycle.cut_off_error(counted=True)
            return self._rerank(route, call, served, cancel, deadline, counts_left, room)

    def _rerank(self, route: str, call: RerankCall, served: Served, cancel: threading.Event | None,
                deadline: float | None, counts_left: Callable[[], bool] | None, room: Room | None) -> RerankResult:
        reranker = self.reranker
        metrics = reranker.metrics
        request_id = current_request_id() or new_request_id()
        metrics.inflight_requests.inc()
        started = time.perf_counter()
        error: HttpError | None = None
        result: RerankResult | None = None
        try:
            # The engine validates the untyped fields before any work; bad ones raise ValidationError.
            result = reranker.rerank_detailed(
                call.query, call.documents, call.top_n, call.instruction,  # type: ignore[arg-type]
                call.raw_scores, cancel, max_doc_tokens=call.max_doc_tokens,  # type: ignore[arg-type]
                documents_field=call.documents_field, room=room, truncate=call.truncate,
                max_chunks=call.max_chunks,  # type: ignore[arg-type]
            )
            if not served.settle(ANSWERED):  # a stop cut its request off first, and answered its client 503
                raise self.lifecycle.cut_off_error()
            return result
        except Exception as err:
            error = to_http_error(err)
            cancelled = error.status == CLIENT_CLOSED
            # Cut off by a stop that did not wait, not by its caller: cancelled, or it reached the engine's queue
            # after the stop had closed it, or it was scored after the stop had settled it as cut off.
            cut_off = self.lifecycle.stopping and (cancelled or type(err) is ClosedError or served.cut)
            if cancelled and deadline is not None and time.monotonic() >= deadline:
                error = HttpError(504, "timeout", "the request's deadline passed before all its pairs were scored; "
                                  "retry later, or send fewer documents")
            elif cut_off:
                error = self.lifecycle.cut_off_error()
            error.counted = True
            error.stats = err.stats if isinstance(err, RerankerError) else None  # what it cost until it ended
            if error.status >= 500 and not (cancelled or cut_off):  # a failure to look into, with its traceback
                logger.error("rerank failed", exc_info=err, extra={"request_id": request_id, "route": route})
            raise error from err
        finally:
            # From the request's arrival where it is known (reading its body, its wait for a worker thread, on Ray
            # Serve its wait at the ingress for a replica): the latency its client sees, as the docs define it.
            age = request_age()
            elapsed = age if age is not None else time.perf_counter() - started
            metrics.inflight_requests.dec()
            # Cancelled by its caller, whatever it ended as (scored, refused, dropped): not a deadline or a stop.
            left = cancel is not None and cancel.is_set() and (error is None or error.type not in (
                "timeout", "shutting_down"))
            if not (left and counts_left is not None and not counts_left()):
                self._book(route, call, request_id, elapsed, result, error)

    def _book(self, route: str, call: RerankCall, request_id: str, elapsed: float, result: RerankResult | None,
              error: HttpError | None) -> None:
        """Metrics, history and log line of one rerank that reached the engine."""
        metrics = self.reranker.metrics
        status = "ok" if error is None else error.outcome
        # The request's span (HTTP server span, or the UI handler's): logs, history and exemplars name it.
        span = trace.get_current_span().get_span_context()
        ids = trace_fields(span)
        metrics.requests.labels(route=route, status=status).inc()
        # An exemplar only for a trace the collector keeps; OpenMetrics scrapes show it.
        exemplar = {"trace_id": ids["trace_id"]} if ids and span.trace_flags.sampled else None
        metrics.request_seconds.labels(route=route).observe(elapsed, exemplar=exemplar)
        n_docs = len(call.documents) if isinstance(call.documents, Sequence) and not isinstance(
            call.documents, str) else 0
        self.history.add(route, n_docs, elapsed * 1000, status, request_id, ids.get("trace_id", ""))
        self._log(route, request_id, call, status, elapsed, n_docs, result, error, ids)

    def refused(self, route: str, error: HttpError) -> None:
        """Book a request answered before it reached the engine (bad JSON, wrong shape, too big, no key)."""
        book_refusal(self.reranker.metrics, self.history, route, error)

    def _log(self, route: str, request_id: str, call: RerankCall, status: str, elapsed: float, n_docs: int,
             result: RerankResult | None, error: HttpError | None, ids: dict[str, str]) -> None:
        settings = self.reranker.settings
        latency_ms = elapsed * 1000
        if not should_log(ok=error is None, latency_ms=latency_ms, sample_rate=settings.log_sample_rate,
                          slow_ms=settings.slow_ms, rng=self._rng):
            return
        fields: dict[str, object] = {
            **dict.fromkeys(OPTIONAL_FIELDS), "request_id": request_id, "route": route, "status": status,
            "n_docs": n_docs, "top_n": call.top_n if type(call.top_n) is int and 0 < call.top_n <= 10**9 else None,
            "latency_ms": round(latency_ms, 2), **ids,
        }
        if isinstance(call.query, str):
            fields.update(query_fields(call.query, settings.log_query_preview))
        stats = result.stats if result is not None else error.stats if error is not None else None
        if stats is not None:  # a request that failed or was cancelled once queued has them too
            s = stats
            fields.update(
                queue_ms=round(s.queue_seconds * 1000, 2), inference_ms=round(s.inference_seconds * 1000, 2),
                tokens=s.tokens, truncated=s.truncated, chunked=s.chunked, cache_hits=s.cache_hits,
                top1_score=s.top1_score, score_std=s.score_std,
            )
        if error is not None:
            fields.update(error_type=error.type, http_status=error.status, error=error.message)
        slow = latency_ms >= settings.slow_ms
        logger.log(_level(status, slow), "slow rerank" if slow else "rerank", extra=fields)


def book_refusal(metrics: Metrics, history: RequestHistory, route: str, error: HttpError) -> None:
    """Metrics, history and log line of a request answered before it reached an engine: here, or at a Ray
    Serve ingress, which has no engine of its own."""
    status = error.outcome
    metrics.requests.labels(route=route, status=status).inc()
    age = request_age()  # unknown outside an HTTP request (a Gradio event)
    if age is not None:
        metrics.request_seconds.labels(route=route).observe(age)
    request_id = current_request_id() or new_request_id()
    ids = trace_fields(trace.get_current_span().get_span_context())
    latency_ms = round(age * 1000, 2) if age is not None else None
    history.add(route, 0, latency_ms or 0.0, status, request_id, ids.get("trace_id", ""))
    fields: dict[str, object] = {
        **dict.fromkeys(OPTIONAL_FIELDS), "request_id": request_id, "route": route, "status": status,
        "latency_ms": latency_ms, "error_type": error.type, "http_status": error.status, "error": error.message,
        **ids,
    }
    logger.log(_level(status, slow=False), "rerank refused", extra=fields)


def _level(status: str, slow: bool) -> int:
    """WARNING for what an operator acts on (server errors, overload, slow requests), so that
    RERANKER_LOG_LEVEL=WARNING keeps those lines and drops client errors and sampled successes."""
    return logging.WARNING if slow or status in ("error", "overloaded") else logging.INFO
