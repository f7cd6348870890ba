"""What a rerank returns: the ranked documents and what the call cost."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


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


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """The logistic function, without overflow at either end: CrossEncoder.predict's default activation, and the
    one every score here is shown through, whatever activation a model's config names (docs/engine.md, Scores)."""
    small = np.exp(-np.abs(logits))
    return np.where(logits >= 0, 1 / (1 + small), small / (1 + small)).astype(np.float32)


def rank(documents: Sequence[str], logits: Sequence[float], *, raw_scores: bool,
         top_n: int | None) -> tuple[list[RankedDocument], list[float]]:
    """The best `top_n` documents (all if None), best first, each with its logit if `raw_scores`, else its sigmoid;
    and every document's sigmoid, in the request's order."""
    raw = np.asarray(logits, dtype=np.float32)
    probabilities = sigmoid(raw).tolist()
    ranked_by = raw.tolist()
    shown = ranked_by if raw_scores else probabilities
    # Ordered by the logits, whatever is shown: float32 sigmoid is exactly 1.0 from a logit of about 17 (a causal
    # yes/no reranker's clear answers reach it), and ordering on it ranked such documents by their place in the
    # request.
    order = sorted(range(len(documents)), key=lambda i: (-ranked_by[i], i))
    limit = len(order) if top_n is None else min(top_n, len(order))
    return [RankedDocument(i, shown[i], documents[i]) for i in order[:limit]], probabilities
