"""The metrics server and every metric family of SPEC section 6, driven by known traffic."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Counter

import metrics_server
from reranker import Reranker
from reranker.gpu import GpuCollector, Nvml
from reranker.metrics import Metrics
from reranker.model import ScoringModel
from reranker.tokens import EncodedPair
from tests.conftest import model_settings
from tests.servers import HANG_S, serve
from tests.test_faults import wait_until
from web.errors import HttpError
from web.http import create_app


def test_metrics_endpoint_serves_the_registry_in_prometheus_format() -> None:
    registry = CollectorRegistry()
    Counter("demo_total", "A demo counter.", registry=registry).inc(3)
    client = metrics_server.create_app(registry).test_client()
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "demo_total 3.0" in response.get_data(as_text=True)
    openmetrics = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert openmetrics.headers["Content-Type"].startswith("application/openmetrics-text")
    assert client.get("/healthz").status_code == 200


def test_metrics_server_runs_on_a_named_daemon_thread_and_stops() -> None:
    registry = CollectorRegistry()
    Counter("demo_total", "A demo counter.", registry=registry).inc()
    handle = metrics_server.start(registry, "127.0.0.1", 0)
    try:
        assert handle.thread.name == "metrics-server" and handle.thread.daemon
        assert "demo_total 1.0" in httpx.get(f"http://127.0.0.1:{handle.port}/metrics", timeout=HANG_S).text
    finally:
        handle.stop()
    assert not handle.thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{handle.port}/metrics", timeout=2)


def test_a_taken_port_names_the_variable() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(metrics_server.PortError, match="set RERANKER_METRICS_PORT to a free port"):
            metrics_server.start(CollectorRegistry(), "127.0.0.1", port)


def test_a_port_whose_last_connections_wait_out_time_wait_is_taken_again() -> None:
    """A restart binds the port that the stopped server's closed connections still hold (TIME_WAIT)."""
    listener = metrics_server.bind("127.0.0.1", 0, serving="the UI and API", variable="RERANKER_PORT")
    port = listener.getsockname()[1]
    listener.listen()
    client = socket.create_connection(("127.0.0.1", port), timeout=HANG_S)
    accepted, _ = listener.accept()
    accepted.close()  # the server closes first: its side waits out TIME_WAIT
    client.recv(1)
    client.close()
    listener.close()
    again = metrics_server.bind("127.0.0.1", port, serving="the UI and API", variable="RERANKER_PORT")
    again.close()


def test_an_address_this_machine_lacks_names_the_host_variable() -> None:
    absent = "192.0.2.1"  # TEST-NET-1 (RFC 5737), for documentation: no machine should hold it
    with socket.socket() as probe:
        try:
            probe.bind((absent, 0))
        except OSError:
            pass
        else:
            pytest.skip(f"this machine holds {absent}")
    for variable, host_variable in (("RERANKER_PORT", "RERANKER_HOST"),
                                    ("RERANKER_METRICS_PORT", "RERANKER_METRICS_HOST")):
        with pytest.raises(metrics_server.PortError, match=f"set {host_variable} to an address of this machine"):
            metrics_server.bind(absent, 0, serving="x", variable=variable)


def test_a_port_another_service_listens_on_first_stops_the_serving(bert_model: ScoringModel, bert_dir: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Two services bound the same port (SO_REUSEADDR, which a restart needs): the second started while the first
    was still loading its model. The one to listen second ran on, saying it served and serving nothing (uvicorn
    took its failed listen quietly); it is told so now, and exits 1."""
    import app

    rival = socket.socket()
    rival.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    rival.bind(("127.0.0.1", 0))  # another service, still loading its model
    port = rival.getsockname()[1]
    ours = metrics_server.bind("127.0.0.1", port, serving="the UI and API", variable="RERANKER_PORT")
    rival.listen()  # ...which is up first
    try:
        with Reranker(bert_model, model_settings(bert_dir, port=port)) as reranker:
            status: list[int] = []
            # On a thread, so that a serve() that went on to run fails here (its signal handlers need the main
            # thread) rather than serving for ever.
            serving = threading.Thread(target=lambda: status.append(app.serve(reranker, ours)))
            serving.start()
            serving.join(HANG_S)
            assert status == [1]
    finally:
        rival.close()
        ours.close()
    assert f"cannot serve the UI and API on 127.0.0.1:{port}" in caplog.text and "serving on" not in caplog.text


@pytest.fixture
def traffic(bert_model: ScoringModel, bert_dir: Path) -> Iterator[tuple[TestClient, Metrics]]:
    metrics = Metrics(CollectorRegistry(), process_collector=True)
    with Reranker(bert_model, model_settings(bert_dir, max_docs=10), metrics=metrics) as reranker:
        yield TestClient(create_app(reranker, ui=False)), metrics


def value(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    assert found is not None, f"{name}{labels} is not exported"
    return found


def test_requests_and_durations_by_route_and_status(traffic: tuple[TestClient, Metrics]) -> None:
    client, metrics = traffic
    for i in range(3):
        assert client.post("/v1/rerank", json={"query": f"q{i}", "documents": ["a", "b"]}).status_code == 200
    assert client.post("/v1/rerank", json={"query": "", "documents": ["a"]}).status_code == 400
    assert client.post("/v1/rerank", json={"query": 1, "documents": ["a"]}).status_code == 422
    assert client.post("/rerank", json={"query": "q", "texts": ["a"] * 11}).status_code == 413
    assert value(metrics, "reranker_requests_total", route="/v1/rerank", status="ok") == 3
    assert value(metrics, "reranker_requests_total", route="/v1/rerank", status="invalid") == 2
    assert value(metrics, "reranker_requests_total", route="/rerank", status="invalid") == 1
    # Every answered request has a duration, those refused before the engine (wrong types) included.
    assert value(metrics, "reranker_request_duration_seconds_count", route="/v1/rerank") == 5
    assert value(metrics, "reranker_request_duration_seconds_count", route="/rerank") == 1
    assert value(metrics, "reranker_inflight_requests") == 0


def test_documents_tokens_pairs_and_batches(traffic: tuple[TestClient, Metrics]) -> None:
    client, metrics = traffic
    sent = [3, 5, 1]
    for n in sent:
        client.post("/v1/rerank", json={"query": f"query {n}", "documents": [f"doc {i}" for i in range(n)]})
    assert value(metrics, "reranker_documents_per_request_sum") == sum(sent)
    assert value(metrics, "reranker_documents_per_request_count") == 3
    assert value(metrics, "reranker_pairs_scored_total") == sum(sent)
    assert value(metrics, "reranker_batch_size_sum") == sum(sent)
    assert value(metrics, "reranker_input_tokens_total") > sum(sent)
    assert value(metrics, "reranker_batch_tokens_sum") >= value(metrics, "reranker_input_tokens_total")
    assert value(metrics, "reranker_inference_duration_seconds_count") >= 3
    assert value(metrics, "reranker_queue_duration_seconds_count") == 3
    assert value(metrics, "reranker_top1_score_count") == 3 and value(metrics, "reranker_score_stddev_count") == 3


def test_cache_hits_and_truncations(traffic: tuple[TestClient, Metrics]) -> None:
    client, metrics = traffic
    body = {"query": "cache", "documents": ["one", "two", "cache " * 400]}
    client.post("/v1/rerank", json=body)
    client.post("/v1/rerank", json=body)
    assert value(metrics, "reranker_cache_requests_total", result="miss") == 3
    assert value(metrics, "reranker_cache_requests_total", result="hit") == 3
    # The repeat never reached the model, and its score is still of the cut text: counted in each request.
    assert value(metrics, "reranker_truncated_documents_total") == 2


def test_model_info_load_time_queue_gauges_and_process_collector(traffic: tuple[TestClient, Metrics],
                                                                 bert_model: ScoringModel) -> None:
    _, metrics = traffic
    assert value(metrics, "reranker_model_info", model=bert_model.model_id, device="cpu", backend="torch",
                 backend_reason="RERANKER_BACKEND=torch", dtype="float32", dtype_reason="RERANKER_DTYPE=float32",
                 max_length="256", compile="off") == 1
    assert value(metrics, "reranker_model_load_seconds") > 0
    assert value(metrics, "reranker_queue_pairs") == 0
    assert value(metrics, "reranker_queue_capacity_pairs") == 20000
    assert value(metrics, "process_resident_memory_bytes") > 0


def test_overloaded_and_error_outcomes(bert_model: ScoringModel, bert_dir: Path) -> None:
    release = threading.Event()
    calls = {"n": 0}

    def scorer(batch: Sequence[EncodedPair]) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 1:
            release.wait(HANG_S)
        if calls["n"] == 2:
            raise RuntimeError("kernel failure")
        return bert_model.score(batch)

    metrics = Metrics(CollectorRegistry())
    settings = model_settings(bert_dir, max_queue=4, cache_size=0)
    with Reranker(bert_model, settings, metrics=metrics, score_fn=scorer) as reranker:
        client = TestClient(create_app(reranker, ui=False))
        blocker = threading.Thread(target=client.post, args=("/v1/rerank",),
                                   kwargs={"json": {"query": "q", "documents": ["a", "b", "c"]}})
        blocker.start()
        wait_until(lambda: reranker.queued_pairs == 3)
        response = client.post("/v1/rerank", json={"query": "q", "documents": ["d", "e"]})
        assert response.status_code == 429 and response.headers["Retry-After"] == "1"
        release.set()
        blocker.join(HANG_S)
        failed = client.post("/v1/rerank", json={"query": "q", "documents": ["f"]})
        assert failed.status_code == 500 and "kernel" not in failed.text
    assert value(metrics, "reranker_requests_total", route="/v1/rerank", status="overloaded") == 1
    assert value(metrics, "reranker_requests_total", route="/v1/rerank", status="error") == 1
    assert value(metrics, "reranker_requests_total", route="/v1/rerank", status="ok") == 1


def held_scorer(model: ScoringModel) -> tuple[Callable[[Sequence[EncodedPair]], np.ndarray], threading.Event]:
    """`model`'s scorer, holding every pass until the event is set."""
    release = threading.Event()

    def scorer(batch: Sequence[EncodedPair]) -> np.ndarray:
        release.wait(HANG_S)
        return model.score(batch)
    return scorer, release


def test_a_burst_past_the_queue_is_refused_at_once_not_left_waiting_for_a_worker_thread(
        bert_model: ScoringModel, bert_dir: Path) -> None:
    """The room was taken on anyio's worker threads, which lend 40 to every caller: with those all waiting on
    scoring, a burst of small requests waited for a thread, uncounted, and never got its 429."""
    scorer, release = held_scorer(bert_model)
    metrics = Metrics(CollectorRegistry())
    settings = model_settings(bert_dir, max_queue=50, cache_size=0)
    statuses: list[int] = []
    with Reranker(bert_model, settings, metrics=metrics, score_fn=scorer) as reranker, \
            serve(create_app(reranker, ui=False)) as url, httpx.Client(timeout=HANG_S) as http:
        def call(i: int) -> None:
            statuses.append(http.post(f"{url}/v1/rerank", json={"query": "q", "documents": [f"doc {i}"]}).status_code)

        callers = [threading.Thread(target=call, args=(i,)) for i in range(100)]
        for caller in callers:
            caller.start()
        try:
            wait_until(lambda: statuses.count(429) == 50)  # while the 50 admitted wait on the scorer
            assert len(statuses) == 50
        finally:
            release.set()
            for caller in callers:
                caller.join(HANG_S)
    assert sorted(statuses) == [200] * 50 + [429] * 50
    assert value(metrics, "reranker_requests_total", route="/v1/rerank", status="overloaded") == 50
    assert value(metrics, "reranker_queue_pairs") == 0


def test_with_the_queue_full_a_request_the_cache_answers_is_served_not_refused(bert_model: ScoringModel,
                                                                                bert_dir: Path) -> None:
    """Admission held room for every document before the cache was looked at: with the queue full, a request the
    cache answers whole (a repeated query, as RAG pipelines send) was refused 429 though it queues no pair."""
    scorer, release = held_scorer(bert_model)
    metrics = Metrics(CollectorRegistry())
    settings = model_settings(bert_dir, max_queue=4, cache_size=100)
    cached = {"query": "q", "documents": ["a", "b", "a"]}
    with Reranker(bert_model, settings, metrics=metrics, score_fn=scorer) as reranker:
        looked_up: list[tuple[Any, ...]] = []
        lookup = reranker.pairs_to_hold

        def pairs_to_hold(*args: Any) -> int:
            looked_up.append(args)
            return lookup(*args)

        reranker.pairs_to_hold = pairs_to_hold  # type: ignore[method-assign,assignment]
        client = TestClient(create_app(reranker, ui=False))
        release.set()
        first = client.post("/v1/rerank", json=cached)
        assert first.status_code == 200
        assert looked_up == []  # with room to spare, admission hashes no document
        release.clear()
        blocker = threading.Thread(target=client.post, args=("/v1/rerank",),
                                   kwargs={"json": {"query": "q", "documents": ["c", "d", "e", "f"]}})
        blocker.start()
        try:
            wait_until(lambda: reranker.queued_pairs == 4)  # the queue is full
            again = client.post("/v1/rerank", json={**cached, "top_n": 2})
            assert again.status_code == 200 and again.json()["results"] == first.json()["results"][:2]
            # The same pairs as the engine scores them: a cap on windows means nothing in truncate mode.
            assert client.post("/v1/rerank", json={**cached, "max_chunks_per_doc": 1}).status_code == 200
            # One document the cache lacks needs a pair of room, which a full queue has not.
            assert client.post("/v1/rerank", json={**cached, "documents": ["a", "new"]}).status_code == 429
            # What /v2/rerank cuts to max_tokens_per_doc is looked up only after a tokenizer pass: room for all.
            v2 = {"model": "m", "query": "q", "documents": ["a"], "max_tokens_per_doc": 1}
            assert client.post("/v2/rerank", json=v2).status_code == 429
        finally:
            release.set()
            blocker.join(HANG_S)
    assert value(metrics, "reranker_requests_total", route="/v1/rerank", status="ok") == 4
    assert value(metrics, "reranker_requests_total", route="/v1/rerank", status="overloaded") == 1


def test_the_request_duration_counts_from_the_requests_arrival(bert_model: ScoringModel, bert_dir: Path) -> None:
    """It counted from the engine call: a body sent over a second, or a wait for a worker thread (on Ray Serve, at
    the ingress for a replica), was left out, and the latency alert stayed quiet while clients waited."""
    metrics = Metrics(CollectorRegistry())

    def slow_body() -> Iterator[bytes]:
        yield b'{"query": "q", '
        time.sleep(1.0)
        yield b'"documents": ["a", "b"]}'

    with Reranker(bert_model, model_settings(bert_dir), metrics=metrics) as reranker, \
            serve(create_app(reranker, ui=False)) as url:
        sent = time.perf_counter()
        answer = httpx.post(f"{url}/v1/rerank", content=slow_body(), headers={"content-type": "application/json"},
                            timeout=HANG_S)
        client_s = time.perf_counter() - sent
        assert answer.status_code == 200
    booked = value(metrics, "reranker_request_duration_seconds_sum", route="/v1/rerank")
    assert 1.0 <= booked <= client_s, (booked, client_s)


def test_a_client_that_leaves_while_waiting_for_a_worker_thread_gives_its_room_back_at_once(
        bert_model: ScoringModel, bert_dir: Path) -> None:
    """Its room stayed held until a thread was free to find it gone: live clients got 429 meanwhile."""
    import anyio
    from starlette.requests import Request

    from web.backend import LocalBackend
    from web.service import RerankCall, RerankService

    settings = model_settings(bert_dir, max_queue=50, cache_size=0)
    busy = threading.Event()
    with Reranker(bert_model, settings) as reranker:
        backend = LocalBackend(RerankService(reranker))

        async def disconnect() -> dict[str, Any]:
            return {"type": "http.disconnect"}

        async def scenario() -> tuple[int, Exception | None]:
            anyio.to_thread.current_default_thread_limiter().total_tokens = 1
            holder = asyncio.ensure_future(anyio.to_thread.run_sync(busy.wait, HANG_S))  # the only thread
            await asyncio.sleep(0.05)
            request = Request({"type": "http", "method": "POST", "path": "/v1/rerank", "headers": []}, disconnect)
            call = RerankCall("q", [f"doc {i}" for i in range(30)])
            leaving = asyncio.ensure_future(backend.rerank(request, "/v1/rerank", call))
            for _ in range(200):  # the client is gone; its call waits on the thread the holder keeps
                await asyncio.sleep(0.01)
                if reranker._batcher._held_pairs == 0:
                    break
            held = reranker._batcher._held_pairs
            busy.set()
            await holder
            try:
                await leaving
            except Exception as err:
                return held, err
            return held, None

        held, error = asyncio.run(scenario())
        assert held == 0 and isinstance(error, HttpError) and error.status == 499
        assert len(reranker.rerank("q", [f"doc {i}" for i in range(50)])) == 50  # all the room is back


class FakeNvml:
    """The slice of the NVML API the collector uses, with two GPUs."""

    def __init__(self, fail_init: bool = False, broken_device: int | None = None) -> None:
        self.fail_init = fail_init
        self.broken_device = broken_device
        self.init_calls = 0

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if index == self.broken_device:
            raise RuntimeError("GPU is lost")
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return SimpleNamespace(used=(handle + 1) * 2**30, total=80 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return SimpleNamespace(gpu=25 * (handle + 1))

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return b"NVIDIA H100"


def test_gpu_gauges_are_read_at_scrape_time() -> None:
    registry = CollectorRegistry()
    registry.register(GpuCollector(Nvml(FakeNvml())))
    get = registry.get_sample_value
    assert get("reranker_gpu_memory_used_bytes", {"gpu": "0"}) == 2**30
    assert get("reranker_gpu_memory_used_bytes", {"gpu": "1"}) == 2 * 2**30
    assert get("reranker_gpu_memory_total_bytes", {"gpu": "1"}) == 80 * 2**30
    assert get("reranker_gpu_utilization_ratio", {"gpu": "0"}) == 0.25
    assert get("reranker_gpu_utilization_ratio", {"gpu": "1"}) == 0.5


def test_without_a_gpu_the_gauges_are_absent_and_nvml_is_tried_once(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeNvml(fail_init=True)
    registry = CollectorRegistry()
    registry.register(GpuCollector(Nvml(fake)))
    for _ in range(3):
        text = metrics_server.create_app(registry).test_client().get("/metrics").get_data(as_text=True)
        assert "reranker_gpu" not in text
    assert fake.init_calls == 1
    assert not [r for r in caplog.records if r.levelno >= 30]  # no warning spam


def test_a_lost_gpu_is_skipped_not_raised() -> None:
    registry = CollectorRegistry()
    registry.register(GpuCollector(Nvml(FakeNvml(broken_device=0))))
    assert registry.get_sample_value("reranker_gpu_memory_used_bytes", {"gpu": "0"}) is None
    assert registry.get_sample_value("reranker_gpu_memory_used_bytes", {"gpu": "1"}) == 2 * 2**30


def test_real_nvml_on_this_machine_never_fails() -> None:
    readings = Nvml().read()  # empty without a GPU, one reading per GPU with one
    assert all(r.memory_total_bytes > 0 for r in readings)
