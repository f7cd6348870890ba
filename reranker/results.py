"""What a rerank returns: the ranked documents and what the call cost."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RankedDocument:
    """One result: the document's position in the request, its score and its text."""

    index: int
    score: float
    document: str


@dataclass(frozen=True)
class RerankStats:
    """What one call cost, for logs, metrics and the UI's status line."""

    n_docs: int
    tokens: int = 0
    truncated: int = 0
    chunked: int = 0
    cache_hits: int = 0
    pairs_scored: int = 0
    queue_seconds: float = 0.0
    inference_seconds: float = 0.0
    total_seconds: float = 0.0
    top1_score: float | None = None
    score_std: float | None = None


@dataclass(frozen=True)
class RerankResult:
    results: list[RankedDocument]
    stats: RerankStats = field(default_factory=lambda: RerankStats(n_docs=0))
