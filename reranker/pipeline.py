"""The device stage of the worker: the one thread that runs the model, with one batch in flight.

The collating thread (reranker.batcher) hands over padded CPU batches through a queue of one. This thread
copies a batch to the device and launches its forward pass, and only then waits for the batch before it
and delivers that one's scores: on a GPU the next pass is already queued while Python finishes the last,
so with work waiting the GPU never idles on Python. OpenVINO with two streams works the same way: the next
batch starts on the other stream while the last one runs. On one CPU stream (torch, or OpenVINO on one thread) a
launch runs the pass to completion, and its scores are delivered at once rather than after the next pass.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from opentelemetry.trace import Span

from reranker.backends import Finished, Pending
from reranker.errors import CancelledError, DeviceFaultError, RerankerError, ScoringError
from reranker.metrics import Metrics
from reranker.spans import BatchSpans
from reranker.tokens import EncodedPair

logger = logging.getLogger(__name__)

ScoreFn = Callable[[Sequence[EncodedPair]], np.ndarray]


class Scorer(Protocol):
    """What the worker needs of a model; reranker.model.ScoringModel is the real one."""

    def collate(self, batch: Sequence[EncodedPair], *, exact: bool = False) -> Any:
        """Pad a batch into CPU features; runs on the collating thread, or with `exact` on the device thread
        for a retry, which then runs at the batch's own shape with nothing that only pays off on repeats."""

    def launch(self, features: Any) -> Pending:
        """Start scoring collated features; runs on the device thread only."""


class FunctionScorer:
    """A plain `pairs -> scores` function (fakes in tests) as a scorer: nothing to collate, scored at launch."""

    def __init__(self, score_fn: ScoreFn) -> None:
        self._score_fn = score_fn

    def collate(self, batch: Sequence[EncodedPair], *, exact: bool = False) -> Sequence[EncodedPair]:
        return batch

    def launch(self, features: Sequence[EncodedPair]) -> Pending:
        return Finished(self._score_fn(features))


def as_scorer(model: Scorer | ScoreFn) -> Scorer:
    if callable(model) and not hasattr(model, "launch"):
        return FunctionScorer(model)
    return model  # type: ignore[return-value]


def loaded_torch() -> Any:
    """torch where this process has imported it, else None: a model started from the conversion cache runs without
    it, and nothing torch raises can happen there."""
    return sys.modules.get("torch")


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA OOM, or a CPU allocation that failed inside torch."""
    torch = loaded_torch()
    if isinstance(err, MemoryError) or (torch is not None and isinstance(err, torch.cuda.OutOfMemoryError)):
        return True
    message = str(err)
    return isinstance(err, RuntimeError) and (
        "can't allocate memory" in message or "out of memory" in message.lower()
    )


@dataclass(frozen=True)
class Batch:
    """The pairs of one forward pass; `items` says whose they are (opaque here, one per pair)."""

    pairs: Sequence[EncodedPair]
    items: Sequence[Any]
    features: Any = None  # collated already, or None to collate on the device thread (retries)
    shape: tuple[int, int] | None = None  # the padded (rows, width) it was collated to; None: the real one

    @property
    def padded_tokens(self) -> int:
        rows, width = self.shape or (len(self.pairs), max(pair.n_tokens for pair in self.pairs))
        return rows * width

    def split(self) -> tuple[Batch, Batch]:
        half = len(self.pairs) // 2
        return (Batch(self.pairs[:half], self.items[:half]), Batch(self.pairs[half:], self.items[half:]))


# Hands each item its score (a float32 tensor in batch order) or the error that failed it, with when the pass
# that scored it ran ((start, end) on time.perf_counter), or None where no pass did.
Deliver = Callable[[Sequence[Any], "np.ndarray | RerankerError", "tuple[float, float] | None"], None]


@dataclass(frozen=True)
class _Launched:
    batch: Batch
    pending: Pending
    started: float
    span: Span | None = None  # the pass's reranker.batch span, when a request in it is traced


STOP = object()


class DeviceStage:
    """Runs batches from `inbox` on the scorer, in order; the worker must outlive any failure."""

    def __init__(self, scorer: Scorer, inbox: queue.Queue[Any], deliver: Deliver, metrics: Metrics,
                 spans: BatchSpans | None = None, *, probe: Sequence[EncodedPair] = (),
                 abandoned: Callable[[Sequence[Any]], bool] = lambda items: False,
                 on_fault: Callable[[str], None] = lambda reason: None) -> None:
        self._scorer = scorer
        self._inbox = inbox
        self._deliver = deliver
        self._metrics = metrics
        self._spans = spans
        self._probe = probe
        self._abandoned = abandoned
        self._on_fault = on_fault
        self.fault: str | None = None
        self._last_done = 0.0
        # While the thread works (time.monotonic): when its current work began, or its last pass ended. None while
        # it waits for a batch.
        self._progress: float | None = None
        self.thread = threading.Thread(target=self._run, name="reranker-device", daemon=True)

    def stalled_for(self) -> float:
        """Seconds the thread has worked without a pass ending (a forward pass that never returns: a hung device);
        0 while it waits for work."""
        progress = self._progress
        return 0.0 if progress is None else time.monotonic() - progress

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as err:  # a bug, not a model failure: the thread ends and nothing scores any more
            self.fault = f"the device thread died: {type(err).__name__}: {err}".splitlines()[0][:300]
            logger.critical("the scoring worker died", exc_info=err, extra={"cause": self.fault})
            self._metrics.device_faults.inc()
            self._on_fault(self.fault)

    def _serve(self) -> None:
        in_flight: _Launched | None = None
        while True:
            if in_flight is None:
                self._progress = None  # waits for work: not stalled, however long that takes
            try:
                batch = self._inbox.get(block=in_flight is None)
                if self._progress is None:
                    self._progress = time.monotonic()
            except queue.Empty:  # nothing waiting: finish the batch on the device
                assert in_flight is not None
                self._complete(in_flight)
                in_flight = None
                continue
            if batch is STOP:
                if in_flight is not None:
                    self._complete(in_flight)
                return
            if self.fault is not None or self._abandoned(batch.items):
                # A poisoned device runs nothing more; a batch whose callers all gave up is not worth a pass.
                self._drop(batch)
                continue
            launched, failure = self._launch(batch)
            if in_flight is not None:
                self._complete(in_flight)
            in_flight = launched
            if failure is not None:
                self._recover(batch, failure)
            elif in_flight is not None and in_flight.pending.ran:
                # A pass that ran synchronously is delivered now, not held while the next one runs.
                self._complete(in_flight)
                in_flight = None

    def _launch(self, batch: Batch) -> tuple[_Launched | None, BaseException | None]:
        started = time.perf_counter()
        span = self._spans.start(batch.pairs, batch.items, batch.padded_tokens) if self._spans is not None else None
        try:
            features = batch.features if batch.features is not None else self._scorer.collate(batch.pairs, exact=True)
            return _Launched(batch, self._scorer.launch(features), started, span), None
        except Exception as err:
            self._progress = time.monotonic()  # a pass that failed at once ended too
            self._end_span(span, error=err)
            # Keep no traceback: its frames hold the failed pass's tensors, which must be freed before
            # the retry (the PyTorch FAQ's out-of-memory pitfall).
            return None, err.with_traceback(None)

    def _complete(self, launched: _Launched) -> None:
        try:
            scores = launched.pending.wait()
            self._progress = time.monotonic()  # the pass returned, whatever it returned
            if np.ndim(scores) != 1 or len(scores) != len(launched.batch.pairs):  # a backend's bug, kept to its batch
                raise ScoringError(f"the model returned scores of shape {np.shape(scores)} for a batch of "
                                   f"{len(launched.batch.pairs)} pairs")
        except Exception as err:
            self._progress = time.monotonic()
            self._end_span(launched.span, error=err)
            self._recover(launched.batch, err.with_traceback(None))
            return
        done = time.perf_counter()
        # The time this batch had the device: as the backend timed it where passes run side by side; else from
        # its launch, or from the end of the pass queued before it.
        elapsed = launched.pending.seconds
        if elapsed is None:
            elapsed = done - max(launched.started, self._last_done)
        self._last_done = done
        batch = launched.batch
        self._metrics.inference_seconds.observe(elapsed)
        self._metrics.batch_size.observe(len(batch.pairs))
        self._metrics.batch_tokens.observe(batch.padded_tokens)
        self._metrics.pairs_scored.inc(len(batch.pairs))
        self._end_span(launched.span, inference_seconds=elapsed)
        self._deliver(batch.items, scores, (done - elapsed, done))

    def _end_span(self, span: Span | None, *, error: BaseException | None = None,
                  inference_seconds: float | None = None) -> None:
        if self._spans is not None:
            self._spans.end(span, error=error, inference_seconds=inference_seconds)

    def _score_now(self, batch: Batch) -> None:
        if self._abandoned(batch.items):  # a half whose callers gave up meanwhile (or whose other pair failed them)
            self._drop(batch)
            return
        launched, failure = self._launch(batch)
        if launched is not None:
            self._complete(launched)
        else:
            assert failure is not None
            self._recover(batch, failure)

    def _recover(self, batch: Batch, failure: BaseException) -> None:
        """Halve and retry a failed batch, so that only a pair that fails alone fails its request."""
        try:
            self._bisect(batch, failure)
        except Exception as err:  # the worker must outlive anything
            logger.exception("recovering a failed batch failed", extra={"batch_size": len(batch.pairs)})
            error = ScoringError("the model failed to score this request")
            error.__cause__ = err
            self._deliver(batch.items, error, None)

    def _drop(self, batch: Batch) -> None:
        error: RerankerError = CancelledError("the caller gave up")
        if self.fault is not None:
            error = DeviceFaultError()
        self._deliver(batch.items, error, None)

    def _device_is_poisoned(self) -> bool:
        """After a failure that is not about memory: does a known-good pair still score? CUDA errors such as
        an illegal memory access or a device-side assert leave the context unusable, failing every later pass."""
        if not self._probe:
            return False
        try:
            self._scorer.launch(self._scorer.collate(self._probe, exact=True)).wait()
        except Exception as err:
            self.fault = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            return True
        return False

    def _bisect(self, batch: Batch, failure: BaseException) -> None:
        out_of_memory = is_out_of_memory(failure)
        torch = loaded_torch()
        if out_of_memory and torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self.fault is None and not out_of_memory and self._device_is_poisoned():
            logger.critical("the scoring device is unusable; failing all work", extra={"cause": self.fault},
                            exc_info=failure)
            self._metrics.device_faults.inc()
            self._on_fault(self.fault or "")
        if self.fault is not None:
            self._drop(batch)
            return
        # A lone pair collated for the device's shape buckets may have been padded to several rows: it
        # is retried once at its own shape before its request is told it cannot fit.
        retry_alone = (out_of_memory and len(batch.pairs) == 1 and batch.shape is not None
                       and batch.shape != (1, batch.pairs[0].n_tokens))
        if len(batch.pairs) == 1 and not retry_alone:
            if out_of_memory:
                error = ScoringError(
                    f"out of memory scoring one document of {batch.pairs[0].n_tokens} tokens; lower "
                    "RERANKER_MAX_LENGTH or send a shorter document"
                )
            else:
                logger.error("the model failed on one pair", exc_info=failure)
                error = ScoringError("the model failed to score this request")
            error.__cause__ = failure
            self._deliver(batch.items, error, None)
            return
        if out_of_memory:
            self._metrics.oom_retries.inc()
            logger.warning("out of memory; retrying " + ("alone" if retry_alone else "as two halves"),
                           extra={"batch_size": len(batch.pairs)})
        else:
            # A failure that is not about memory is split too, so one bad pair cannot fail the other
            # requests that happened to share its batch.
            logger.warning("a batch failed; retrying as two halves to isolate the pair",
                           extra={"batch_size": len(batch.pairs), "error": f"{type(failure).__name__}: {failure}"})
        for part in [Batch(batch.pairs, batch.items)] if retry_alone else batch.split():
            self._score_now(part)
