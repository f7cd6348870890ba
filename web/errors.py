"""The one place where package exceptions become HTTP statuses and JSON error bodies."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi.responses import JSONResponse

from reranker import (
    CancelledError,
    ClosedError,
    EmptyInputError,
    InvalidTypeError,
    LimitExceededError,
    OverloadedError,
    RerankerError,
    RerankStats,
    ScoringError,
    ValidationError,
)
from web.request_id import current_request_id, new_request_id

# The routes whose errors take their hosted API's shape (HttpError.body).
COHERE_V1 = "/v1/rerank"
COHERE_V2 = "/v2/rerank"
TEI = "/rerank"


class HttpError(Exception):
    """An error answer: status, a stable type, a message for the caller, the metric status label."""

    def __init__(self, status: int, type: str, message: str, *, counted: bool = False,
                 headers: Mapping[str, str] | None = None, tei_type: str | None = None) -> None:
        super().__init__(status, type, message)
        self.status = status
        self.type = type
        self.message = message
        self.counted = counted  # already recorded in reranker_requests_total
        self.headers = dict(headers or {})  # of the answer, over those its status gets by default
        self._tei_type = tei_type
        self.stats: RerankStats | None = None  # what a request that ended once queued cost, for its log line

    @property
    def outcome(self) -> str:
        if self.status == 429:
            return "overloaded"
        if self.status == CLIENT_CLOSED:
            return "cancelled"
        return "invalid" if self.status < 500 else "error"

    def body(self, path: str = "") -> dict[str, Any]:
        """The JSON error of the route at `path`, in the shape its hosted API's clients read: Cohere v2's
        `{"id", "message"}`, TEI's `{"error": message, "error_type"}`, and elsewhere `{"error": {"type", "message"}}`,
        on /v1/rerank with Cohere v1's top-level `message` and Jina's `detail` beside it."""
        route = path.rstrip("/")
        if route == COHERE_V2:
            return {"id": current_request_id() or new_request_id(), "message": self.message}
        if route == TEI:
            return {"error": self.message, "error_type": self.tei_type}
        ours = {"error": {"type": self.type, "message": self.message}}
        return {**ours, "message": self.message, "detail": self.message} if route == COHERE_V1 else ours

    @property
    def tei_type(self) -> str:
        """TEI's ErrorType for this answer; its clients know no other names."""
        if self._tei_type is not None:
            return self._tei_type
        if self.status == 429:
            return "Overloaded"
        if self.status == 503:
            return "Unhealthy"
        return "Backend" if self.status >= 500 else "Validation"

    def response(self, path: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(path), status_code=self.status, headers={**(headers or {}), **self.headers})


# nginx's "client closed request": never seen by the client, which is gone; it labels the metrics.
CLIENT_CLOSED = 499


def client_left(message: str, *, counted: bool = False) -> HttpError:
    """The answer to a request whose caller went away (counted `cancelled`); `message` says when it left."""
    return HttpError(CLIENT_CLOSED, "cancelled", message, counted=counted)

# Most specific first: the first class the error is an instance of decides. Their messages are written
# for the caller; any other error gets a fixed message, so internal details never leave the process. The last
# column is TEI's error type where the status alone does not give it (HttpError.tei_type).
STATUSES: list[tuple[type[RerankerError], int, str, str | None]] = [
    (LimitExceededError, 413, "limit_exceeded", None),
    (InvalidTypeError, 422, "invalid_type", None),
    (EmptyInputError, 400, "invalid_request", "Empty"),
    (ValidationError, 400, "invalid_request", None),
    (OverloadedError, 429, "overloaded", None),
    (ClosedError, 503, "not_ready", None),
    (CancelledError, CLIENT_CLOSED, "cancelled", None),
    (ScoringError, 500, "scoring_failed", None),
]


def to_http_error(err: BaseException) -> HttpError:
    """Map any exception to the answer the caller sees."""
    if isinstance(err, HttpError):
        return err
    for kind, status, name, tei_type in STATUSES:
        if isinstance(err, kind):
            return HttpError(status, name, str(err), tei_type=tei_type)
    if isinstance(err, RerankerError):
        return HttpError(500, "internal_error", "the request could not be served")
    return HttpError(500, "internal_error", "internal error; the service logged the details")
