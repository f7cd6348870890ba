"""The worker: token-budget batches, OOM halving, overload, failures that stay with their request."""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from reranker import (
    CancelledError,
    DeviceFaultError,
    LimitExceededError,
    OverloadedError,
    Reranker,
    ScoringError,
    planning,
)
from reranker.batcher import Batcher, is_out_of_memory
from reranker.jobs import CancelSignal, Job
from reranker.metrics import Metrics
from reranker.model import ScoringModel
from reranker.packing import cut_batches
from reranker.rounds import Item
from reranker.tokens import EncodedPair
from tests.conftest import model_settings
from tests.servers import HANG_S
from tests.test_faults import GatedCall, fill_the_pipeline, one_round, outcome_within, wait_until


def test_batches_stay_within_the_token_budget() -> None:
    lengths = [5, 50, 7, 100, 3, 60, 8, 200]
    batches = cut_batches(lengths, 120)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 120
    assert [lengths[i] for i in batches[0]] == [3, 5, 7, 8]  # shortest first, merged
    # The budget is a maximum: a batch that fills it exactly is one pass, not two.
    assert cut_batches([10] * 4, 40) == [[0, 1, 2, 3]] and cut_batches([10] * 5, 40) == [[0, 1, 2, 3], [4]]


def test_out_of_memory_is_recognised() -> None:
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 GB"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


class FlakyDevice:
    """Runs the real model but raises CUDA out-of-memory above a batch size or token count. Records each pass's
    size; with `held`, the first pass waits for `gate`."""

    def __init__(self, model: ScoringModel, max_pairs: int = 10**9, max_pair_tokens: int = 10**9,
                 held: bool = False) -> None:
        self.model = model
        self.max_pairs = max_pairs
        self.max_pair_tokens = max_pair_tokens
        self.calls = 0
        self.sizes: list[int] = []
        self.gate = threading.Event()
        if not held:
            self.gate.set()
        self.first_batch = threading.Event()

    def __call__(self, batch: Sequence[EncodedPair]) -> np.ndarray:
        self.calls += 1
        self.first_batch.set()
        self.gate.wait(HANG_S)
        self.sizes.append(len(batch))
        if len(batch) > self.max_pairs or max(p.n_tokens for p in batch) > self.max_pair_tokens:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model.score(batch)


def test_oom_halves_the_batch_and_gives_the_same_scores(
    bert_model: ScoringModel, documents: list[str], metrics: Metrics
) -> None:
    query = "json parse"
    settings = model_settings(Path(bert_model.model_id), cache_size=0)
    with Reranker(bert_model, settings) as reranker:
        expected = {r.index: r.score for r in reranker.rerank(query, documents, raw_scores=True)}
    device = FlakyDevice(bert_model, max_pairs=7)
    with Reranker(bert_model, settings, metrics=metrics, score_fn=device) as reranker:
        got = {r.index: r.score for r in reranker.rerank(query, documents, raw_scores=True)}
    np.testing.assert_allclose([got[i] for i in range(200)], [expected[i] for i in range(200)], rtol=1e-5, atol=1e-5)
    assert (metrics.registry.get_sample_value("reranker_oom_retries_total") or 0) > 0
    assert metrics.registry.get_sample_value("reranker_pairs_scored_total") == 200


def test_an_unfittable_pair_fails_only_its_request(bert_model: ScoringModel, documents: list[str]) -> None:
    device = FlakyDevice(bert_model, max_pair_tokens=100, held=True)
    settings = model_settings(Path(bert_model.model_id), cache_size=0)
    short_docs = ["a short one", "cache server", "tea"]
    long_docs = ["cache " * 150]
    outcomes: dict[str, object] = {}
    with Reranker(bert_model, settings, score_fn=device) as reranker:
        def call(name: str, docs: list[str]) -> None:
            try:
                outcomes[name] = reranker.rerank("cache", docs)
            except Exception as err:
                outcomes[name] = err

        callers = [threading.Thread(target=call, args=a) for a in (("short", short_docs), ("long", long_docs))]
        one_round(reranker, device, callers, pairs=3 + 1)
        assert device.sizes[:4] == [1, 1, 1, 4], "the two requests' pairs ran out of memory in one pass"
        assert isinstance(outcomes["long"], ScoringError)
        assert "out of memory scoring one document" in str(outcomes["long"])
        assert isinstance(outcomes["short"], list) and len(outcomes["short"]) == 3
        # The worker is still alive and serving.
        assert len(reranker.rerank("tea", short_docs)) == 3


def test_a_failing_model_fails_the_request_not_the_worker(bert_model: ScoringModel) -> None:
    calls = {"n": 0}

    def broken_once(batch: Sequence[EncodedPair]) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device-side assert triggered")
        return bert_model.score(batch)

    with Reranker(bert_model, model_settings(Path(bert_model.model_id)), score_fn=broken_once) as reranker:
        with pytest.raises(ScoringError, match="failed to score") as info:
            reranker.rerank("q", ["d"])
        assert "device-side" not in str(info.value)  # nothing internal in the message
        assert len(reranker.rerank("q", ["d", "e"])) == 2


def test_a_backend_returning_the_wrong_number_of_scores_fails_its_batch_not_the_worker(
        bert_model: ScoringModel) -> None:
    """Too few scores raised IndexError inside the delivery, which ended the device thread and the process with it;
    too many were cut silently. Now such a batch fails as any failed pass does: halved and retried."""
    def one_short(batch: Sequence[EncodedPair]) -> np.ndarray:
        scores = bert_model.score(batch)
        return scores[:-1] if len(batch) > 1 else scores

    def one_more(batch: Sequence[EncodedPair]) -> np.ndarray:
        return np.append(bert_model.score(batch), 0.5)

    settings = model_settings(Path(bert_model.model_id), cache_size=0)
    with Reranker(bert_model, settings) as exact:
        expected = exact.rerank("q", ["a", "b", "c", "d"])
    with Reranker(bert_model, settings, score_fn=one_short) as reranker:
        ranked = reranker.rerank("q", ["a", "b", "c", "d"])  # the pairs, one by one
        assert [r.index for r in ranked] == [r.index for r in expected]
        assert [r.score for r in ranked] == pytest.approx([r.score for r in expected], abs=1e-5)
        assert reranker.fault is None
    with Reranker(bert_model, settings, score_fn=one_more) as reranker:
        for _ in range(2):  # the worker answers the next request too
            with pytest.raises(ScoringError, match="failed to score"):
                reranker.rerank("q", ["a", "b"])


def test_non_finite_scores_fail_the_request_and_are_counted(bert_model: ScoringModel, metrics: Metrics) -> None:
    def nan_scorer(batch: Sequence[EncodedPair]) -> np.ndarray:
        scores = bert_model.score(batch).copy()
        scores[0] = float("nan")
        return scores

    with Reranker(bert_model, model_settings(Path(bert_model.model_id)), metrics=metrics,
                  score_fn=nan_scorer) as reranker:
        with pytest.raises(ScoringError, match="non-finite score .*at float32 the model itself produced it"):
            reranker.rerank("q", ["d", "e"])
    assert metrics.registry.get_sample_value("reranker_nonfinite_scores_total") == 1


def test_a_full_queue_raises_overloaded_at_once(bert_model: ScoringModel, metrics: Metrics,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused before any tokenizing, and the refused request counts no cache lookups or tokens."""
    release = threading.Event()

    def slow(batch: Sequence[EncodedPair]) -> np.ndarray:
        release.wait(HANG_S)
        return bert_model.score(batch)

    settings = model_settings(Path(bert_model.model_id), max_queue=10, cache_size=0)
    with Reranker(bert_model, settings, metrics=metrics, score_fn=slow) as reranker:
        first = threading.Thread(target=reranker.rerank, args=("q", [f"doc {i}" for i in range(8)]))
        first.start()
        # The count and the gauge are set one after the other: wait for both.
        wait_until(lambda: reranker.queued_pairs == 8 == metrics.registry.get_sample_value("reranker_queue_pairs"))
        counted = {name: metrics.registry.get_sample_value(name, labels) for name, labels in [
            ("reranker_cache_requests_total", {"result": "miss"}), ("reranker_input_tokens_total", None)]}
        with monkeypatch.context() as patch:
            patch.setattr(planning, "plan", lambda *args, **kwargs: pytest.fail("tokenized a request it then refused"))
            refused = outcome_within(lambda: reranker.rerank("q", ["x", "y", "z"]))
            assert isinstance(refused, OverloadedError) and "RERANKER_MAX_QUEUE=10" in str(refused)
            # At once: refused while the queue was still full, not after waiting for room.
            assert first.is_alive() and reranker.queued_pairs == 8
        assert counted == {name: metrics.registry.get_sample_value(name, labels) for name, labels in [
            ("reranker_cache_requests_total", {"result": "miss"}), ("reranker_input_tokens_total", None)]}
        release.set()
        first.join(HANG_S)
        assert len(reranker.rerank("q", ["x", "y", "z"])) == 3
    assert metrics.registry.get_sample_value("reranker_queue_pairs") == 0


def gated_tokenizing(model: ScoringModel, monkeypatch: pytest.MonkeyPatch) -> GatedCall:
    """The model's tokenizer pass held at the gate; `calls` records how many documents each pass had."""
    return GatedCall(model.encoder, "encode", monkeypatch, lambda query, documents, *args, **kwargs: len(documents))


def test_requests_being_tokenized_hold_their_room_so_a_burst_is_refused_before_its_tokenizing(
        bert_model: ScoringModel, metrics: Metrics, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, the bound only counted queued pairs: every request of a burst passed the check, all of them
    tokenized side by side, and all but the first were refused after paying for it (429s of 3-7 s here)."""
    settings = model_settings(Path(bert_model.model_id), max_queue=10, cache_size=0)
    with Reranker(bert_model, settings, metrics=metrics) as reranker:
        tokenizing = gated_tokenizing(bert_model, monkeypatch)
        first = threading.Thread(target=reranker.rerank, args=("q", [f"doc {i}" for i in range(8)]))
        first.start()
        wait_until(lambda: tokenizing.calls == [8])
        monkeypatch.setattr(reranker._clipper, "clip", lambda *args: pytest.fail("clipped a request it refused"))
        for call in (lambda: reranker.rerank("q", ["x", "y", "z"]),
                     lambda: reranker.rerank_detailed("q", ["x", "y", "z"], max_doc_tokens=2)):
            refused = outcome_within(call)
            assert isinstance(refused, OverloadedError), refused
            assert "0 pairs waiting, 8 more being tokenized" in str(refused)
        assert tokenizing.calls == [8] and reranker.queued_pairs == 0
        with ThreadPoolExecutor(1) as pool:
            fits = pool.submit(reranker.rerank, "q", ["x", "y"])  # 8 + 2: it tokenizes beside the first
            wait_until(lambda: tokenizing.calls == [8, 2])
            tokenizing.gate.set()
            assert len(fits.result(HANG_S)) == 2
        first.join(HANG_S)
        assert len(reranker.rerank("q", [f"doc {i}" for i in range(10)])) == 10  # all the room is back


def test_the_room_is_given_back_when_tokenizing_fails_or_the_caller_leaves(bert_model: ScoringModel,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    settings = model_settings(Path(bert_model.model_id), max_queue=10, cache_size=0)
    with Reranker(bert_model, settings) as reranker:
        with pytest.raises(LimitExceededError, match="shorten it"):  # raised by the tokenizing, past the check
            reranker.rerank("word " * 2000, [f"doc {i}" for i in range(10)])
        tokenizing = gated_tokenizing(bert_model, monkeypatch)
        cancel = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            leaving = pool.submit(reranker.rerank_detailed, "q", [f"doc {i}" for i in range(10)], cancel=cancel)
            wait_until(lambda: tokenizing.calls == [10])
            cancel.set()
            tokenizing.gate.set()
            with pytest.raises(CancelledError):
                leaving.result(HANG_S)
        assert len(reranker.rerank("q", [f"doc {i}" for i in range(10)])) == 10


def test_a_request_whose_caller_left_is_cancelled_not_refused_for_the_room_it_gave_back() -> None:
    """The room of a caller that leaves is given back at once, on the event loop, a moment before its cancellation
    is set: its request, still tokenizing, asked for room again in that moment, found the queue full (others had
    taken the room) and was booked 429, overloaded, for a client that had gone."""
    batcher = Batcher(lambda batch: np.zeros(len(batch), dtype=np.float32), batch_tokens=100, max_queue=10,
                      metrics=Metrics(CollectorRegistry()))
    try:
        leaving = batcher.room()
        leaving.need(6)
        leaving.abandon()
        batcher.room().need(8)  # another request takes the room given back
        with pytest.raises(CancelledError):
            leaving.need(6)
        with pytest.raises(CancelledError):
            leaving.submit([EncodedPair(np.arange(10))])
        leaving.release()  # as leaving its `with` block does
        assert batcher.queued_pairs == 0 and batcher._held_pairs == 8
    finally:
        batcher.close()


def test_documents_the_cache_answers_hold_no_room(bert_model: ScoringModel, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = model_settings(Path(bert_model.model_id), max_queue=10)
    with Reranker(bert_model, settings) as reranker:
        cached = [f"cached {i}" for i in range(8)]
        reranker.rerank("q", cached)
        tokenizing = gated_tokenizing(bert_model, monkeypatch)
        with ThreadPoolExecutor(2) as pool:
            held = pool.submit(reranker.rerank, "q", [f"new {i}" for i in range(4)])
            wait_until(lambda: tokenizing.calls == [4])
            mostly_cached = pool.submit(reranker.rerank, "q", [*cached, "new 4", "new 5"])  # 10 documents, 2 to score
            wait_until(lambda: tokenizing.calls == [4, 2])
            refused = outcome_within(lambda: reranker.rerank("q", [f"other {i}" for i in range(5)]))
            assert isinstance(refused, OverloadedError) and "6 more being tokenized" in str(refused)
            tokenizing.gate.set()
            assert len(held.result(HANG_S)) == 4 and len(mostly_cached.result(HANG_S)) == 10


def test_a_request_larger_than_the_queue_is_a_limit_error(bert_model: ScoringModel) -> None:
    settings = model_settings(Path(bert_model.model_id), max_queue=3)
    with Reranker(bert_model, settings) as reranker:
        with pytest.raises(LimitExceededError, match="RERANKER_MAX_QUEUE=3"):
            reranker.rerank("q", ["a", "b", "c", "d"])


def test_a_dead_worker_fails_requests_instead_of_hanging(bert_model: ScoringModel) -> None:
    batcher = Batcher(bert_model.score, batch_tokens=1024, max_queue=100, metrics=Metrics(CollectorRegistry()))
    batcher.close()  # the worker exits; a job that still gets queued must not wait forever
    job = Job(bert_model.encode([("q", "d")]))
    outcome_within(lambda: batcher.wait(job))
    assert isinstance(job.error, DeviceFaultError)


def test_a_pair_that_breaks_the_model_fails_only_its_own_request(bert_model: ScoringModel,
                                                                  metrics: Metrics) -> None:
    poison = "poison " * 20

    poisoned: list[int] = []  # the size of each pass that held the poison

    def scorer(batch: Sequence[EncodedPair]) -> np.ndarray:
        if any(pair.n_tokens > 20 for pair in batch):
            poisoned.append(len(batch))
            raise RuntimeError("index out of range in self")
        return bert_model.score(batch)

    held, release = threading.Event(), threading.Event()

    def gated(batch: Sequence[EncodedPair]) -> np.ndarray:
        held.set()
        release.wait(HANG_S)  # hold the worker so that both requests land in one batch
        return scorer(batch)

    settings = model_settings(Path(bert_model.model_id), cache_size=0)
    outcomes: dict[str, object] = {}
    with Reranker(bert_model, settings, metrics=metrics, score_fn=gated) as reranker:
        def start(name: str, docs: Sequence[str] = ("up",)) -> threading.Thread:
            def call() -> None:
                try:
                    outcomes[name] = reranker.rerank("q", list(docs))
                except Exception as err:
                    outcomes[name] = err

            thread = threading.Thread(target=call)
            thread.start()
            return thread

        threads = [start("warm")]
        assert held.wait(HANG_S)
        threads += fill_the_pipeline(reranker, start)
        threads += [start("good", ["a", "b", "c"]), start("bad", [poison])]
        wait_until(lambda: reranker.queued_pairs == 1 + 2 + 4)
        release.set()
        for thread in threads:
            thread.join(HANG_S)
        assert isinstance(outcomes["good"], list) and len(outcomes["good"]) == 3
        assert isinstance(outcomes["bad"], ScoringError) and "index" not in str(outcomes["bad"])
        assert poisoned[0] == 4  # the poison failed a pass of both requests, which was then bisected
        assert reranker.queued_pairs == 0
    assert metrics.registry.get_sample_value("reranker_queue_pairs") == 0


def test_a_request_finished_before_a_later_failure_stays_successful(bert_model: ScoringModel) -> None:
    """OOM on the full batch, the first half scores, the second half fails: each job gets one outcome."""
    calls = {"n": 0}

    def scorer(batch: Sequence[EncodedPair]) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        if calls["n"] == 3:
            raise RuntimeError("device-side assert")
        return np.ones(len(batch), dtype=np.float32)

    metrics = Metrics(CollectorRegistry())
    batcher = Batcher(scorer, batch_tokens=10**6, max_queue=100, metrics=metrics)
    pairs = bert_model.encode([("q", "a"), ("q", "b")])
    # Submit both before the worker wakes, so they share one batch.
    with batcher._cond:
        first, second = batcher.submit(pairs[:1]), batcher.submit(pairs[1:])
    batcher.wait(first)
    batcher.wait(second)
    batcher.close()
    assert first.error is None and first.scores == [1.0]
    assert isinstance(second.error, ScoringError)
    assert batcher.queued_pairs == 0 and metrics.registry.get_sample_value("reranker_queue_pairs") == 0


def test_a_failed_pair_ends_its_request_at_once_and_its_other_pairs_get_no_pass() -> None:
    """A request fails whole when one of its pairs does: its caller was told only after its other pairs had run
    (a 1,000-document request on a CPU: minutes of passes nobody reads), and they held their queue room meanwhile."""
    gate = threading.Event()
    passes: list[list[int]] = []  # the lengths in each pass the scorer ran

    def scorer(batch: Sequence[EncodedPair]) -> np.ndarray:
        passes.append([pair.n_tokens for pair in batch])
        gate.wait(HANG_S)
        if any(pair.n_tokens == 5 for pair in batch):
            raise RuntimeError("index out of range in self")
        return np.zeros(len(batch), dtype=np.float32)

    metrics = Metrics(CollectorRegistry())
    batcher = Batcher(scorer, batch_tokens=10, max_queue=100, metrics=metrics)  # one pair per batch
    try:
        # The shortest pair (5 tokens) breaks the model; batches go shortest first, so it runs first.
        job = batcher.submit([EncodedPair(np.arange(5))] + [EncodedPair(np.arange(10)) for _ in range(6)])
        wait_until(lambda: len(passes) == 1)
        gate.set()
        assert job.done.wait(HANG_S) and isinstance(job.error, ScoringError)
        wait_until(lambda: batcher.queued_pairs == 0)
        assert metrics.registry.get_sample_value("reranker_queue_pairs") == 0
        # The batches already handed to the device thread are dropped unrun, and nothing counts as cancelled.
        assert batcher.submit([EncodedPair(np.arange(10))]).done.wait(HANG_S)
        assert passes == [[5], [10]]
        assert metrics.registry.get_sample_value("reranker_cancelled_pairs_total") == 0
    finally:
        gate.set()
        batcher.close()


@pytest.mark.parametrize("cut_ins", [True, False])
def test_a_small_request_behind_a_bulk_one_cuts_in_between_its_batches(cut_ins: bool) -> None:
    """A 2-pair request queued while a 40-pair one is being scored (one pair a batch): it cuts in after the round's
    next batch, its pairs in passes 4 and 6, where without cut-ins it waited for all of the bulk one (passes 41-42).
    Each job gets its own scores, and the bulk one all of its pairs."""
    passes: list[list[int]] = []
    gate = threading.Event()

    def scorer(batch: Sequence[EncodedPair]) -> np.ndarray:
        passes.append([pair.n_tokens for pair in batch])
        gate.wait(HANG_S)
        return np.array([pair.n_tokens for pair in batch], dtype=np.float32)

    batcher = Batcher(scorer, batch_tokens=10, max_queue=100, metrics=Metrics(CollectorRegistry()),
                      cut_ins=cut_ins)
    try:
        bulk = batcher.submit([EncodedPair(np.arange(10)) for _ in range(40)])
        # Pass 1 at the gate, batch 2 in the hand-over queue, batch 3 waiting to be handed over.
        wait_until(lambda: len(passes) == 1 and bulk.sent[2])
        small = batcher.submit([EncodedPair(np.arange(9)) for _ in range(2)])  # 9 tokens: its passes are told apart
        gate.set()
        assert bulk.done.wait(HANG_S) and small.done.wait(HANG_S)
        assert bulk.error is None and small.error is None
        assert bulk.scores == [10.0] * 40 and small.scores == [9.0] * 2
        small_passes = [number for number, lengths in enumerate(passes, 1) if lengths == [9]]
        assert small_passes == ([4, 6] if cut_ins else [41, 42])
        assert len(passes) == 42
    finally:
        gate.set()
        batcher.close()


def test_cut_ins_take_the_smallest_requests_first_and_only_those_smaller_than_the_rest_of_the_round() -> None:
    batcher = Batcher(lambda batch: np.zeros(len(batch), dtype=np.float32), batch_tokens=40, max_queue=100,
                      metrics=Metrics(CollectorRegistry()))
    with batcher._cond:  # queued together, before the collator looks
        jobs = {name: batcher.submit([EncodedPair(np.arange(length)) for length in lengths])
                for name, lengths in (("a", [10] * 6), ("b", [12, 10, 11]), ("c", [10]), ("d", [30]))}
        names = {job: name for name, job in jobs.items()}
        # Round left: 5 pairs, so a (6 pairs) waits. The smallest first (c, d: one pair each), each one's shortest
        # pairs first, while the batch's padded size (rows x longest) stays within 40 tokens; a request whose next
        # pair does not fit (d's 30 tokens would pad it to 2 x 30) leaves room to the next one (b).
        taken = [[(names[item.job], item.n_tokens) for item in batcher._rounds.take_cut_in(5)] for _ in range(3)]
        assert taken == [[("c", 10), ("b", 10), ("b", 11)],
                         [("b", 12)],  # b and d have one pair left each: b is the older; d's 30 would pad to 60
                         [("d", 30)]]
        assert batcher._rounds.take_cut_in(5) == [] and list(batcher._rounds.pending) == [jobs["a"]]
        assert batcher._rounds.take_cut_in(7) != []  # smaller than a round of 7 pairs: a too
        for job in jobs.values():
            batcher.cancel(job)
    batcher.close()


def test_a_cut_in_batch_is_topped_up_with_pairs_of_the_round() -> None:
    """A one-pair request cutting in would leave its pass three quarters empty: pairs of the round fill it."""
    passes: list[list[int]] = []  # the tag of each pair in each pass
    gate = threading.Event()

    def scorer(batch: Sequence[EncodedPair]) -> np.ndarray:
        passes.append([int(pair.input_ids[0]) for pair in batch])
        gate.wait(HANG_S)
        return np.array([pair.input_ids[0] for pair in batch], dtype=np.float32)

    batcher = Batcher(scorer, batch_tokens=40, max_queue=100, metrics=Metrics(CollectorRegistry()))
    try:
        bulk = batcher.submit([EncodedPair(np.full(10, 1)) for _ in range(20)])  # four pairs a batch
        wait_until(lambda: len(passes) == 1 and bulk.sent[8])
        small = batcher.submit([EncodedPair(np.full(10, 2))])
        gate.set()
        assert bulk.done.wait(HANG_S) and small.done.wait(HANG_S)
        assert bulk.scores == [1.0] * 20 and small.scores == [2.0]
        assert passes == [[1] * 4] * 3 + [[2, 1, 1, 1], [1] * 4, [1]]
    finally:
        gate.set()
        batcher.close()


def test_the_top_up_takes_the_rounds_longest_pairs_that_cost_no_more_padding() -> None:
    """The round's shortest pairs, padded to the cut-in's longest, would be mostly padding; those no longer than it,
    the longest first, fill its rows instead, and the rest of the round keeps its order."""
    batcher = Batcher(lambda batch: np.zeros(len(batch), dtype=np.float32), batch_tokens=80, max_queue=100,
                      metrics=Metrics(CollectorRegistry()))
    job = Job([EncodedPair(np.arange(n)) for n in (20, 3, 5, 8, 15, 18, 25)])
    batch, *others = [Item(job, i) for i in range(7)]
    left = deque(others)
    with batcher._cond:
        topped = batcher._rounds.top_up([batch], left)
    assert [item.n_tokens for item in topped] == [20, 18, 15, 8]  # four rows of 20: the budget
    assert [item.n_tokens for item in left] == [3, 5, 25]
    batcher.close()


def test_a_round_leaves_a_small_request_out_once_to_cut_in_unless_they_would_share_passes() -> None:
    batcher = Batcher(lambda batch: np.zeros(len(batch), dtype=np.float32), batch_tokens=40, max_queue=100,
                      metrics=Metrics(CollectorRegistry()))

    def pairs(n: int) -> list[EncodedPair]:
        return [EncodedPair(np.arange(10)) for _ in range(n)]

    with batcher._cond:  # the collator does not look meanwhile
        bulk, small = batcher.submit(pairs(20)), batcher.submit(pairs(2))
        taken = batcher._rounds.take_round()  # bulk spans five batches: small waits to cut in after the first
        assert {item.job for item in taken} == {bulk} and list(batcher._rounds.pending) == [small] and small.left_out
        later = batcher.submit(pairs(30))
        taken = batcher._rounds.take_round()  # small was left out once: it goes into this round, however small
        assert {item.job for item in taken} == {small, later} and not batcher._rounds.pending
        few, one = batcher.submit(pairs(6)), batcher.submit(pairs(1))
        taken = batcher._rounds.take_round()  # 70 tokens, two batches of 40: they share passes, so both are taken
        assert {item.job for item in taken} == {few, one}
        for job in (bulk, small, later, few, one):
            batcher.cancel(job)
    batcher.close()


@pytest.mark.parametrize("cut_ins", [True, False])
def test_a_request_left_out_of_a_round_cuts_in_even_past_what_is_left_of_it(cut_ins: bool) -> None:
    """S (4 pairs) is under half of L (10 pairs, more than two batches' worth of tokens), so the round leaves it out to
    cut in. L's first batch takes 8 of its 10 pairs: 2 are left, fewer than S's 4, and S used to wait for the next
    round, behind N, a request that arrived meanwhile (done at pass 17, against 5 without cut-ins). A request left out
    cuts in whatever is left of the round, and goes first in the next (found by review, 2026-12-04)."""
    passes: list[list[int]] = []  # the tag of each pair in each pass
    gate, first = threading.Event(), threading.Event()

    def scorer(batch: Sequence[EncodedPair]) -> np.ndarray:
        passes.append([int(pair.input_ids[0]) for pair in batch])
        first.set()
        gate.wait(HANG_S)
        return np.zeros(len(batch), dtype=np.float32)

    def pairs(*lengths: int, tag: int) -> list[EncodedPair]:
        return [EncodedPair(np.full(length, tag)) for length in lengths]

    batcher = Batcher(scorer, batch_tokens=40, max_queue=1000, metrics=Metrics(CollectorRegistry()), cut_ins=cut_ins)
    try:
        with batcher._cond:  # queued together
            large = batcher.submit(pairs(*[5] * 8, 40, 40, tag=1))
            small = batcher.submit(pairs(39, 39, 39, 39, tag=2))
        assert first.wait(HANG_S)
        later = batcher.submit(pairs(*[30] * 10, tag=3))  # arrives while the round runs
        gate.set()
        for job in (large, small, later):
            assert job.done.wait(HANG_S) and job.error is None
        last_small_pass = max(number for number, tags in enumerate(passes, 1) if 2 in tags)
        # Without cut-ins, sorted: L's short pairs, S's four (one a pass: 39 tokens), L's two. With them: S cuts in
        # twice between L's batches, and its last two go first in the next round, before N's.
        assert last_small_pass == (7 if cut_ins else 5), passes
    finally:
        gate.set()
        batcher.close()


def test_a_stream_of_small_requests_leaves_the_round_every_other_pass() -> None:
    """Cut-ins alternate with the round's batches: eight one-pair requests queued behind a ten-pair one take turns
    with it, so the large request is not held back by however many small ones arrive."""
    passes: list[int] = []
    gate = threading.Event()

    def scorer(batch: Sequence[EncodedPair]) -> np.ndarray:
        passes.extend(pair.n_tokens for pair in batch)
        gate.wait(HANG_S)
        return np.zeros(len(batch), dtype=np.float32)

    batcher = Batcher(scorer, batch_tokens=10, max_queue=100, metrics=Metrics(CollectorRegistry()))
    try:
        bulk = batcher.submit([EncodedPair(np.arange(10)) for _ in range(10)])
        wait_until(lambda: len(passes) == 1 and bulk.sent[2])
        smalls = [batcher.submit([EncodedPair(np.arange(9))]) for _ in range(8)]
        gate.set()
        assert bulk.done.wait(HANG_S) and all(job.done.wait(HANG_S) for job in smalls)
        # Passes 1-3 were the round's already; then one small, one of the round, in turn, while the small ones are
        # smaller than what is left of the round (one pair is not smaller than one): the last two, in the next round.
        assert passes == [10, 10, 10] + [9, 10] * 6 + [10] + [9, 9], str(passes)
    finally:
        gate.set()
        batcher.close()


def test_a_retried_half_whose_requests_failed_meanwhile_gets_no_pass() -> None:
    """Bisecting a failed batch: once the bad pair failed its request, a half holding only that request's pairs
    is dropped, not run; the other request's pair in the first half still scores."""
    passes: list[list[int]] = []

    def scorer(batch: Sequence[EncodedPair]) -> np.ndarray:
        passes.append([pair.n_tokens for pair in batch])
        if any(pair.n_tokens == 5 for pair in batch):
            raise RuntimeError("index out of range in self")
        return np.ones(len(batch), dtype=np.float32)

    metrics = Metrics(CollectorRegistry())
    batcher = Batcher(scorer, batch_tokens=10**6, max_queue=100, metrics=metrics)
    with batcher._cond:  # one batch, sorted by length: bad 5, good 6, bad's 7 and 8
        bad = batcher.submit([EncodedPair(np.arange(n)) for n in (5, 7, 8)])
        good = batcher.submit([EncodedPair(np.arange(6))])
    assert bad.done.wait(HANG_S) and good.done.wait(HANG_S)
    batcher.close()
    assert isinstance(bad.error, ScoringError) and good.error is None and good.scores == [1.0]
    assert passes == [[5, 6, 7, 8], [5, 6], [5], [6]]  # no pass of [7, 8]
    assert batcher.queued_pairs == 0 and metrics.registry.get_sample_value("reranker_cancelled_pairs_total") == 0


def test_the_failed_pass_is_freed_before_the_retry(bert_model: ScoringModel) -> None:
    import weakref

    refs: list[weakref.ref[torch.Tensor]] = []

    def scorer(batch: Sequence[EncodedPair]) -> np.ndarray:
        if len(batch) > 1:
            activations = torch.zeros(1024)
            refs.append(weakref.ref(activations))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        assert all(ref() is None for ref in refs), "the failed pass is still referenced during the retry"
        return bert_model.score(batch)

    with Reranker(bert_model, model_settings(Path(bert_model.model_id), cache_size=0), score_fn=scorer) as r:
        assert len(r.rerank("q", ["a", "b", "c", "d"])) == 4
    assert refs


class RecordingScorer:
    """Logs the order of collate/launch/wait and which thread ran each. Given the device thread's hand-over
    queue and the number of batches to come, each launch but the last returns only once the next batch waits
    in that queue: a device slower than the collator, as a GPU pass on real sizes is not, whatever the CPU."""

    def __init__(self, model: ScoringModel, inbox: queue.Queue[Any] | None = None, batches: int = 0) -> None:
        self.model = model
        self.inbox = inbox
        self.batches = batches
        self.events: list[str] = []
        self.threads: dict[str, set[str]] = {"collate": set(), "launch": set(), "wait": set()}
        self.launches = 0

    def collate(self, batch: Sequence[EncodedPair], *, exact: bool = False) -> tuple[int, Sequence[EncodedPair]]:
        self.threads["collate"].add(threading.current_thread().name)
        return len(batch), batch

    def launch(self, features: tuple[int, Sequence[EncodedPair]]) -> RecordingScorer.Pending:
        self.threads["launch"].add(threading.current_thread().name)
        self.launches += 1
        number = self.launches
        self.events.append(f"launch {number}")
        inbox = self.inbox
        if inbox is not None and number < self.batches:
            wait_until(lambda: inbox.qsize() > 0)
        return RecordingScorer.Pending(self, number, self.model.score(features[1]))

    class Pending:
        def __init__(self, owner: RecordingScorer, number: int, scores: np.ndarray) -> None:
            self.owner, self.number, self.scores = owner, number, scores

        ran = False  # as on a GPU: launch returns before the pass has run
        seconds: float | None = None  # as on a GPU: the worker's clock times the pass

        def wait(self) -> np.ndarray:
            self.owner.threads["wait"].add(threading.current_thread().name)
            self.owner.events.append(f"wait {self.number}")
            return self.scores


def test_the_next_batch_is_launched_before_the_last_one_is_waited_for(bert_model: ScoringModel,
                                                                      documents: list[str]) -> None:
    settings = model_settings(Path(bert_model.model_id), cache_size=0, batch_tokens=1024)
    with Reranker(bert_model, settings) as plain:
        expected = {r.index: r.score for r in plain.rerank("json", documents[:60], raw_scores=True)}
    counting = RecordingScorer(bert_model)
    with Reranker(bert_model, settings, score_fn=counting) as reranker:  # type: ignore[arg-type]
        reranker.rerank("json", documents[:60], raw_scores=True)
    n = counting.launches
    assert n >= 3, "the workload should need several batches"
    scorer = RecordingScorer(bert_model, batches=n)
    with Reranker(bert_model, settings, score_fn=scorer) as reranker:  # type: ignore[arg-type]
        scorer.inbox = reranker._batcher._ready
        got = {r.index: r.score for r in reranker.rerank("json", documents[:60], raw_scores=True)}
    assert got == pytest.approx(expected, abs=1e-6)
    assert scorer.launches == n
    # Batch k+1 is on the device before batch k's scores are read: one batch always in flight.
    for k in range(1, n):
        assert scorer.events.index(f"launch {k + 1}") < scorer.events.index(f"wait {k}")
    assert scorer.threads["launch"] == scorer.threads["wait"] == {"reranker-device"}
    assert scorer.threads["collate"] == {"reranker-collator"}


def test_close_finishes_a_queue_deeper_than_the_pipeline() -> None:
    """More batches queued than the worker holds (one collated, one on the device): close() scores them all,
    and the batcher's lock stays free for callers meanwhile."""

    gate = threading.Event()

    def slow(batch: Sequence[EncodedPair]) -> np.ndarray:
        gate.wait(HANG_S)
        return np.arange(len(batch), dtype=np.float32)

    batcher = Batcher(slow, batch_tokens=10, max_queue=1000, metrics=Metrics(CollectorRegistry()))
    job = batcher.submit([EncodedPair(np.arange(10)) for _ in range(6)])  # one pair per batch: six passes
    closer = threading.Thread(target=batcher.close, kwargs={"timeout": HANG_S})
    closer.start()
    wait_until(lambda: batcher.closed)
    # close() is waiting for six passes that cannot start yet; its lock is free for callers meanwhile (to
    # cancel or be refused). A close() that held it would only let go after the gate, and this times out first.
    assert batcher._cond.acquire(timeout=HANG_S / 2)
    batcher._cond.release()
    assert not job.done.is_set() and closer.is_alive()
    gate.set()
    assert job.done.wait(HANG_S), "close() left queued work unscored"
    assert job.error is None and job.scores == [0.0] * 6
    closer.join(HANG_S)
    assert not closer.is_alive() and not batcher.alive


def test_on_the_cpu_scores_are_delivered_when_their_own_pass_ends() -> None:
    """A pass that runs inside launch is not held back until the next pass finishes."""
    gate = threading.Event()
    passes = {"n": 0}

    def scorer(batch: Sequence[EncodedPair]) -> np.ndarray:
        passes["n"] += 1
        if passes["n"] == 1:  # the second batch is ready when the first pass ends: nothing to wait for first
            wait_until(lambda: batcher._ready.qsize() > 0)
        if passes["n"] == 2:
            gate.wait(HANG_S)  # the second pass holds the device until the first caller has its scores
        return np.zeros(len(batch), dtype=np.float32)

    batcher = Batcher(scorer, batch_tokens=10, max_queue=100, metrics=Metrics(CollectorRegistry()))
    with batcher._cond:  # one round, two batches of one pair each
        first = batcher.submit([EncodedPair(np.arange(10))])
        second = batcher.submit([EncodedPair(np.arange(10))])
    try:  # bounded below the gate's own timeout: a first request held back by the second pass times out here
        assert first.done.wait(HANG_S / 2), "the first request waited for the second pass"
    finally:
        gate.set()
    assert second.done.wait(HANG_S) and first.error is None and second.error is None
    batcher.close()


def test_a_cancelled_jobs_pairs_in_the_current_round_give_their_room_back_at_once() -> None:
    """Pairs taken into a round but in no batch yet stayed queued until the collator reached their batch (the rest
    of the round's passes later), and new requests got 429 for the room of a caller that had left."""
    gate = threading.Event()
    passes: list[int] = []

    def scorer(batch: Sequence[EncodedPair]) -> np.ndarray:
        gate.wait(HANG_S)
        passes.append(len(batch))
        return np.zeros(len(batch), dtype=np.float32)

    metrics = Metrics(CollectorRegistry())
    # One pair per batch; no cut-ins, so that all eight pairs stay in the round.
    batcher = Batcher(scorer, batch_tokens=10, max_queue=9, metrics=metrics, cut_ins=False)
    try:
        holder = batcher.submit([EncodedPair(np.arange(10))])  # on the device, at the gate
        wait_until(lambda: batcher._ready.qsize() == 0 and holder.started is not None)
        with batcher._cond:  # one round of eight batches
            stays = batcher.submit([EncodedPair(np.arange(10)) for _ in range(3)])
            leaves = batcher.submit([EncodedPair(np.arange(10)) for _ in range(5)])
        wait_until(lambda: stays.sent[1])  # its second batch waits on the full hand-over queue: the rest do not
        assert batcher.queued_pairs == 9
        batcher.cancel(leaves)
        assert isinstance(leaves.error, CancelledError) and leaves.done.is_set()
        assert batcher.queued_pairs == 4 and metrics.registry.get_sample_value("reranker_queue_pairs") == 4
        assert batcher.submit([EncodedPair(np.arange(10)) for _ in range(5)]).remaining == 5  # room for 5 again
        gate.set()
        assert stays.done.wait(HANG_S) and stays.error is None
        assert metrics.registry.get_sample_value("reranker_cancelled_pairs_total") == 5
    finally:
        gate.set()
        batcher.close()
    assert len(passes) == 1 + 3 + 5 and batcher.queued_pairs == 0  # the holder, the three, the later five


def test_a_cancelled_job_stays_cancelled_when_a_pass_of_its_pairs_fails_while_it_is_given_up(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """_give_up marked the job given up, let go of the lock to drop its pairs, and only then set its error: a pass
    of its pairs failing in between put ScoringError in its place, and a caller that had left was answered 500."""
    metrics = Metrics(CollectorRegistry())
    batcher = Batcher(lambda batch: np.zeros(len(batch), dtype=np.float32), batch_tokens=100, max_queue=10,
                      metrics=metrics)
    try:
        with batcher._cond:  # the collator takes nothing yet
            job = batcher.submit([EncodedPair(np.arange(10)), EncodedPair(np.arange(10))])
            job.sent[0] = True  # one pair on the device
        deliver = batcher._deliver

        def failing_pass_first(items: Sequence[Any], outcome: Any, ran: Any) -> None:
            if isinstance(outcome, CancelledError):  # the thread switch at the worst moment
                deliver([Item(job, 0)], ScoringError("the model failed to score this request"), None)
            deliver(items, outcome, ran)

        monkeypatch.setattr(batcher, "_deliver", failing_pass_first)
        batcher.cancel(job)
        assert isinstance(job.error, CancelledError) and job.done.is_set()
    finally:
        monkeypatch.undo()
        batcher.close()


def test_a_lone_unpadded_pair_out_of_memory_is_not_run_again(bert_model: ScoringModel, metrics: Metrics) -> None:
    """Retrying a lone pair alone only pays when buckets padded it: here its shape was its own already."""
    device = FlakyDevice(bert_model, max_pair_tokens=1)
    with Reranker(bert_model, model_settings(Path(bert_model.model_id)), metrics=metrics, score_fn=device) as r:
        with pytest.raises(ScoringError, match="out of memory scoring one document"):
            r.rerank("q", ["a lone document"])
    assert device.calls == 1 and metrics.registry.get_sample_value("reranker_oom_retries_total") == 0


def test_a_pass_the_backend_timed_is_booked_at_its_own_time(bert_model: ScoringModel, documents: list[str]) -> None:
    """Passes side by side (OpenVINO's two streams) end close together, so the worker's clock would book the
    second at almost nothing: the time the backend measured goes to the histogram and the span, and each pass is
    that long in the request's figure."""
    class Timed(RecordingScorer):
        class Pending(RecordingScorer.Pending):
            seconds = 0.125

        def launch(self, features: tuple[int, Sequence[EncodedPair]]) -> RecordingScorer.Pending:
            self.launches += 1
            return Timed.Pending(self, self.launches, self.model.score(features[1]))

    metrics = Metrics(CollectorRegistry())
    scorer = Timed(bert_model)
    settings = model_settings(Path(bert_model.model_id), cache_size=0, batch_tokens=1024)
    with Reranker(bert_model, settings, metrics=metrics, score_fn=scorer) as reranker:  # type: ignore[arg-type]
        result = reranker.rerank_detailed("json", documents[:60])
    booked = metrics.registry.get_sample_value("reranker_inference_duration_seconds_sum")
    assert scorer.launches >= 3 and booked == pytest.approx(0.125 * scorer.launches)
    assert result.stats.inference_seconds >= 0.125


class SideBySide:
    """A device of several streams: each pass runs `pass_s` from its launch whatever else runs, and the backend
    times it (as OpenVINO does). The first launch returns once the next batch waits, so the two run at once."""

    def __init__(self, pass_s: float) -> None:
        self.pass_s = pass_s
        self.inbox: queue.Queue[Any] = queue.Queue()  # the batcher's hand-over queue, once there is a batcher
        self.launches = 0

    def collate(self, batch: Sequence[EncodedPair], *, exact: bool = False) -> Sequence[EncodedPair]:
        return batch

    def launch(self, batch: Sequence[EncodedPair]) -> SideBySide.Running:
        self.launches += 1
        if self.launches == 1:
            wait_until(lambda: self.inbox.qsize() > 0)
        return SideBySide.Running(time.perf_counter(), self.pass_s, len(batch))

    class Running:
        ran = False

        def __init__(self, started: float, pass_s: float, rows: int) -> None:
            self.started, self.pass_s, self.rows = started, pass_s, rows
            self.seconds: float | None = None

        def wait(self) -> np.ndarray:
            time.sleep(max(0.0, self.started + self.pass_s - time.perf_counter()))
            self.seconds = time.perf_counter() - self.started
            return np.zeros(self.rows, dtype=np.float32)


def test_a_requests_passes_side_by_side_count_once_in_its_inference_time() -> None:
    """Two of one request's passes on two streams fill the same wall time: its inference time is the time during
    which any of them ran (summed, they made twice a pass), never more than the request took."""
    scorer = SideBySide(pass_s=0.5)
    batcher = Batcher(scorer, batch_tokens=10, max_queue=100, metrics=Metrics(CollectorRegistry()))
    scorer.inbox = batcher._ready
    submitted = time.perf_counter()
    job = batcher.submit([EncodedPair(np.arange(10)) for _ in range(2)])  # one pair per batch: two passes
    try:
        assert job.done.wait(HANG_S) and job.error is None
        took = time.perf_counter() - submitted
    finally:
        batcher.close()
    assert scorer.launches == 2
    assert 0.5 <= job.inference_seconds <= took


def test_a_cancel_signal_calls_its_watchers_once_each_and_never_after_they_stop_watching() -> None:
    signal = CancelSignal()
    calls: list[str] = []
    signal.watch(lambda: calls.append("first"))
    stop_second = signal.watch(lambda: calls.append("second"))
    signal.watch(lambda: calls.append(str(1 / 0)))  # a failing watcher is logged; the others and the setter go on
    signal.watch(lambda: calls.append("third"))
    stop_second()
    signal.set()
    signal.set()
    assert calls == ["first", "third"] and signal.is_set()
    signal.watch(lambda: calls.append("late"))  # already set: called at once
    assert calls == ["first", "third", "late"]


def test_a_waiting_job_is_cancelled_by_the_signals_setter_not_by_a_later_look() -> None:
    """The waiting thread looked at a plain Event every 50 ms: 40 waiting requests kept 4% of a core busy, and a
    leaving caller's pairs stayed queued until the next look. A CancelSignal ends the job inside its set()."""
    gate = threading.Event()

    def scorer(batch: Sequence[EncodedPair]) -> np.ndarray:
        gate.wait(HANG_S)
        return np.zeros(len(batch), dtype=np.float32)

    metrics = Metrics(CollectorRegistry())
    batcher = Batcher(scorer, batch_tokens=10, max_queue=20, metrics=metrics)  # one pair per batch
    try:
        holder = batcher.submit([EncodedPair(np.arange(10))])  # on the device, at the gate
        wait_until(lambda: holder.started is not None)
        leaving = batcher.submit([EncodedPair(np.arange(10)) for _ in range(5)])
        signal = CancelSignal()
        with ThreadPoolExecutor(1) as pool:
            try:
                waiter = pool.submit(batcher.wait, leaving, signal)
                wait_until(lambda: bool(signal._watchers), timeout=10)  # the waiter watches
                signal.set()
                assert leaving.done.is_set() and isinstance(leaving.error, CancelledError)
                waiter.result(HANG_S)
            finally:
                signal.set()
                gate.set()
        assert not signal._watchers
        finished = CancelSignal()
        batcher.wait(holder, finished)  # a job that ends unwatches its signal
        assert holder.error is None and not finished._watchers
        assert (metrics.registry.get_sample_value("reranker_cancelled_pairs_total") or 0) >= 3  # no batch took them
    finally:
        gate.set()
        batcher.close()
