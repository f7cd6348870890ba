"""Abandoned work is dropped unscored; a dead worker or a poisoned device turns the reranker unready."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pytest

from reranker import CancelledError, DeviceFaultError, Reranker
from reranker.batcher import ScoreFn
from reranker.metrics import Metrics
from reranker.model import ScoringModel
from reranker.tokens import EncodedPair
from tests.conftest import model_settings
from tests.servers import HANG_S


class GatedScorer:
    """The real model behind a gate, so tests can hold the device while they queue work; counts pairs."""

    def __init__(self, model: ScoringModel) -> None:
        self.model = model
        self.gate = threading.Event()
        self.pairs = 0
        self.first_batch = threading.Event()

    def __call__(self, batch: Sequence[EncodedPair]) -> np.ndarray:
        self.first_batch.set()
        self.gate.wait(HANG_S)  # tests open it; the bound only frees the worker of a test that failed first
        self.pairs += len(batch)
        return self.model.score(batch)


class GatedCall:
    """`owner.name` (a method of the real model) behind a gate: each call records `measure(its arguments)`,
    marks `first_batch` and waits until a test opens `gate`, then runs the method itself."""

    def __init__(self, owner: object, name: str, monkeypatch: pytest.MonkeyPatch,
                 measure: Callable[..., int]) -> None:
        self._method = getattr(owner, name)
        self._measure = measure
        self.gate = threading.Event()
        self.first_batch = threading.Event()
        self.calls: list[int] = []
        monkeypatch.setattr(owner, name, self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(self._measure(*args, **kwargs))
        self.first_batch.set()
        self.gate.wait(HANG_S)  # tests open it; the bound only frees the worker of a test that failed first
        return self._method(*args, **kwargs)


def gated_launch(model: ScoringModel, monkeypatch: pytest.MonkeyPatch) -> GatedCall:
    """The real model's passes (its own collate and backend: padding, OpenVINO's streams) held at the first
    while a test queues work; `calls` records each pass's rows."""
    return GatedCall(model, "launch", monkeypatch, lambda batch: batch.rows)


def wait_until(condition: object, timeout: float = HANG_S) -> None:
    """Poll `condition` until it holds; the deadline only bounds a hang, never how fast the machine is."""
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def outcome_within(call: Callable[[], object], timeout: float = HANG_S) -> object:
    """What `call` returned or raised; fails, rather than hanging the test run, if it has not ended in `timeout`."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as err:
            outcome.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert outcome, f"still waiting after {timeout:.0f} s"
    return outcome[0]


def jobs_taken(reranker: Reranker) -> float:
    """How many requests the collating thread has taken into a round (each observes its queue wait once)."""
    return reranker.metrics.registry.get_sample_value("reranker_queue_duration_seconds_count") or 0.0


def fill_the_pipeline(reranker: Reranker, start: Callable[[str], threading.Thread]) -> list[threading.Thread]:
    """With the device held by a pass: one single-pair request waits in the hand-over queue and a second one
    holds the collating thread, blocked on that queue. Whatever is submitted next waits pending together
    and is taken as one round once the device moves on. `start(name)` starts a thread sending one pair."""
    threads = []
    for name in ("fill-1", "fill-2"):
        taken = jobs_taken(reranker)
        threads.append(start(name))
        # Taken into a round, so the first is handed over (the queue had room) before the second is taken.
        wait_until(lambda taken=taken: jobs_taken(reranker) == taken + 1)
    return threads


class Held(Protocol):
    gate: threading.Event
    first_batch: threading.Event


def one_round(reranker: Reranker, held: Held, callers: Sequence[threading.Thread], pairs: int) -> None:
    """Runs `callers` (threads not yet started, `pairs` pairs in all) as one round of the collating thread, so
    their pairs share passes: a single pair's pass holds the device at `held`'s gate, fill_the_pipeline, the
    callers queue together, then the gate opens. Returns when every thread has ended."""
    def start(name: str) -> threading.Thread:
        thread = threading.Thread(target=reranker.rerank, args=(name, ["x"]))
        thread.start()
        return thread

    threads = [start("holds the device")]
    assert held.first_batch.wait(HANG_S)
    threads += fill_the_pipeline(reranker, start)
    for caller in callers:
        caller.start()
    wait_until(lambda: reranker.queued_pairs == 3 + pairs)  # the three single pairs are not scored yet
    held.gate.set()
    for thread in [*threads, *callers]:
        thread.join(HANG_S)


def test_abandoned_pairs_are_dropped_unscored_while_others_get_their_answers(
    bert_model: ScoringModel, documents: list[str], metrics: Metrics
) -> None:
    scorer = GatedScorer(bert_model)
    settings = model_settings(Path(bert_model.model_id), cache_size=0, batch_tokens=1024)
    with Reranker(bert_model, settings) as plain:
        expected = {r.index: r.score for r in plain.rerank("json", documents[:40], raw_scores=True)}
    outcomes: dict[str, object] = {}
    with Reranker(bert_model, settings, metrics=metrics, score_fn=scorer) as reranker:
        warm = threading.Thread(target=lambda: reranker.rerank("warm", ["up"]))
        warm.start()
        assert scorer.first_batch.wait(HANG_S)  # the device is now held
        gone = threading.Event()

        def abandoned(name: str, docs: list[str]) -> None:
            try:
                outcomes[name] = reranker.rerank_detailed("cache", docs, cancel=gone)
            except Exception as err:
                outcomes[name] = err

        def live() -> None:
            outcomes["live"] = reranker.rerank("json", documents[:40], raw_scores=True)

        threads = {"collated": threading.Thread(target=abandoned, args=("collated", documents[:150])),
                   "live": threading.Thread(target=live),
                   "pending": threading.Thread(target=abandoned, args=("pending", documents[150:180]))}
        # Each abandoned request where a disconnect can find it, whatever the machine's speed: the first is
        # taken into a round of its own and cut into batches (one handed to the device thread, one holding the
        # collating thread, the rest not yet collated); the live one and the second wait pending behind them.
        threads["collated"].start()
        wait_until(lambda: jobs_taken(reranker) == 2)
        threads["live"].start()
        threads["pending"].start()
        wait_until(lambda: reranker.queued_pairs == 1 + 150 + 40 + 30)
        gone.set()  # the abandoned callers' clients disconnect
        for name in ("collated", "pending"):
            threads[name].join(HANG_S)
            assert isinstance(outcomes[name], CancelledError)
        scorer.gate.set()
        for thread in [warm, threads["live"]]:
            thread.join(HANG_S)
        live_results = outcomes["live"]
        assert isinstance(live_results, list)
        assert {r.index: r.score for r in live_results} == pytest.approx(expected, abs=1e-5)
        wait_until(lambda: reranker.queued_pairs == 0)
    # The warm-up pair and the live request's 40 were scored; none of the abandoned 150 + 30.
    assert scorer.pairs == 41
    assert metrics.registry.get_sample_value("reranker_cancelled_pairs_total") == 180
    assert metrics.registry.get_sample_value("reranker_pairs_scored_total") == 41
    # Accepted work counts its lookups and tokens whatever became of it: all 1 + 150 + 40 + 30 documents.
    assert metrics.registry.get_sample_value("reranker_cache_requests_total", {"result": "miss"}) == 221
    assert (metrics.registry.get_sample_value("reranker_input_tokens_total") or 0) > 180 * 8


def poisoning_scorer(model: ScoringModel, healthy_batches: int) -> ScoreFn:
    calls = {"n": 0}

    def scorer(batch: Sequence[EncodedPair]) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] > healthy_batches:
            # What a CUDA context looks like after an illegal memory access: every later call fails.
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return model.score(batch)

    return scorer


def test_a_poisoned_device_fails_all_work_once_and_turns_unready(bert_model: ScoringModel, metrics: Metrics,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    settings = model_settings(Path(bert_model.model_id), cache_size=0)
    poisoned = poisoning_scorer(bert_model, 1)
    passes = {"n": 0}

    def counted(batch: Sequence[EncodedPair]) -> np.ndarray:
        passes["n"] += 1
        return poisoned(batch)

    with Reranker(bert_model, settings, metrics=metrics, score_fn=counted) as reranker:
        assert len(reranker.rerank("q", ["a", "b"])) == 2 and reranker.ready
        with pytest.raises(DeviceFaultError, match="restarting"):
            reranker.rerank("q", ["c", "d", "e"])
        assert not reranker.ready
        assert reranker.fault is not None and "illegal memory access" in reranker.fault
        before = passes["n"]
        with pytest.raises(DeviceFaultError):
            reranker.rerank("q", ["f"])  # refused at once, nothing more is run
        assert passes["n"] == before
    assert metrics.registry.get_sample_value("reranker_device_faults_total") == 1
    assert sum("scoring device is unusable" in r.getMessage() for r in caplog.records) == 1


def test_a_one_off_failure_is_not_a_fault(bert_model: ScoringModel, metrics: Metrics) -> None:
    calls = {"n": 0}

    def once(batch: Sequence[EncodedPair]) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("CUDA error: device-side assert triggered")
        return bert_model.score(batch)

    with Reranker(bert_model, model_settings(Path(bert_model.model_id)), metrics=metrics, score_fn=once) as r:
        results = r.rerank("q", ["a", "b", "c", "d"], raw_scores=True)
        assert len(results) == 4 and r.ready and r.fault is None
    assert metrics.registry.get_sample_value("reranker_device_faults_total") == 0


def test_a_pass_that_never_returns_is_a_fault_and_fails_every_waiting_request(
        bert_model: ScoringModel, metrics: Metrics, caplog: pytest.LogCaptureFixture) -> None:
    """A hung device (a pass that never returns) held every request until its client gave up, and the service stayed
    ready, so nothing restarted it: past RERANKER_STALL_SECONDS it is a fault, as a poisoned device is."""
    hung = GatedScorer(bert_model)
    settings = model_settings(Path(bert_model.model_id), cache_size=0, stall_seconds=1.0)
    with Reranker(bert_model, settings, metrics=metrics, score_fn=hung) as reranker:
        assert reranker.stall_seconds == 1.0
        try:
            with ThreadPoolExecutor(2) as pool:
                held = pool.submit(reranker.rerank, "q", ["a", "b"])  # its pass hangs
                assert hung.first_batch.wait(HANG_S)
                waiting = pool.submit(reranker.rerank, "q", ["c"])  # queued behind it
                started = time.monotonic()
                for answer in (held, waiting):
                    with pytest.raises(DeviceFaultError, match="restarting"):
                        answer.result(HANG_S)
                assert time.monotonic() - started < 10  # the limit and the watch's period, with room
            assert not reranker.ready and "RERANKER_STALL_SECONDS=1" in str(reranker.fault)
            with pytest.raises(DeviceFaultError):
                reranker.rerank("q", ["d"])  # refused at once
        finally:
            hung.gate.set()  # the pass returns after all: its answers are dropped
    assert metrics.registry.get_sample_value("reranker_device_faults_total") == 1
    assert any(r.getMessage() == "the scoring device stalled" for r in caplog.records)


def test_slow_passes_that_end_and_idle_time_are_no_stall(bert_model: ScoringModel) -> None:
    passes = []

    def slow(batch: Sequence[EncodedPair]) -> np.ndarray:
        passes.append(len(batch))
        time.sleep(0.5)  # each pass ends well within the limit, though the work takes twice as long as it
        return bert_model.score(batch)

    settings = model_settings(Path(bert_model.model_id), cache_size=0, stall_seconds=2.0, batch_tokens=1)
    with Reranker(bert_model, settings, score_fn=slow) as reranker:
        assert len(reranker.rerank("q", [f"document {i}" for i in range(8)])) == 8
        assert len(passes) >= 8  # one pair a pass: 4 s and more of work
        time.sleep(2.5)  # idle past the limit
        assert reranker.ready and reranker.fault is None
        assert len(reranker.rerank("q", ["after"])) == 1


def test_the_stall_limit_follows_the_device_unless_set(bert_model: ScoringModel) -> None:
    from reranker.budgets import stall_limit

    assert stall_limit("cuda:0") == 120.0 and stall_limit("cpu") == 600.0
    with Reranker(bert_model, model_settings(Path(bert_model.model_id))) as reranker:
        assert reranker.stall_seconds == 600.0  # the tiny model runs on the CPU
    with Reranker(bert_model, model_settings(Path(bert_model.model_id), stall_seconds=0.0)) as reranker:
        assert reranker.stall_seconds == 0.0 and reranker._batcher._stall_watch is None  # no watch at all


class WorkerBug(BaseException):
    """Escapes every `except Exception`: stands for a bug that kills the device thread."""


def test_a_dead_worker_thread_turns_unready_and_fails_waiting_requests(bert_model: ScoringModel) -> None:
    def broken(batch: Sequence[EncodedPair]) -> np.ndarray:
        raise WorkerBug("boom")

    with Reranker(bert_model, model_settings(Path(bert_model.model_id)), score_fn=broken) as reranker:
        assert isinstance(outcome_within(lambda: reranker.rerank("q", ["a", "b"])), DeviceFaultError)
        assert not reranker.ready and reranker.fault is not None and "died" in reranker.fault
        with pytest.raises(DeviceFaultError):
            reranker.rerank("q", ["a"])


def test_scores_are_unchanged_when_nothing_is_cancelled(bert_model: ScoringModel, documents: list[str]) -> None:
    settings = model_settings(Path(bert_model.model_id), cache_size=0)
    with Reranker(bert_model, settings) as reranker:
        plain = reranker.rerank("json", documents[:30], raw_scores=True)
        watched = reranker.rerank_detailed("json", documents[:30], raw_scores=True, cancel=threading.Event())
    np.testing.assert_allclose([r.score for r in plain], [r.score for r in watched.results], atol=1e-6)


def test_requests_failed_together_each_raise_their_own_error(bert_model: ScoringModel) -> None:
    """A device fault hands one error to every request still waiting; each caller raises its own copy."""
    gate = threading.Event()
    calls = {"n": 0}

    def scorer(batch: Sequence[EncodedPair]) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 1:
            gate.wait(HANG_S)  # holds the device while the others queue behind it
            return bert_model.score(batch)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    errors: dict[str, BaseException] = {}

    def call(reranker: Reranker, name: str) -> None:
        try:
            reranker.rerank(name, ["x", "y"] if name in "ab" else ["z"])
        except DeviceFaultError as err:
            errors[name] = err

    with Reranker(bert_model, model_settings(Path(bert_model.model_id), cache_size=0), score_fn=scorer) as reranker:
        def start(name: str) -> threading.Thread:
            thread = threading.Thread(target=call, args=(reranker, name))
            thread.start()
            return thread

        threads = [start("warm")]
        wait_until(lambda: calls["n"] == 1)
        threads += fill_the_pipeline(reranker, start)  # so a and b wait pending together, as one round
        threads += [start("a"), start("b")]
        wait_until(lambda: reranker.queued_pairs == 7)
        gate.set()
        for thread in threads:
            thread.join(HANG_S)
    assert set(errors) == {"fill-1", "fill-2", "a", "b"}
    assert errors["a"] is not errors["b"] and str(errors["a"]) == str(errors["b"])


def test_the_stall_watch_stops_with_the_reranker(bert_model: ScoringModel) -> None:
    with Reranker(bert_model, model_settings(Path(bert_model.model_id), stall_seconds=30.0)) as reranker:
        watch = reranker._batcher._stall_watch
        assert watch is not None and watch._thread.is_alive()
    assert not watch._thread.is_alive()  # joined by close(), not left to end on its own
