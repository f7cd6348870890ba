"""A client's disconnect is noticed when the ASGI server reports it (`http.disconnect`), not on a later poll."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from starlette.requests import Request

from reranker import Reranker
from reranker.metrics import Metrics
from reranker.model import ScoringModel
from tests.conftest import model_settings
from tests.servers import HANG_S
from tests.test_faults import GatedScorer
from web.cancel import client_gone, run_cancellable
from web.http import create_app

Message = MutableMapping[str, Any]


class Connection:
    """An ASGI receive channel: the request body first, then nothing until the client leaves when the test says
    so. It counts the reads made after the body, and whether a waiting read was abandoned."""

    def __init__(self, body: bytes = b"") -> None:
        self.body: bytes | None = body
        self.leave = asyncio.Event()
        self.reads_after_body = 0
        self.abandoned = False

    async def receive(self) -> Message:
        if self.body is not None:
            body, self.body = self.body, None
            return {"type": "http.request", "body": body, "more_body": False}
        self.reads_after_body += 1
        try:
            await self.leave.wait()
        except asyncio.CancelledError:
            self.abandoned = True
            raise
        return {"type": "http.disconnect"}


def test_client_gone_returns_on_http_disconnect_after_the_body() -> None:
    connection = Connection()

    async def scenario() -> None:
        connection.leave.set()
        await client_gone(Request({"type": "http", "method": "POST", "path": "/", "headers": []}, connection.receive))

    asyncio.run(scenario())
    assert connection.body is None and connection.reads_after_body == 1  # past the body chunk, to the disconnect


def test_a_disconnect_cancels_the_request_through_one_waiting_read(bert_model: ScoringModel, documents: list[str],
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Through the real app: with the device held, the request waits; the client leaves; the engine drops the
    request's pairs. Only one read of the connection happened meanwhile: nothing polled it. Its log line says what
    it cost until then (it logged null tokens and times)."""
    caplog.set_level(logging.INFO, logger="reranker.requests")
    gated = GatedScorer(bert_model)
    metrics = Metrics(CollectorRegistry())
    settings = model_settings(Path(bert_model.model_id), cache_size=0)
    body = json.dumps({"query": "q", "documents": documents[:40]}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/rerank", "raw_path": b"/v1/rerank", "query_string": b"",
             "root_path": "", "server": ("127.0.0.1", 7860), "client": ("127.0.0.1", 50000),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    with Reranker(bert_model, settings, metrics=metrics, score_fn=gated) as reranker:
        app = create_app(reranker, ui=False)
        warm = threading.Thread(target=reranker.rerank, args=("warm", ["up"]))
        warm.start()
        assert gated.first_batch.wait(HANG_S)  # the device is held: the request below queues behind it
        warm_tokens = metrics.registry.get_sample_value("reranker_input_tokens_total") or 0

        async def scenario() -> Connection:
            connection = Connection(body)
            served = asyncio.ensure_future(app(scope, connection.receive, send))
            deadline = time.monotonic() + HANG_S
            while reranker.queued_pairs < 40:  # accepted and queued
                assert time.monotonic() < deadline, "the request was never queued"
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)  # three of the old poller's intervals: it would have read three times more
            connection.leave.set()
            deadline = time.monotonic() + HANG_S
            while metrics.registry.get_sample_value("reranker_requests_total",
                                                    {"route": "/v1/rerank", "status": "cancelled"}) != 1:
                assert time.monotonic() < deadline, "the disconnect was never noticed"
                await asyncio.sleep(0.01)
            gated.gate.set()
            await asyncio.wait_for(served, HANG_S)
            return connection

        connection = asyncio.run(scenario())
        warm.join(HANG_S)
    assert connection.reads_after_body == 1
    assert metrics.registry.get_sample_value("reranker_cancelled_pairs_total") == 40
    (line,) = [record for record in caplog.records if getattr(record, "status", None) == "cancelled"]
    tokens = (metrics.registry.get_sample_value("reranker_input_tokens_total") or 0) - warm_tokens
    assert line.tokens == tokens > 0  # type: ignore[attr-defined]
    assert line.cache_hits == 0 and line.queue_ms > 0 and line.inference_ms == 0  # type: ignore[attr-defined]
    assert gated.pairs == 1  # only the warm-up ran


def test_finished_work_stops_waiting_for_the_client() -> None:
    connection = Connection()

    async def scenario() -> str:
        request = Request({"type": "http", "method": "POST", "path": "/", "headers": []}, connection.receive)
        result = await run_cancellable(lambda cancel: "scored", lambda: client_gone(request))
        await asyncio.sleep(0)  # let the cancelled read unwind
        return result

    assert asyncio.run(scenario()) == "scored"
    assert connection.abandoned and not connection.leave.is_set()
