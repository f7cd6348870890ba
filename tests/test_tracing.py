"""Spans in memory: the tree of one request, batch links, errors, traceparent/traceresponse, tracing off."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, format_span_id, format_trace_id

from reranker import Reranker, Settings, spans
from reranker.metrics import Metrics
from reranker.model import ScoringModel
from reranker.tokens import EncodedPair
from reranker.tracing import Tracing
from tests.conftest import model_settings
from tests.otlp_receiver import otlp_receiver
from tests.servers import HANG_S, serve
from tests.test_faults import jobs_taken, wait_until
from web.history import RequestHistory
from web.http import create_app
from web.tracing import UI_SPAN

SECRET_QUERY = "walrus-private-question"
SECRET_DOC = "zebra-confidential-passage"
CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
STEPS = (spans.VALIDATE, spans.CACHE, spans.TOKENIZE, spans.QUEUE, spans.SCORE, spans.BATCH, spans.POSTPROCESS)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracing(exporter: InMemorySpanExporter, metrics: Metrics) -> Iterator[Tracing]:
    tracing = Tracing.exporting_to(exporter, metrics)
    yield tracing
    tracing.shutdown()


def finished(tracing: Tracing, exporter: InMemorySpanExporter, *names: str) -> list[ReadableSpan]:
    """Every span exported so far, once those named have ended (a live server ends its span after answering)."""
    deadline = time.monotonic() + HANG_S
    while True:
        tracing.flush(timeout=HANG_S)
        got = list(exporter.get_finished_spans())
        if set(names) <= {s.name for s in got} or time.monotonic() > deadline:
            return got


def one(got: list[ReadableSpan], name: str) -> ReadableSpan:
    [span] = [s for s in got if s.name == name]
    return span


def started(span: ReadableSpan) -> int:
    assert span.start_time is not None, f"{span.name} never started"
    return span.start_time


def ended(span: ReadableSpan) -> int:
    assert span.end_time is not None, f"{span.name} never ended"
    return span.end_time


def test_one_request_is_one_trace_of_step_spans(bert_model: ScoringModel, bert_dir: Path, tracing: Tracing,
                                                exporter: InMemorySpanExporter) -> None:
    with Reranker(bert_model, model_settings(bert_dir), tracing=tracing) as reranker:
        client = TestClient(create_app(reranker, ui=False))
        response = client.post("/v1/rerank", json={"query": SECRET_QUERY, "documents": [SECRET_DOC, "tea", "a cache"],
                                                   "top_n": 2})
    assert response.status_code == 200
    got = finished(tracing, exporter)
    server, request = one(got, "POST /v1/rerank"), one(got, spans.REQUEST)
    assert server.kind is SpanKind.SERVER and server.parent is None
    assert server.attributes is not None and server.attributes["http.route"] == "/v1/rerank"
    assert request.parent is not None and request.parent.span_id == server.context.span_id
    steps = {name: one(got, name) for name in STEPS}
    for step in steps.values():
        assert step.parent is not None and step.parent.span_id == request.context.span_id
        assert step.context.trace_id == server.context.trace_id and step.status.status_code is StatusCode.UNSET
    order = [steps[name] for name in (spans.VALIDATE, spans.CACHE, spans.TOKENIZE, spans.QUEUE, spans.SCORE)]
    assert all(ended(a) <= started(b) + 1000 for a, b in zip(order, order[1:], strict=False))  # 1 µs of slack
    assert ended(steps[spans.SCORE]) <= started(steps[spans.POSTPROCESS]) + 1000

    assert dict(request.attributes or {}) == {
        "reranker.model": bert_model.model_id, "reranker.device": "cpu", "reranker.dtype": "float32",
        "reranker.documents": 3, "reranker.pairs": 3, "reranker.tokens": dict(steps[spans.TOKENIZE].attributes or {})[
            "reranker.tokens"], "reranker.truncated": 0, "reranker.chunked": 0, "reranker.cache_hits": 0,
        "reranker.top_n": 2, "reranker.outcome": "ok",
    }
    batch = steps[spans.BATCH]
    attributes: dict[str, Any] = dict(batch.attributes or {})
    assert attributes["reranker.batch.size"] == 3 and attributes["reranker.batch.requests"] == 1
    assert attributes["reranker.batch.padded_tokens"] >= attributes["reranker.batch.tokens"] == dict(
        request.attributes or {})["reranker.tokens"]
    assert attributes["reranker.model"] == bert_model.model_id and attributes["reranker.batch.inference_ms"] > 0
    assert [link.context for link in batch.links] == [request.context]
    assert [link.context for link in steps[spans.SCORE].links] == [batch.context]
    assert dict(steps[spans.CACHE].attributes or {}) == {"reranker.cache_hits": 0}

    # Level 2: flags 03 = sampled, and the trace id is random (this service started the trace).
    expected = f"00-{format_trace_id(server.context.trace_id)}-{format_span_id(server.context.span_id)}-03"
    assert response.headers["traceresponse"] == expected
    everything = repr([(s.attributes, [e.attributes for e in s.events], s.name) for s in got])
    assert SECRET_QUERY not in everything and SECRET_DOC not in everything


def test_a_traceparent_continues_the_callers_trace(bert_model: ScoringModel, bert_dir: Path, tracing: Tracing,
                                                  exporter: InMemorySpanExporter) -> None:
    with Reranker(bert_model, model_settings(bert_dir), tracing=tracing) as reranker:
        client = TestClient(create_app(reranker, ui=False))
        sampled = client.post("/rerank", json={"query": "q", "texts": ["a", "b"]},
                              headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"})
        server = one(finished(tracing, exporter), "POST /rerank")
        assert format_trace_id(server.context.trace_id) == CALLER_TRACE
        assert server.parent is not None and format_span_id(server.parent.span_id) == CALLER_SPAN
        assert sampled.headers["traceresponse"] == f"00-{CALLER_TRACE}-{format_span_id(server.context.span_id)}-01"
        # A caller that does not sample: the default parent-based sampler records nothing, and says so.
        exporter.clear()
        unsampled = client.post("/rerank", json={"query": "q", "texts": ["c"]},
                                headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-00"})
        assert unsampled.headers["traceresponse"].startswith(f"00-{CALLER_TRACE}-")
        assert unsampled.headers["traceresponse"].endswith("-00")
    assert finished(tracing, exporter) == []


def test_two_requests_that_shared_a_batch_both_link_it(bert_model: ScoringModel, bert_dir: Path, tracing: Tracing,
                                                       exporter: InMemorySpanExporter) -> None:
    held, release = threading.Event(), threading.Event()

    def gated(batch: Sequence[EncodedPair]) -> np.ndarray:
        held.set()
        release.wait(HANG_S)  # hold the device so that both requests wait in one round
        return bert_model.score(batch)

    # A budget of 100 padded tokens: the second warm-up's two long documents make two batches, the first
    # waits in the prefetch slot and the second holds the collator, so both requests queue as one round.
    settings = model_settings(bert_dir, cache_size=0, batch_tokens=100)
    with Reranker(bert_model, settings, score_fn=gated, tracing=tracing) as reranker:
        warm = [threading.Thread(target=reranker.rerank, args=("warm", docs))
                for docs in (["up"], ["up " * 60, "down " * 60])]
        calls = [threading.Thread(target=reranker.rerank, args=("q", docs))
                 for docs in (["a", "b", "c"], ["d", "e", "f", "g"])]
        warm[0].start()
        assert held.wait(HANG_S)
        warm[1].start()
        wait_until(lambda: jobs_taken(reranker) == 2)  # its round is being handed over: later arrivals wait
        for thread in calls:
            thread.start()
        wait_until(lambda: reranker.queued_pairs == 10)
        release.set()
        for thread in [*warm, *calls]:
            thread.join(HANG_S)
    got = finished(tracing, exporter)
    requests = {dict(s.attributes or {})["reranker.documents"]: s for s in got if s.name == spans.REQUEST}
    first, second = requests[3], requests[4]
    assert first.context.trace_id != second.context.trace_id  # two traces, one batch
    [shared] = [s for s in got if s.name == spans.BATCH and len(s.links) == 2]
    assert {link.context.span_id for link in shared.links} == {first.context.span_id, second.context.span_id}
    assert dict(shared.attributes or {})["reranker.batch.size"] == 7
    assert dict(shared.attributes or {})["reranker.batch.requests"] == 2
    assert shared.parent is not None and shared.parent.span_id in {first.context.span_id, second.context.span_id}
    for request in (first, second):
        [score] = [s for s in got if s.name == spans.SCORE and s.parent and s.parent.span_id == request.context.span_id]
        assert [link.context.span_id for link in score.links] == [shared.context.span_id]


def test_errors_are_recorded_with_status_error(bert_model: ScoringModel, bert_dir: Path, tracing: Tracing,
                                               exporter: InMemorySpanExporter) -> None:
    def small_device(batch: Sequence[EncodedPair]) -> np.ndarray:
        if len(batch) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return bert_model.score(batch)

    with Reranker(bert_model, model_settings(bert_dir, cache_size=0), score_fn=small_device,
                  tracing=tracing) as reranker:
        client = TestClient(create_app(reranker, ui=False))
        assert client.post("/v1/rerank", json={"query": "", "documents": ["a"]}).status_code == 400
        invalid = finished(tracing, exporter)
        exporter.clear()
        assert client.post("/v1/rerank", json={"query": "q", "documents": ["a", "b"]}).status_code == 200
        halved = finished(tracing, exporter)
    request, validate = one(invalid, spans.REQUEST), one(invalid, spans.VALIDATE)
    assert request.status.status_code is StatusCode.ERROR and validate.status.status_code is StatusCode.ERROR
    assert dict(request.attributes or {})["reranker.outcome"] == "invalid"
    assert [e.attributes["exception.type"] for e in validate.events if e.attributes] == [
        "reranker.errors.EmptyInputError"]  # a ValidationError: the empty query
    assert "query is empty" in str(validate.status.description)
    batches = sorted((s for s in halved if s.name == spans.BATCH), key=started)
    assert [dict(b.attributes or {})["reranker.batch.size"] for b in batches] == [2, 1, 1]  # one pass per retry
    assert [b.status.status_code for b in batches] == [StatusCode.ERROR, StatusCode.UNSET, StatusCode.UNSET]
    assert len(one(halved, spans.SCORE).links) == 3


def test_a_request_cancelled_in_the_queue_is_recorded_there_and_not_as_an_error(
        bert_model: ScoringModel, bert_dir: Path, tracing: Tracing, exporter: InMemorySpanExporter,
        caplog: pytest.LogCaptureFixture) -> None:
    """Its caller left while its pairs waited: the queue span was ended before the cancellation was recorded on
    it (lost, with two SDK warnings in the log), and every span said ERROR for a client that hung up."""
    from reranker.errors import CancelledError
    from tests.test_faults import GatedScorer, fill_the_pipeline

    gated = GatedScorer(bert_model)
    cancel = threading.Event()
    outcome: list[BaseException] = []

    def start(name: str) -> threading.Thread:
        thread = threading.Thread(target=reranker.rerank, args=(name, ["x"]))
        thread.start()
        return thread

    def cancelled_call() -> None:
        try:
            reranker.rerank_detailed("q", ["a", "b"], cancel=cancel)
        except CancelledError as err:
            outcome.append(err)

    with Reranker(bert_model, model_settings(bert_dir, cache_size=0), score_fn=gated, tracing=tracing) as reranker, \
            caplog.at_level("WARNING", logger="opentelemetry"):
        threads = [start("holds the device")]
        assert gated.first_batch.wait(HANG_S)
        threads += fill_the_pipeline(reranker, start)  # so that the next pairs stay in the queue
        call = threading.Thread(target=cancelled_call)
        call.start()
        wait_until(lambda: reranker.queued_pairs == 3 + 2)
        cancel.set()
        call.join(HANG_S)
        gated.gate.set()
        for thread in threads:
            thread.join(HANG_S)
        got = finished(tracing, exporter)
    assert len(outcome) == 1
    [queue] = [s for s in got if s.name == spans.QUEUE and dict(s.attributes or {})["reranker.pairs"] == 2]
    trace_spans = {s.name: s for s in got if s.context.trace_id == queue.context.trace_id}
    assert spans.SCORE not in trace_spans  # no pair of it was taken
    request = trace_spans[spans.REQUEST]
    assert [e.attributes["exception.type"] for e in queue.events if e.attributes] == ["reranker.errors.CancelledError"]
    assert queue.status.status_code is StatusCode.UNSET and request.status.status_code is StatusCode.UNSET
    assert dict(request.attributes or {})["reranker.outcome"] == "cancelled"
    assert [r.getMessage() for r in caplog.records if r.name.startswith("opentelemetry")] == []


def test_a_request_cancelled_during_its_pass_links_that_pass(bert_model: ScoringModel, bert_dir: Path,
                                                             tracing: Tracing, exporter: InMemorySpanExporter) -> None:
    """The batch span told its requests about itself when the pass ended: a request given up meanwhile recorded its
    score span first, without the link to the pass that carried its pairs."""
    from reranker.errors import CancelledError
    from tests.test_faults import GatedScorer

    gated = GatedScorer(bert_model)
    cancel = threading.Event()
    with Reranker(bert_model, model_settings(bert_dir, cache_size=0), score_fn=gated, tracing=tracing) as reranker:
        with ThreadPoolExecutor(1) as pool:
            call = pool.submit(reranker.rerank_detailed, "q", ["a"], cancel=cancel)
            try:
                assert gated.first_batch.wait(HANG_S)  # its one pair is on the device
                cancel.set()
                with pytest.raises(CancelledError):
                    call.result(HANG_S)
            finally:
                gated.gate.set()
        got = finished(tracing, exporter, spans.BATCH)
    [batch] = [s for s in got if s.name == spans.BATCH]
    [score] = [s for s in got if s.name == spans.SCORE]
    assert [link.context.span_id for link in score.links] == [batch.context.span_id]


def test_the_gradio_api_and_queue_carry_the_trace(bert_model: ScoringModel, bert_dir: Path, tracing: Tracing,
                                                  exporter: InMemorySpanExporter) -> None:
    data = ["cache server", "a cache\ntea", None, "", False, None]
    with Reranker(bert_model, model_settings(bert_dir, cache_size=0), tracing=tracing) as reranker:
        with serve(create_app(reranker)) as url:
            direct = httpx.post(f"{url}/gradio_api/api/predict", json={"data": data}, timeout=HANG_S)
            assert direct.status_code == 200 and direct.headers["traceresponse"]
            got = finished(tracing, exporter, "POST /gradio_api/api/predict", UI_SPAN)
            server, ui = one(got, "POST /gradio_api/api/predict"), one(got, UI_SPAN)
            assert ui.parent is not None and ui.parent.span_id == server.context.span_id  # same request context
            assert one(got, spans.REQUEST).parent.span_id == ui.context.span_id  # type: ignore[union-attr]
            exporter.clear()
            # The queued API: the handler runs apart from the POST that queued it; the trace still holds.
            event = httpx.post(f"{url}/gradio_api/call/predict", json={"data": data}, timeout=HANG_S).json()["event_id"]
            assert "event: complete" in httpx.get(f"{url}/gradio_api/call/predict/{event}", timeout=HANG_S).text
            got = finished(tracing, exporter, "POST /gradio_api/call/predict", UI_SPAN, spans.REQUEST)
            queued, ui = one(got, "POST /gradio_api/call/predict"), one(got, UI_SPAN)
            assert ui.parent is not None and ui.parent.span_id == queued.context.span_id
            assert one(got, spans.REQUEST).parent.span_id == ui.context.span_id  # type: ignore[union-attr]
            assert one(got, spans.BATCH).context.trace_id == queued.context.trace_id


def test_a_path_no_route_serves_names_no_operation_of_its_own(bert_model: ScoringModel, bert_dir: Path,
                                                              tracing: Tracing, exporter: InMemorySpanExporter) -> None:
    """The mounted Gradio app's spans are named by path, and so were the 404s it answers for any URL: a scanner's
    every probe became an operation of its own in the trace backend. They are the bare method now."""
    with Reranker(bert_model, model_settings(bert_dir), tracing=tracing) as reranker:
        with serve(create_app(reranker)) as url:
            for path in ("/wp-login.php", "/v1/rank/abc123", "/xyz/Q7"):
                assert httpx.get(f"{url}{path}", timeout=HANG_S).status_code == 404
            assert httpx.post(f"{url}/gradio_api/api/predict", json={"data": ["q", "a", None, "", False, None]},
                              timeout=HANG_S).status_code == 200
            got = finished(tracing, exporter, "POST /gradio_api/api/predict")
    servers = [span.name for span in got if span.kind == SpanKind.SERVER]
    assert sorted(servers) == ["GET", "GET", "GET", "POST /gradio_api/api/predict"]


def test_a_queued_gradio_call_is_logged_under_its_requests_id_and_trace(
        bert_model: ScoringModel, bert_dir: Path, tracing: Tracing, exporter: InMemorySpanExporter,
        caplog: pytest.LogCaptureFixture) -> None:
    """Gradio's queue runs the call apart from the POST that queued it: its request line had an id of its own, not
    the X-Request-ID its caller got, and one refused there (a wrong number of inputs) had no trace ids either."""
    caller = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
    calls = {"queued-ok": ["cache server", "a cache\ntea", None, "", False, None], "queued-bad": ["q", "a"]}
    settings = model_settings(bert_dir, cache_size=0, log_sample_rate=1.0)
    with Reranker(bert_model, settings, tracing=tracing) as reranker, serve(create_app(reranker)) as url, \
            caplog.at_level("INFO", logger="reranker.requests"):
        for request_id, data in calls.items():
            queued = httpx.post(f"{url}/gradio_api/call/predict", json={"data": data}, timeout=HANG_S,
                                headers={**caller, "X-Request-ID": request_id})
            assert queued.headers["x-request-id"] == request_id
            httpx.get(f"{url}/gradio_api/call/predict/{queued.json()['event_id']}", timeout=HANG_S)
        unnamed = httpx.post(f"{url}/gradio_api/call/predict", json={"data": calls["queued-ok"]}, timeout=HANG_S)
        httpx.get(f"{url}/gradio_api/call/predict/{unnamed.json()['event_id']}", timeout=HANG_S)
        wait_until(lambda: len([r for r in caplog.records if r.name == "reranker.requests"]) == 3)
    lines = {r.request_id: r for r in caplog.records if r.name == "reranker.requests"}  # type: ignore[attr-defined]
    assert set(lines) == {"queued-ok", "queued-bad", unnamed.headers["x-request-id"]}
    assert lines["queued-ok"].status == "ok" and lines["queued-bad"].status == "invalid"  # type: ignore[attr-defined]
    for request_id in calls:
        assert lines[request_id].trace_id == CALLER_TRACE and lines[request_id].span_id  # type: ignore[attr-defined]
    # The refused call is timed from when Gradio's queue took it up, as the handler's calls are from their start.
    assert lines["queued-bad"].latency_ms > 0  # type: ignore[attr-defined]


def test_tracing_off_makes_no_span_and_exports_nothing(bert_model: ScoringModel, bert_dir: Path, metrics: Metrics,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []
    start_span = sdk_trace.Tracer.start_span

    def spy(self: sdk_trace.Tracer, name: str, *args: object, **kwargs: object) -> trace.Span:
        made.append(name)
        return start_span(self, name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sdk_trace.Tracer, "start_span", spy)  # every SDK span of the process passes here
    caller = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
    with otlp_receiver() as (collector, received):
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "10")
        settings = Settings.from_env({"RERANKER_TRACING": "0", "OTEL_EXPORTER_OTLP_ENDPOINT": collector})
        tracing = Tracing.from_settings(settings, metrics)
        assert not tracing.enabled and isinstance(tracing.tracer, trace.NoOpTracer)
        with Reranker(bert_model, model_settings(bert_dir), metrics=metrics, tracing=tracing) as reranker:
            history = RequestHistory()
            with serve(create_app(reranker, history=history)) as url:
                json_route = httpx.post(f"{url}/v1/rerank", json={"query": "q", "documents": ["a"]}, headers=caller,
                                        timeout=HANG_S)
                gradio = httpx.post(f"{url}/gradio_api/api/predict", headers=caller, timeout=HANG_S,
                                    json={"data": ["q", "a\nb", None, "", False, None]})
                assert json_route.status_code == gradio.status_code == 200
                assert "traceresponse" not in json_route.headers and "traceresponse" not in gradio.headers
            job = reranker._batcher.submit(bert_model.encode([("q", "d")]))
            reranker._batcher.wait(job)
            assert job.span_context is None and job.batch_spans == []
            assert [r.trace_id for r in history.latest()] == ["", ""]
        tracing.shutdown()
        time.sleep(0.2)
    assert made == [] and received.requests == []
