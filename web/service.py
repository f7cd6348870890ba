"""What every surface (JSON routes, Gradio API, UI) does around one rerank call: metrics and outcome."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from reranker import Reranker, RerankResult
from web.errors import HttpError, to_http_error


@dataclass(frozen=True)
class RerankCall:
    query: object
    documents: object
    top_n: object = None
    instruction: object = None
    raw_scores: bool = False


def split_lines(text: str) -> list[str]:
    """Documents pasted one per line; blank lines are not documents."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def serve_rerank(reranker: Reranker, route: str, call: RerankCall) -> RerankResult:
    """Run one rerank for `route`, recording its metrics; raise HttpError on any failure."""
    metrics = reranker.metrics
    metrics.inflight_requests.inc()
    started = time.perf_counter()
    error: HttpError | None = None
    try:
        reranker.validate(call.query, call.documents, call.top_n, call.instruction)
        documents: Sequence[str] = call.documents  # type: ignore[assignment]
        metrics.documents_per_request.observe(len(documents))
        return reranker.rerank_detailed(
            call.query,  # type: ignore[arg-type]
            documents, call.top_n, call.instruction, call.raw_scores,  # type: ignore[arg-type]
        )
    except Exception as err:
        error = to_http_error(err)
        error.counted = True
        raise error from err
    finally:
        elapsed = time.perf_counter() - started
        metrics.inflight_requests.dec()
        metrics.requests.labels(route=route, status="ok" if error is None else error.outcome).inc()
        metrics.request_seconds.labels(route=route).observe(elapsed)
