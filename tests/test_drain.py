"""The process around the engine: a client that disconnects, SIGTERM during a load, a device fault."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from prometheus_client import CollectorRegistry

from reranker import Reranker
from reranker.metrics import Metrics
from reranker.model import ScoringModel
from tests.conftest import model_settings
from tests.servers import HANG_S, free_port, post_head, serve, wait_ready
from tests.test_faults import GatedCall, GatedScorer, wait_until
from web.errors import HttpError
from web.http import create_app
from web.lifecycle import Lifecycle

ROOT = Path(__file__).resolve().parent.parent
DRAIN_S = 600  # seconds: bounds a hung drain, far beyond what draining this load takes on a loaded machine


def test_a_client_that_disconnects_has_its_pairs_dropped(bert_model: ScoringModel, documents: list[str]) -> None:
    gated = GatedScorer(bert_model)
    metrics = Metrics(CollectorRegistry())
    settings = model_settings(Path(bert_model.model_id), cache_size=0)
    with Reranker(bert_model, settings, metrics=metrics, score_fn=gated) as reranker, \
            serve(create_app(reranker, ui=False)) as url:
        warm = threading.Thread(target=reranker.rerank, args=("warm", ["up"]))
        warm.start()
        assert gated.first_batch.wait(HANG_S)  # the device is held: no answer can come until the gate opens
        # The client leaves once its pairs are queued (a fixed wait could end before the server had tokenized
        # them, and nothing would be dropped).
        body = json.dumps({"query": "q", "documents": documents[:100]}).encode()
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=HANG_S) as sock:
            sock.sendall(post_head(url, "/v1/rerank", len(body)) + body)
            wait_until(lambda: reranker.queued_pairs >= 100)
        wait_until(lambda: metrics.registry.get_sample_value(
            "reranker_requests_total", {"route": "/v1/rerank", "status": "cancelled"}) == 1)
        gated.gate.set()
        warm.join(HANG_S)
        response = httpx.post(f"{url}/v1/rerank", json={"query": "q", "documents": documents[:5]}, timeout=HANG_S)
        assert response.status_code == 200 and len(response.json()["results"]) == 5
    assert metrics.registry.get_sample_value("reranker_cancelled_pairs_total") == 100
    assert gated.pairs == 1 + 5


def test_a_cancelled_gradio_event_has_its_pairs_dropped(bert_model: ScoringModel, documents: list[str]) -> None:
    from gradio_client import Client

    gated = GatedScorer(bert_model)
    metrics = Metrics(CollectorRegistry())
    settings = model_settings(Path(bert_model.model_id), cache_size=0)
    with Reranker(bert_model, settings, metrics=metrics, score_fn=gated) as reranker, \
            serve(create_app(reranker)) as url:
        warm = threading.Thread(target=reranker.rerank, args=("warm", ["up"]))
        warm.start()
        assert gated.first_batch.wait(HANG_S)  # the device is held
        client = Client(url, verbose=False)
        job = client.submit("q", "\n".join(documents[:80]), api_name="/predict")
        wait_until(lambda: reranker.queued_pairs == 81)  # the warm-up pair and the event's 80 wait for the device
        job.cancel()
        wait_until(lambda: metrics.registry.get_sample_value(
            "reranker_requests_total", {"route": "ui", "status": "cancelled"}) == 1)
        gated.gate.set()
        warm.join(HANG_S)
        table, _ = client.predict("q", "a\nb", api_name="/predict")  # still serving
        assert len(table["data"] if isinstance(table, dict) else table) == 2
    assert metrics.registry.get_sample_value("reranker_cancelled_pairs_total") == 80
    assert gated.pairs == 1 + 2


def test_a_drain_waits_for_the_events_still_in_gradios_queue(bert_model: ScoringModel) -> None:
    """16 UI events run (the Rerank event's concurrency limit) and 4 wait in Gradio's queue for a slot. Between
    the last running one leaving the engine and Gradio starting the next, nothing is in flight: a drain that looked
    then ended, and the process exited with the 4 unanswered. Gradio's dispatch is paused here to hold that moment
    open."""
    from gradio_client import Client

    from web.gradio_login import find_gradio_app
    from web.lifecycle import Lifecycle

    gated = GatedScorer(bert_model)
    lifecycle = Lifecycle()
    settings = model_settings(Path(bert_model.model_id), cache_size=0)
    with Reranker(bert_model, settings, metrics=Metrics(CollectorRegistry()), score_fn=gated) as reranker:
        app = create_app(reranker, lifecycle=lifecycle)
        queue = find_gradio_app(app).get_blocks()._queue
        try:
            with serve(app) as url:
                client = Client(url, verbose=False)
                jobs = [client.submit(f"q{i}", "a\nb", api_name="/predict") for i in range(20)]
                wait_until(lambda: lifecycle.inflight == 16 and len(queue.event_ids_to_events) == 20)
                queue.get_events = lambda: None  # type: ignore[method-assign]  # no waiting event starts until this goes
                try:
                    lifecycle.begin_drain()
                    gated.gate.set()
                    wait_until(lambda: lifecycle.inflight == 0)
                    assert not lifecycle.wait_idle(time.monotonic() + 0.5)  # 4 accepted events not answered yet
                finally:
                    del queue.get_events
                assert lifecycle.wait_idle(time.monotonic() + HANG_S)
                answers = [job.result(timeout=HANG_S) for job in jobs]
        finally:
            gated.gate.set()
    assert all("2 documents" in status for _, status in answers)


@pytest.mark.parametrize("path", ["/v1/rerank", "/gradio_api/api/predict"])
def test_a_request_in_the_engine_is_one_request_in_flight(bert_model: ScoringModel, bert_dir: Path,
                                                           path: str) -> None:
    """The drain gate and the engine call both counted it: the drain's log lines said 2 in flight for 1."""
    from web.lifecycle import Lifecycle

    gated = GatedScorer(bert_model)
    lifecycle = Lifecycle()
    body = ({"data": ["q", "a", None, "", False, None]} if path.startswith("/gradio") else
            {"query": "q", "documents": ["a"]})
    with Reranker(bert_model, model_settings(bert_dir, cache_size=0), metrics=Metrics(CollectorRegistry()),
                  score_fn=gated) as reranker, serve(create_app(reranker, lifecycle=lifecycle)) as url:
        try:
            with ThreadPoolExecutor(1) as pool:
                answer = pool.submit(httpx.post, f"{url}{path}", json=body, timeout=HANG_S)
                wait_until(lambda: reranker.metrics.registry.get_sample_value("reranker_inflight_requests") == 1)
                seen = lifecycle.inflight
                gated.gate.set()
                assert answer.result(HANG_S).status_code == 200
            assert seen == 1
            wait_until(lambda: lifecycle.inflight == 0)
        finally:
            gated.gate.set()


@pytest.mark.parametrize("path", ["/gradio_api/api/predict", "/gradio_api/run/predict"])
def test_a_direct_gradio_api_call_is_in_flight_before_it_reaches_the_engine(
        bert_model: ScoringModel, bert_dir: Path, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gradio parses and preprocesses such a call (and the handler reads an upload) before the engine counts it:
    a drain that began then saw nothing in flight and ended, cutting the call off."""
    from fastapi.testclient import TestClient

    from web.gradio_api import CountedBlocks
    from web.lifecycle import Lifecycle

    lifecycle = Lifecycle()
    seen: list[bool] = []
    preprocess = CountedBlocks.preprocess_data

    async def watched(self: CountedBlocks, *args: object, **kwargs: object) -> object:
        seen.append(lifecycle.idle)
        return await preprocess(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(CountedBlocks, "preprocess_data", watched)
    with Reranker(bert_model, model_settings(bert_dir), metrics=Metrics(CollectorRegistry())) as reranker:
        client = TestClient(create_app(reranker, lifecycle=lifecycle))
        answer = client.post(path, json={"data": ["q", "a\nb", None, "", False, None]})
        assert answer.status_code == 200, answer.text
    assert seen == [False]


@pytest.mark.parametrize("path", ["/v2/rerank", "/v1/rerank", "/gradio_api/api/predict"])
def test_a_refusal_while_draining_has_the_requests_id_and_latency(
        bert_model: ScoringModel, bert_dir: Path, path: str, caplog: pytest.LogCaptureFixture) -> None:
    """The drain gate ran outside the request id: its 503 had no X-Request-ID, /v2/rerank's body another id
    than the log line's, and the line no latency (nor the duration histogram a sample)."""
    from fastapi.testclient import TestClient

    from web.lifecycle import Lifecycle

    caplog.set_level("INFO", logger="reranker.requests")
    lifecycle = Lifecycle()
    with Reranker(bert_model, model_settings(bert_dir), metrics=Metrics(CollectorRegistry())) as reranker:
        client = TestClient(create_app(reranker, lifecycle=lifecycle))
        lifecycle.begin_drain()
        body = {"data": ["q", "a"]} if path.startswith("/gradio") else {"query": "q", "documents": ["a"]}
        answer = client.post(path, json=body, headers={"X-Request-ID": "my-id-1"})
        assert answer.status_code == 503 and answer.headers["x-request-id"] == "my-id-1"
        if path == "/v2/rerank":
            assert answer.json()["id"] == "my-id-1"
        [line] = [r for r in caplog.records if r.getMessage() == "rerank refused"]
        assert line.request_id == "my-id-1" and line.latency_ms is not None  # type: ignore[attr-defined]
        route = "ui" if path.startswith("/gradio") else path
        assert reranker.metrics.registry.get_sample_value("reranker_request_duration_seconds_count",
                                                          {"route": route}) == 1


CUT_OFF_CALLS = {
    "/v1/rerank": ({"query": "q", "documents": ["a", "b"]}, "/v1/rerank"),
    # Gradio's route turned the cancellation into a 500 with a traceback, which the engine call counted besides.
    "/gradio_api/api/predict": ({"data": ["q", "a\nb", None, "", False, None]}, "ui"),
}


@pytest.mark.parametrize("path", list(CUT_OFF_CALLS))
def test_a_request_in_the_engine_that_a_second_signal_cuts_off_gets_503_and_is_counted_once(
        bert_model: ScoringModel, bert_dir: Path, path: str, capfd: pytest.CaptureFixture[str]) -> None:
    """The server's event loop cancelled it as it closed: the client got uvicorn's bare 500, the log a traceback,
    and the engine call counted it `cancelled`, as if its client had left."""
    import app as service
    from web.lifecycle import Lifecycle

    body, route = CUT_OFF_CALLS[path]
    gated = GatedScorer(bert_model)
    lifecycle = Lifecycle()
    servers: list[service.DrainingServer] = []

    def draining(config: uvicorn.Config) -> uvicorn.Server:
        servers.append(service.DrainingServer(config, lifecycle, DRAIN_S))
        return servers[-1]

    with Reranker(bert_model, model_settings(bert_dir, cache_size=0), metrics=Metrics(CollectorRegistry()),
                  score_fn=gated) as reranker:
        sample = reranker.metrics.registry.get_sample_value

        def counted() -> dict[str, float]:
            return {status: sample("reranker_requests_total", {"route": route, "status": status}) or 0
                    for status in ("ok", "invalid", "cancelled", "error")}

        try:
            with serve(create_app(reranker, ui=route == "ui", lifecycle=lifecycle), draining) as url, \
                    ThreadPoolExecutor(2) as pool:
                pool.submit(reranker.rerank, "warm", ["up"])
                assert gated.first_batch.wait(HANG_S)  # the device is held: the request's pairs wait in the queue
                answer = pool.submit(httpx.post, f"{url}{path}", json=body, timeout=HANG_S)
                wait_until(lambda: reranker.queued_pairs == 1 + 2)
                [server] = servers
                server.handle_exit(signal.SIGTERM, None)  # drains: the request is accepted, so it is waited for
                server.handle_exit(signal.SIGTERM, None)  # stops at once
                response = answer.result(HANG_S)
                wait_until(lambda: sum(counted().values()) > 0)  # its pairs dropped unscored while the device is held
                gated.gate.set()  # the warm-up call ends, and with it the pool
        finally:
            gated.gate.set()
        time.sleep(0.5)  # a second count, were there one, would be in by now
        assert counted() == {"ok": 0, "invalid": 0, "cancelled": 0, "error": 1}
    assert response.status_code == 503 and response.headers["retry-after"], response.text
    assert "stopped before this request was answered" in response.text
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("path", list(CUT_OFF_CALLS))
def test_a_request_whose_answer_is_ready_when_a_stop_cuts_it_off_gets_that_answer(
        bert_model: ScoringModel, bert_dir: Path, path: str, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    """The stop cancelled the request's task just after its engine call had scored it: the call had counted it
    `ok`, and its client got the cut-off's 503. The answer in hand is now sent, and counted once."""
    import app as service
    from web.lifecycle import Lifecycle
    from web.service import RerankService

    body, route = CUT_OFF_CALLS[path]
    lifecycle = Lifecycle()
    servers: list[service.DrainingServer] = []
    booking, release, asked = threading.Event(), threading.Event(), threading.Event()
    book, answer_ready = RerankService._book, lifecycle.answered_before_cut_off

    def held_book(self: RerankService, *args: Any) -> None:  # the call has its answer, and waits here to book it
        booking.set()
        release.wait(HANG_S)
        book(self, *args)

    def asked_answer_ready() -> bool:
        ready = answer_ready()
        asked.set()
        return ready

    monkeypatch.setattr(RerankService, "_book", held_book)
    monkeypatch.setattr(lifecycle, "answered_before_cut_off", asked_answer_ready)

    def draining(config: uvicorn.Config) -> uvicorn.Server:
        servers.append(service.DrainingServer(config, lifecycle, DRAIN_S))
        return servers[-1]

    with Reranker(bert_model, model_settings(bert_dir, cache_size=0), metrics=Metrics(CollectorRegistry())) as reranker:
        sample = reranker.metrics.registry.get_sample_value
        try:
            with serve(create_app(reranker, ui=route == "ui", lifecycle=lifecycle), draining) as url, \
                    ThreadPoolExecutor(1) as pool:
                answer = pool.submit(httpx.post, f"{url}{path}", json=body, timeout=HANG_S)
                assert booking.wait(HANG_S)
                [server] = servers
                server.handle_exit(signal.SIGTERM, None)
                server.handle_exit(signal.SIGTERM, None)  # stops at once: the request's task is cancelled
                wait_until(lambda: asked.is_set() or answer.done())  # the stop cancelled the request's wait
                release.set()
                response = answer.result(HANG_S)
        finally:
            release.set()
        counted = {status: sample("reranker_requests_total", {"route": route, "status": status}) or 0
                   for status in ("ok", "invalid", "cancelled", "error")}
    assert response.status_code == 200, response.text
    assert "b" in response.text and counted == {"ok": 1, "invalid": 0, "cancelled": 0, "error": 0}
    assert "Traceback" not in capfd.readouterr().err


class ForcedStop:
    """The server factory for `serve` (app.py's DrainingServer), and its stop that does not wait (two signals)."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle
        self.servers: list[uvicorn.Server] = []

    def __call__(self, config: uvicorn.Config) -> uvicorn.Server:
        import app as service

        self.servers.append(service.DrainingServer(config, self.lifecycle, DRAIN_S))
        return self.servers[-1]

    def stop(self) -> None:
        [server] = self.servers
        server.handle_exit(signal.SIGTERM, None)
        server.handle_exit(signal.SIGTERM, None)


@pytest.mark.parametrize("case", ["rerank-preprocessing", "monitoring-preprocessing", "rerank-postprocessing"])
def test_a_gradio_api_call_cut_off_around_its_handler(bert_model: ScoringModel, bert_dir: Path, case: str,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    """Cut off in Gradio's preprocessing, before its handler ran: Gradio caught the cancellation, answered its 500
    and printed a traceback, and nothing counted the call; now 503, counted once. A Monitoring refresh cut off
    there is no rerank, and counts nothing. Cut off in Gradio's postprocessing, after the engine call booked the
    answer: the client got 503 for a call counted `ok`; now the answer."""
    import gradio as gr

    from web.gradio_login import find_gradio_app

    step = "preprocess_data" if case.endswith("preprocessing") else "postprocess_data"
    reached, release = threading.Event(), threading.Event()
    original = getattr(gr.Blocks, step)

    async def held(self: gr.Blocks, *args: Any, **kwargs: Any) -> Any:
        reached.set()
        while not release.is_set():
            await asyncio.sleep(0.01)
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(gr.Blocks, step, held)
    lifecycle = Lifecycle()
    asked, settle = threading.Event(), lifecycle.answered_before_cut_off

    def asked_to_settle() -> bool:
        answered = settle()
        asked.set()
        return answered

    monkeypatch.setattr(lifecycle, "answered_before_cut_off", asked_to_settle)
    stop = ForcedStop(lifecycle)
    body, route = CUT_OFF_CALLS["/gradio_api/api/predict"]
    path = "/gradio_api/api/predict"
    with Reranker(bert_model, model_settings(bert_dir, cache_size=0), metrics=Metrics(CollectorRegistry())) as reranker:
        app = create_app(reranker, ui=True, lifecycle=lifecycle)
        if case.startswith("monitoring"):
            fns = find_gradio_app(app).get_blocks().fns
            [index] = [i for i, f in fns.items() if getattr(f.fn, "__name__", "") == "refresh"]
            path, body = "/gradio_api/run/predict", {"fn_index": index, "data": [], "session_hash": "s"}
        try:
            with serve(app, stop) as url, ThreadPoolExecutor(1) as pool:
                answer = pool.submit(httpx.post, f"{url}{path}", json=body, timeout=HANG_S)
                assert reached.wait(HANG_S)
                stop.stop()
                if step == "postprocess_data":
                    assert asked.wait(HANG_S)  # the stop's cancellation reached the postprocessing
                else:
                    wait_until(lambda: answer.done())
                release.set()
                response = answer.result(HANG_S)
        finally:
            release.set()
        counted = {labels["status"]: value for labels, value in samples(reranker, "reranker_requests_total")
                   if labels["route"] == route and value}
    err = capfd.readouterr().err
    if case == "rerank-preprocessing":
        assert response.status_code == 503 and response.headers["retry-after"], response.text
        assert "stopped before this request was answered" in response.json()["error"]
        assert counted == {"error": 1.0}
    elif case == "monitoring-preprocessing":
        assert response.status_code == 500 and counted == {}  # as before: not a rerank
    else:
        assert response.status_code == 200 and "a" in response.text, response.text
        assert counted == {"ok": 1.0}
    assert "Traceback" not in err or case == "monitoring-preprocessing"


def test_a_request_scored_after_a_stop_cut_it_off_is_counted_as_the_cut_off_its_client_got(
        bert_model: ScoringModel, bert_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The other order: the stop settled the request as cut off (its client answered 503) while its engine call
    ran, and the call then scored every pair. It was counted `ok`."""
    from web.lifecycle import Lifecycle
    from web.service import RerankCall, RerankService

    lifecycle = Lifecycle()
    settings = model_settings(bert_dir, cache_size=0)
    with Reranker(bert_model, settings, metrics=Metrics(CollectorRegistry())) as reranker, \
            caplog.at_level(logging.INFO, logger="reranker"):
        service = RerankService(reranker, lifecycle=lifecycle)
        with lifecycle.serving():
            lifecycle.stop()
            assert not lifecycle.answered_before_cut_off()  # no answer yet: settled as cut off
            with pytest.raises(HttpError) as cut_off:
                service.rerank("/v1/rerank", RerankCall("q", ["a", "b"]))
        counted = {labels["status"]: value for labels, value in samples(reranker, "reranker_requests_total") if value}
    assert cut_off.value.status == 503 and cut_off.value.type == "shutting_down" and cut_off.value.counted
    assert counted == {"error": 1.0}
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_request_a_stop_cut_off_before_its_engine_call_is_neither_scored_nor_counted_there(
        bert_model: ScoringModel, bert_dir: Path) -> None:
    """More requests than the server's 40 worker threads: one cut off while it waited for a thread was answered
    and counted by the drain gate, and then, once a thread was free, tokenized and counted again by the engine
    call. Whoever claims the request first records it."""
    from web.lifecycle import Lifecycle
    from web.service import RerankCall, RerankService

    gated = GatedScorer(bert_model)
    gated.gate.set()
    lifecycle = Lifecycle()
    with Reranker(bert_model, model_settings(bert_dir, cache_size=0), metrics=Metrics(CollectorRegistry()),
                  score_fn=gated) as reranker:
        service = RerankService(reranker, lifecycle=lifecycle)
        with lifecycle.serving() as served:  # the drain gate's count of the request
            lifecycle.stop()
            assert served.claim()  # the gate answered its cut-off, and recorded it
            with pytest.raises(HttpError) as refused:
                service.rerank("/v1/rerank", RerankCall("q", ["a", "b"]))
        assert refused.value.status == 503 and refused.value.counted
        assert reranker.metrics.registry.get_sample_value("reranker_requests_total",
                                                          {"route": "/v1/rerank", "status": "error"}) == 0
    assert gated.pairs == 0


# Four of the engine's tokenizing slices (reranker.planning.SLICE_CHARS): 13 documents each, then 1.
LARGE = [f"document {i} " + "about cache servers and rivers " * 650 for i in range(40)]


@pytest.mark.parametrize("cancelled", [True, False], ids=["cancelled", "reaches-the-closed-queue"])
def test_a_request_a_stop_cut_off_while_tokenizing_stops_there_and_is_answered_as_cut_off(
        bert_model: ScoringModel, bert_dir: Path, cancelled: bool, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A stop that does not wait, while a large request is being tokenized. Its caller's cancel (the stop
    cancelled the request's task) ends the tokenizing at the next slice: it used to run to the end, and the
    process to wait for it after the server had closed (47 s for two 1000-document requests). Where the
    tokenizing ends after the stop closed the engine, the submit's ClosedError is the cut-off too: it was
    answered `not_ready`, and logged as a failure with a traceback."""
    from reranker.planning import SLICE_CHARS
    from web.lifecycle import Lifecycle
    from web.service import RerankCall, RerankService

    assert sum(map(len, LARGE)) > 3 * SLICE_CHARS
    lifecycle = Lifecycle()
    cancel = threading.Event()
    reranker = Reranker(bert_model, model_settings(bert_dir, cache_size=0), metrics=Metrics(CollectorRegistry()))
    # A request held in its tokenizing: records each call's documents (one call per slice). Set after the
    # engine's own start, which encodes a probe.
    encoder = GatedCall(bert_model.encoder, "encode", monkeypatch, lambda query, documents, *_, **__: len(documents))
    service = RerankService(reranker, lifecycle=lifecycle)
    with ThreadPoolExecutor(1) as pool, caplog.at_level(logging.INFO, logger="reranker"):
        call = pool.submit(service.rerank, "/v1/rerank", RerankCall("cache", LARGE), cancel)
        assert encoder.first_batch.wait(HANG_S)  # tokenizing the first slice
        lifecycle.stop()
        if cancelled:
            cancel.set()  # as run_cancellable does when the stop cancels the request's task
        else:
            reranker.close()  # the lifespan's shutdown closed the engine first
        encoder.gate.set()
        with pytest.raises(HttpError) as cut_off:
            call.result(HANG_S)
    reranker.close()
    assert cut_off.value.status == 503 and cut_off.value.type == "shutting_down"
    assert encoder.calls == ([13] if cancelled else [13, 13, 13, 1])  # the request's slices that were tokenized
    counted = {labels["status"]: value for labels, value in samples(reranker, "reranker_requests_total") if value}
    assert counted == {"error": 1.0}
    assert samples(reranker, "reranker_pairs_scored_total") == [({}, 0.0)]
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert failures == [], [r.getMessage() for r in failures]


def samples(reranker: Reranker, name: str) -> list[tuple[dict[str, str], float]]:
    return [(sample.labels, sample.value) for family in reranker.metrics.registry.collect()
            for sample in family.samples if sample.name == name]


def start_app(env: dict[str, str], argv: list[str] | None = None) -> tuple[subprocess.Popen[str], str, str]:
    port, metrics_port = free_port(), free_port()
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "RERANKER_PORT": str(port),
                "RERANKER_METRICS_PORT": str(metrics_port), "RERANKER_CACHE_SIZE": "0", **env}
    process = subprocess.Popen(argv or [str(ROOT / "start.sh")], cwd=ROOT, env=full_env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"


class HeldRequest:
    """A /v1/rerank whose body waits for `answer`. It sends `Expect: 100-continue`, and the server says
    "100 Continue" only once the app asks for the body: from then on the request is counted in flight, for as
    long as the test likes. (Polling a gauge for "the load is under way" raced a fast backend: 24 requests of
    400 documents were all answered before a scrape saw 8 in flight.)"""

    def __init__(self, url: str, i: int) -> None:
        self.docs = [f"held {i} document {j} about cache servers and rivers " * 4 for j in range(200)]
        self.body = json.dumps({"query": f"held {i}", "documents": self.docs}).encode()
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=HANG_S)
        self.sock.sendall(post_head(url, "/v1/rerank", len(self.body), {"Expect": "100-continue"}))
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            byte = self.sock.recv(1)
            assert byte, f"closed before 100 Continue: {head!r}"
            head += byte
        assert head.startswith(b"HTTP/1.1 100 "), head

    def answer(self, send_body: bool = True) -> tuple[int, dict]:
        """Send the body (or not); the status and JSON of the answer, or (-1, {}) if the connection just closed."""
        try:
            if send_body:
                self.sock.sendall(self.body)
            response = http.client.HTTPResponse(self.sock)
            response.begin()
            return response.status, json.loads(response.read())
        except (OSError, http.client.HTTPException):
            return -1, {}
        finally:
            self.sock.close()


def log_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_sigterm_during_a_load_answers_every_accepted_request_in_full(bert_dir: Path) -> None:
    # A drain deadline no loaded machine reaches: the log line below proves the drain ended by itself.
    process, url, _ = start_app({"RERANKER_MODEL": str(bert_dir), "RERANKER_MAX_LENGTH": "256",
                                 "RERANKER_DRAIN_SECONDS": str(DRAIN_S)})
    try:
        wait_ready(url)

        def call(i: int) -> tuple[int, int, dict]:
            # Query-specific documents: a mixed-up answer would show foreign text.
            docs = [f"request {i} document {j} about cache servers and rivers " * 4 for j in range(400)]
            try:
                response = httpx.post(f"{url}/v1/rerank", json={"query": f"request {i}", "documents": docs},
                                      timeout=DRAIN_S)
            except httpx.TransportError:
                return i, -1, {}  # never accepted: the listener had closed
            return i, response.status_code, response.json() if response.content else {}

        def client(c: int) -> list[tuple[int, int, dict]]:
            """One client of the load: it sends again after each answer, until it is refused."""
            outcomes = [call(c * 100)]
            while outcomes[-1][1] == 200 and len(outcomes) < 20:
                outcomes.append(call(c * 100 + len(outcomes)))
            return outcomes

        with ThreadPoolExecutor(8) as pool:
            load = [pool.submit(client, c) for c in range(8)]
            held = [HeldRequest(url, i) for i in range(8)]  # in flight at the signal, whatever the load is doing
            process.send_signal(signal.SIGTERM)
            # Refusals start with the drain, which /readyz reports: a request sent any earlier may be accepted.
            wait_until(lambda: httpx.get(f"{url}/readyz", timeout=HANG_S).status_code == 503)
            late = httpx.post(f"{url}/v1/rerank", json={"query": "late", "documents": ["x"]}, timeout=HANG_S)
            ready = httpx.get(f"{url}/readyz", timeout=HANG_S)
            held_answers = [request.answer() for request in held]
            outcomes = [outcome for future in load for outcome in future.result()]
        assert late.status_code == 503 and late.headers["retry-after"] and ready.status_code == 503
        assert process.wait(timeout=DRAIN_S) == 0
    finally:
        if process.poll() is None:
            process.kill()
        output, _ = process.communicate(timeout=HANG_S)
    [draining] = [line for line in log_lines(output) if line["message"].startswith("draining")]
    assert draining["inflight"] >= 8
    for request, (status, body) in zip(held, held_answers, strict=True):
        assert status == 200, (status, body)
        assert [request.docs[r["index"]] for r in body["results"]] == [r["document"]["text"] for r in body["results"]]
        assert sorted(r["index"] for r in body["results"]) == list(range(200))
    # Requests that arrived after the signal were refused whole (503, Retry-After) or found no listener.
    assert all(status in (200, 503, -1) for _, status, _ in outcomes), [s for _, s, _ in outcomes]
    assert all(body["error"]["type"] == "shutting_down" for _, status, body in outcomes if status == 503)
    for i, status, body in outcomes:
        if status == 200:
            results = body["results"]
            assert sorted(r["index"] for r in results) == list(range(400))
            assert all(r["document"]["text"].startswith(f"request {i} document {r['index']} ") for r in results)
    assert "drained: every accepted request was answered" in output


def test_a_second_sigterm_stops_at_once_and_says_how_many_requests_it_cut_off(bert_dir: Path) -> None:
    """The second signal's line gave no number, and once the cut-off requests had ended the drain's thread
    logged 'drained: every accepted request was answered'."""
    process, url, _ = start_app({"RERANKER_MODEL": str(bert_dir), "RERANKER_MAX_LENGTH": "256",
                                 "RERANKER_DRAIN_SECONDS": str(DRAIN_S)})
    try:
        wait_ready(url)
        held = [HeldRequest(url, i) for i in range(2)]  # their bodies never come: the drain cannot end by itself
        process.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(f"{url}/readyz", timeout=HANG_S).status_code == 503)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=HANG_S) == 0
        # Cut off with an answer that says so, not uvicorn's bare 500 (and a logged traceback).
        answers = [request.answer(send_body=False) for request in held]
    finally:
        if process.poll() is None:
            process.kill()
        output, _ = process.communicate(timeout=HANG_S)
    assert all(status == 503 and body["error"]["type"] == "shutting_down" for status, body in answers), answers
    lines = log_lines(output)
    [second] = [line for line in lines if line["message"].startswith("second stop signal")]
    assert second["inflight"] == 2
    assert [line["status"] for line in lines if line["message"] == "rerank refused"] == ["error"] * 2
    assert "drained: every accepted request was answered" not in output
    assert [line for line in lines if line["level"] == "ERROR"] == []


def test_a_stop_ends_an_open_tabs_heartbeat_stream_instead_of_cutting_it(bert_dir: Path) -> None:
    """A browser tab holds a Gradio heartbeat stream, which ends only when told. Every stop with a tab open waited
    out uvicorn's graceful timeout (5 s) and then cut the stream, logging two errors."""
    process, url, _ = start_app({"RERANKER_MODEL": str(bert_dir), "RERANKER_DRAIN_SECONDS": str(DRAIN_S)})
    tab: list[str] = []
    try:
        wait_ready(url)

        def open_tab() -> None:
            with httpx.stream("GET", f"{url}/gradio_api/heartbeat/open-tab", timeout=HANG_S) as stream:
                tab.extend(stream.iter_lines())
            tab.append("eof")  # ended by the server, not cut: a cut stream raises instead

        with ThreadPoolExecutor(1) as pool:
            heartbeat = pool.submit(open_tab)
            wait_until(lambda: tab)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=HANG_S) == 0
            heartbeat.result(HANG_S)
    finally:
        if process.poll() is None:
            process.kill()
        output, _ = process.communicate(timeout=HANG_S)
    assert tab[-1] == "eof"
    assert [line for line in log_lines(output) if line["level"] == "ERROR"] == []


FAULTY_APP = """
import sys
from pathlib import Path

import app
from reranker import Reranker
from reranker.logs import setup_logging
from reranker.loading import load_model
from tests.conftest import model_settings
from tests.test_faults import GatedScorer
from tests.test_faults import poisoning_scorer

setup_logging("INFO")
settings = model_settings(Path(sys.argv[1]), port=int(sys.argv[2]), cache_size=0)
model = load_model(settings)
with Reranker(model, settings, score_fn=poisoning_scorer(model, 1)) as reranker:
    sys.exit(app.serve(reranker))
"""


def test_a_device_fault_turns_unready_and_exits_non_zero(bert_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "faulty_app.py"
    script.write_text(FAULTY_APP)
    port = free_port()
    process, url, _ = start_app({"PYTHONPATH": str(ROOT)},
                             [sys.executable, str(script), str(bert_dir), str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        first = httpx.post(f"{url}/v1/rerank", json={"query": "q", "documents": ["a"]}, timeout=HANG_S)
        assert first.status_code == 200  # the one healthy batch
        broken = httpx.post(f"{url}/v1/rerank", json={"query": "q", "documents": ["b", "c"]}, timeout=HANG_S)
        assert broken.status_code == 503 and "restarting" in broken.json()["error"]["message"]
        assert process.wait(timeout=HANG_S) == 1
    finally:
        if process.poll() is None:
            process.kill()
        output, _ = process.communicate(timeout=HANG_S)
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    faults = [line for line in lines if line.get("error_type") == "device_fault"]
    assert len(faults) == 1 and "illegal memory access" in faults[0]["cause"]
