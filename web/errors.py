"""The one place where package exceptions become HTTP statuses and JSON error bodies."""

from __future__ import annotations

from reranker import (
    ClosedError,
    InvalidTypeError,
    LimitExceededError,
    OverloadedError,
    RerankerError,
    ScoringError,
    ValidationError,
)


class HttpError(Exception):
    """An error answer: status, a stable type, a message for the caller, the metric status label."""

    def __init__(self, status: int, type: str, message: str, *, counted: bool = False) -> None:
        super().__init__(status, type, message)
        self.status = status
        self.type = type
        self.message = message
        self.counted = counted  # already recorded in reranker_requests_total

    @property
    def outcome(self) -> str:
        if self.status == 429:
            return "overloaded"
        return "invalid" if self.status < 500 else "error"

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"type": self.type, "message": self.message}}


def to_http_error(err: BaseException) -> HttpError:
    """Map any exception to the answer the caller sees; internal details never leave the process."""
    if isinstance(err, HttpError):
        return err
    if isinstance(err, LimitExceededError):
        return HttpError(413, "limit_exceeded", str(err))
    if isinstance(err, InvalidTypeError):
        return HttpError(422, "invalid_type", str(err))
    if isinstance(err, ValidationError):
        return HttpError(400, "invalid_request", str(err))
    if isinstance(err, OverloadedError):
        return HttpError(429, "overloaded", str(err))
    if isinstance(err, ClosedError):
        return HttpError(503, "not_ready", str(err))
    if isinstance(err, ScoringError):
        return HttpError(500, "scoring_failed", str(err))
    if isinstance(err, RerankerError):
        return HttpError(500, "internal_error", "the request could not be served")
    return HttpError(500, "internal_error", "internal error; the service logged the details")
