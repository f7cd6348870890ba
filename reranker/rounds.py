"""What the collator takes next: each caller's pairs not yet taken, shortest first, taken as a round across callers
or as a cut-in between a round's batches, and batches filled under the token budget (reranker.packing's `joins`).

Not thread-safe: reranker.batcher calls it under its lock.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

from opentelemetry.trace import SpanContext

from reranker.jobs import Job
from reranker.packing import PaddedShape, joins


@dataclass(frozen=True)
class Item:
    """One pair of a caller's job, as the collator and the device thread pass it along."""

    job: Job
    position: int

    @property
    def n_tokens(self) -> int:
        return self.job.pairs[self.position].n_tokens

    @property
    def span_context(self) -> SpanContext | None:
        return self.job.span_context

    def served_by(self, batch: SpanContext) -> None:
        if batch not in self.job.batch_spans:
            self.job.batch_spans.append(batch)


class Rounds:
    """The pending pairs and the rules that take them. `current` is the round the collator is cutting into batches;
    `cut_ins` whether smaller requests cut in between its batches (see `take_cut_in`)."""

    def __init__(self, batch_tokens: int, shape: PaddedShape, cut_ins: bool) -> None:
        self.batch_tokens = batch_tokens
        self.shape = shape
        self.cut_ins = cut_ins
        # Each caller's pairs not yet in a round, shortest first, callers oldest first.
        self.pending: dict[Job, deque[Item]] = {}
        self.current: list[Item] = []

    def add(self, job: Job) -> None:
        """Queue a job's pairs, shortest first."""
        if job.pairs:
            order = sorted(range(len(job.pairs)), key=lambda i: job.pairs[i].n_tokens)
            self.pending[job] = deque(Item(job, i) for i in order)

    def drop(self, job: Job) -> list[Item]:
        """Take out the job's pairs that no batch has taken: pending, or in the current round and not yet sent (a round
        of 20,000 pairs runs for minutes on a CPU, and they hold their queue room until dropped)."""
        mine = list(self.pending.pop(job, ()))
        return mine + [item for item in self.current if item.job is job and not job.sent[item.position]]

    def drain(self) -> list[Item]:
        """Take out every pending pair (the device failed: none can be scored)."""
        waiting = [item for items in self.pending.values() for item in items]
        self.pending = {}
        return waiting

    def take_round(self) -> list[Item]:
        """The next round's pairs, taken out of `pending`: every request's, but (with cut-ins, where the rest holds
        more than two batches' worth of tokens) those of a request under half the size of the largest, which stays
        pending to cut in after the round's first batch (see `take_cut_in`) rather than wait for its sorted place.
        A request left out of one round goes into the next one whatever its size, first, so none waits for ever."""
        if not self.pending:
            return []
        largest = max(len(items) for items in self.pending.values())
        taken = [job for job, items in self.pending.items() if job.left_out or 2 * len(items) >= largest]
        tokens = sum(item.n_tokens for job in taken for item in self.pending[job])
        if not self.cut_ins or tokens <= 2 * self.batch_tokens:  # they would share its passes: all of them
            taken = list(self.pending)
        round_items = [item for job in taken for item in self.pending.pop(job)]
        for job in self.pending:
            job.left_out = True
        return round_items

    def take_cut_in(self, round_left: int) -> list[Item]:
        """For one batch, the pending pairs of requests smaller than what is left of the current round (`round_left`
        pairs) or left out of it, the smallest request first, each one's shortest pairs first; taken out of `pending`.

        Between two batches of a round the collator runs one such batch, topped up with pairs of the round where it has
        room (see `top_up`): a 10-document request that arrives while 1000-document ones are being scored waits for
        about two passes, not for all of them, and the round still gets every other pass (and the room cut-ins
        leave), so a stream of small requests cannot starve a large one. A request as large as the rest of the round
        (and not left out of it) waits for the next round, as every request did before 2026-12-04."""
        smaller = sorted((job for job, items in self.pending.items() if job.left_out or len(items) < round_left),
                         key=lambda job: len(self.pending[job]))  # stable: the oldest first among equals
        taken: list[Item] = []
        for job in smaller:
            items = self.pending[job]
            self.fill(taken, items)
            if not items:
                del self.pending[job]
        return taken

    def fill(self, batch: list[Item], source: deque[Item]) -> list[Item]:
        """Move pairs from the front of `source` (shortest first) into `batch` while each `joins` it; return `batch`."""
        width = max((item.n_tokens for item in batch), default=0)
        while source and joins(len(batch), width, source[0].n_tokens, self.batch_tokens, self.shape):
            width = max(width, source[0].n_tokens)
            batch.append(source.popleft())
        return batch

    def top_up(self, batch: list[Item], left: deque[Item]) -> list[Item]:
        """Fill the room a cut-in `batch` leaves with pairs of the round (`left`, taken out of it) no longer than its
        longest, the longest of them first: they cost no more padding than the batch pays for already (the round's
        shortest would be padded the most). Returns `batch`."""
        width = max(item.n_tokens for item in batch)
        fitting = [i for i, item in enumerate(left) if item.n_tokens <= width]
        # A pair no longer than the batch's longest joins it by the row count alone: count the rows, then take that
        # many of the longest (nlargest keeps sorted()'s order among equals), not sort them all on the hot path.
        room = 0
        while room < len(fitting) and joins(len(batch) + room, width, width, self.batch_tokens, self.shape):
            room += 1
        longest = heapq.nlargest(room, fitting, key=lambda i: left[i].n_tokens)
        batch.extend(left[i] for i in longest)
        if longest:
            taken = set(longest)
            kept = [item for i, item in enumerate(left) if i not in taken]
            left.clear()
            left.extend(kept)
        return batch
