"""The worker: merges the pairs of all callers into token-budget batches and runs them on the device.

Two threads: this module's collating thread takes what is pending as one round, cuts it into batches and pads each
on the CPU, letting a request smaller than what is left of the round cut in between its batches;
reranker.pipeline's device thread runs them, one in flight, and delivers the scores back here. A queue of one
between them keeps the next batch ready while the current one runs.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from reranker.errors import (
    CancelledError,
    ClosedError,
    DeviceFaultError,
    LimitExceededError,
    OverloadedError,
    RerankerError,
)
from reranker.jobs import CancelSignal, Job, Room
from reranker.metrics import Metrics
from reranker.packing import PaddedShape, unpadded
from reranker.pipeline import STOP, Batch, DeviceStage, ScoreFn, Scorer, as_scorer, is_out_of_memory
from reranker.rounds import Item, Rounds
from reranker.spans import BatchSpans, current_span_context
from reranker.stall import StallWatch
from reranker.tokens import EncodedPair

logger = logging.getLogger(__name__)

__all__ = ["Batcher", "ScoreFn", "is_out_of_memory"]


class Batcher:
    """Owns the model through a scorer; callers only submit pairs and wait for their own scores."""

    def __init__(self, scorer: Scorer | ScoreFn, *, batch_tokens: int, max_queue: int, metrics: Metrics,
                 probe: Sequence[EncodedPair] = (), batch_spans: BatchSpans | None = None,
                 shape: PaddedShape = unpadded, stall_seconds: float = 0.0, cut_ins: bool = True) -> None:
        """`stall_seconds` (0: never): how long the device thread may work without a pass ending before the device
        is taken as hung, a fault (see `fault`). `cut_ins`: whether smaller requests cut in between a round's batches
        (see reranker.rounds)."""
        self._metrics = metrics
        self._scorer = as_scorer(scorer)
        self._shape = shape
        self._max_queue = max_queue
        self._rounds = Rounds(batch_tokens, shape, cut_ins)
        self._queued_pairs = 0
        self._held_pairs = 0  # held by callers still tokenizing (Room)
        self._cond = threading.Condition()
        self._closed = False
        # One collated batch waits while the device runs another: the prefetch of text-embeddings-inference.
        ready: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._ready = ready
        # `probe` (a known-good pair) tells a one-off failure from a device that fails everything.
        self._device = DeviceStage(self._scorer, ready, self._deliver, metrics, batch_spans, probe=probe,
                                   abandoned=lambda items: all(item.job.given_up for item in items),
                                   on_fault=self._on_fault)
        self._live: weakref.WeakSet[Job] = weakref.WeakSet()  # submitted jobs whose callers still hold them
        self._stall_seconds = stall_seconds
        self._collator = threading.Thread(target=self._collate_rounds, name="reranker-collator", daemon=True)
        self._device.thread.start()
        self._collator.start()
        self._stall_watch = StallWatch(self._device.stalled_for, stall_seconds, self._stalled) \
            if stall_seconds > 0 else None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def queued_pairs(self) -> int:
        return self._queued_pairs

    @property
    def alive(self) -> bool:
        return self._collator.is_alive() and self._device.thread.is_alive()

    @property
    def fault(self) -> str | None:
        """Why nothing can be scored any more (a dead worker thread, a poisoned device), or None."""
        if self._device.fault is not None:
            return self._device.fault
        if not self.alive and not self._closed:
            return "the scoring worker thread stopped"
        return None

    def _on_fault(self, reason: str) -> None:
        """Refuse new work and fail what waits: nothing queued can be scored on this device any more."""
        with self._cond:
            self._closed = True
            waiting = self._rounds.drain()
            self._cond.notify()
        error = DeviceFaultError()
        self._deliver(waiting, error, None)

    def _stalled(self, seconds: float) -> None:
        """A pass that never returns (a hung GPU) held every request and left the service ready: past
        `stall_seconds` without a pass ending, the device is a fault, as a poisoned one is. Every request still
        waiting is failed (503 not_ready) and new work refused; the process (or the Ray Serve replica) then ends so
        that it is restarted. A pass that returns after all has its answers dropped."""
        if self._device.fault is not None:  # failed already, and said so
            return
        self._device.fault = (f"no forward pass has ended for {seconds:.0f} s (RERANKER_STALL_SECONDS="
                              f"{self._stall_seconds:g}): the device is taken as hung")
        logger.critical("the scoring device stalled", extra={"cause": self._device.fault})
        self._metrics.device_faults.inc()
        self._on_fault(self._device.fault)
        error = DeviceFaultError()
        for job in list(self._live):
            self._give_up(job, error)

    def room(self) -> Room:
        """An empty hold on the queue's bound, for a caller about to tokenize (see Room)."""
        return Room(self)

    def hold(self, room: Room, pairs: int, *, abandon: bool = False) -> None:
        with self._cond:
            room.abandoned = room.abandoned or abandon
            if pairs > room.pairs:
                self._refuse(pairs, room)
            self._held_pairs += pairs - room.pairs
            room.pairs = pairs

    def _refuse(self, n_pairs: int, room: Room | None) -> None:
        """Under the lock: raise if `n_pairs` more pairs cannot be queued now; those `room` holds have room already.
        An abandoned room's request is cancelled, not refused for the room it gave back."""
        if room is not None and room.abandoned:
            raise CancelledError("the caller gave up")
        held = room.pairs if room is not None else 0
        if n_pairs > self._max_queue:
            raise LimitExceededError(
                f"this request needs {n_pairs} model passes (documents plus chunks), more than "
                f"RERANKER_MAX_QUEUE={self._max_queue}; send fewer or shorter documents"
            )
        if self._closed:
            if self._device.fault is not None:
                raise DeviceFaultError()
            raise ClosedError("the reranker is shutting down")
        others = self._held_pairs - held
        if self._queued_pairs + others + n_pairs > self._max_queue:
            preparing = f", {others} more being tokenized" if others else ""
            raise OverloadedError(
                f"the scoring queue is full ({self._queued_pairs} pairs waiting{preparing}, limit "
                f"RERANKER_MAX_QUEUE={self._max_queue}); retry shortly"
            )

    def submit(self, pairs: Sequence[EncodedPair], room: Room | None = None) -> Job:
        """Queue pairs at once or raise OverloadedError; the queue bound is checked before queuing. `room`, held
        since before tokenizing, is used up."""
        job = Job(pairs, span_context=current_span_context())
        with self._cond:  # the room may be released from another thread (RerankService.admit's holder)
            self._refuse(len(pairs), room)
            if room is not None:
                self._held_pairs -= room.pairs
                room.pairs = 0
            self._rounds.add(job)
            self._live.add(job)
            self._queued_pairs += len(pairs)
            self._metrics.queue_pairs.set(self._queued_pairs)
            self._cond.notify()
        return job

    def wait(self, job: Job, cancel: threading.Event | None = None) -> None:
        """Block until the job is scored; fail it rather than hang if the worker is gone.

        When `cancel` is set (the caller went away) the job's pairs that have not started are dropped: at once by
        a CancelSignal, which calls back, within 50 ms by a plain Event, which is looked at.
        """
        unwatch = cancel.watch(lambda: self.cancel(job)) if isinstance(cancel, CancelSignal) else None
        looks = cancel is not None and unwatch is None
        try:
            while not job.done.wait(0.05 if looks else 1.0):
                if cancel is not None and cancel.is_set():
                    self.cancel(job)
                elif not self.alive:
                    job.error = job.error or DeviceFaultError("the scoring worker stopped; the service is restarting")
                    job.done.set()
        finally:
            if unwatch is not None:
                unwatch()

    def cancel(self, job: Job) -> None:
        """Drop the job's pairs that no batch has taken yet, count them, and fail the job at once."""
        self._give_up(job, CancelledError("the caller gave up"), cancelled=True)

    def _give_up(self, job: Job, error: RerankerError, *, cancelled: bool = False) -> None:
        """End the job with `error` now and drop its pairs that no batch has taken: its caller gave up, or one of its
        pairs failed, which fails the whole request, so none of the rest is worth a pass."""
        with self._cond:
            if job.done.is_set() or job.given_up:  # the first to give it up (its caller, or a failure) decides
                return
            job.given_up = True
            job.cancelled = cancelled
            # Now, under the lock: a pass of its pairs that fails meanwhile must not put its error in this one's place.
            job.error = job.error or error
            mine = self._rounds.drop(job)  # pending, and those of the current round no batch has taken
        self._deliver(mine, error, None)
        with self._cond:
            job.done.set()

    def close(self, timeout: float = 30.0) -> None:
        """Finish the queued work, then stop the worker."""
        if self._stall_watch is not None:
            self._stall_watch.close()
        with self._cond:
            self._closed = True
            self._cond.notify()
        deadline = time.monotonic() + timeout
        self._collator.join(timeout)
        self._device.thread.join(max(0.0, deadline - time.monotonic()))

    def _collate_rounds(self) -> None:
        while True:
            with self._cond:
                while not self._rounds.pending and not self._closed:
                    self._cond.wait()
                round_items = self._rounds.take_round()
                self._rounds.current = round_items
            if not round_items:  # closed and drained
                # Outside the lock: the device thread needs it to deliver what is still in flight, and
                # only then takes the STOP from a full hand-over queue.
                self._hand_over(STOP)
                return
            # Sorted by length across callers, the fewest padded tokens, and cut one batch at a time, shortest first;
            # but the pairs of requests left out of a round before go first: they have waited a round already.
            left = deque(sorted(round_items, key=lambda item: (not item.job.left_out, item.n_tokens)))
            while left:
                with self._cond:  # against _give_up(): each pair is dropped by it, or sent here, never both
                    items = self._send(self._rounds.fill([], left))
                if items and not self._run(items):
                    return
                if left and self._rounds.cut_ins:
                    with self._cond:
                        cut_in = self._rounds.take_cut_in(len(left))
                        cut_in = self._send(self._rounds.top_up(cut_in, left) if cut_in else [])
                    if cut_in and not self._run(cut_in):
                        return
            with self._cond:
                self._rounds.current = []

    def _send(self, items: list[Item]) -> list[Item]:
        """Under the lock: the pairs of `items` whose callers still wait, marked as handed to the device."""
        items = [item for item in items if not item.job.given_up]
        for item in items:
            item.job.sent[item.position] = True
        return items

    def _start(self, items: Sequence[Item]) -> None:
        """Count how long the jobs whose first pairs are in a batch now waited for it."""
        now = time.perf_counter()
        for item in items:
            if item.job.started is None:
                item.job.started = now
                self._metrics.queue_seconds.observe(now - item.job.submitted)

    def _run(self, items: list[Item]) -> bool:
        """Pad `items` as one batch and hand it to the device thread; False if that thread is gone."""
        self._start(items)
        pairs = [item.job.pairs[item.position] for item in items]
        try:
            features = self._scorer.collate(pairs)
        except Exception:  # the device thread collates it again, and isolates what fails
            logger.exception("collating a batch failed", extra={"batch_size": len(items)})
            features = None
        shape = self._shape(len(pairs), max(pair.n_tokens for pair in pairs))
        return self._hand_over(Batch(pairs, items, features, shape if features is not None else None))

    def _hand_over(self, batch: Batch | object) -> bool:
        """Queue a batch for the device thread; False (and its pairs failed) if that thread is gone."""
        while True:
            try:
                self._ready.put(batch, timeout=0.5)
                return True
            except queue.Full:
                if not self._device.thread.is_alive():
                    if isinstance(batch, Batch):
                        error = DeviceFaultError("the scoring worker stopped; the service is restarting")
                        self._deliver(batch.items, error, None)
                    return False

    def _deliver(self, items: Sequence[Item], outcome: np.ndarray | RerankerError,
                 ran: tuple[float, float] | None) -> None:
        """Record each item's score, or fail its job, and wake the callers whose jobs are complete; `ran` is when
        the pass that scored them ran."""
        if not items:
            return
        error, scores = (outcome, None) if isinstance(outcome, RerankerError) else (None, outcome.tolist())
        failed: list[Job] = []
        with self._cond:
            fresh = cancelled = 0
            for slot, item in enumerate(items):
                job = item.job
                if job.finished[item.position]:
                    continue
                fresh += 1
                cancelled += job.cancelled
                job.finished[item.position] = True
                if scores is not None:
                    job.scores[item.position] = scores[slot]
                    if ran is not None:
                        job.passes.add(ran)
                elif job.error is None:
                    job.error = error
                    if not job.given_up:
                        failed.append(job)
                job.remaining -= 1
                if job.remaining == 0:
                    job.done.set()
            self._queued_pairs -= fresh
            self._metrics.queue_pairs.set(self._queued_pairs)
        if isinstance(error, CancelledError):
            self._metrics.cancelled_pairs.inc(cancelled)
        for job in failed:  # a failed pair fails its request: its caller is told now, and its other pairs dropped
            assert error is not None
            self._give_up(job, error)
