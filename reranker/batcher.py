"""The worker: merges the pairs of all callers into token-budget batches and runs them on the device.

Two threads: this module's collating thread takes everything pending as one round, cuts it into batches
and pads each on the CPU; reranker.pipeline's device thread runs them, one in flight, and delivers the
scores back here. A queue of one between them keeps the next batch ready while the current one runs.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from opentelemetry.trace import SpanContext

from reranker.errors import ClosedError, LimitExceededError, OverloadedError, ScoringError
from reranker.metrics import Metrics
from reranker.pipeline import STOP, Batch, DeviceStage, ScoreFn, Scorer, as_scorer, is_out_of_memory
from reranker.spans import BatchSpans, current_span_context
from reranker.tokens import EncodedPair

logger = logging.getLogger(__name__)

__all__ = ["Batcher", "Job", "ScoreFn", "cut_batches", "is_out_of_memory"]


@dataclass(eq=False)
class Job:
    """The pairs of one caller; the worker fills `scores` and sets `done`."""

    pairs: Sequence[EncodedPair]
    scores: list[float] = field(init=False)
    error: Exception | None = None
    remaining: int = field(init=False)
    finished: list[bool] = field(init=False)
    done: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    inference_seconds: float = 0.0
    span_context: SpanContext | None = None  # the caller's request span, which the batch spans link to
    batch_spans: list[SpanContext] = field(default_factory=list)  # the traced passes that carried its pairs

    def __post_init__(self) -> None:
        self.scores = [float("nan")] * len(self.pairs)
        self.remaining = len(self.pairs)
        self.finished = [False] * len(self.pairs)
        if not self.pairs:
            self.done.set()


@dataclass(frozen=True)
class _Item:
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


def cut_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Group indices, shortest first, so that len(batch) * longest stays within the token budget."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        if current and (len(current) + 1) * lengths[index] > budget:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


class Batcher:
    """Owns the model through a scorer; callers only submit pairs and wait for their own scores."""

    def __init__(self, scorer: Scorer | ScoreFn, *, batch_tokens: int, max_queue: int, metrics: Metrics,
                 batch_spans: BatchSpans | None = None) -> None:
        self._metrics = metrics
        self._scorer = as_scorer(scorer)
        self._batch_tokens = batch_tokens
        self._max_queue = max_queue
        self._pending: list[_Item] = []
        self._queued_pairs = 0
        self._cond = threading.Condition()
        self._closed = False
        # One collated batch waits while the device runs another: the prefetch of text-embeddings-inference.
        ready: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._ready = ready
        self._device = DeviceStage(self._scorer, ready, self._deliver, metrics, batch_spans)
        self._collator = threading.Thread(target=self._collate_rounds, name="reranker-collator", daemon=True)
        self._device.thread.start()
        self._collator.start()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def queued_pairs(self) -> int:
        return self._queued_pairs

    @property
    def alive(self) -> bool:
        return self._collator.is_alive() and self._device.thread.is_alive()

    def submit(self, pairs: Sequence[EncodedPair]) -> Job:
        """Queue pairs at once or raise OverloadedError; the queue bound is checked before queuing."""
        if len(pairs) > self._max_queue:
            raise LimitExceededError(
                f"this request needs {len(pairs)} model passes (documents plus chunks), more than "
                f"RERANKER_MAX_QUEUE={self._max_queue}; send fewer or shorter documents"
            )
        job = Job(pairs, span_context=current_span_context())
        with self._cond:
            if self._closed:
                raise ClosedError("the reranker is shutting down")
            if self._queued_pairs + len(pairs) > self._max_queue:
                raise OverloadedError(
                    f"the scoring queue is full ({self._queued_pairs} pairs waiting, limit "
                    f"RERANKER_MAX_QUEUE={self._max_queue}); retry shortly"
                )
            self._pending.extend(_Item(job, i) for i in range(len(pairs)))
            self._queued_pairs += len(pairs)
            self._metrics.queue_pairs.set(self._queued_pairs)
            self._cond.notify()
        return job

    def wait(self, job: Job) -> None:
        """Block until the job is scored; fail it rather than hang if the worker is gone."""
        while not job.done.wait(1.0):
            if not self.alive:
                job.error = job.error or ScoringError("the scoring worker stopped; restart the service")
                job.done.set()

    def close(self, timeout: float = 30.0) -> None:
        """Finish the queued work, then stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        deadline = time.monotonic() + timeout
        self._collator.join(timeout)
        self._device.thread.join(max(0.0, deadline - time.monotonic()))

    def _collate_rounds(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    self._ready.put(STOP)
                    return
                # One round = everything pending now; later arrivals wait for the next round, so a
                # stream of short requests cannot starve a long one.
                round_items, self._pending = self._pending, []
            now = time.perf_counter()
            for item in round_items:
                if item.job.started is None:
                    item.job.started = now
                    self._metrics.queue_seconds.observe(now - item.job.submitted)
            lengths = [item.n_tokens for item in round_items]
            for indices in cut_batches(lengths, self._batch_tokens):
                items = [round_items[i] for i in indices]
                pairs = [item.job.pairs[item.position] for item in items]
                try:
                    features = self._scorer.collate(pairs)
                except Exception:  # the device thread collates it again, and isolates what fails
                    logger.exception("collating a batch failed", extra={"batch_size": len(items)})
                    features = None
                self._ready.put(Batch(pairs, items, features))

    def _deliver(self, items: Sequence[_Item], outcome: torch.Tensor | ScoringError, seconds: float) -> None:
        """Record each item's score, or fail its job, and wake the callers whose jobs are complete."""
        scores = outcome.tolist() if isinstance(outcome, torch.Tensor) else None
        share = seconds / len(items)
        with self._cond:
            fresh = 0
            for slot, item in enumerate(items):
                job = item.job
                if job.finished[item.position]:
                    continue
                fresh += 1
                job.finished[item.position] = True
                if scores is not None:
                    job.scores[item.position] = scores[slot]
                    job.inference_seconds += share
                elif job.error is None:
                    job.error = outcome  # type: ignore[assignment]
                job.remaining -= 1
                if job.remaining == 0:
                    job.done.set()
            self._queued_pairs -= fresh
            self._metrics.queue_pairs.set(self._queued_pairs)
