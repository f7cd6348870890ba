"""Tracing as configured by OTEL_*: OTLP over HTTP and gRPC to loopback receivers, samplers, a dead collector,
dropped spans, and the trace id in logs, the Monitoring tab and metric exemplars."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import format_trace_id

import metrics_server
from reranker import Reranker, Settings, spans
from reranker.gpu import Nvml
from reranker.metrics import Metrics
from reranker.model import ScoringModel
from reranker.tracing import Tracing
from tests.conftest import model_settings
from tests.otlp_receiver import grpc_receiver, otlp_receiver
from tests.servers import HANG_S, free_port, wait_ready
from tests.test_faults import outcome_within, wait_until
from tests.test_metrics import FakeNvml
from web.history import RequestHistory
from web.http import create_app
from web.monitoring import Monitor

REQUEST_SPANS = {"POST /v1/rerank", spans.REQUEST, spans.VALIDATE, spans.CACHE, spans.TOKENIZE, spans.QUEUE,
                 spans.SCORE, spans.BATCH, spans.POSTPROCESS}


def tracing_from(environ: dict[str, str], metrics: Metrics, monkeypatch: pytest.MonkeyPatch) -> Tracing:
    """Tracing as app.py builds it, with `environ` as the process environment the SDK reads."""
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_env(environ)
    assert settings.tracing
    return Tracing.from_settings(settings, metrics)


def dropped(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("reranker_trace_spans_dropped_total", {"reason": reason}) or 0.0


def test_spans_reach_an_otlp_http_collector(bert_model: ScoringModel, bert_dir: Path, metrics: Metrics,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    with otlp_receiver() as (url, received):
        tracing = tracing_from({"OTEL_EXPORTER_OTLP_ENDPOINT": url, "OTEL_BSP_SCHEDULE_DELAY": "50",
                                "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test,team=search",
                                "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=acme"}, metrics, monkeypatch)
        assert isinstance(tracing._exporter.inner, HttpSpanExporter)  # type: ignore[union-attr]
        with Reranker(bert_model, model_settings(bert_dir), metrics=metrics, tracing=tracing) as reranker:
            client = TestClient(create_app(reranker, ui=False))
            assert client.post("/v1/rerank", json={"query": "q", "documents": ["a", "b"]}).status_code == 200
            received.wait_for(REQUEST_SPANS)  # sent by the batch processor on its own schedule, no flush
        assert tracing.shutdown(timeout=HANG_S)
    got = received.spans()
    assert {name for name, _, _ in got} == {"reranker"}  # the default service name
    assert {span.name for _, _, span in got} == REQUEST_SPANS
    _, resource, _ = got[0]
    assert resource["deployment.environment"] == "test" and resource["team"] == "search"
    assert received.headers[0]["x-tenant"] == "acme"
    assert len({span.trace_id for _, _, span in got}) == 1
    assert dropped(metrics, "export_failed") == dropped(metrics, "queue_full") == 0


def test_spans_reach_an_otlp_grpc_collector(bert_model: ScoringModel, bert_dir: Path, metrics: Metrics,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    with grpc_receiver() as (url, received):
        tracing = tracing_from({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": url, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                                "OTEL_SERVICE_NAME": "rag-reranker"}, metrics, monkeypatch)
        assert isinstance(tracing._exporter.inner, GrpcSpanExporter)  # type: ignore[union-attr]
        with Reranker(bert_model, model_settings(bert_dir), metrics=metrics, tracing=tracing) as reranker:
            reranker.rerank("q", ["a", "b"])
        assert tracing.shutdown(timeout=HANG_S)  # flushes what the batch processor still held
    got = received.spans()
    assert {name for name, _, _ in got} == {"rag-reranker"}
    assert {span.name for _, _, span in got} == REQUEST_SPANS - {"POST /v1/rerank"}


def test_samplers_come_from_the_environment(bert_model: ScoringModel, bert_dir: Path, metrics: Metrics,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    exporter = InMemorySpanExporter()
    tracing = Tracing.exporting_to(exporter, metrics)
    with Reranker(bert_model, model_settings(bert_dir), metrics=metrics, tracing=tracing) as reranker:
        client = TestClient(create_app(reranker, ui=False))
        dropped_trace = client.post("/rerank", json={"query": "q", "texts": ["a"]}).headers["traceresponse"]
        assert tracing.flush(timeout=HANG_S)
        assert exporter.get_finished_spans() == ()  # a ratio of 0 keeps no trace of our own...
        assert not int(dropped_trace.rsplit("-", 1)[1], 16) & 1  # ...and says so to the caller
        caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        client.post("/rerank", json={"query": "q", "texts": ["b"]}, headers={"traceparent": caller})
        assert tracing.flush(timeout=HANG_S)
        assert REQUEST_SPANS - {"POST /v1/rerank"} <= {s.name for s in exporter.get_finished_spans()}  # parent-based
    openmetrics = _scrape(metrics, openmetrics=True)
    assert 'trace_id="0af7651916cd43dd8448eb211c80319c"' in openmetrics
    assert openmetrics.count("trace_id=") == 1  # no exemplar for the trace nobody keeps
    tracing.shutdown()


def _scrape(metrics: Metrics, *, openmetrics: bool) -> str:
    accept = "application/openmetrics-text; version=1.0.0; charset=utf-8" if openmetrics else "text/plain"
    client = metrics_server.create_app(metrics.registry).test_client()
    return str(client.get("/metrics", headers={"Accept": accept}).get_data(as_text=True))


def test_logs_monitoring_and_exemplars_name_the_trace(bert_model: ScoringModel, bert_dir: Path, metrics: Metrics,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    exporter = InMemorySpanExporter()
    tracing = Tracing.exporting_to(exporter, metrics)
    history = RequestHistory()
    with Reranker(bert_model, model_settings(bert_dir, log_sample_rate=1.0), metrics=metrics,
                  tracing=tracing) as reranker, caplog.at_level(logging.INFO, logger="reranker.requests"):
        client = TestClient(create_app(reranker, ui=False, history=history))
        assert client.post("/v1/rerank", json={"query": "q", "documents": ["a", "b"]}).status_code == 200
        assert client.post("/v1/rerank", content=b"{", headers={"content-type": "application/json"}).status_code == 400
        monitor = Monitor(reranker, history, Nvml(FakeNvml()))
        rows = monitor.last_requests()
    tracing.shutdown()
    servers = [s for s in exporter.get_finished_spans() if s.name == "POST /v1/rerank"]
    trace_ids = [format_trace_id(s.context.trace_id) for s in servers]
    lines = [r for r in caplog.records if r.name == "reranker.requests"]
    assert [getattr(r, "trace_id", None) for r in lines] == trace_ids  # the served request and the refused one
    assert getattr(lines[0], "span_id", None) == f"{servers[0].context.span_id:016x}"
    assert [row[5] for row in rows] == trace_ids[::-1]  # newest first, as the tab shows them
    assert f'trace_id="{trace_ids[0]}"' in _scrape(metrics, openmetrics=True)
    assert "trace_id" not in _scrape(metrics, openmetrics=False)  # the classic text format has no exemplars


def test_a_dead_collector_costs_requests_nothing(bert_model: ScoringModel, bert_dir: Path, metrics: Metrics,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests never wait for an export, however long it takes: every one is answered while the first export
    is still held back; then the dead collector fails every export, each span is counted, and the shutdown is
    cut short. (What tracing costs a request is bench/tracing.py's figure, not a test's: it needs a quiet
    machine.)"""
    dead = f"http://127.0.0.1:{free_port()}/v1/traces"  # nothing listens there: every export is refused
    tracing = tracing_from({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": dead, "OTEL_BSP_SCHEDULE_DELAY": "10",
                            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "8", "OTEL_EXPORTER_OTLP_TIMEOUT": "600"},
                           metrics, monkeypatch)
    exporting, release = threading.Event(), threading.Event()
    exporter = tracing._exporter.inner  # type: ignore[union-attr]
    export = exporter.export

    def held_back(spans: Sequence[ReadableSpan]) -> SpanExportResult:
        exporting.set()
        release.wait(HANG_S)  # an export that takes as long as the test likes: the collector's connect timeout
        return export(spans)

    monkeypatch.setattr(exporter, "export", held_back)
    requests = 30
    with Reranker(bert_model, model_settings(bert_dir, cache_size=0), metrics=metrics, tracing=tracing) as reranker:
        client = TestClient(create_app(reranker, ui=False))

        def send_all() -> None:
            for i in range(requests):
                docs = [f"document {i} {j}" for j in range(8)]
                assert client.post("/v1/rerank", json={"query": "q", "documents": docs}).status_code == 200
                if i == 0:
                    assert exporting.wait(HANG_S)  # the first spans are on their way out, and stay there

        try:  # every request answered while that export is held back
            assert outcome_within(send_all) is None
        finally:
            release.set()
    started = time.monotonic()
    assert not tracing.shutdown(timeout=0.5)  # the exporter is still retrying: it is cut short
    assert time.monotonic() - started < HANG_S / 4  # not the minutes of retries left in the queue
    wait_until(lambda: dropped(metrics, "export_failed") >= requests * len(REQUEST_SPANS))  # every span, counted


class _Stuck(SpanExporter):
    """A collector that takes nothing until told to stop."""

    def __init__(self) -> None:
        self.stop = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.stop.wait(HANG_S)
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self.stop.set()


def test_a_full_queue_drops_spans_and_counts_them(metrics: Metrics, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "4")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "2")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "10")
    tracing = Tracing.exporting_to(_Stuck(), metrics)
    for i in range(20):
        tracing.tracer.start_span(f"span {i}").end()
        time.sleep(0.005)  # room for the batch processor's thread to take a batch into the stuck export
    assert dropped(metrics, "queue_full") >= 10  # the queue holds 4 and the stuck export 2, however they ran
    assert not tracing.shutdown(timeout=0.2)  # the export is stuck until the shutdown tells it to stop
    tracing.tracer.start_span("too late").end()
    assert dropped(metrics, "shutdown") == 1
    # The exports the shutdown let fail are counted as the batch processor's thread gets to them.
    wait_until(lambda: dropped(metrics, "queue_full") + dropped(metrics, "export_failed") + 1 >= 20)


def test_the_protocol_picks_the_exporter(metrics: Metrics, bert_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    for protocol, kind in (("http/protobuf", HttpSpanExporter), ("grpc", GrpcSpanExporter)):
        tracing = Tracing.from_settings(replace(model_settings(bert_dir), tracing=True, tracing_protocol=protocol),
                                        metrics)
        assert isinstance(tracing._exporter.inner, kind)  # type: ignore[union-attr]
        assert tracing.shutdown()


def test_the_service_flushes_its_spans_when_stopped(bert_dir: Path) -> None:
    """The whole process, with the batch processor told to wait an hour: only the flush at exit can send them
    (with a minute, the processor's own schedule could send them during a slow start-up or a slow request)."""
    root = Path(__file__).resolve().parent.parent
    port, metrics_port = free_port(), free_port()
    with otlp_receiver() as (collector, received):
        env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "HF_HUB_OFFLINE": "1",
               "RERANKER_CACHE_DIR": os.environ["RERANKER_CACHE_DIR"],  # conftest's, not ~/.cache
               "RERANKER_MODEL": str(bert_dir), "RERANKER_PORT": str(port), "RERANKER_METRICS_PORT": str(metrics_port),
               "RERANKER_LOG_SAMPLE_RATE": "1", "OTEL_EXPORTER_OTLP_ENDPOINT": collector,
               "OTEL_BSP_SCHEDULE_DELAY": "3600000", "OTEL_SERVICE_NAME": "reranker-under-test"}
        process = subprocess.Popen([str(root / "start.sh")], cwd=root, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url)
            answer = httpx.post(f"{url}/v1/rerank", json={"query": "q", "documents": ["a", "b"]}, timeout=HANG_S)
            trace_id = answer.headers["traceresponse"].split("-")[1]
            time.sleep(0.5)
            assert received.requests == []  # held back by the batch processor
            process.send_signal(signal.SIGTERM)
            stdout, _ = process.communicate(timeout=HANG_S)  # an exit that waited for the processor: an hour
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        assert process.returncode == 0
        got = received.spans()
    assert {name for name, _, _ in got} == {"reranker-under-test"}
    assert REQUEST_SPANS <= {span.name for _, _, span in got}
    assert {span.trace_id.hex() for _, _, span in got if span.name == "POST /v1/rerank"} == {trace_id}
    lines = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    assert [line["trace_id"] for line in lines if line.get("logger") == "reranker.requests"] == [trace_id]
    assert any(line["message"].startswith("tracing on") for line in lines)
