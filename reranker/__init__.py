"""Cross-encoder reranking for serving: exact scores, one batching worker, cache, long documents."""

from __future__ import annotations

from reranker.engine import Reranker
from reranker.errors import (
    CancelledError,
    ClosedError,
    DeviceFaultError,
    EmptyInputError,
    InvalidTypeError,
    LimitExceededError,
    ModelLoadError,
    OverloadedError,
    RerankerError,
    ScoringError,
    ValidationError,
)
from reranker.results import RankedDocument, RerankResult, RerankStats
from reranker.settings import Settings, SettingsError

__all__ = [
    "CancelledError",
    "ClosedError",
    "DeviceFaultError",
    "EmptyInputError",
    "InvalidTypeError",
    "LimitExceededError",
    "ModelLoadError",
    "OverloadedError",
    "RankedDocument",
    "RerankResult",
    "RerankStats",
    "Reranker",
    "RerankerError",
    "ScoringError",
    "Settings",
    "SettingsError",
    "ValidationError",
]
