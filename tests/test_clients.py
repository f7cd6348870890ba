"""The official clients against a running service: the Cohere SDK (v1 `Client`, v2 `ClientV2`) and, in their
own venv, LangChain's and LlamaIndex's Cohere rerankers pointed at it by base_url."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cohere
import httpx
import pytest
from cohere.core.api_error import ApiError
from cohere.errors import BadRequestError, ServiceUnavailableError, UnauthorizedError, UnprocessableEntityError
from prometheus_client import CollectorRegistry

from reranker import Reranker
from reranker.metrics import Metrics
from reranker.model import ScoringModel
from tests.conftest import model_settings
from tests.servers import serve
from web.http import create_app
from web.lifecycle import Lifecycle

KEY = "client-test-key"
QUERY = "which server keeps the cache warm?"
DOCS = ["a cache server keeps hot data in memory", "tea grows on hills", "the queue server", "json token parse",
        "warm caches answer fast", "rivers run to the sea"]
INTEGRATIONS_PYTHON = Path(__file__).resolve().parent.parent / ".venv-integrations" / "bin" / "python"


@pytest.fixture(scope="module")
def live(bert_model: ScoringModel, bert_dir: Path) -> Iterator[tuple[str, Lifecycle]]:
    settings = model_settings(bert_dir, max_docs=50, api_key=KEY)
    lifecycle = Lifecycle()
    with Reranker(bert_model, settings, metrics=Metrics(CollectorRegistry())) as reranker:
        with serve(create_app(reranker, lifecycle=lifecycle)) as url:
            yield url, lifecycle


@pytest.fixture(scope="module")
def url(live: tuple[str, Lifecycle]) -> str:
    return live[0]


@contextmanager
def sdk(make: type[cohere.Client] | type[cohere.ClientV2], url: str, key: str = KEY) -> Iterator[Any]:
    """A Cohere SDK client on an HTTP client that is closed afterwards (the SDK leaves its own open)."""
    with httpx.Client(timeout=30) as http:
        yield make(base_url=url, api_key=key, httpx_client=http)


def tei(url: str, documents: list[str]) -> list[tuple[int, float]]:
    response = httpx.post(f"{url}/rerank", json={"query": QUERY, "texts": documents},
                          headers={"authorization": f"Bearer {KEY}"}, timeout=30)
    response.raise_for_status()
    return [(r["index"], r["score"]) for r in response.json()]


def test_client_v2_ranks_as_the_tei_route(url: str) -> None:
    with sdk(cohere.ClientV2, url) as client:
        response = client.rerank(model="rerank-v3.5", query=QUERY, documents=DOCS)
        top = client.rerank(model="rerank-v3.5", query=QUERY, documents=DOCS, top_n=2, max_tokens_per_doc=512)
    assert [(r.index, r.relevance_score) for r in response.results] == tei(url, DOCS)
    assert response.id and response.meta is not None and response.meta.api_version is not None
    assert response.meta.api_version.version == "2"
    assert [(r.index, r.relevance_score) for r in top.results] == tei(url, DOCS)[:2]


def test_client_v1_ranks_as_the_tei_route_and_returns_documents(url: str) -> None:
    with sdk(cohere.Client, url) as client:
        response = client.rerank(model="rerank-v3.5", query=QUERY, documents=DOCS, top_n=3, return_documents=True)
        bare = client.rerank(model="rerank-v3.5", query=QUERY, documents=DOCS, return_documents=False)
    assert [(r.index, r.relevance_score) for r in response.results] == tei(url, DOCS)[:3]
    assert all(r.document is not None and r.document.text == DOCS[r.index] for r in response.results)
    assert all(r.document is None for r in bare.results) and len(bare.results) == len(DOCS)


def test_client_v1_ranks_objects_on_rank_fields_and_echoes_them_whole(url: str) -> None:
    """The v1 SDK's document objects with `rank_fields`, and its explicit None sent as null."""
    objects = [{"title": f"doc {i}", "text": text} for i, text in enumerate(DOCS)]
    with sdk(cohere.Client, url) as client:
        response = client.rerank(model="m", query=QUERY, documents=objects, rank_fields=["title", "text"],
                                  return_documents=None, top_n=len(DOCS) * 100)
    lines = [f"title: doc {i}\ntext: {text}" for i, text in enumerate(DOCS)]
    assert [(r.index, r.relevance_score) for r in response.results] == tei(url, lines)
    assert [r.document.dict() if r.document else None for r in response.results] \
        == [objects[r.index] for r in response.results]


@pytest.mark.parametrize("make", [cohere.Client, cohere.ClientV2], ids=["v1", "v2"])
def test_a_wrong_key_is_the_sdks_unauthorized_error(url: str, make: type[cohere.Client]) -> None:
    with sdk(make, url, key="not-the-key") as client, pytest.raises(UnauthorizedError) as raised:
        client.rerank(model="m", query=QUERY, documents=DOCS)
    assert raised.value.status_code == 401


@pytest.mark.parametrize("make", [cohere.Client, cohere.ClientV2], ids=["v1", "v2"])
def test_bad_requests_are_the_sdks_typed_errors_with_our_message(url: str, make: type[cohere.Client]) -> None:
    with sdk(make, url) as client:
        with pytest.raises(BadRequestError) as bad:
            client.rerank(model="m", query="   ", documents=DOCS)
        with pytest.raises(UnprocessableEntityError) as shape:
            client.rerank(model="m", query=QUERY, documents=DOCS, top_n="two")
        with pytest.raises(ApiError) as too_many:
            client.rerank(model="m", query=QUERY, documents=["d"] * 51)
    assert too_many.value.status_code == 413

    def message(body: object) -> str:  # v2 answers in Cohere's shape, v1 in this API's with Cohere v1's message
        assert isinstance(body, dict)
        if make is cohere.Client:
            assert body["message"] == body["error"]["message"]
        return str(body["message"])
    assert "query is empty" in message(bad.value.body)
    assert "top_n" in message(shape.value.body)
    assert "RERANKER_MAX_DOCS=50" in message(too_many.value.body)


def test_a_draining_service_is_the_sdks_service_unavailable_error(live: tuple[str, Lifecycle]) -> None:
    url, lifecycle = live
    lifecycle.begin_drain()
    try:
        with sdk(cohere.ClientV2, url) as client, pytest.raises(ServiceUnavailableError) as raised:
            client.rerank(model="m", query=QUERY, documents=DOCS)
    finally:
        lifecycle.draining = False
    assert raised.value.status_code == 503 and isinstance(raised.value.body, dict)
    assert "shutting down" in raised.value.body["message"]


def test_langchain_and_llama_index_cohere_rerankers_rank_as_the_tei_route(url: str) -> None:
    if not INTEGRATIONS_PYTHON.exists():
        pytest.skip(f"{INTEGRATIONS_PYTHON} is missing: ./test.sh makes it from requirements-integrations.txt")
    request = {"url": url, "key": KEY, "query": QUERY, "documents": DOCS, "top_n": 3}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LANGSMITH_TRACING": "false", "PYTHONPATH": ""}
    done = subprocess.run([str(INTEGRATIONS_PYTHON), str(Path(__file__).with_name("integrations_client.py")),
                           json.dumps(request)], capture_output=True, text=True, timeout=300, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = {line["client"]: line["results"] for line in map(json.loads, done.stdout.splitlines())}
    expected = [list(pair) for pair in tei(url, DOCS)[:3]]
    assert answers == {"langchain": expected, "llama_index": expected}
