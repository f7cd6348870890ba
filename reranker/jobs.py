"""What a caller holds while its pairs wait for the worker: its Job, its Room in the queue's bound, and the
CancelSignal it leaves by (reranker.batcher fills the first two)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from opentelemetry.trace import SpanContext

from reranker.tokens import EncodedPair

logger = logging.getLogger(__name__)


class CancelSignal(threading.Event):
    """An Event that also calls back whoever watches it the moment it is set.

    A caller that leaves sets its request's signal; the batcher, watching it, drops the request's unstarted pairs
    then and there, where a plain Event had each waiting request's thread wake every 50 ms to look (40 waiting
    requests kept 4% of a core busy doing nothing).
    """

    def __init__(self) -> None:
        super().__init__()
        self._watchers: list[Callable[[], None]] = []
        self._watchers_lock = threading.Lock()

    def set(self) -> None:
        with self._watchers_lock:
            super().set()
            watchers, self._watchers = self._watchers, []
        for watcher in watchers:
            try:
                watcher()
            except Exception:  # one watcher's failure must not keep the others, or the setter, from going on
                logger.exception("a cancellation watcher failed")

    def watch(self, watcher: Callable[[], None]) -> Callable[[], None]:
        """Call `watcher` once when the signal is set (at once if it is already); returns the function that stops
        watching, after which `watcher` is not called."""
        with self._watchers_lock:
            if not self.is_set():
                self._watchers.append(watcher)
                return lambda: self._unwatch(watcher)
        watcher()
        return lambda: None

    def _unwatch(self, watcher: Callable[[], None]) -> None:
        with self._watchers_lock:
            if watcher in self._watchers:
                self._watchers.remove(watcher)


@dataclass(eq=False)
class Job:
    """The pairs of one caller; the worker fills `scores` and sets `done`."""

    pairs: Sequence[EncodedPair]
    scores: list[float] = field(init=False)
    error: Exception | None = None
    remaining: int = field(init=False)
    finished: list[bool] = field(init=False)
    sent: list[bool] = field(init=False)  # handed to the device in a batch: cancelling no longer drops it
    done: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    passes: set[tuple[float, float]] = field(default_factory=set)  # (start, end) of each pass that scored its pairs
    cancelled: bool = False  # its caller gave up: the pairs dropped for it count as cancelled
    given_up: bool = False  # cancelled, or failed: its caller reads no score of it, so no pair left is worth a pass
    left_out: bool = False  # pending when a round was taken, and not in it: it goes into the next round
    span_context: SpanContext | None = None  # the caller's request span, which the batch spans link to
    batch_spans: list[SpanContext] = field(default_factory=list)  # the traced passes that carried its pairs

    def __post_init__(self) -> None:
        self.scores = [float("nan")] * len(self.pairs)
        self.remaining = len(self.pairs)
        self.finished = [False] * len(self.pairs)
        self.sent = [False] * len(self.pairs)
        if not self.pairs:
            self.done.set()

    @property
    def inference_seconds(self) -> float:
        """The wall time during which at least one of its passes ran: passes side by side (OpenVINO's streams)
        count once, so it never exceeds the job's own time; a pass shared with other jobs counts whole for each."""
        total, reached = 0.0, float("-inf")
        for start, end in sorted(self.passes):
            if end > reached:
                total += end - max(start, reached)
                reached = end
        return total


class Queue(Protocol):
    """What a Room draws on: reranker.batcher.Batcher (named here by its methods, so that imports flow one way)."""

    def hold(self, room: Room, pairs: int, *, abandon: bool = False) -> None: ...

    def submit(self, pairs: Sequence[EncodedPair], room: Room | None = None) -> Job: ...


class Room:
    """Room in the queue's bound that a caller holds from before its first tokenizer pass until it submits
    (`Batcher.room`): requests being tokenized count against RERANKER_MAX_QUEUE with the queued pairs, so that a
    burst past the bound is refused before its tokenizing, not after it. Leaving the `with` block gives back
    whatever `submit` did not use."""

    def __init__(self, batcher: Queue) -> None:
        self._batcher = batcher
        self.pairs = 0
        self.abandoned = False

    def need(self, pairs: int) -> None:
        """Hold room for `pairs` pairs, raising what `submit` would when more than held do not fit; fewer give
        the rest back. The documents' count is a lower bound when long documents are chunked."""
        self._batcher.hold(self, pairs)

    def submit(self, pairs: Sequence[EncodedPair]) -> Job:
        """Queue the tokenized pairs in place of the room held; they may be more (chunks), checked again."""
        return self._batcher.submit(pairs, self)

    def release(self) -> None:
        """Give back whatever is held; from any thread, any number of times."""
        self._batcher.hold(self, 0)

    def abandon(self) -> None:
        """Give back whatever is held, for good: the caller left, or its deadline passed. Its request, still being
        tokenized, then gets CancelledError from `need` or `submit`, not a 429 for the room it just gave back."""
        self._batcher.hold(self, 0, abandon=True)

    def __enter__(self) -> Room:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
