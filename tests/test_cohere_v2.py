"""POST /v2/rerank: Cohere v2's request and answer, its error shape, and the same engine, limits and metrics."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from reranker import Reranker
from reranker.longdocs import DocumentClipper
from reranker.metrics import Metrics
from reranker.model import ScoringModel
from tests.conftest import model_settings
from tests.servers import serve
from web.http import create_app

DOCS = ["a cache server keeps hot data", "tea grows on hills", "the queue server", "json token parse"]
LONG = "the queue server keeps the cache warm and the json tokens parsed " * 30


@pytest.fixture(scope="module")
def live(bert_model: ScoringModel, bert_dir: Path) -> Iterator[tuple[str, Reranker]]:
    # No score cache: a route compared with another must score its pairs itself, not read the other's entries.
    settings = model_settings(bert_dir, max_docs=20, max_doc_chars=5000, max_body_bytes=64 * 1024,
                              api_key="secret", cache_size=0)
    with Reranker(bert_model, settings, metrics=Metrics(CollectorRegistry())) as reranker:
        with serve(create_app(reranker, ui=False)) as url:
            yield url, reranker


def post(url: str, path: str, body: Any, key: str | None = "secret", **headers: str) -> httpx.Response:
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    return httpx.post(f"{url}{path}", content=json.dumps(body).encode(),
                      headers={"content-type": "application/json", **headers}, timeout=30)


def count(reranker: Reranker, status: str) -> float:
    value = reranker.metrics.registry.get_sample_value("reranker_requests_total",
                                                       {"route": "/v2/rerank", "status": status})
    return value or 0.0


def test_v2_answers_as_cohere_v2_with_the_scores_of_the_other_routes(live: tuple[str, Reranker]) -> None:
    url, reranker = live
    ok_before = count(reranker, "ok")
    response = post(url, "/v2/rerank", {"model": "rerank-v3.5", "query": "cache server", "documents": DOCS},
                    **{"x-request-id": "trace-me-42"})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"id", "results", "meta"}
    assert body["id"] == "trace-me-42" == response.headers["x-request-id"]  # one id in answer, header and log
    assert body["meta"] == {"api_version": {"version": "2"}, "billed_units": {"search_units": 1},
                            "tokens": {"input_tokens": body["meta"]["tokens"]["input_tokens"]}}
    results = body["results"]
    assert all(set(r) == {"index", "relevance_score"} for r in results)  # no document text, as Cohere v2
    v1 = post(url, "/v1/rerank", {"query": "cache server", "documents": DOCS}).json()["results"]
    tei = post(url, "/rerank", {"query": "cache server", "texts": DOCS}).json()
    assert [(r["index"], r["relevance_score"]) for r in results] == \
        [(r["index"], r["relevance_score"]) for r in v1] == [(r["index"], r["score"]) for r in tei]
    assert count(reranker, "ok") == ok_before + 1


def test_v2_top_n_extensions_and_fields_cohere_clients_send(live: tuple[str, Reranker]) -> None:
    url, _ = live
    full = post(url, "/v2/rerank", {"query": "cache server", "documents": DOCS, "raw_scores": True}).json()
    body = post(url, "/v2/rerank", {"query": "cache server", "documents": DOCS + [{"text": "tea"}], "top_n": 2,
                                    "raw_scores": True, "priority": 3, "relevant_spans": {"mode": "disabled"},
                                    "some_future_field": [1]}).json()
    # No model named: taken; unknown fields ignored. The extra document changes the padded batch: equal to float
    # precision, not bit for bit.
    assert [r["index"] for r in body["results"]] == [r["index"] for r in full["results"][:2]]
    assert [r["relevance_score"] for r in body["results"]] == \
        pytest.approx([r["relevance_score"] for r in full["results"][:2]], rel=1e-5)
    raw_v1 = post(url, "/v1/rerank", {"query": "cache server", "documents": DOCS, "raw_scores": True,
                                      "return_documents": False}).json()["results"]
    assert full["results"] == raw_v1  # logits, as /v1/rerank's raw_scores
    many = post(url, "/v2/rerank", {"query": "q", "documents": [f"doc {i}" for i in range(20)]}).json()
    assert many["meta"]["billed_units"] == {"search_units": 1}


def test_max_tokens_per_doc_scores_each_document_cut_to_its_first_tokens(
        live: tuple[str, Reranker], bert_model: ScoringModel) -> None:
    url, reranker = live
    truncated = reranker.metrics.registry.get_sample_value("reranker_truncated_documents_total") or 0.0
    documents = [LONG, DOCS[0]]
    body = post(url, "/v2/rerank", {"query": "queue", "documents": documents, "max_tokens_per_doc": 12}).json()
    cut = DocumentClipper(bert_model.tokenizer).clip([LONG], 12)[0]
    assert cut is not None and len(cut) < len(LONG)
    expected = post(url, "/v1/rerank", {"query": "queue", "documents": [cut, DOCS[0]]}).json()
    assert body["results"] == [{"index": r["index"], "relevance_score": r["relevance_score"]}
                               for r in expected["results"]]
    assert reranker.metrics.registry.get_sample_value("reranker_truncated_documents_total") == truncated + 1
    # Without the field, Cohere's default (4096 tokens) is far past this model's 256: plain truncation.
    default = post(url, "/v2/rerank", {"query": "queue", "documents": documents}).json()
    plain = post(url, "/v1/rerank", {"query": "queue", "documents": documents}).json()
    assert [r["relevance_score"] for r in default["results"]] == [r["relevance_score"] for r in plain["results"]]


def test_v2_takes_the_earlier_v2_apis_return_documents_and_rank_fields(live: tuple[str, Reranker]) -> None:
    """Cohere's SDKs up to 5.13 send these on v2, and read each result's `document` back when they asked for it."""
    url, _ = live
    objects = [{"title": "Queues", "text": d} for d in DOCS]
    echoed = post(url, "/v2/rerank", {"query": "cache server", "documents": objects, "return_documents": True,
                                      "max_chunks_per_doc": 3}).json()["results"]
    plain = post(url, "/v2/rerank", {"query": "cache server", "documents": DOCS}).json()["results"]
    assert [(r["index"], r["relevance_score"]) for r in echoed] == [(r["index"], r["relevance_score"]) for r in plain]
    assert [r["document"] for r in echoed] == [objects[r["index"]] for r in echoed]  # as sent, as on /v1/rerank
    strings = post(url, "/v2/rerank", {"query": "q", "documents": DOCS, "return_documents": True}).json()["results"]
    assert [r["document"] for r in strings] == [{"text": DOCS[r["index"]]} for r in strings]
    fields = {"query": "cache server", "documents": objects, "rank_fields": ["title", "text"],
              "return_documents": False}
    by_fields = post(url, "/v2/rerank", fields).json()["results"]
    on_v1 = post(url, "/v1/rerank", fields).json()["results"]
    assert by_fields == on_v1 and all("document" not in r for r in by_fields)


@pytest.mark.parametrize(("body", "status", "says"), [
    ({"query": "", "documents": DOCS}, 400, "query is empty"),
    ({"query": "q", "documents": DOCS, "max_chunks_per_doc": 0}, 400, "max_chunks_per_doc must be a positive"),
    ({"query": "q", "documents": DOCS, "max_chunks_per_doc": "9"}, 422, "max_chunks_per_doc"),
    ({"query": "q", "documents": DOCS, "return_documents": "yes"}, 422, "return_documents"),
    ({"query": "q", "documents": []}, 400, "documents is empty"),
    ({"query": "q", "documents": DOCS, "max_tokens_per_doc": 0}, 400, "max_tokens_per_doc must be a positive"),
    ({"query": "q", "documents": DOCS, "relevant_spans": {"mode": "enabled"}}, 400, "relevant_spans is not supp"),
    ({"query": "q", "documents": DOCS, "top_n": 0}, 400, "top_n must be a positive integer"),
    ({"query": "q", "documents": [f"d{i}" for i in range(21)]}, 413, "the limit is RERANKER_MAX_DOCS=20"),
    ({"query": "q", "documents": ["x" * 5001]}, 413, "RERANKER_MAX_DOC_CHARS"),
    ({"query": 7, "documents": DOCS}, 422, "query: Input should be a valid string"),
    ({"query": "q", "documents": DOCS, "max_tokens_per_doc": "9"}, 422, "max_tokens_per_doc"),
    ({"query": "q", "documents": [3]}, 422, "documents[0] must be a string"),
    ({"documents": DOCS}, 422, "query: Field required"),
])
def test_v2_errors_come_in_cohere_shape_naming_what_to_change(
        live: tuple[str, Reranker], body: dict[str, Any], status: int, says: str) -> None:
    url, reranker = live
    before = count(reranker, "invalid")
    response = post(url, "/v2/rerank", body)
    assert response.status_code == status, response.text
    error = response.json()
    assert set(error) == {"id", "message"} and error["id"] == response.headers["x-request-id"]
    assert says in error["message"]
    assert count(reranker, "invalid") == before + 1


def test_v2_refusals_before_the_route_are_cohere_shaped_too(live: tuple[str, Reranker]) -> None:
    url, reranker = live
    before = count(reranker, "invalid")
    checks = [
        (post(url, "/v2/rerank", {"query": "q", "documents": DOCS}, key=None), 401, "Authorization: Bearer"),
        (post(url, "/v2/rerank", {"query": "q", "documents": DOCS}, key="wrong"), 401, "Authorization: Bearer"),
        (post(url, "/v2/rerank", {"query": "q", "documents": ["x" * 4000] * 20}), 413, "RERANKER_MAX_BODY_BYTES"),
        (httpx.post(f"{url}/v2/rerank", content=b"{not json", timeout=30,
                    headers={"authorization": "Bearer secret", "content-type": "application/json"}), 400, "not valid"),
    ]
    for response, status, says in checks:
        assert response.status_code == status
        assert set(response.json()) == {"id", "message"} and says in response.json()["message"]
    assert count(reranker, "invalid") == before + len(checks)
    wrong_method = httpx.get(f"{url}/v2/rerank", headers={"authorization": "Bearer secret"}, timeout=30)
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert wrong_method.json()["message"] == "/v2/rerank takes POST with a JSON body"
    # The other routes keep their own error shape (v1's with Cohere v1's top-level message and Jina's detail).
    assert set(post(url, "/v1/rerank", {"query": "", "documents": DOCS}).json()) == {"error", "message", "detail"}


def test_v1_answers_carry_cohere_meta_too(live: tuple[str, Reranker]) -> None:
    url, _ = live
    meta = post(url, "/v1/rerank", {"query": "q", "documents": DOCS}).json()["meta"]
    assert meta["api_version"] == {"version": "1"} and meta["billed_units"] == {"search_units": 1}
