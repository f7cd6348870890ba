"""One request's documents against the pair-score cache: what it answers, and what is left to score, once per text."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from reranker.cache import Entry, ScoreCache
from reranker.planning import Plan


@dataclass(frozen=True)
class Lookup:
    """`keys[i]` is document i's pair key and `cached[i]` the cache's entry for it, if any. `scored` holds the
    documents to score: of those the cache did not answer, the first of each key (a document repeated in the
    request is scored once, and its first copy stands for the others). Slot k of the request's plan is document
    `scored[k]`, and `slot_of` maps the key of every document to score to its slot."""

    keys: list[bytes]
    cached: list[Entry | None]
    scored: list[int]
    slot_of: dict[bytes, int]

    @classmethod
    def of(cls, cache: ScoreCache, keys: Sequence[bytes]) -> Lookup:
        cached = [cache.get(key) for key in keys]
        scored: list[int] = []
        slot_of: dict[bytes, int] = {}
        for i, (key, entry) in enumerate(zip(keys, cached, strict=True)):
            if entry is None and key not in slot_of:
                slot_of[key] = len(scored)
                scored.append(i)
        return cls(list(keys), cached, scored, slot_of)

    @property
    def hits(self) -> int:
        return sum(entry is not None for entry in self.cached)

    @property
    def misses(self) -> int:
        """Documents the cache did not answer, repeats included."""
        return len(self.cached) - self.hits

    def flags(self, plan: Plan) -> list[int]:
        """How each document's scored text was cut to max_length or split: a cache hit as its first request found,
        a repeat as the first of its key."""
        return [entry[1] if entry is not None else plan.flags(self.slot_of[key])
                for key, entry in zip(self.keys, self.cached, strict=True)]

    def fill(self, cache: ScoreCache, best: Sequence[float], plan: Plan) -> list[float]:
        """Store the scored documents' logits (`best`, by slot) in the cache, and return every document's."""
        for slot, i in enumerate(self.scored):
            cache.put(self.keys[i], (best[slot], plan.flags(slot)))
        return [entry[0] if entry is not None else best[self.slot_of[key]]
                for key, entry in zip(self.keys, self.cached, strict=True)]
