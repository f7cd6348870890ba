"""deploy/ray's ingress without a cluster, over a fake DeploymentHandle: which failures of a model replica are retried
on another, Serve's backpressure answered as one process's overload, /readyz from the controller's view of the
replicas (not a call queued behind scoring work), and RERANKER_UI_AUTH's guard on /api/predict."""

from __future__ import annotations

import pytest

pytest.importorskip("ray.serve", reason="needs requirements-ray.txt")

import asyncio  # noqa: E402
import concurrent.futures  # noqa: E402
import logging  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from typing import Any, cast  # noqa: E402

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402
from ray.exceptions import ActorDiedError  # noqa: E402
from ray.serve._private.common import DeploymentID  # noqa: E402
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError  # noqa: E402
from ray.serve.handle import DeploymentHandle  # noqa: E402
from starlette.requests import Request  # noqa: E402

from deploy.ray import model, remote  # noqa: E402
from deploy.ray.ingress import ingress_app  # noqa: E402
from deploy.ray.model import Reply  # noqa: E402
from deploy.ray.panel import ReplicaView  # noqa: E402
from deploy.ray.remote import RemoteBackend  # noqa: E402
from reranker import Reranker, RerankResult, Settings  # noqa: E402
from reranker.metrics import Metrics  # noqa: E402
from reranker.model import ScoringModel  # noqa: E402
from reranker.results import RankedDocument  # noqa: E402
from reranker.tokens import EncodedPair  # noqa: E402
from reranker.tracing import Tracing  # noqa: E402
from tests.conftest import model_settings  # noqa: E402
from tests.servers import HANG_S  # noqa: E402
from web.errors import HttpError  # noqa: E402
from web.history import RequestHistory  # noqa: E402
from web.lifecycle import Lifecycle  # noqa: E402
from web.service import RerankCall, RerankService  # noqa: E402
from web.snapshots import metrics_snapshot  # noqa: E402

FAULT = Reply("faulty", error=(503, "not_ready", "the scoring device failed; the service is restarting, retry shortly"))
RESULT = RerankResult([RankedDocument(index=0, score=0.5, document="a")])
CALL = RerankCall(query="q", documents=["a"])


class FakeResponse:
    """A DeploymentResponse that answers `outcome` (or raises it)."""

    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome

    def __await__(self) -> Any:
        return self._answer().__await__()

    async def _answer(self) -> Any:
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def cancel(self) -> None:
        pass


class FakeHandle:
    """Answers the rerank calls with `outcomes` in turn, the last one for ever; info with a model id."""

    app_name = "reranker"
    deployment_name = "RerankModel"

    def __init__(self, *outcomes: Reply | BaseException) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0
        self.rerank = SimpleNamespace(remote=self._rerank)
        self.info = SimpleNamespace(remote=lambda: FakeResponse({"model": "tiny"}))

    def _rerank(self, *args: Any) -> FakeResponse:
        self.calls += 1
        return FakeResponse(self.outcomes[min(self.calls, len(self.outcomes)) - 1])


def backend(handle: FakeHandle, environ: dict[str, str] | None = None, **kwargs: Any) -> RemoteBackend:
    kwargs.setdefault("claim", lambda call_id: True)  # no Ray key-value store here: this process counts
    kwargs.setdefault("views", list)  # ...and no replica published a view: /info is a call
    return RemoteBackend(cast(DeploymentHandle, handle), Settings.from_env(environ or {}), **kwargs)


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)


def test_a_replica_whose_device_failed_is_retried_on_another() -> None:
    """A failed replica answers every call at once with 503 not_ready: nothing was scored, so another replica
    can answer it (a healthy one was free while the audit's clients got 64 of these in 3.5 s)."""
    handle = FakeHandle(FAULT, FAULT, Reply("healthy", result=RESULT))
    assert asyncio.run(backend(handle).rerank(None, "/v1/rerank", CALL)) == RESULT
    assert handle.calls == 3
    died = FakeHandle(ActorDiedError(), FAULT, Reply("healthy", result=RESULT))  # the two kinds, mixed
    assert asyncio.run(backend(died).rerank(None, "/v1/rerank", CALL)) == RESULT


def test_a_model_deployment_that_failed_to_deploy_is_a_503_not_a_500() -> None:
    """Serve's router raises DeploymentUnavailableError while the model deployment has failed for good (a model
    that cannot load) or is being deleted: it fell through to a 500 internal_error while /readyz said 503."""
    gone = DeploymentUnavailableError(DeploymentID(name="RerankModel", app_name="reranker"))
    handle = FakeHandle(gone)
    with pytest.raises(HttpError) as failed:
        asyncio.run(backend(handle, tries=3).rerank(None, "/v1/rerank", CALL))
    assert (failed.value.status, failed.value.type, failed.value.counted) == (503, "not_ready", False)
    assert "failed to deploy" in failed.value.message and handle.calls == 1  # lasting: not retried
    handle.info = SimpleNamespace(remote=lambda: FakeResponse(gone))
    with pytest.raises(HttpError) as info:
        asyncio.run(backend(handle).info())
    assert info.value.status == 503


def test_a_model_replica_refuses_a_burst_past_its_queue_at_once_not_after_a_worker_thread(
        bert_model: ScoringModel, bert_dir: Path) -> None:
    """As one process does (web/backend.py): the replica took its queue room on anyio's worker threads, 40 for all
    its calls, so with a GPU config's max_ongoing_requests of 64 the calls past 40 waited for a thread, uncounted,
    and got no 429 for the ingress to try another replica with; and one whose deadline passed meanwhile held its
    room until a thread found it expired."""
    from deploy.ray.model import RerankModel

    release = threading.Event()

    def scorer(batch: Sequence[EncodedPair]) -> np.ndarray:
        release.wait(HANG_S)
        return bert_model.score(batch)

    settings = model_settings(bert_dir, max_queue=50, cache_size=0)
    with Reranker(bert_model, settings, metrics=Metrics(CollectorRegistry()), score_fn=scorer) as reranker:
        replica = RerankModel.__new__(RerankModel)  # the methods under test, without Serve's replica around them
        replica.reranker, replica.service, replica.replica, replica.app = reranker, RerankService(reranker), "r1", None

        async def burst() -> list[Reply]:
            calls = [asyncio.ensure_future(replica.rerank("/v1/rerank", RerankCall("q", [f"doc {i}"]), f"id{i}", {}))
                     for i in range(100)]
            await asyncio.wait(calls, timeout=HANG_S / 4, return_when=asyncio.FIRST_COMPLETED)
            await asyncio.sleep(0.5)  # the rest of the refusals, answered on the event loop
            early = [call.result() for call in calls if call.done()]
            waiting = [call for call in calls if not call.done()]
            assert reranker.queued_pairs + reranker._batcher._held_pairs == 50  # the admitted hold their room
            release.set()
            return early + [await call for call in waiting]

        try:
            replies = asyncio.run(burst())
        finally:
            release.set()
            del replica.reranker  # closed by the `with`; __del__ closes only what a replica's __init__ made
        assert len(replies) == 100
        refused = [reply.error[:2] for reply in replies if reply.error is not None]
        assert refused == [(429, "overloaded")] * 50
        assert sum(reply.result is not None for reply in replies) == 50 and reranker.queued_pairs == 0


def test_a_model_replica_books_the_latency_from_the_requests_arrival_at_the_ingress(
        bert_model: ScoringModel, bert_dir: Path) -> None:
    """The replica counted from the call: the wait at the ingress for a free replica was in no metric."""
    from deploy.ray.model import RerankModel

    metrics = Metrics(CollectorRegistry())
    with Reranker(bert_model, model_settings(bert_dir), metrics=metrics) as reranker:
        replica = RerankModel.__new__(RerankModel)  # the method under test, without Serve's replica around it
        replica.reranker, replica.service, replica.replica, replica.app = reranker, RerankService(reranker), "r1", None
        carrier = {model.ARRIVED: repr(time.time() - 2.0), model.AGE: "1.5"}  # 2 s ago; sent after 1.5 s
        try:
            reply = asyncio.run(replica.rerank("/v1/rerank", CALL, "id1", carrier))
        finally:
            del replica.reranker  # closed by the `with`; __del__ closes only what a replica's __init__ made
    assert reply.result is not None
    booked = metrics.registry.get_sample_value("reranker_request_duration_seconds_sum", {"route": "/v1/rerank"})
    assert booked is not None and 2.0 <= booked < 2.0 + HANG_S


def test_the_model_id_comes_with_the_answers() -> None:
    """/readyz names the model: asking a replica for it queued behind scoring work, as readiness did."""
    remote_backend = backend(FakeHandle(Reply("r", result=RESULT, model="their-model")))

    async def ask() -> str:
        await remote_backend.rerank(None, "/v1/rerank", CALL)
        return await remote_backend.model_id()

    assert asyncio.run(ask()) == "their-model"  # not FakeHandle.info's


def test_retries_are_bounded_by_tries_and_the_deadline() -> None:
    handle = FakeHandle(FAULT)
    with pytest.raises(HttpError) as failed:
        asyncio.run(backend(handle, tries=3).rerank(None, "/v1/rerank", CALL))
    assert handle.calls == 3
    assert (failed.value.status, failed.value.type, failed.value.counted) == (503, "not_ready", True)
    late = FakeHandle(FAULT)  # no time left for the wait before another try
    with pytest.raises(HttpError):
        asyncio.run(backend(late, tries=3, deadline_s=0.005).rerank(None, "/v1/rerank", CALL))
    assert late.calls == 1


def test_a_replica_whose_queue_is_full_is_tried_once_more() -> None:
    """Serve balances requests, not pairs: one replica can hold a few huge requests while another is idle."""
    full = Reply("busy", error=(429, "overloaded", "the queue is full (RERANKER_MAX_QUEUE=20000 pairs)"))
    handle = FakeHandle(full, Reply("idle", result=RESULT))
    assert asyncio.run(backend(handle).rerank(None, "/v1/rerank", CALL)) == RESULT
    everywhere = FakeHandle(full)  # every replica full: the 429, after one more try only
    with pytest.raises(HttpError) as failed:
        asyncio.run(backend(everywhere, tries=3).rerank(None, "/v1/rerank", CALL))
    assert (failed.value.status, failed.value.counted, everywhere.calls) == (429, True, 2)

def test_a_replicas_answer_to_a_bad_request_is_not_retried() -> None:
    handle = FakeHandle(Reply("r", error=(400, "invalid_request", "query must not be empty")))
    with pytest.raises(HttpError) as failed:
        asyncio.run(backend(handle).rerank(None, "/v1/rerank", CALL))
    assert failed.value.status == 400 and handle.calls == 1


def test_readiness_is_the_controllers_count_of_running_replicas_asked_once_a_second() -> None:
    """Not a call to a replica: under load that queued behind max_ongoing_requests of scoring and timed out."""
    running = iter([0, 1, 1])
    asked: list[int] = []

    def count() -> int:
        asked.append(1)
        return next(running)

    async def probe() -> None:
        ready = backend(FakeHandle(AssertionError("readiness asked a replica")), running=count)
        refusal = await ready.readiness()
        assert refusal is not None and (refusal.status, refusal.type) == (503, "not_ready")
        assert await asyncio.gather(*(ready.readiness() for _ in range(20))) == [refusal] * 20  # cached
        assert len(asked) == 1
        ready._ready = None  # a second later
        assert await ready.readiness() is None

    asyncio.run(probe())



class WaitingHandle(FakeHandle):
    """A call that gets no answer, as one queued at the handle while no replica is running (or one a replica holds,
    `taken`). Cancelled, it ends as Serve 2.60 ends such a call: RequestCancelledError either way, and its
    replica-result future (resolved once a replica takes the call) cancelled only while it waited for a replica."""

    def __init__(self, taken: bool = False) -> None:
        super().__init__()
        self.taken = taken
        self.cancelled = 0

    def _rerank(self, *args: Any) -> Any:
        self.calls += 1
        self.sent = args
        handle = self
        answer: asyncio.Future[Any] | None = None

        class Waiting:
            def __init__(self) -> None:
                self._replica_result_future: concurrent.futures.Future[Any] = concurrent.futures.Future()
                if handle.taken:
                    self._replica_result_future.set_result("a replica's result")

            def __await__(self) -> Any:
                nonlocal answer
                answer = asyncio.get_running_loop().create_future()
                return answer.__await__()

            def cancel(self) -> None:
                if self._replica_result_future.cancelled() or answer is not None and answer.done():
                    return  # as Serve's: a second cancel does nothing
                handle.cancelled += 1
                self._replica_result_future.cancel()
                assert answer is not None
                answer.set_exception(RequestCancelledError())

        return Waiting()


def test_a_try_no_replica_answers_ends_at_the_deadline_with_504() -> None:
    """Without a bound on each try, a call waiting for a replica waited out the proxy's request_timeout_s, whose
    408 is Serve's plain text."""
    handle = WaitingHandle()
    started = time.monotonic()
    with pytest.raises(HttpError) as failed:
        asyncio.run(backend(handle, deadline_s=0.3).rerank(None, "/v1/rerank", CALL))
    assert 0.3 <= time.monotonic() - started < 0.3 + remote.REPLICA_GRACE_S + 5  # the deadline, the grace, and room
    assert (failed.value.status, failed.value.type, failed.value.counted) == (504, "timeout", False)
    assert "0.3 s" in failed.value.message
    assert handle.calls == 1 and handle.cancelled == 1  # not tried again, and the call is withdrawn


def test_the_deadline_counts_from_the_requests_arrival(monkeypatch: pytest.MonkeyPatch) -> None:
    """It counted from the call: a body sent over 60 s (RERANKER_BODY_TIMEOUT_SECONDS) left the full 100 s after
    it, past the proxy's request_timeout_s (120 s), whose 408 is Serve's plain text."""
    sent: list[tuple[Any, ...]] = []
    handle = FakeHandle(Reply("r1", result=RESULT))
    answer = handle.rerank.remote

    def remember(*args: Any) -> FakeResponse:
        sent.append(args)
        return answer(*args)

    handle.rerank = SimpleNamespace(remote=remember)
    monkeypatch.setattr(remote, "request_age", lambda: 40.0)  # the request arrived 40 s ago
    assert asyncio.run(backend(handle, deadline_s=100.0).rerank(None, "/v1/rerank", CALL)) == RESULT
    [(_, _, _, _, deadline_at, left, _)] = sent
    assert 59.0 < left <= 60.0 and abs(deadline_at - time.time() - left) < 1.0
    # Older than its deadline on arrival at the call (a body sent over minutes): answered here, no replica asked.
    monkeypatch.setattr(remote, "request_age", lambda: 120.0)
    with pytest.raises(HttpError) as late:
        asyncio.run(backend(handle, deadline_s=100.0).rerank(None, "/v1/rerank", CALL))
    assert (late.value.status, late.value.type, late.value.counted) == (504, "timeout", False) and len(sent) == 1
    # The replica's latency counts from the arrival too (before, its request_duration left out the wait here).
    [(_, _, _, carrier, _, _, _)] = sent
    assert float(carrier[model.AGE]) == 40.0 and abs(time.time() - 40.0 - float(carrier[model.ARRIVED])) < 1.0


def test_a_replica_takes_the_requests_arrival_within_what_its_clock_can_say() -> None:
    def age(arrived_ago: float) -> float:
        arrived = model.arrival({model.ARRIVED: repr(time.time() - arrived_ago), model.AGE: "4.0"}, 60.0)
        assert arrived is not None
        return time.perf_counter() - arrived

    assert 4.9 < age(5.0) < 5.5  # sent 4 s after it arrived, then a second in Serve's queue
    assert 3.9 < age(-30.0) < 4.5  # this clock behind the ingress's: never younger than when sent
    assert 63.9 < age(3600.0) < 64.5  # this clock an hour ahead: never older than its deadline allows
    assert model.arrival({}, 60.0) is None and model.arrival({model.ARRIVED: "x", model.AGE: "1"}, None) is None


def leaving_client(after_s: float) -> Request:
    """A request whose client disconnects `after_s` seconds after sending its body."""
    async def receive() -> dict[str, Any]:
        await asyncio.sleep(after_s)
        return {"type": "http.disconnect"}

    return Request({"type": "http", "method": "POST", "path": "/v1/rerank", "headers": []}, receive)


@pytest.mark.parametrize(("taken", "claimed"), [(False, True), (False, False), (True, True)],
                         ids=["waiting for a replica", "handed to a replica anyway", "held by a replica"])
def test_a_request_whose_client_leaves_is_counted_once(taken: bool, claimed: bool) -> None:
    """A replica counts a call cancelled while it held it; one still waiting for a replica never reached one, and
    went uncounted and unlogged (Ray's proxy saw a 499, reranker_requests_total nothing): the ingress counts it,
    unless Ray handed the withdrawn call to a replica anyway and the replica claimed it first (claims.py)."""
    booked: list[tuple[str, str]] = []
    claims: list[str] = []

    def book(route: str, error: HttpError) -> None:
        booked.append((route, error.outcome))

    def claim(call_id: str) -> bool:
        claims.append(call_id)
        return claimed

    async def leave(how: str) -> WaitingHandle:
        handle = WaitingHandle(taken)
        remote_backend = backend(handle, book=book, claim=claim)
        if how == "disconnect":  # the ingress saw the client go
            with pytest.raises(HttpError) as failed:
                await remote_backend.rerank(leaving_client(0.05), "/v1/rerank", CALL)
            assert (failed.value.status, failed.value.counted) == (499, True)
        else:  # Serve cancelled the ingress's request: its client left at the proxy, or Gradio cancelled the event
            call = asyncio.ensure_future(remote_backend.rerank(None, "/v1/rerank", CALL))
            await asyncio.sleep(0.05)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
        assert handle.cancelled == 1
        return handle

    for how in ("disconnect", "cancelled"):
        booked.clear()
        claims.clear()
        handle = asyncio.run(leave(how))  # which waits for the claim, made off the event loop
        assert booked == ([] if taken or not claimed else [("/v1/rerank", "cancelled")]), how
        # The claim is on the id the replica was sent with the call.
        assert claims == ([] if taken else [handle.sent[-1]]), how


def test_at_the_drain_deadline_calls_no_replica_took_get_503_and_those_a_replica_holds_go_on(
        metrics: Metrics, requests_total: Any) -> None:
    """Serve held a call still waiting for a model replica until it killed the stopping ingress at the end of its
    graceful shutdown, and its proxy answered a plain-text 500, counted nowhere (11 of 40 requests, helper-25's
    walkthrough, RERANKER_DRAIN_SECONDS=3). Now the drain's deadline answers it as one process's cut-off does."""
    lifecycle = Lifecycle()

    async def cut(taken: bool, claimed: bool = True) -> tuple[WaitingHandle, Any]:
        handle = WaitingHandle(taken)
        remote_backend = backend(handle, lifecycle=lifecycle, claim=lambda call_id: claimed)
        app = ingress_app(remote_backend, metrics, RequestHistory(),
                          Tracing.from_settings(remote_backend.settings, metrics), lifecycle)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingress") as http:
            call = asyncio.ensure_future(http.post("/v1/rerank", json={"query": "q", "documents": ["a"]}))
            while handle.calls == 0:
                await asyncio.sleep(0.01)
            remote_backend.cut_off_waiting(lifecycle.cut_off_error())
            if taken:  # its replica answers it, within the replica's own graceful shutdown
                await asyncio.sleep(0.2)
                assert not call.done() and handle.cancelled == 0
                call.cancel()
                return handle, None
            return handle, await asyncio.wait_for(call, HANG_S)

    handle, answer = asyncio.run(cut(taken=False))
    assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
    assert answer.json()["error"]["type"] == "shutting_down" and "retry it on another instance" in answer.text
    assert handle.cancelled == 1  # withdrawn: no replica will take it later
    assert requests_total("/v1/rerank", "error") == 1  # counted once, by the ingress
    asyncio.run(cut(taken=True))
    # Ray handed the withdrawn call to a replica anyway, which counted it first (deploy/ray/claims.py): the same
    # answer, counted there only.
    handle, answer = asyncio.run(cut(taken=False, claimed=False))
    assert answer.status_code == 503 and answer.json()["error"]["type"] == "shutting_down"
    assert requests_total("/v1/rerank", "error") == 1


class FakeStore:
    """Ray's internal key-value store, as claims.py uses it; `fail` names the calls that raise."""

    def __init__(self, *fail: str) -> None:
        self.keys: set[bytes] = set()
        self.fail = fail

    def internal_kv_get_gcs_client(self) -> FakeStore:
        return self

    def internal_kv_put(self, key: bytes, value: bytes, overwrite: bool, namespace: bytes, *, timeout: float) -> int:
        """1 if `key` was added (as Ray's GcsClient answers), or the timeout's error."""
        assert timeout > 0 and not overwrite and namespace
        if "put" in self.fail:
            raise ConnectionError("GCS away")
        if "slow" in self.fail:
            raise RuntimeError("RPC error: Deadline Exceeded")  # what Ray's client raises after `timeout` seconds
        existed = key in self.keys
        self.keys.add(key)
        return 0 if existed else 1

    def _internal_kv_del(self, key: str, *, namespace: str) -> None:
        if "del" in self.fail:
            raise ConnectionError("GCS away")
        self.keys.discard(key.encode())


def test_a_claim_has_one_winner_and_a_store_that_fails_never_makes_two(monkeypatch: pytest.MonkeyPatch) -> None:
    from deploy.ray import claims

    store = FakeStore()
    monkeypatch.setattr(claims, "kv_store", lambda: store)
    assert claims.claim_left("reranker", "c1") and store.keys == {b"left/reranker/c1"}  # kept FORGET_S
    assert not claims.claim_left("reranker", "c1") and store.keys == set()  # the loser deletes it
    claims.forget_claims()
    # A delete that fails after the put decided leaves the answer as it was.
    store.fail = ("del",)
    assert claims.claim_left("reranker", "c2")
    assert not claims.claim_left("reranker", "c2")
    claims.forget_claims()  # and the keys kept stay for withdraw_drain, without an error
    # Without the store at all, both sides count it: twice beats never.
    store.fail = ("put",)
    assert claims.claim_left("reranker", "c3")
    store.fail = ("slow",)  # nor with a GCS that does not answer within CLAIM_TIMEOUT_S
    assert claims.claim_left("reranker", "c4")


def test_a_request_past_its_deadline_is_counted_once_as_a_timeout() -> None:
    """The 504 is booked by the route's error handler; the withdrawn call adds no `cancelled` here."""
    booked: list[HttpError] = []
    with pytest.raises(HttpError) as failed:
        asyncio.run(backend(WaitingHandle(), deadline_s=0.1, book=lambda _, error: booked.append(error))
                    .rerank(None, "/v1/rerank", CALL))
    assert (failed.value.status, failed.value.counted, booked) == (504, False, [])


def test_tries_and_the_deadline_must_allow_one_try() -> None:
    with pytest.raises(ValueError, match="tries must be at least 1 and deadline_s above 0"):
        backend(FakeHandle(), tries=0)
    with pytest.raises(ValueError, match="got tries=3, deadline_s=0"):
        backend(FakeHandle(), deadline_s=0)


def test_a_new_ingress_names_the_configured_model_while_the_replicas_are_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    """/readyz names the model; before any answer it asked a replica, queued behind their scoring work."""
    monkeypatch.setattr(remote, "MODEL_ID_WAIT_S", 0.05)
    withdrawn: list[bool] = []

    class Queued:  # a call queued behind the replicas' scoring
        def __await__(self) -> Any:
            return asyncio.get_running_loop().create_future().__await__()

        def cancel(self) -> None:
            withdrawn.append(True)

    busy = WaitingHandle()
    busy.info = SimpleNamespace(remote=Queued)
    remote_backend = backend(busy, {"RERANKER_MODEL": "org/their-model"})
    started = time.monotonic()
    assert asyncio.run(remote_backend.model_id()) == "org/their-model"
    assert time.monotonic() - started < 2
    assert withdrawn == [True]  # Serve does not withdraw a call whose awaiting task is cancelled: it stayed queued


def test_info_is_what_a_model_replica_last_published_not_a_call_queued_behind_scoring() -> None:
    """/info asked a model replica, so under load it waited behind their scoring (or got a 429), where one process
    answers at once: it is now the newest view a replica published that is fresh by this node's clock; a stale one
    (a replica killed before it could delete its key) or one without an /info (an older version's) is passed over."""
    calls: list[bool] = []

    class Queued:  # a call queued behind the replicas' scoring
        def __init__(self) -> None:
            calls.append(True)

        def __await__(self) -> Any:
            return asyncio.get_running_loop().create_future().__await__()

        def cancel(self) -> None:
            pass

    def view(replica: str, age_s: float, info: dict[str, Any] | None) -> ReplicaView:
        at = time.time() - age_s
        return ReplicaView(replica, replace(metrics_snapshot(Metrics(CollectorRegistry())), time=at), [], info=info)

    views = [view("killed", 30.0, {"replica": "killed"}), view("older", 2.0, {"replica": "older"}),
             view("newer", 0.5, {"replica": "newer", "device": "cpu"}), view("old-version", 0.1, None),
             view("fast-clock", -3.0, {"replica": "fast"})]  # a node whose clock runs ahead
    busy = WaitingHandle()
    busy.info = SimpleNamespace(remote=Queued)
    started = time.monotonic()
    assert asyncio.run(asyncio.wait_for(backend(busy, views=lambda: views).info(), 2)) == {"replica": "fast"}
    newer = asyncio.run(asyncio.wait_for(backend(busy, views=lambda: views[:3]).info(), 2))
    assert newer == {"replica": "newer", "device": "cpu"}
    assert time.monotonic() - started < 2 and calls == []
    for stale in ([views[0], views[3]], []):  # nothing fresh with an /info: a replica is asked
        assert asyncio.run(backend(FakeHandle(), views=lambda stale=stale: stale).info()) == {"model": "tiny"}

    def away() -> list[ReplicaView]:
        raise ConnectionError("the GCS is restarting")

    assert asyncio.run(backend(FakeHandle(), views=away).info()) == {"model": "tiny"}


def test_a_view_that_stopped_changing_is_stale_by_this_process_clock_whatever_its_node_clock_says() -> None:
    """A replica killed before it could delete its view, on a node whose clock runs 30 s ahead: its view's time looks
    recent to every other node for 30 s. Once it has not changed for forget_s here, /info no longer answers from it
    (a replica is asked); a view that goes on changing stays fresh however far its node's clock is behind."""
    def view(replica: str, at: float) -> ReplicaView:
        return ReplicaView(replica, replace(metrics_snapshot(Metrics(CollectorRegistry())), time=at), [],
                           info={"replica": replica})

    ahead = view("killed-ahead", time.time() + 30)
    current = [ahead]
    remote_backend = backend(FakeHandle(), views=lambda: current, forget_s=0.3)
    assert asyncio.run(remote_backend.info()) == {"replica": "killed-ahead"}  # first seen: its time looks fresh
    time.sleep(0.4)
    assert asyncio.run(remote_backend.info()) == {"model": "tiny"}  # unchanged for forget_s: asked instead
    behind_at = time.time() - 25  # a live replica whose node's clock is 25 s behind publishes again and again
    for step in range(4):
        current = [ahead, view("live-behind", behind_at + step)]
        time.sleep(0.15)
        answer = asyncio.run(remote_backend.info())
        assert answer == ({"model": "tiny"} if step == 0 else {"replica": "live-behind"}), step


def test_info_answers_a_dead_replica_or_a_full_queue_as_a_rerank_does() -> None:
    for failure, status in ((ActorDiedError(), 503), (BackPressureError(num_queued_requests=1,
                                                                         max_queued_requests=1), 429)):
        handle = FakeHandle()
        handle.info = SimpleNamespace(remote=lambda failure=failure: FakeResponse(failure))
        with pytest.raises(HttpError) as failed:
            asyncio.run(backend(handle).info())
        assert failed.value.status == status

@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def client(handle: FakeHandle, metrics: Metrics, environ: dict[str, str]) -> httpx.AsyncClient:
    remote_backend = backend(handle, environ)
    app = ingress_app(remote_backend, metrics, RequestHistory(), Tracing.from_settings(remote_backend.settings,
                                                                                        metrics))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingress")


def post(handle: FakeHandle, metrics: Metrics, path: str, body: dict[str, Any],
         environ: dict[str, str] | None = None, **kwargs: Any) -> httpx.Response:
    async def send() -> httpx.Response:
        async with client(handle, metrics, environ or {}) as http:
            return await http.post(path, json=body, **kwargs)

    return asyncio.run(send())


@pytest.fixture
def requests_total(metrics: Metrics) -> Iterator[Any]:
    yield lambda route, status: metrics.registry.get_sample_value(
        "reranker_requests_total", {"route": route, "status": status})


def test_serves_backpressure_is_one_process_overload(metrics: Metrics, requests_total: Any) -> None:
    """Serve's own answer was a plain-text 503 'Request dropped due to backpressure', without Retry-After and
    uncounted; one process answers a full queue 429 overloaded, Retry-After: 1, counted."""
    handle = FakeHandle(BackPressureError(num_queued_requests=2, max_queued_requests=2))
    answer = post(handle, metrics, "/v1/rerank", {"query": "q", "documents": ["a"]})
    assert answer.status_code == 429 and answer.headers["retry-after"] == "1"
    assert answer.json()["error"]["type"] == "overloaded"
    assert "max_queued_requests" in answer.json()["error"]["message"]
    assert handle.calls == 1  # the whole deployment is full: no other replica to try
    assert requests_total("/v1/rerank", "overloaded") == 1


class FakeRayCounter:
    def __init__(self, name: str, description: str, tag_keys: tuple[str, ...]) -> None:
        self.name, self.tag_keys = name, tag_keys
        self.counts: dict[str, float] = {}

    def inc(self, value: float, tags: dict[str, str]) -> None:
        assert set(tags) == set(self.tag_keys)
        self.counts[tags["status_code"]] = self.counts.get(tags["status_code"], 0) + value

    def _record(self, value: float, tags: dict[str, str]) -> None:  # Ray's own, which takes a 0
        self.counts[tags["status_code"]] = value


def test_the_ingress_counts_what_it_answers_the_proxy_by_status(metrics: Metrics) -> None:
    """The proxy's 429s less the ingress's are the proxy's own (RerankerServeProxyRefusing): reranker_requests_total
    counted a model replica's 429 for a try the ingress retried and then answered 200, silencing that alert."""
    from deploy.ray.metrics import ingress_answers

    answers = ingress_answers(SimpleNamespace(Counter=FakeRayCounter))
    assert answers.name == "reranker_ingress_answers" and answers.tag_keys == ("status_code",)
    assert answers.counts == {"429": 0}  # exported from the start: a first 429 is an increase
    full = Reply("busy", error=(429, "overloaded", "the queue is full (RERANKER_MAX_QUEUE=20000 pairs)"))
    handle = FakeHandle(full, Reply("idle", result=RESULT), full, full, RuntimeError("a bug"))
    remote_backend = backend(handle)
    app = ingress_app(remote_backend, metrics, RequestHistory(), Tracing.from_settings(remote_backend.settings,
                                                                                        metrics), answers=answers)

    async def send() -> list[int]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://ingress") as http:
            body = {"query": "q", "documents": ["a"]}
            return [(await http.post("/v1/rerank", json=body)).status_code for _ in range(3)] \
                + [(await http.post("/v1/rerank", json={})).status_code, (await http.get("/healthz")).status_code]

    assert asyncio.run(send()) == [200, 429, 500, 422, 200]
    assert answers.counts == {"200": 2, "429": 1, "500": 1, "422": 1}  # the retried 429 is not the proxy's
    assert metrics.registry.get_sample_value("reranker_requests_total", {"route": "/v1/rerank", "status": "error"}) == 1


def test_serves_own_warning_for_a_refused_call_is_dropped_and_its_other_lines_kept() -> None:
    """The request line logs the 429 once; Serve's router also logged a WARNING naming no request for each."""
    remote.quiet_router_refusals()  # as the ingress and UI replicas do when they start
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    serve_logger = logging.getLogger("ray.serve")
    serve_logger.addHandler(handler)
    try:
        serve_logger.warning(BackPressureError(num_queued_requests=2, max_queued_requests=2).message)
        serve_logger.warning("Replica r1 is unhealthy")
    finally:
        serve_logger.removeHandler(handler)
    assert seen == ["Replica r1 is unhealthy"]


def test_with_ui_auth_and_no_api_key_predict_is_refused_as_in_one_process(metrics: Metrics,
                                                                          requests_total: Any) -> None:
    handle = FakeHandle(Reply("r", result=RESULT))
    ui_auth = {"RERANKER_UI_AUTH": "admin:secret"}
    refused = post(handle, metrics, "/api/predict", {"data": ["q", ["a"]]}, ui_auth)
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "unauthorized"
    assert "RERANKER_UI_AUTH" in refused.json()["error"]["message"]
    assert requests_total("/api/predict", "invalid") == 1 and handle.calls == 0
    # The JSON routes stay open (they take RERANKER_API_KEY alone), and an API key decides /api/predict too.
    assert post(handle, metrics, "/v1/rerank", {"query": "q", "documents": ["a"]}, ui_auth).status_code == 200
    keyed = {**ui_auth, "RERANKER_API_KEY": "k"}
    answer = post(handle, metrics, "/api/predict", {"data": ["q", ["a"]]}, keyed, headers={"authorization": "Bearer k"})
    assert answer.status_code == 200 and answer.json()["data"][0][0]["index"] == 0
    assert post(handle, metrics, "/api/predict", {"data": ["q", ["a"]]}).status_code == 200  # no UI_AUTH: open


def test_a_refusal_while_draining_is_logged_with_the_requests_id_and_latency(
        metrics: Metrics, caplog: pytest.LogCaptureFixture) -> None:
    """As in one process (tests/test_drain.py): the drain gate ran outside the request id, so the 503's request
    line had another id than the one Serve's proxy answered, and no latency."""
    from web.lifecycle import Lifecycle

    caplog.set_level("INFO", logger="reranker.requests")
    handle = FakeHandle(Reply("r", result=RESULT))
    remote_backend = backend(handle)
    lifecycle = Lifecycle()
    lifecycle.begin_drain()
    app = ingress_app(remote_backend, metrics, RequestHistory(),
                      Tracing.from_settings(remote_backend.settings, metrics), lifecycle)

    async def send() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingress") as http:
            return await http.post("/v1/rerank", json={"query": "q", "documents": ["a"]},
                                   headers={"X-Request-ID": "from-the-proxy"})

    assert asyncio.run(send()).status_code == 503 and handle.calls == 0
    [line] = [r for r in caplog.records if r.getMessage() == "rerank refused"]
    assert line.request_id == "from-the-proxy" and line.latency_ms is not None  # type: ignore[attr-defined]
