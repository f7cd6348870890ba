"""Every rerank request is counted once in reranker_requests_total, whichever way it ends."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from gradio.queueing import Queue
from prometheus_client import CollectorRegistry

from reranker import Reranker
from reranker.metrics import STATUSES, Metrics
from reranker.model import ScoringModel
from tests.conftest import model_settings
from tests.servers import HANG_S, serve
from tests.test_faults import GatedScorer, wait_until
from web.gradio_login import find_gradio_app
from web.http import create_app


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
