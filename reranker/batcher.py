"""The single inference worker: merges the pairs of all callers into token-budget batches."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from reranker.errors import ClosedError, LimitExceededError, OverloadedError, ScoringError
from reranker.metrics import Metrics
from reranker.model import EncodedPair

logger = logging.getLogger(__name__)

ScoreFn = Callable[[Sequence[EncodedPair]], torch.Tensor]


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA OOM, or a CPU allocation that failed inside torch."""
    if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    message = str(err)
    return isinstance(err, RuntimeError) and (
        "can't allocate memory" in message or "out of memory" in message.lower()
    )


@dataclass(eq=False)
class Job:
    """The pairs of one caller; the worker fills `scores` and sets `done`."""

    pairs: Sequence[EncodedPair]
    scores: torch.Tensor = field(init=False)
    error: Exception | None = None
    remaining: int = field(init=False)
    finished: list[bool] = field(init=False)
    done: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    inference_seconds: float = 0.0

    def __post_init__(self) -> None:
        self.scores = torch.full((len(self.pairs),), float("nan"))
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
    """Owns the model through `score_fn`; callers only submit pairs and wait for their own scores."""

    def __init__(self, score_fn: ScoreFn, *, batch_tokens: int, max_queue: int, metrics: Metrics) -> None:
        self._metrics = metrics
        self._score_fn = score_fn
        self._batch_tokens = batch_tokens
        self._max_queue = max_queue
        self._pending: list[_Item] = []
        self._queued_pairs = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="reranker-worker", daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def queued_pairs(self) -> int:
        return self._queued_pairs

    def submit(self, pairs: Sequence[EncodedPair]) -> Job:
        """Queue pairs at once or raise OverloadedError; the queue bound is checked before queuing."""
        if len(pairs) > self._max_queue:
            raise LimitExceededError(
                f"this request needs {len(pairs)} model passes (documents plus chunks), more than "
                f"RERANKER_MAX_QUEUE={self._max_queue}; send fewer or shorter documents"
            )
        job = Job(pairs)
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
            if not self._thread.is_alive():
                job.error = job.error or ScoringError("the scoring worker stopped; restart the service")
                job.done.set()

    def close(self, timeout: float = 30.0) -> None:
        """Finish the queued work, then stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
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
                self._run_batch([round_items[i] for i in indices])

    def _run_batch(self, items: list[_Item]) -> None:
        try:
            self._score_with_retry(items)
        except Exception as err:  # the worker must outlive anything; _fail skips what already finished
            logger.exception("scoring a batch failed", extra={"batch_size": len(items)})
            self._fail(items, ScoringError("the model failed to score this request"), err)

    def _score_with_retry(self, items: list[_Item]) -> None:
        """Score items; on failure halve and retry, so that only a pair that fails alone fails its request."""
        pairs = [item.job.pairs[item.position] for item in items]
        started = time.perf_counter()
        failure: BaseException | None = None
        try:
            scores = self._score_fn(pairs)
        except Exception as err:
            # Keep no traceback: its frames hold the failed pass's tensors, which must be freed before
            # the retry (the PyTorch FAQ's out-of-memory pitfall). Retry outside this except block.
            failure = err.with_traceback(None)
        if failure is not None:
            self._recover(items, failure)
            return
        elapsed = time.perf_counter() - started
        self._metrics.inference_seconds.observe(elapsed)
        self._metrics.batch_size.observe(len(items))
        self._metrics.batch_tokens.observe(len(items) * max(item.n_tokens for item in items))
        self._metrics.pairs_scored.inc(len(items))
        share = elapsed / len(items)
        for item, score in zip(items, scores.tolist(), strict=True):
            item.job.scores[item.position] = score
            item.job.inference_seconds += share
        self._finish(items)

    def _recover(self, items: list[_Item], failure: BaseException) -> None:
        out_of_memory = is_out_of_memory(failure)
        if out_of_memory and torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(items) == 1:
            if out_of_memory:
                error = ScoringError(
                    f"out of memory scoring one document of {items[0].n_tokens} tokens; lower "
                    "RERANKER_MAX_LENGTH or send a shorter document"
                )
            else:
                logger.error("the model failed on one pair", exc_info=failure)
                error = ScoringError("the model failed to score this request")
            self._fail(items, error, failure)
            return
        if out_of_memory:
            self._metrics.oom_retries.inc()
            logger.warning("out of memory; retrying as two halves", extra={"batch_size": len(items)})
        else:
            # A failure that is not about memory is split too, so one bad pair cannot fail the other
            # requests that happened to share its batch.
            logger.warning("a batch failed; retrying as two halves to isolate the pair",
                           extra={"batch_size": len(items), "error": f"{type(failure).__name__}: {failure}"})
        half = len(items) // 2
        self._score_with_retry(items[:half])
        self._score_with_retry(items[half:])

    def _fail(self, items: list[_Item], error: ScoringError, cause: BaseException) -> None:
        error.__cause__ = cause
        for item in items:
            if not item.job.finished[item.position] and item.job.error is None:
                item.job.error = error
        self._finish(items)

    def _finish(self, items: list[_Item]) -> None:
        """Mark items done, each at most once, whatever path got them here."""
        fresh = [item for item in items if not item.job.finished[item.position]]
        with self._cond:
            self._queued_pairs -= len(fresh)
            self._metrics.queue_pairs.set(self._queued_pairs)
        for item in fresh:
            item.job.finished[item.position] = True
            item.job.remaining -= 1
            if item.job.remaining == 0:
                item.job.done.set()
