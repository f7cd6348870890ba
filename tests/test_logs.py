"""JSON logs: request lines, sampling, no document text, and a whole process that prints only JSON."""

from __future__ import annotations

import io
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from reranker import Reranker
from reranker.logs import json_formatter, query_fields, setup_logging, should_log
from reranker.metrics import Metrics
from reranker.model import ScoringModel
from tests.conftest import model_settings
from tests.servers import HANG_S, free_port, wait_ready
from web.errors import HttpError
from web.service import RerankCall, RerankService

ROOT = Path(__file__).resolve().parent.parent
REQUEST_FIELDS = {"timestamp", "level", "logger", "message", "request_id", "route", "status", "n_docs",
                  "query_chars", "query_hash", "top_n", "latency_ms", "queue_ms", "inference_ms", "tokens", "truncated",
                  "cache_hits", "top1_score", "score_std"}
SECRET_DOC = "zebra-confidential-passage"


@pytest.fixture
def request_lines() -> Iterator[io.StringIO]:
    """Request log lines of `reranker.requests`, formatted as the service formats them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(json_formatter())
    request_logger = logging.getLogger("reranker.requests")
    request_logger.addHandler(handler)
    request_logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        request_logger.removeHandler(handler)
        request_logger.setLevel(logging.NOTSET)


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def service(bert_model: ScoringModel, bert_dir: Path, **overrides: object) -> RerankService:
    settings = model_settings(bert_dir, **overrides)
    return RerankService(Reranker(bert_model, settings, metrics=Metrics(CollectorRegistry())), rng=random.Random(0))


def test_a_request_line_carries_every_field_and_no_text(bert_model: ScoringModel, bert_dir: Path,
                                                        request_lines: io.StringIO) -> None:
    svc = service(bert_model, bert_dir, log_sample_rate=1.0)
    try:
        svc.rerank("/v1/rerank", RerankCall("where is the zebra", [SECRET_DOC, "tea"], 1))
    finally:
        svc.reranker.close()
    [line] = lines(request_lines)
    assert REQUEST_FIELDS <= set(line)
    assert line["route"] == "/v1/rerank" and line["status"] == "ok" and line["n_docs"] == 2 and line["top_n"] == 1
    assert line["query_chars"] == len("where is the zebra") and len(line["query_hash"]) == 12
    assert SECRET_DOC not in request_lines.getvalue() and "where is the zebra" not in request_lines.getvalue()


def test_errors_and_slow_requests_are_always_logged_successes_sampled(
        bert_model: ScoringModel, bert_dir: Path, request_lines: io.StringIO) -> None:
    svc = service(bert_model, bert_dir, log_sample_rate=0.0, slow_ms=float("inf"))  # a loaded machine is not slow
    try:
        svc.rerank("/rerank", RerankCall("q", ["a"]))
        with pytest.raises(HttpError):
            svc.rerank("/rerank", RerankCall("", ["a"]))
    finally:
        svc.reranker.close()
    [line] = lines(request_lines)
    assert line["status"] == "invalid" and line["error_type"] == "invalid_request" and line["http_status"] == 400
    assert should_log(ok=True, latency_ms=5000, sample_rate=0.0, slow_ms=2000)
    rng = random.Random(7)
    logged = sum(should_log(ok=True, latency_ms=1, sample_rate=0.1, slow_ms=2000, rng=rng) for _ in range(10_000))
    assert 800 < logged < 1200


def test_refused_and_failed_requests_carry_the_same_fields_and_operator_lines_are_warnings(
        bert_model: ScoringModel, bert_dir: Path, request_lines: io.StringIO) -> None:
    """Every line has the whole schema (null where nothing applies); RERANKER_LOG_LEVEL=WARNING keeps
    overloads, server errors and slow requests, and drops client errors."""
    svc = service(bert_model, bert_dir, log_sample_rate=0.0)
    try:
        svc.refused("/rerank", HttpError(400, "invalid_json", "the request body is not valid JSON"))
        svc.refused("/rerank", HttpError(429, "overloaded", "the scoring queue is full"))
        with pytest.raises(HttpError):
            svc.rerank("/v1/rerank", RerankCall("q", ["a"], top_n="a pasted document"))
    finally:
        svc.reranker.close()
    svc = service(bert_model, bert_dir, log_sample_rate=0.0, slow_ms=0)
    try:
        svc.rerank("/v1/rerank", RerankCall("q", ["a"]))  # slower than slow_ms=0
    finally:
        svc.reranker.close()
    refused, overloaded, invalid, slow = lines(request_lines)
    for line in (refused, overloaded, invalid, slow):
        assert REQUEST_FIELDS | {"error_type"} <= set(line), REQUEST_FIELDS - set(line)
    assert refused["n_docs"] is None and refused["tokens"] is None and refused["error_type"] == "invalid_json"
    assert invalid["n_docs"] == 1 and invalid["top_n"] is None and invalid["tokens"] is None
    assert "pasted document" not in request_lines.getvalue()
    assert [line["level"] for line in (refused, overloaded, invalid, slow)] == ["INFO", "WARNING", "INFO", "WARNING"]
    assert slow["message"] == "slow rerank" and slow["error_type"] is None


def test_query_preview_only_when_configured() -> None:
    assert query_fields("a long secret query", 0).keys() == {"query_chars", "query_hash"}
    assert query_fields("a long secret query", 6) == {"query_chars": 19, "query_preview": "a long"}


def test_setup_logging_routes_library_output_and_warnings_to_json() -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, sys.excepthook, threading.excepthook)
    stream = io.StringIO()
    try:
        setup_logging("INFO", stream)
        logging.getLogger("transformers.modeling_utils").warning("a library warning")
        logging.getLogger("transformers.modeling_utils").info("library chatter held back")
        logging.getLogger("uvicorn.access").info("GET / 200")
        with pytest.warns(UserWarning):  # pytest's own capture still sees it
            import warnings
            warnings.warn("deprecated thing", UserWarning, stacklevel=1)
        logging.getLogger("reranker.app").info("hello", extra={"model": "m"})
    finally:
        root.handlers[:], _, sys.excepthook, threading.excepthook = saved[0], saved[1], saved[2], saved[3]
        root.setLevel(saved[1])
        logging.captureWarnings(False)
    parsed = lines(stream)
    messages = [p["message"] for p in parsed]
    assert "a library warning" in messages and "hello" in messages
    assert "library chatter held back" not in messages and "GET / 200" not in messages
    assert all({"timestamp", "level", "logger", "message"} <= set(p) for p in parsed)


def test_a_closed_log_pipe_drops_records_without_a_traceback_each(capsys: pytest.CaptureFixture[str]) -> None:
    """A log shipper that closed its end of stdout: logging wrote a traceback of several lines to stderr for every
    record (366 lines by the first request)."""
    class Closed(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    root = logging.getLogger()
    saved = (root.handlers[:], root.level, sys.excepthook, threading.excepthook)
    try:
        setup_logging("INFO", Closed())
        for n in range(3):
            logging.getLogger("reranker.app").info("line %d", n)
    finally:
        root.handlers[:], _, sys.excepthook, threading.excepthook = saved[0], saved[1], saved[2], saved[3]
        root.setLevel(saved[1])
        logging.captureWarnings(False)
    assert "Logging error" not in capsys.readouterr().err


def test_the_whole_process_prints_only_json_lines(bert_dir: Path) -> None:
    port, metrics_port = free_port(), free_port()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "HF_HUB_OFFLINE": "1",
           "RERANKER_CACHE_DIR": os.environ["RERANKER_CACHE_DIR"],  # conftest's, not ~/.cache
           "RERANKER_MODEL": str(bert_dir), "RERANKER_PORT": str(port), "RERANKER_METRICS_PORT": str(metrics_port),
           "RERANKER_LOG_SAMPLE_RATE": "1", "RERANKER_MAX_DOCS": "5",
           "RERANKER_METRICS_HOST": "127.0.0.2"}  # another loopback address: the metrics bind to it alone
    process = subprocess.Popen([str(ROOT / "start.sh")], cwd=ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        with httpx.Client(timeout=HANG_S) as client:
            ok = client.post(f"{url}/v1/rerank", json={"query": "zebra", "documents": [SECRET_DOC, "tea"]},
                             headers={"X-Request-ID": "trace-42"})
            assert ok.headers["x-request-id"] == "trace-42"
            assert client.post(f"{url}/rerank", json={"query": "q", "texts": ["t"] * 6}).status_code == 413
            assert client.post(f"{url}/v1/rerank", content=b"{", headers={"content-type": "application/json"}
                               ).headers["x-request-id"]
            assert client.get(f"{url}/").status_code == 200
            exposed = client.get(f"http://127.0.0.2:{metrics_port}/metrics").text
            assert "reranker_requests_total" in exposed and "_created" not in exposed  # app.py's QUIET_DEFAULTS
            with pytest.raises(httpx.ConnectError):  # RERANKER_METRICS_HOST: not on the UI's address
                client.get(f"http://127.0.0.1:{metrics_port}/metrics")
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=HANG_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0
    printed = [line for line in (stdout + stderr).splitlines() if line.strip()]
    records = []
    for line in printed:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r}")
    assert all(isinstance(r, dict) and r.get("message") is not None for r in records)
    [ready] = [r for r in records if r["message"] == "model ready"]
    assert ready["model"] == str(bert_dir) and ready["device"] == "cpu" and ready["dtype"] and ready["backend_reason"]
    assert {"torch", "transformers", "sentence-transformers", "gradio"} <= set(ready["versions"])
    requests = [r for r in records if r.get("logger") == "reranker.requests"]
    assert {r["status"] for r in requests} == {"ok", "invalid"}
    [traced] = [r for r in requests if r["request_id"] == "trace-42"]
    assert REQUEST_FIELDS <= set(traced)
    assert SECRET_DOC not in stdout + stderr
