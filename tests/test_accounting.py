"""Every rerank request is counted once in reranker_requests_total, whichever way it ends."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import httpx
import pytest
from gradio.queueing import Queue
from prometheus_client import CollectorRegistry

from reranker import Reranker
from reranker.metrics import STATUSES, Metrics
from reranker.model import ScoringModel
from tests.conftest import model_settings
from tests.servers import HANG_S, serve
from tests.test_faults import GatedScorer, wait_until
from web.errors import HttpError
from web.gradio_login import find_gradio_app
from web.http import create_app
from web.service import RerankCall, RerankService

RUNNING = 16  # build_blocks' concurrency_limit: the next event waits in Gradio's queue


def counts(metrics: Metrics, route: str) -> dict[str, float]:
    registry = metrics.registry
    return {status: registry.get_sample_value("reranker_requests_total", {"route": route, "status": status}) or 0
            for status in STATUSES}


@pytest.fixture
def held(bert_model: ScoringModel) -> Iterator[tuple[str, Reranker, GatedScorer, Queue]]:
    """A served app whose device is held until the test opens `gate`; the cache off, so every call scores."""
    gated = GatedScorer(bert_model)
    settings = model_settings(Path(bert_model.model_id), cache_size=0)
    with Reranker(bert_model, settings, metrics=Metrics(CollectorRegistry()), score_fn=gated) as reranker:
        app = create_app(reranker)
        try:
            with serve(app) as url:
                yield url, reranker, gated, find_gradio_app(app).get_blocks()._queue
        finally:
            gated.gate.set()


def leave_while_sending(url: str, path: str, sent: bytes) -> None:
    """POST a JSON body of 1000 bytes to `path`, send only `sent` of it, and close the connection."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=HANG_S) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: 1000\r\n\r\n".encode() + sent)


@pytest.mark.parametrize("sent", [b"", b'{"query": "q", "documents": ["a'], ids=["no body yet", "half a body"])
@pytest.mark.parametrize(("path", "route"), [
    *((path, path) for path in ("/v1/rerank", "/v2/rerank", "/rerank", "/api/predict")),
    ("/gradio_api/call/predict", "ui"), ("/gradio_api/api/predict", "ui")])
def test_a_client_that_leaves_while_sending_its_body_is_counted_cancelled(
        held: tuple[str, Reranker, GatedScorer, Queue], path: str, route: str, sent: bytes) -> None:
    """Read as the body it was, such a request was counted invalid (400: not valid JSON)."""
    url, reranker, _, _ = held
    leave_while_sending(url, path, sent)
    wait_until(lambda: sum(counts(reranker.metrics, route).values()) > 0)
    assert counts(reranker.metrics, route) == {**dict.fromkeys(STATUSES, 0), "cancelled": 1}


@pytest.mark.parametrize(("path", "route"), [("/v1/rerank", "/v1/rerank"), ("/gradio_api/queue/join", None),
                                           ("/login", None)])
def test_a_body_that_does_not_arrive_in_time_gets_408_and_the_connection_closes(
        bert_model: ScoringModel, path: str, route: str | None) -> None:
    """A client that sent its headers and part of its body, then nothing (or a byte a minute), held the connection
    and its partial body in memory for as long as it liked."""
    settings = model_settings(Path(bert_model.model_id), body_timeout_seconds=1)
    with Reranker(bert_model, settings, metrics=Metrics(CollectorRegistry())) as reranker:
        with serve(create_app(reranker)) as url:
            host, port = url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port)), timeout=HANG_S) as sock:
                started = time.monotonic()
                sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                             f"Content-Length: 1000\r\n\r\n".encode() + b'{"query": "q"')
                answer = b""
                while chunk := sock.recv(65536):  # until the server closes the connection
                    answer += chunk
                waited = time.monotonic() - started
            assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
            assert b'"type":"body_timeout"' in answer and 1 <= waited < HANG_S
            if route is not None:
                assert counts(reranker.metrics, route) == {**dict.fromkeys(STATUSES, 0), "invalid": 1}


@contextmanager
def every_slot_taken(url: str, reranker: Reranker, gated: GatedScorer) -> Iterator[None]:
    """RUNNING events of one session held on the device, so the next event waits in Gradio's queue; once the
    block ends they run and the test waits for their answers."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    running = [client.submit("q", f"document {i}", api_name="/predict") for i in range(RUNNING)]
    wait_until(lambda: reranker.metrics.registry.get_sample_value("reranker_inflight_requests") == RUNNING)
    yield
    gated.gate.set()
    for job in running:
        job.result(HANG_S)


def test_a_gradio_event_cancelled_while_it_waits_in_gradios_queue_is_counted(
        held: tuple[str, Reranker, GatedScorer, Queue], caplog: pytest.LogCaptureFixture) -> None:
    """Job.cancel() of an event Gradio has queued but not started removes it: its handler never runs."""
    from gradio_client import Client

    caplog.set_level("INFO", logger="reranker.requests")
    url, reranker, gated, queue = held
    with every_slot_taken(url, reranker, gated):
        # Its own session: Gradio's cancel also stops the running events of the session that cancels.
        waiting = Client(url, verbose=False).submit("q", "a\nb", api_name="/predict")
        wait_until(lambda: waiting.communicator is not None and waiting.communicator.event_id is not None)
        assert len(queue) == 1
        waiting.cancel()
        wait_until(lambda: len(queue) == 0)
    assert counts(reranker.metrics, "ui") == {**dict.fromkeys(STATUSES, 0), "ok": RUNNING, "cancelled": 1}
    [line] = [r for r in caplog.records if r.getMessage() == "rerank refused"]
    assert (line.route, line.status, line.latency_ms) == ("ui", "cancelled", None)  # type: ignore[attr-defined]


def test_a_gradio_event_whose_browser_leaves_while_it_waits_in_gradios_queue_is_counted(
        held: tuple[str, Reranker, GatedScorer, Queue]) -> None:
    """A tab closed while its event waits: Gradio drops the session's queued events when its stream closes."""
    url, reranker, gated, queue = held
    [predict] = [fn._id for fn in queue.blocks.fns.values() if fn.api_name == "predict"]
    with every_slot_taken(url, reranker, gated), httpx.Client(base_url=url, timeout=HANG_S) as browser:
        joined = browser.post("/gradio_api/queue/join", json={
            "data": ["q", "a\nb", None, "", False, None], "fn_index": predict, "session_hash": "closed-tab"})
        assert joined.status_code == 200, joined.text
        with browser.stream("GET", "/gradio_api/queue/data", params={"session_hash": "closed-tab"}) as stream:
            # Held in a name: a line iterator dropped after its first line closes the connection, at once (httpx),
            # and the queue dropped the event before the test looked (a flaky failure, 1 run in 3).
            lines = stream.iter_lines()
            assert next(lines).startswith("data:")  # the queue's estimation: the event waits
            assert len(queue) == 1
        wait_until(lambda: len(queue) == 0)
    assert counts(reranker.metrics, "ui") == {**dict.fromkeys(STATUSES, 0), "ok": RUNNING, "cancelled": 1}


def test_a_running_gradio_event_whose_browser_leaves_is_cancelled(bert_model: ScoringModel) -> None:
    """A tab closed or reloaded while its event runs: Gradio only marks the event dead and lets its handler run on,
    so every pair was scored for nobody (a 1,000-document rerank on a CPU: seconds of passes) and it was counted ok.
    The handler now watches the event and drops its unstarted pairs."""
    gated = GatedScorer(bert_model)
    settings = model_settings(Path(bert_model.model_id), cache_size=0, batch_tokens=64)  # a few pairs a pass
    documents = "\n".join(f"document number {i}" for i in range(40))
    with Reranker(bert_model, settings, metrics=Metrics(CollectorRegistry()), score_fn=gated) as reranker:
        app = create_app(reranker)
        [predict] = [fn._id for fn in find_gradio_app(app).get_blocks().fns.values() if fn.api_name == "predict"]
        try:
            with serve(app) as url, httpx.Client(base_url=url, timeout=HANG_S) as browser:
                joined = browser.post("/gradio_api/queue/join", json={
                    "data": ["q", documents, None, "", False, None], "fn_index": predict, "session_hash": "left"})
                assert joined.status_code == 200, joined.text
                with browser.stream("GET", "/gradio_api/queue/data", params={"session_hash": "left"}) as stream:
                    lines = stream.iter_lines()  # held in a name: dropping it would close the stream at once
                    assert next(lines).startswith("data:")
                    assert gated.first_batch.wait(HANG_S)  # running: its first pass holds the device
                wait_until(lambda: counts(reranker.metrics, "ui")["cancelled"] == 1)
                gated.gate.set()
                wait_until(lambda: reranker.metrics.registry.get_sample_value("reranker_inflight_requests") == 0)
        finally:
            gated.gate.set()
        cancelled = reranker.metrics.registry.get_sample_value("reranker_cancelled_pairs_total") or 0
    assert counts(reranker.metrics, "ui") == {**dict.fromkeys(STATUSES, 0), "cancelled": 1}
    assert cancelled > 0 and gated.pairs + cancelled == 40


def all_requests(metrics: Metrics) -> float:
    return sum(sample.value for metric in metrics.registry.collect() for sample in metric.samples
               if sample.name == "reranker_requests_total")


NOT_RERANKS = [("GET", "/v1/rerank"), ("DELETE", "/rerank"), ("POST", "/v1/rerank/"), ("POST", "/api/predict/"),
               ("OPTIONS", "/v2/rerank")]


REFUSALS = [*((refusal, ui) for refusal in ("none", "no key", "draining") for ui in (True, False)),
            ("no UI login", True)]  # which guards /api/predict only with the UI


@pytest.mark.parametrize(("refusal", "ui"), REFUSALS, ids=[f"{r}, {'UI' if ui else 'no UI'}" for r, ui in REFUSALS])
def test_a_wrong_method_or_a_trailing_slash_is_no_rerank_request_whoever_answers_it(
        bert_model: ScoringModel, bert_dir: Path, refusal: str, ui: bool) -> None:
    """Answered by the route table (405, 404) they were not counted; answered first by the key check, the
    drain gate or the UI login (401, 503) they were counted as rerank requests."""
    from fastapi.testclient import TestClient

    from web.lifecycle import Lifecycle

    overrides: dict[str, dict[str, object]] = {"none": {}, "no key": {"api_key": "s3cret"}, "draining": {},
                                               "no UI login": {"ui_auth": (("alice", "pw"),)}}
    lifecycle = Lifecycle()
    with Reranker(bert_model, model_settings(bert_dir, **overrides[refusal]),
                  metrics=Metrics(CollectorRegistry())) as reranker:
        client = TestClient(create_app(reranker, ui=ui, lifecycle=lifecycle))
        if refusal == "draining":
            lifecycle.begin_drain()
        for method, path in NOT_RERANKS:
            client.request(method, path, json={"query": "q", "documents": ["a"]})
        assert all_requests(reranker.metrics) == 0
        # What is a rerank request is still counted, once.
        client.post("/api/predict", json={"data": ["q", "a"]})
        assert all_requests(reranker.metrics) == 1


def test_gradio_api_calls_without_the_ui_login_are_counted(bert_model: ScoringModel, bert_dir: Path) -> None:
    """As /api/predict's are: the login's 401 came before GradioApiStatus, which counts the Gradio API's refusals."""
    from fastapi.testclient import TestClient

    settings = model_settings(bert_dir, ui_auth=(("alice", "pw"),))
    with Reranker(bert_model, settings, metrics=Metrics(CollectorRegistry())) as reranker:
        client = TestClient(create_app(reranker))
        for path in ("/gradio_api/call/predict", "/gradio_api/api/predict", "/api/predict"):
            assert client.post(path, json={"data": ["q", "a"]}).status_code == 401, path
        assert counts(reranker.metrics, "ui") == {**dict.fromkeys(STATUSES, 0), "invalid": 2}
        assert all_requests(reranker.metrics) == 3


def test_a_bug_in_a_route_is_counted_as_an_error() -> None:
    """An exception the engine did not answer (a bug in shaping a request or a response) gets the 500 of the
    catch-all handler; uncounted, the error-ratio alerts never saw it."""
    from fastapi.testclient import TestClient

    from reranker import Settings
    from web.api import build_api
    from web.backend import Backend

    class Broken:
        settings = Settings.from_env({})

        async def rerank(self, *args: object) -> None:
            raise RuntimeError("a bug")

    booked: list[tuple[str, int, str]] = []

    def book(route: str, error: HttpError) -> None:
        booked.append((route, error.status, error.outcome))

    client = TestClient(build_api(cast(Backend, Broken()), book), raise_server_exceptions=False)
    answer = client.post("/v1/rerank", json={"query": "q", "documents": ["a"]})
    assert answer.status_code == 500 and answer.json()["error"]["type"] == "internal_error"
    assert booked == [("/v1/rerank", 500, "error")]


GRADIO_REFUSALS = {"draining": 503, "no UI login": 401, "over the body limit": 413, "no session": 400}


@pytest.mark.parametrize("refusal", GRADIO_REFUSALS)
def test_refusals_of_gradio_calls_that_name_their_event_by_index_count_the_rerank_event_alone(
        bert_model: ScoringModel, bert_dir: Path, refusal: str) -> None:
    """queue/join (where the browser's Rerank button and gradio_client queue events) and /run/predict (where the
    browser sends every unqueued event: the Monitoring tab's timer) run the event that the body's fn_index names.
    A refused queue/join of the Rerank event was counted by nobody, and a refused timer tick on /run/predict was
    counted as a rerank request (every open tab's, for as long as a drain lasted)."""
    from fastapi.testclient import TestClient

    from web.lifecycle import Lifecycle

    limit = 4000
    settings = model_settings(bert_dir, max_body_bytes=limit,
                              ui_auth=(("alice", "pw"),) if refusal == "no UI login" else ())
    lifecycle = Lifecycle()
    with Reranker(bert_model, settings, metrics=Metrics(CollectorRegistry())) as reranker:
        app = create_app(reranker, lifecycle=lifecycle)
        blocks = find_gradio_app(app).get_blocks()
        [rerank] = [fn._id for fn in blocks.fns.values() if fn.api_name == "predict"]
        [tick] = [fn._id for fn in blocks.fns.values() if getattr(fn.fn, "__name__", "") == "refresh"]
        client = TestClient(app)
        if refusal == "draining":
            lifecycle.begin_drain()
        documents = "x" * limit if refusal == "over the body limit" else "a\nb"
        paths = ["/gradio_api/queue/join"] + ([] if refusal == "no session" else ["/gradio_api/run/predict"])
        for path in paths:
            for fn_index, data in ((rerank, ["q", documents, None, "", False, None]), (tick, [])):
                body: dict[str, object] = {"data": data, "fn_index": fn_index}
                if refusal != "no session":
                    body["session_hash"] = "a-tab"
                before = all_requests(reranker.metrics)
                answer = client.post(path, json=body)
                if fn_index == rerank or refusal in ("draining", "no UI login"):
                    assert answer.status_code == GRADIO_REFUSALS[refusal], (path, fn_index, answer.text)
                assert all_requests(reranker.metrics) - before == (fn_index == rerank), (path, fn_index)
        outcome = HttpError(GRADIO_REFUSALS[refusal], "", "").outcome
        assert counts(reranker.metrics, "ui") == {**dict.fromkeys(STATUSES, 0), outcome: len(paths)}
        assert all_requests(reranker.metrics) == len(paths)


def test_a_gradio_call_naming_its_event_as_gradio_reads_any_fn_index_is_counted(bert_model: ScoringModel,
                                                                                 bert_dir: Path) -> None:
    """Gradio reads fn_index leniently ("3", 3.0): such a queue join of the Rerank event runs it, and its refusal
    went uncounted; a large body is read only in part, and is the Rerank event's (the only one with documents)."""
    from fastapi.testclient import TestClient

    from web.gradio_api import PEEK_BYTES
    from web.lifecycle import Lifecycle

    lifecycle = Lifecycle()
    with Reranker(bert_model, model_settings(bert_dir), metrics=Metrics(CollectorRegistry())) as reranker:
        app = create_app(reranker, lifecycle=lifecycle)
        blocks = find_gradio_app(app).get_blocks()
        [rerank] = [fn._id for fn in blocks.fns.values() if fn.api_name == "predict"]
        [tick] = [fn._id for fn in blocks.fns.values() if getattr(fn.fn, "__name__", "") == "refresh"]
        client = TestClient(app)
        lifecycle.begin_drain()
        big = "x" * PEEK_BYTES
        for fn_index, documents, counted in [(str(rerank), "a", 1), (float(rerank), "a", 1), (str(tick), "a", 0),
                                             ("not a number", "a", 0), (rerank, big, 1)]:
            before = all_requests(reranker.metrics)
            answer = client.post("/gradio_api/queue/join", json={
                "data": ["q", documents, None, "", False, None], "fn_index": fn_index, "session_hash": "a-tab"})
            assert answer.status_code == 503
            assert all_requests(reranker.metrics) - before == counted, fn_index


@pytest.mark.parametrize("ours", [True, False], ids=["this process counts it", "another process counted it"])
def test_a_cancelled_call_is_counted_only_where_its_claim_says(bert_model: ScoringModel, ours: bool) -> None:
    """On Ray Serve a call withdrawn by the ingress can still reach a model replica; which of the two counts its
    client's leaving is settled by a claim (deploy/ray/claims.py), asked only for such a cancellation. The other
    books nothing: no count, no history entry, no log line; the gauge of requests in flight is back to 0 either
    way."""
    settings = model_settings(Path(bert_model.model_id), cache_size=0, log_sample_rate=1.0)
    asked: list[str] = []

    def counts_left() -> bool:
        asked.append("asked")
        return ours

    with Reranker(bert_model, settings, metrics=Metrics(CollectorRegistry())) as reranker:
        service = RerankService(reranker)
        service.rerank("/v1/rerank", RerankCall("q", ["a", "b"]), counts_left=counts_left)
        assert asked == []  # a call that was answered is this process's
        gone = threading.Event()
        gone.set()  # the client left before its pairs were scored
        with pytest.raises(HttpError) as failed:
            service.rerank("/v1/rerank", RerankCall("q", ["c", "d"]), gone, counts_left=counts_left)
        # Cancelled, whatever it ended as: the replica may have been handed a call the ingress withdrew.
        with pytest.raises(HttpError) as refused:
            service.rerank("/v1/rerank", RerankCall("", ["e"]), gone, counts_left=counts_left)
    assert failed.value.status == 499 and refused.value.status == 400 and asked == ["asked"] * 2
    assert counts(reranker.metrics, "/v1/rerank") == {**dict.fromkeys(STATUSES, 0), "ok": 1, "cancelled": int(ours),
                                                      "invalid": int(ours)}
    statuses = [line.status for line in service.history.latest()]  # latest first
    assert statuses == (["invalid", "cancelled", "ok"] if ours else ["ok"])
    assert reranker.metrics.registry.get_sample_value("reranker_inflight_requests") == 0
