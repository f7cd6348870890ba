"""Exceptions raised by the reranker package; the web layer maps each to one HTTP status."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from reranker.results import RerankStats


class RerankerError(Exception):
    """Base class of every error this package raises on purpose.

    `stats` is what a request that failed or was cancelled after its pairs were
    queued had cost by then (its tokens, cache hits, queue and inference time), for its log line and span; None for
    one that ended before."""

    stats: RerankStats | None = None


class ValidationError(RerankerError, ValueError):
    """The request is malformed; the message says what to change (HTTP 400/422)."""


class EmptyInputError(ValidationError):
    """The query, or the list of documents, is empty (HTTP 400; TEI's `Empty`)."""


class InvalidTypeError(ValidationError):
    """A field has the wrong type or shape (HTTP 422)."""


class LimitExceededError(ValidationError):
    """The request is well-formed but over a configured limit (HTTP 413)."""


class OverloadedError(RerankerError):
    """The scoring queue is full; retry later (HTTP 429)."""


class ScoringError(RerankerError):
    """The model could not score this request (non-finite score, out of memory for one pair)."""


class ModelLoadError(RerankerError):
    """The model could not be fetched or loaded; the message says how to use a local directory."""


class ClosedError(RerankerError):
    """The reranker was closed and no longer accepts work (HTTP 503)."""


class DeviceFaultError(ClosedError):
    """The worker died or the device is poisoned (every batch fails): the process must be restarted (HTTP 503)."""

    def __init__(self, message: str = "the scoring device failed; the service is restarting, retry shortly") -> None:
        super().__init__(message)


class CancelledError(RerankerError):
    """The caller gave up (client disconnected); its pairs that had not started were dropped."""
