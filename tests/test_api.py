"""The HTTP surface: every route, the error schema on bad input, the API key, one ranking everywhere."""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, cast

import httpx
import pytest
from gradio_client import Client, handle_file

from reranker import Reranker, ValidationError
from reranker.metrics import Metrics
from reranker.model import ScoringModel
from tests.conftest import model_settings
from tests.servers import HANG_S, serve
from web.http import create_app
from web.middleware import LIMITED_PATHS, BodyLimit
from web.service import RerankService
from web.ui import make_predict
from web.uploads import read_documents

DOCS = ["a cache server keeps hot data", "tea grows on hills", "the queue server", "", "json token parse"]


@pytest.fixture(scope="module")
def live(bert_model: ScoringModel, bert_dir: Path) -> Iterator[tuple[str, Reranker]]:
    # No score cache: each surface compared with another scores its pairs itself (test_engine.py tests the cache).
    settings = model_settings(bert_dir, max_docs=20, max_doc_chars=2000, max_query_chars=500,
                              max_body_bytes=64 * 1024, cache_size=0)
    with Reranker(bert_model, settings, metrics=Metrics(__import__("prometheus_client").CollectorRegistry())) as r:
        with serve(create_app(r)) as url:
            yield url, r


@pytest.fixture
def url(live: tuple[str, Reranker]) -> str:
    return live[0]


def post(url: str, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    # json.dumps escapes non-ASCII (lone surrogates included) as \\uXXXX, as most JSON clients do.
    headers = {"content-type": "application/json", **kwargs.pop("headers", {})}
    return httpx.post(f"{url}{path}", content=json.dumps(body).encode(), headers=headers, timeout=HANG_S, **kwargs)


class Answer(Protocol):  # an httpx response, or the test client's
    def json(self) -> Any: ...


def error_message(response: Answer) -> str:
    """The message of an error answer in any route's shape: TEI's on /rerank, Cohere v2's, or ours."""
    body = response.json()
    if isinstance(body.get("error"), str):
        assert body["error_type"], body
        return str(body["error"])
    return str(body["message"] if "id" in body else body["error"]["message"])


def test_cohere_rerank(url: str) -> None:
    response = post(url, "/v1/rerank", {"query": "cache server", "documents": DOCS[:3] + [{"text": DOCS[3]}]})
    assert response.status_code == 200
    body = response.json()
    assert body["model"] and body["id"] and body["usage"]["total_tokens"] > 0
    results = body["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2, 3]
    assert [r["relevance_score"] for r in results] == sorted((r["relevance_score"] for r in results), reverse=True)
    assert all(0 < r["relevance_score"] < 1 and r["document"]["text"] == DOCS[r["index"]] for r in results)


def test_cohere_top_n_return_documents_and_raw_scores(url: str) -> None:
    body = post(url, "/v1/rerank", {"query": "cache server", "documents": DOCS, "top_n": 2,
                                    "return_documents": False, "raw_scores": True,
                                    "model": "anything", "unknown_field": 1}).json()
    assert len(body["results"]) == 2 and all("document" not in r for r in body["results"])  # left out, as Cohere
    full = post(url, "/v1/rerank", {"query": "cache server", "documents": DOCS, "raw_scores": True}).json()
    assert [r["index"] for r in body["results"]] == [r["index"] for r in full["results"][:2]]
    assert [r["relevance_score"] for r in body["results"]] == [r["relevance_score"] for r in full["results"][:2]]
    # raw_scores gives logits: their sigmoid is the default score.
    probabilities = post(url, "/v1/rerank", {"query": "cache server", "documents": DOCS}).json()["results"]
    raw = {r["index"]: r["relevance_score"] for r in full["results"]}
    for r in probabilities:
        assert r["relevance_score"] == pytest.approx(1 / (1 + math.exp(-raw[r["index"]])), abs=1e-6)


def test_cohere_v1_takes_what_its_clients_send(url: str) -> None:
    """A `top_n` past the documents (Cohere: up to their number), nulls for the optional flags (the SDK sends an
    explicit None as null), documents echoed as sent, and objects ranked on `rank_fields`."""
    every = post(url, "/v1/rerank", {"query": "cache server", "documents": DOCS}).json()["results"]
    for top_n in (len(DOCS) + 1, 10_000, 10**30):
        answer = post(url, "/v1/rerank", {"query": "cache server", "documents": DOCS, "top_n": top_n})
        assert answer.status_code == 200 and answer.json()["results"] == every
    nulls = post(url, "/v1/rerank", {"query": "cache server", "documents": DOCS, "top_n": None,
                                     "return_documents": None, "raw_scores": None, "rank_fields": None})
    assert nulls.status_code == 200 and nulls.json()["results"] == every  # null as absent
    objects = [{"title": "Redis", "body": DOCS[0], "id": 7, "tags": ["kv"]}, {"title": "Paris", "body": DOCS[1]},
               {"body": DOCS[2]}]
    answer = post(url, "/v1/rerank", {"query": "cache server", "documents": objects, "rank_fields": ["title", "body"]})
    assert answer.status_code == 200, answer.text
    assert {r["index"]: r["document"] for r in answer.json()["results"]} == dict(enumerate(objects))  # as sent
    # Ranked on "name: value" lines of the fields named, in rank_fields' order; one field ranks on its value alone.
    lines = [f"title: Redis\nbody: {DOCS[0]}", f"title: Paris\nbody: {DOCS[1]}", f"body: {DOCS[2]}"]
    def ranked(documents: list[Any], **extra: Any) -> dict[int, float]:
        return scores(post(url, "/v1/rerank", {"query": "cache server", "documents": documents, **extra}))

    assert ranked(objects, rank_fields=["title", "body"]) == ranked(lines)
    assert ranked(objects, rank_fields=["body"]) == ranked(DOCS[:3])
    for documents, says in [([{"title": "a"}, {"tags": "b"}], "documents[1] has none of the fields rank_fields names"),
                            ([{"title": ["zebra-secret"]}], "rank_fields[0] is not one")]:
        refused = post(url, "/v1/rerank", {"query": "q", "documents": documents, "rank_fields": ["title", "body"]})
        assert refused.status_code == 422 and says in refused.json()["message"] and "zebra" not in refused.text


def scores(response: httpx.Response) -> dict[int, float]:
    assert response.status_code == 200, response.text
    return {r["index"]: r["relevance_score"] for r in response.json()["results"]}


def test_tei_errors_take_teis_shape(url: str) -> None:
    """TEI's clients read `{"error": message, "error_type": ...}`, with TEI's names: `Empty` for an empty input."""
    answer = post(url, "/rerank", {"query": "", "texts": ["a"]})
    assert answer.status_code == 400 and answer.json() == {"error": answer.json()["error"], "error_type": "Empty"}
    assert answer.json()["error"].startswith("query")
    answer = post(url, "/rerank", {"query": "q", "texts": []})
    assert answer.status_code == 400 and answer.json() == {"error": "texts is empty; send at least one document",
                                                          "error_type": "Empty"}
    for body, status in (({"query": "q", "texts": ["a"], "top_n": 0}, 400),  # the other 4xx: Validation
                         ({"query": "q", "texts": [1]}, 422), ({"query": "q" * 100_000, "texts": ["a"]}, 413)):
        answer = post(url, "/rerank", body)
        assert (answer.status_code, answer.json()["error_type"]) == (status, "Validation"), answer.text
    # Elsewhere the type stays ours.
    assert post(url, "/v1/rerank", {"query": "", "documents": ["a"]}).json()["error"]["type"] == "invalid_request"


def test_tei_truncate_false_refuses_a_text_the_model_would_cut(live: tuple[str, Reranker]) -> None:
    """TEI refuses such a text when its client sends `truncate: false`; it was cut silently here."""
    url, reranker = live
    long = "cache " * 300  # past TEST_MAX_LENGTH tokens
    before = reranker.metrics.registry.get_sample_value("reranker_pairs_scored_total") or 0
    refused = post(url, "/rerank", {"query": "q", "texts": ["short", long], "truncate": False})
    assert refused.status_code == 413 and refused.json()["error_type"] == "Validation"
    assert refused.json()["error"].startswith("texts[1] does not fit RERANKER_MAX_LENGTH=")
    assert "cache" not in refused.json()["error"]
    assert (reranker.metrics.registry.get_sample_value("reranker_pairs_scored_total") or 0) == before  # none ran
    for truncate in (True, None):
        assert post(url, "/rerank", {"query": "q", "texts": ["short", long], "truncate": truncate}).status_code == 200
    # Now a cache hit, whose entry remembers the cut: refused all the same.
    assert post(url, "/rerank", {"query": "q", "texts": [long], "truncate": False}).status_code == 413
    assert post(url, "/rerank", {"query": "q", "texts": ["short"], "truncate": False}).status_code == 200


def test_tei_rerank(url: str) -> None:
    response = post(url, "/rerank", {"query": "cache server", "texts": DOCS})
    assert response.status_code == 200
    nulls = post(url, "/rerank", {"query": "cache server", "texts": DOCS, "raw_scores": None, "return_text": None,
                                  "truncate": None, "top_n": None})
    assert nulls.status_code == 200 and nulls.json() == response.json()  # null as absent
    results = response.json()
    assert isinstance(results, list) and len(results) == len(DOCS)
    assert all(set(r) == {"index", "score"} for r in results)
    with_text = post(url, "/rerank", {"query": "cache server", "texts": DOCS, "return_text": True,
                                      "raw_scores": True, "truncate": True, "truncation_direction": "Right"}).json()
    assert all(r["text"] == DOCS[r["index"]] for r in with_text)
    assert [r["index"] for r in with_text] == [r["index"] for r in results]
    # top_n and raw_scores reach the engine: the best two, and the logits /v1/rerank gives, whose sigmoid is the score.
    top = post(url, "/rerank", {"query": "cache server", "texts": DOCS, "top_n": 2}).json()
    assert top == results[:2]
    raw = {r["index"]: r["score"] for r in with_text}
    cohere = post(url, "/v1/rerank", {"query": "cache server", "documents": DOCS, "raw_scores": True}).json()
    assert raw == pytest.approx({r["index"]: r["relevance_score"] for r in cohere["results"]}, abs=1e-5)
    assert {r["index"]: r["score"] for r in results} == pytest.approx(
        {i: 1 / (1 + math.exp(-logit)) for i, logit in raw.items()}, abs=1e-5)
    # TEI's clients send the direction in either case.
    for direction in ("right", "RIGHT"):
        answer = post(url, "/rerank", {"query": "q", "texts": ["a"], "truncation_direction": direction})
        assert answer.status_code == 200


def test_root_api_predict_accepts_text_or_list(url: str) -> None:
    as_text = post(url, "/api/predict", {"data": ["cache server", "\n".join(DOCS)]}).json()
    as_list = post(url, "/api/predict", {"data": ["cache server", DOCS[:3] + DOCS[4:], 2, None]}).json()
    assert as_text["duration"] >= 0 and len(as_text["data"][0]) == 4  # the blank line is not a document
    assert [r["index"] for r in as_list["data"][0]] == [r["index"] for r in as_text["data"][0]][:2]
    assert set(as_text["data"][0][0]) == {"index", "score", "document"}
    # A Number field's float, as the UI takes it: 2.0 is 2; 0.0 is all, like 0.
    as_float = post(url, "/api/predict", {"data": ["cache server", DOCS[:3] + DOCS[4:], 2.0]}).json()
    assert as_float["data"] == as_list["data"]
    assert len(post(url, "/api/predict", {"data": ["cache server", DOCS, 0.0]}).json()["data"][0]) == len(DOCS)


def test_health_ready_info_docs(url: str) -> None:
    assert httpx.get(f"{url}/healthz", timeout=HANG_S).json() == {"status": "ok"}
    assert httpx.get(f"{url}/readyz", timeout=HANG_S).status_code == 200
    info = httpx.get(f"{url}/info", timeout=HANG_S).json()
    assert info["device"] == "cpu" and info["compile"] == "off" and info["max_length"] == 256
    assert info["long_docs"] == "truncate" and info["model_from_cache"] is False  # torch: always a full load
    assert info["cpu_streams"] is None and info["cut_ins"] is True  # torch runs no OpenVINO streams
    assert info["auth"] == {"api_key": False, "ui_login": False} and info["tracing"] is False
    assert info["limits"]["max_docs"] == 20 and "torch" in info["versions"]
    schema = httpx.get(f"{url}/openapi.json", timeout=HANG_S).json()
    assert {"/v1/rerank", "/rerank", "/api/predict", "/healthz", "/readyz", "/info"} <= set(schema["paths"])
    documents = schema["components"]["schemas"]["CohereRerankRequest"]["properties"]["documents"]
    assert documents["items"]["anyOf"][0] == {"type": "string"}  # items are checked by hand, still documented
    assert schema["components"]["schemas"]["TeiRerankRequest"]["properties"]["texts"]["items"] == {"type": "string"}
    # What the routes answer beyond FastAPI's view (helper-53): the bearer key web.middleware checks, 408, the
    # headers the docs name, the engine's lower bounds, and /readyz's 200.
    assert schema["components"]["securitySchemes"]["apiKey"] == {
        "type": "http", "scheme": "bearer", "description": "RERANKER_API_KEY, where the service sets one"}
    rerank = schema["paths"]["/v1/rerank"]["post"]
    assert rerank["security"] == [{"apiKey": []}, {}] and "security" not in schema["paths"]["/healthz"]["get"]
    assert {"400", "401", "408", "413", "422", "429", "500", "503"} <= set(rerank["responses"])
    assert "Retry-After" in rerank["responses"]["429"]["headers"]
    assert "WWW-Authenticate" in rerank["responses"]["401"]["headers"]
    for model, field in [("CohereRerankRequest", "top_n"), ("CohereV2RerankRequest", "max_tokens_per_doc"),
                         ("CohereV2RerankRequest", "max_chunks_per_doc"), ("TeiRerankRequest", "top_n")]:
        assert schema["components"]["schemas"][model]["properties"][field]["minimum"] == 1, (model, field)
    predict_data = schema["components"]["schemas"]["PredictRequest"]["properties"]["data"]
    assert (predict_data["minItems"], predict_data["maxItems"]) == (2, 4)  # as the route's own 422 holds it
    ready = schema["paths"]["/readyz"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ready == {"$ref": "#/components/schemas/Ready"}
    assert httpx.get(f"{url}/docs", timeout=HANG_S).status_code == 200
    page = httpx.get(f"{url}/", timeout=HANG_S)
    assert page.status_code == 200 and "gradio" in page.text.lower()


def test_each_routes_schema_example_is_a_request_it_answers(url: str) -> None:
    """/docs' "Try it out" sends these as they stand (web/schemas.py); Swagger UI's own of the schema were refused."""
    schema = httpx.get(f"{url}/openapi.json", timeout=HANG_S).json()
    for route in ("/v1/rerank", "/v2/rerank", "/rerank", "/api/predict"):
        body = schema["paths"][route]["post"]["requestBody"]["content"]["application/json"]["schema"]
        [example] = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]["examples"]
        response = httpx.post(f"{url}{route}", json=example, timeout=HANG_S)
        assert response.status_code == 200, (route, response.text)


def test_readyz_is_503_once_closed(bert_model: ScoringModel, bert_dir: Path) -> None:
    from fastapi.testclient import TestClient

    reranker = Reranker(bert_model, model_settings(bert_dir))
    client = TestClient(create_app(reranker, ui=False))
    assert client.get("/readyz").status_code == 200
    reranker.close()
    response = client.get("/readyz")
    assert response.status_code == 503 and response.json()["error"]["type"] == "not_ready"
    assert client.get("/healthz").status_code == 200


BIG = "x" * 2001
BAD_INPUTS: list[tuple[str, str, Any, int]] = [
    ("missing body fields", "/v1/rerank", {}, 422),
    ("missing documents", "/v1/rerank", {"query": "q"}, 422),
    ("missing query", "/v1/rerank", {"documents": ["a"]}, 422),
    ("query is a number", "/v1/rerank", {"query": 5, "documents": ["a"]}, 422),
    ("query is null", "/v1/rerank", {"query": None, "documents": ["a"]}, 422),
    ("documents is a string", "/v1/rerank", {"query": "q", "documents": "a"}, 422),
    ("document is a number", "/v1/rerank", {"query": "q", "documents": [1]}, 422),
    ("document is null", "/v1/rerank", {"query": "q", "documents": [None]}, 422),
    ("document object without text", "/v1/rerank", {"query": "q", "documents": [{"txt": "a"}]}, 422),
    ("document is a list", "/v1/rerank", {"query": "q", "documents": [["a"]]}, 422),
    ("empty documents", "/v1/rerank", {"query": "q", "documents": []}, 400),
    ("empty query", "/v1/rerank", {"query": "", "documents": ["a"]}, 400),
    ("blank query", "/v1/rerank", {"query": "  \n", "documents": ["a"]}, 400),
    ("top_n zero", "/v1/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, 400),
    ("top_n negative", "/v1/rerank", {"query": "q", "documents": ["a"], "top_n": -1}, 400),
    ("top_n not an integer", "/v1/rerank", {"query": "q", "documents": ["a"], "top_n": 1.5}, 422),
    ("top_n a string", "/v1/rerank", {"query": "q", "documents": ["a"], "top_n": "3"}, 422),
    ("return_documents a string", "/v1/rerank", {"query": "q", "documents": ["a"], "return_documents": "no"}, 422),
    ("raw_scores a number", "/v1/rerank", {"query": "q", "documents": ["a"], "raw_scores": 1}, 422),
    ("too many documents", "/v1/rerank", {"query": "q", "documents": ["a"] * 21}, 413),
    # Counted before any item is checked: pydantic used to spend seconds on an error per bad item first.
    ("too many bad documents", "/v1/rerank", {"query": "q", "documents": [1] * 50_000}, 413),
    ("too many bad TEI texts", "/rerank", {"query": "q", "texts": [None] * 50_000}, 413),
    ("document too long", "/v1/rerank", {"query": "q", "documents": [BIG]}, 413),
    ("query too long", "/v1/rerank", {"query": "q" * 501, "documents": ["a"]}, 413),
    ("null byte in query", "/v1/rerank", {"query": "a\u0000b", "documents": ["a"]}, 400),
    ("null byte in document", "/v1/rerank", {"query": "q", "documents": ["a\u0000"]}, 400),
    ("instruction for a model without one", "/v1/rerank", {"query": "q", "documents": ["a"], "instruction": "x"},
     400),
    ("body is an array", "/v1/rerank", ["q", "a"], 422),
    ("TEI texts missing", "/rerank", {"query": "q"}, 422),
    ("TEI texts of numbers", "/rerank", {"query": "q", "texts": [1, 2]}, 422),
    ("TEI empty texts", "/rerank", {"query": "q", "texts": []}, 400),
    ("TEI too many texts", "/rerank", {"query": "q", "texts": ["t"] * 21}, 413),
    ("TEI left truncation", "/rerank", {"query": "q", "texts": ["a"], "truncation_direction": "Left"}, 400),
    ("TEI text as truncation_direction", "/rerank",
     {"query": "q", "texts": ["a"], "truncation_direction": "Patient zebra-secret, born 1970"}, 400),
    ("TEI truncation_direction a number", "/rerank", {"query": "q", "texts": ["a"], "truncation_direction": 7}, 422),
    # json.dumps writes it as Infinity, which is no JSON: refused before any field is read.
    ("TEI truncation_direction infinite", "/rerank", {"query": "q", "texts": ["a"], "truncation_direction": 1e999},
     400),
    ("predict data too short", "/api/predict", {"data": ["q"]}, 422),
    ("predict data not a list", "/api/predict", {"data": "q"}, 422),
    ("predict documents of numbers", "/api/predict", {"data": ["q", [1, 2]]}, 422),
    ("predict query a number", "/api/predict", {"data": [123, ["a"]]}, 422),
    ("predict top_n a string", "/api/predict", {"data": ["q", ["a"], "2"]}, 422),
    ("lone surrogate in query", "/v1/rerank", {"query": "q\ud800", "documents": ["a"]}, 400),
    ("lone surrogate in a document", "/v1/rerank", {"query": "q", "documents": ["a\udc00"]}, 400),
    ("lone surrogate in a TEI text", "/rerank", {"query": "q", "texts": ["a\udc00"]}, 400),
    ("predict empty query", "/api/predict", {"data": ["", "a\nb"]}, 400),
    ("predict top_n negative", "/api/predict", {"data": ["q", "a", -3]}, 400),
    ("predict top_n fractional", "/api/predict", {"data": ["q", "a", 1.5]}, 422),
    ("predict top_n false", "/api/predict", {"data": ["q", "a", False]}, 422),
    ("max_chunks_per_doc zero", "/v1/rerank", {"query": "q", "documents": ["a"], "max_chunks_per_doc": 0}, 400),
    # Each route passes the instruction on (the engine refuses it for this model), and /api/predict takes 4 items.
    ("v2 instruction for a model without one", "/v2/rerank",
     {"model": "m", "query": "q", "documents": ["a"], "instruction": "x"}, 400),
    ("predict instruction for a model without one", "/api/predict", {"data": ["q", ["a"], None, "find"]}, 400),
    ("predict data too long", "/api/predict", {"data": ["q", "a", None, None, "x"]}, 422),
    ("instruction too long", "/v1/rerank", {"query": "q", "documents": ["a"], "instruction": " " * 501}, 413),
    ("null byte in an instruction", "/v1/rerank", {"query": "q", "documents": ["a"], "instruction": "a\u0000"}, 400),
    ("max_chunks_per_doc a string", "/v1/rerank", {"query": "q", "documents": ["a"], "max_chunks_per_doc": "lots"},
     422),
]


@pytest.mark.parametrize("given", ["x" * 129, "a b;c", "line\u00e9"], ids=["129 characters", "spaces", "non-ASCII"])
def test_a_request_id_outside_the_rule_is_replaced_not_echoed(url: str, given: str) -> None:
    """1-128 of A-Za-z0-9._:- is echoed (tests/test_logs.py); anything else reached the header, the logs and
    /v2/rerank's id as sent."""
    headers = {"X-Request-ID": given.encode("utf-8")}
    answer = post(url, "/v2/rerank", {"model": "m", "query": "q", "documents": ["a"]}, headers=headers)
    assert answer.status_code == 200
    assert re.fullmatch(r"[0-9a-f]{32}", answer.headers["x-request-id"])
    assert answer.json()["id"] == answer.headers["x-request-id"]
    sane = post(url, "/v1/rerank", {"query": "q", "documents": ["a"]}, headers={"X-Request-ID": "a" * 128})
    assert sane.headers["x-request-id"] == "a" * 128


def test_cohere_bills_a_search_unit_per_hundred_documents_and_counts_the_tokens_scored(
        live: tuple[str, Reranker]) -> None:
    from reranker.results import RerankResult, RerankStats
    from web.routes import cohere_meta

    for n_docs, units in [(1, 1), (100, 1), (101, 2), (200, 2), (201, 3)]:
        meta = cohere_meta("2", RerankResult([], RerankStats(n_docs=n_docs, tokens=7)))
        assert meta.billed_units.search_units == units and meta.tokens.input_tokens == 7
    url, reranker = live  # no score cache: each request scores its pairs

    def scored_tokens() -> float:
        return reranker.metrics.registry.get_sample_value("reranker_input_tokens_total") or 0.0

    body = {"query": "cache server", "documents": DOCS}
    before = scored_tokens()
    v2 = post(url, "/v2/rerank", {"model": "m", **body}).json()
    between = scored_tokens()
    v1 = post(url, "/v1/rerank", body).json()
    assert v2["meta"]["tokens"]["input_tokens"] == between - before > len(DOCS)
    assert v1["usage"]["total_tokens"] == scored_tokens() - between == v2["meta"]["tokens"]["input_tokens"]


def test_a_tei_error_type_follows_the_status(bert_model: ScoringModel, bert_dir: Path) -> None:
    """TEI's clients tell their own mistakes (Validation) from the server's (Backend, Unhealthy, Overloaded)."""
    from fastapi.testclient import TestClient

    def failing(batch: Any) -> Any:
        if any(pair.n_tokens > 30 for pair in batch):  # the long text, not the probe that checks the device
            raise RuntimeError("out of order")
        return bert_model.score(batch)

    body = {"query": "q", "texts": ["a"]}
    with Reranker(bert_model, model_settings(bert_dir), score_fn=failing) as reranker:
        client = TestClient(create_app(reranker, ui=False))
        broken = client.post("/rerank", json={"query": "q", "texts": ["poison " * 40]})
        assert broken.status_code == 500 and broken.json()["error_type"] == "Backend"
        reranker.close()
        closed = client.post("/rerank", json=body)
        assert closed.status_code == 503 and closed.json()["error_type"] == "Unhealthy"


def test_a_request_exactly_at_each_limit_is_served(url: str) -> None:
    """The limits are maxima: a query, a document or a body of exactly the limit is taken (live: 500 query
    characters, 2,000 document characters, 64 KiB of body, 20 documents)."""
    exact = {"query": "q" * 500, "documents": ["d" * 2000] * 20}
    assert post(url, "/v1/rerank", exact).status_code == 200
    body = json.dumps({"query": "q", "documents": ["a"]}).encode()
    padded = body[:-1] + b" " * (64 * 1024 - len(body)) + b"}"  # JSON whitespace up to the byte
    for size, status in [(64 * 1024, 200), (64 * 1024 + 1, 413)]:
        response = httpx.post(f"{url}/v1/rerank", content=padded[:-1] + b" " * (size - len(padded)) + b"}",
                              headers={"content-type": "application/json"}, timeout=HANG_S)
        assert response.status_code == status, (size, response.text[:200])


@pytest.mark.parametrize(("case", "path", "body", "status"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_a_clear_json_error(url: str, case: str, path: str, body: Any, status: int) -> None:
    response = post(url, path, body)
    assert response.status_code == status, response.text
    if path == "/rerank":  # TEI's shape
        answer = response.json()
        assert answer["error_type"] == ("Empty" if "is empty" in answer["error"] else "Validation")
        assert len(answer["error"]) > 10
    elif path == "/v2/rerank":  # Cohere v2's shape
        assert len(error_message(response)) > 10
    else:
        error = response.json()["error"]
        assert error["type"] and len(error["message"]) > 10
        if path == "/v1/rerank":  # and Cohere v1's message and Jina's detail beside it
            assert response.json()["message"] == response.json()["detail"] == error["message"]
    assert "Traceback" not in response.text
    assert "zebra-secret" not in response.text  # no text of a request is echoed
    assert post(url, "/v1/rerank", {"query": "still", "documents": ["alive"]}).status_code == 200


@pytest.mark.parametrize(("texts", "message"), [
    ([], "texts is empty"),
    ([1, 2], "texts[0] must be a string"),
    (["ok", "a\u0000"], "texts[1] contains a NUL character"),
    (["a\udc00"], "texts[0] is not valid Unicode"),
    (["ok", BIG], "texts[1] has"),
])
def test_tei_errors_name_the_texts_field(url: str, texts: list[Any], message: str) -> None:
    """A TEI client sent `texts`: an error about them says `texts`, not this API's `documents`."""
    error = post(url, "/rerank", {"query": "q", "texts": texts}).json()["error"]
    assert error.startswith(message) and "documents[" not in error, error


@pytest.mark.parametrize(
    ("case", "content", "status", "says"),
    [
        ("malformed JSON", b'{"query": "q", "documents": [', 400, "not valid JSON"),
        ("not JSON at all", b"query=q&documents=a", 400, "not valid JSON"),
        ("non-UTF-8 bytes", b'{"query": "\xff\xfe", "documents": ["a"]}', 400, "not UTF-8"),
        # Valid JSON that Python will not parse: it was called invalid JSON.
        ("a number of 5,000 digits", b'{"query": "q", "documents": ["a"], "top_n": ' + b"9" * 5000 + b"}", 400,
         "a number of over 4,300 digits"),
        # Python's parser takes these, but no reply can carry them: a document object came back holding null.
        ("NaN in a document object", b'{"query": "q", "documents": [{"text": "a", "w": NaN}]}', 400,
         "not JSON: NaN is no JSON number (RFC 8259); send null or a string"),
        ("-Infinity as top_n", b'{"query": "q", "documents": ["a"], "top_n": -Infinity}', 400,
         "-Infinity is no JSON number"),
        ("a number past a double", b'{"query": "q", "documents": [{"text": "a", "w": 1e400}]}', 400,
         "the number 1e400 is out of a double's range; send it as a string"),
        ("empty body", b"", 422, "body"),
        ("body over the size limit", json.dumps({"query": "q", "documents": ["a" * 1000] * 70}).encode(), 413,
         "RERANKER_MAX_BODY_BYTES"),
    ],
)
def test_malformed_bodies_get_a_clear_json_error(url: str, case: str, content: bytes, status: int, says: str) -> None:
    response = httpx.post(f"{url}/v1/rerank", content=content, headers={"content-type": "application/json"},
                          timeout=HANG_S)
    assert response.status_code == status, response.text
    assert says in response.json()["error"]["message"]
    if status == 400:
        assert response.json()["error"]["type"] == "invalid_json"
    assert httpx.get(f"{url}/healthz", timeout=HANG_S).status_code == 200


@pytest.mark.parametrize("route", ["/v1/rerank", "/gradio_api/upload"])
def test_a_content_length_past_any_body_is_refused_413_not_raised(route: str) -> None:
    """uvicorn's parsers refuse such a header themselves; the middleware does not count on its server doing so:
    int() of a 5,000-digit number raises past Python's 4,300-digit limit."""
    sent: list[dict[str, Any]] = []
    refused: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the app was called")

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": route, "root_path": "",
             "headers": [(b"content-length", b"9" * 5000), (b"content-type", b"application/json")]}
    limit = BodyLimit(app, 64 * 1024, lambda route, error: refused.append(error.type))
    asyncio.run(limit(scope, receive, send))
    assert sent[0]["status"] == 413 and refused == ["limit_exceeded"]


def test_bad_requests_are_counted_as_invalid(live: tuple[str, Reranker]) -> None:
    url, reranker = live
    before = reranker.metrics.registry.get_sample_value(
        "reranker_requests_total", {"route": "/v1/rerank", "status": "invalid"}) or 0
    post(url, "/v1/rerank", {"query": "", "documents": ["a"]})
    post(url, "/v1/rerank", {"query": 1, "documents": ["a"]})
    httpx.post(f"{url}/v1/rerank", content=b"{", headers={"content-type": "application/json"}, timeout=HANG_S)
    after = reranker.metrics.registry.get_sample_value(
        "reranker_requests_total", {"route": "/v1/rerank", "status": "invalid"})
    assert after == before + 3


def test_api_key_guards_the_rerank_routes(bert_model: ScoringModel, bert_dir: Path) -> None:
    from fastapi.testclient import TestClient

    with Reranker(bert_model, model_settings(bert_dir, api_key="s3cret")) as reranker:
        client = TestClient(create_app(reranker, ui=False))
        body = {"query": "q", "documents": ["a"]}
        for path, payload in [("/v1/rerank", body), ("/rerank", {"query": "q", "texts": ["a"]}),
                              ("/api/predict", {"data": ["q", "a"]})]:
            for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}]:
                response = client.post(path, json=payload, headers=headers)
                message = error_message(response)
                assert response.status_code == 401 and "Bearer" in message
                assert response.headers["www-authenticate"] == "Bearer"
                # A key that was sent is said to be refused, not missing, and is never echoed.
                assert ("was not accepted" in message) == bool(headers)
                assert "wrong" not in message and "s3cret" not in message
            assert client.post(path, json=payload, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        info = client.get("/info")  # open, as the health routes: it says the key is on, never what it is
        assert info.status_code == 200 and info.json()["auth"] == {"api_key": True, "ui_login": False}
        assert "s3cret" not in info.text
        # A prefix of the key is no key (an empty one least of all), and the scheme's case is the client's (RFC 7235).
        for refused in ["Bearer s3c", "Bearer s", "Bearer ", "Bearer s3cret2"]:
            assert client.post("/v1/rerank", json=body, headers={"Authorization": refused}).status_code == 401
        assert client.post("/v1/rerank", json=body, headers={"Authorization": "bearer s3cret"}).status_code == 200
        # Two Authorization headers are refused even when one holds the key: a proxy in front may check the other.
        for pair in [[("authorization", "Bearer s3cret"), ("authorization", "Bearer wrong")],
                     [("authorization", "Bearer wrong"), ("authorization", "Bearer s3cret")]]:
            twice = client.post("/v1/rerank", json=body, headers=pair)
            assert twice.status_code == 401 and "send one Authorization header" in error_message(twice)
            assert "s3cret" not in twice.text and "wrong" not in twice.text
        # The key is checked before the body is read: a stranger learns nothing about the body's shape.
        unauthorized = client.post("/v1/rerank", content=b"{", headers={"content-type": "application/json"})
        assert unauthorized.status_code == 401 and unauthorized.headers["x-request-id"]
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200


def test_every_surface_gives_the_same_ranking(live: tuple[str, Reranker]) -> None:
    url, reranker = live
    query = "which server keeps a cache"
    docs = [d for d in DOCS if d] + ["cache cache cache", "a river and a mountain"]
    rows, status = make_predict(RerankService(reranker))(query, "\n".join(docs))
    ui = [cast(int, row[2]) for row in rows]
    assert "documents" in status and "ms" in status
    root = [r["index"] for r in post(url, "/api/predict", {"data": [query, docs]}).json()["data"][0]]
    cohere = [r["index"] for r in post(url, "/v1/rerank", {"query": query, "documents": docs}).json()["results"]]
    tei = [r["index"] for r in post(url, "/rerank", {"query": query, "texts": docs}).json()]
    table, _ = Client(url, verbose=False).predict(query, "\n".join(docs), api_name="/predict")
    client = [row[2] for row in table["data"]]
    assert ui == root == cohere == tei == client
    assert sorted(ui) == list(range(len(docs)))


def test_the_ui_status_line_counts_what_the_metrics_count(live: tuple[str, Reranker], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The status line showed the engine's time, where the event's metrics, history row and log line count from when
    Gradio took it up: an upload read slowly was in those and not in it."""
    import web.ui

    def slow_read(path: str, limit: int) -> list[str]:
        time.sleep(0.3)
        return ["a slowly read document"]

    url, reranker = live
    monkeypatch.setattr(web.ui, "read_documents", slow_read)  # the server runs in this process
    (tmp_path / "docs.txt").write_text("a slowly read document\n")

    def booked() -> float:
        return reranker.metrics.registry.get_sample_value("reranker_request_duration_seconds_sum",
                                                          {"route": "ui"}) or 0.0

    before = booked()
    _, status = Client(url, verbose=False).predict("cache", "first\nsecond", None, "", False,
                                                   handle_file(tmp_path / "docs.txt"), api_name="/predict")
    shown, counted = float(status.split(" ms")[0]), (booked() - before) * 1000
    assert shown >= 300 and counted <= shown + 1 < counted + 50, (status, counted)


def test_gradio_rest_routes_work(url: str) -> None:
    data = ["cache server", "\n".join(DOCS), None, "", False, None]
    direct = httpx.post(f"{url}/gradio_api/api/predict", json={"data": data}, timeout=HANG_S)
    assert direct.status_code == 200, direct.text
    rows = direct.json()["data"][0]["data"]
    event = httpx.post(f"{url}/gradio_api/call/predict", json={"data": data}, timeout=HANG_S).json()["event_id"]
    stream = httpx.get(f"{url}/gradio_api/call/predict/{event}", timeout=HANG_S).text
    assert "event: complete" in stream
    completed = json.loads(stream.split("event: complete\ndata: ", 1)[1].splitlines()[0])
    assert [r[2] for r in completed[0]["data"]] == [r[2] for r in rows]


def test_an_event_id_gradio_does_not_hold_gets_its_error_event_and_a_clean_end(
        url: str, capfd: pytest.CaptureFixture[str]) -> None:
    """Gradio raises its 404 after it has started the event stream: the server logged two tracebacks and cut the
    stream mid-chunk (httpx: 'incomplete chunked read'). The client now reads the error event, then the end."""
    capfd.readouterr()
    unknown = httpx.get(f"{url}/gradio_api/call/predict/no-such-event", timeout=HANG_S)
    assert (unknown.status_code, unknown.text) == (200, 'event: error\ndata: "404: Not Found"\n\n')
    session = httpx.get(f"{url}/gradio_api/queue/data", params={"session_hash": "no-such-session"}, timeout=HANG_S)
    assert session.status_code == 200 and '"session_not_found":true' in session.text
    err = capfd.readouterr().err
    assert "Traceback" not in err and "unhandled error" not in err and "Exception in ASGI application" not in err


def test_ui_handler_errors_are_gradio_errors(live: tuple[str, Reranker]) -> None:
    import gradio as gr

    predict = make_predict(RerankService(live[1]))
    with pytest.raises(gr.Error, match="query is empty"):
        predict("", "a\nb")
    with pytest.raises(gr.Error, match="documents is empty"):
        predict("q", "\n\n")


def test_ui_reads_uploaded_files(live: tuple[str, Reranker], tmp_path: Path) -> None:
    import gradio as gr

    predict = make_predict(RerankService(live[1]))

    def invalid(reranker: Reranker) -> float:
        return reranker.metrics.registry.get_sample_value("reranker_requests_total",
                                                          {"route": "ui", "status": "invalid"}) or 0.0

    before = invalid(live[1])  # the module's service is shared: earlier tests count here too
    (tmp_path / "d.txt").write_text("first doc\n\nsecond doc\n")
    (tmp_path / "d.jsonl").write_text('{"text": "first doc"}\n{"text": "second doc", "id": 2}\n')
    (tmp_path / "d.csv").write_text('id,text\n1,first doc\n2,"second doc"\n')
    for name in ("d.txt", "d.jsonl", "d.csv"):
        rows, _ = predict("doc", "", None, "", False, str(tmp_path / name))
        assert sorted(str(row[3]) for row in rows) == ["first doc", "second doc"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(gr.Error, match="line 2 needs a string \"text\" field"):
        predict("doc", "", None, "", False, str(tmp_path / "bad.jsonl"))
    with pytest.raises(gr.Error, match=r"^.?cannot read the uploaded file gone.txt; upload it again.?$"):
        predict("doc", "", None, "", False, str(tmp_path / "gone.txt"))  # no server path in the message
    (tmp_path / "bad.csv").write_text("id,body\n1,x\n")
    with pytest.raises(gr.Error, match='needs a header row with a "text" column'):
        predict("doc", "", None, "", False, str(tmp_path / "bad.csv"))
    # The lax reader took an unclosed quote's rest of the file as one document, silently.
    (tmp_path / "open.csv").write_text('text\nfirst\n"second, unclosed\nthird\nfourth\n')
    with pytest.raises(gr.Error, match="open.csv is not valid CSV: a quote opened after line 2 is never closed"):
        predict("doc", "", None, "", False, str(tmp_path / "open.csv"))
    # A field over the csv module's 128 KiB cap gets the engine's limit message, not a csv.Error.
    (tmp_path / "big.csv").write_text("text\n" + "x" * 200_000 + "\n")
    roomy = model_settings(Path(live[1].model.model_id), max_body_bytes=1 << 20, max_doc_chars=2000)
    # The bad uploads are counted like bad requests: each once.
    assert invalid(live[1]) == before + 4
    with Reranker(live[1].model, roomy) as reranker:
        with pytest.raises(gr.Error, match=r"has 200000 characters"):
            make_predict(RerankService(reranker))("doc", "", None, "", False, str(tmp_path / "big.csv"))
        assert invalid(reranker) == 1


# Inside a line, not ends of one: str.splitlines broke at each, and every later document's index shifted.
INSIDE_A_LINE = "\u2028 \u2029 \u0085 \x0b \x0c \x1c"


def test_documents_one_per_line_end_lines_at_newlines_only(url: str, tmp_path: Path) -> None:
    text = f"first {INSIDE_A_LINE} doc\r\nsecond\rthird\n"
    response = httpx.post(f"{url}/api/predict", json={"data": ["q", text]}, timeout=HANG_S)
    assert response.status_code == 200, response.text
    assert sorted(r["document"] for r in response.json()["data"][0]) == [f"first {INSIDE_A_LINE} doc", "second",
                                                                         "third"]
    (tmp_path / "d.txt").write_text(text, encoding="utf-8")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                                              for t in (f"first {INSIDE_A_LINE} doc", "second")), encoding="utf-8")
    assert read_documents(tmp_path / "d.txt", 1 << 20) == [f"first {INSIDE_A_LINE} doc", "second", "third"]
    assert read_documents(tmp_path / "d.jsonl", 1 << 20) == [f"first {INSIDE_A_LINE} doc", "second"]


@pytest.mark.parametrize(("line", "message"), [
    ("[" * 20_000, "line 2 nests too deeply to read; flatten it"),
    ('{"text": "a", "n": ' + "9" * 5000 + "}", "line 2 holds a number of over 4,300 digits; write it as a string"),
    ('{"text": "a"', "line 2 is not valid JSON"),
])
def test_an_unreadable_jsonl_line_is_a_clear_error(live: tuple[str, Reranker], tmp_path: Path, line: str,
                                                   message: str) -> None:
    """Each escaped json.JSONDecodeError's handler: the Gradio API answered 500 with the exception's text, and
    the log took a traceback."""
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n' + line + "\n")
    with pytest.raises(ValidationError, match=re.escape(message)):
        read_documents(tmp_path / "d.jsonl", 1 << 20)
    client = Client(live[0], verbose=False)
    with pytest.raises(Exception, match=re.escape(message)):
        client.predict("q", "", None, "", False, handle_file(tmp_path / "d.jsonl"), api_name="/predict")


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/v1/rerank", 405), ("PUT", "/rerank", 405), ("DELETE", "/api/predict", 405),
    ("OPTIONS", "/v1/rerank", 405), ("POST", "/v1/rerank/", 404), ("POST", "/rerank/", 404),
    ("GET", "/api/predict/", 404),
    # The health routes: these got a 404 naming the route they had called.
    ("POST", "/healthz", 405), ("DELETE", "/readyz", 405), ("PUT", "/info", 405), ("OPTIONS", "/healthz", 405),
])
def test_a_wrong_method_or_a_trailing_slash_gets_this_apis_error_shape(live: tuple[str, Reranker], method: str,
                                                                        path: str, status: int) -> None:
    """Not Gradio's bare 404 (its app is mounted at /): the error body every client of these routes parses.
    Not a rerank request either, so not counted as one."""
    url, reranker = live
    counted = reranker.metrics.registry.get_sample_value(
        "reranker_requests_total", {"route": path.rstrip("/"), "status": "invalid"})
    response = httpx.request(method, f"{url}{path}", json={"query": "q", "documents": ["a"]}, timeout=HANG_S)
    assert response.status_code == status, response.text
    if path.rstrip("/") == "/rerank":  # TEI's shape, which has no kind for these
        assert response.json()["error_type"] == "Validation"
    else:
        assert response.json()["error"]["type"] in ("method_not_allowed", "not_found")
    assert path.rstrip("/") in error_message(response)
    if status == 405:
        assert response.headers["allow"] == ("POST" if path in LIMITED_PATHS else "GET, HEAD")
        assert error_message(response).endswith("with a JSON body" if path in LIMITED_PATHS else "GET or HEAD")
    assert reranker.metrics.registry.get_sample_value(
        "reranker_requests_total", {"route": path.rstrip("/"), "status": "invalid"}) == counted


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/rank"), ("GET", "/v1/foo"), ("POST", "/v2/rerank/more"), ("GET", "/no-such-page"),
])
def test_an_unknown_route_gets_this_apis_error_shape_naming_the_routes(url: str, method: str, path: str) -> None:
    """Not Gradio's bare {"detail": "Not Found"}: the app mounted at / answers every path none of ours serves."""
    response = httpx.request(method, f"{url}{path}", json={"query": "q", "documents": ["a"]}, timeout=HANG_S)
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["type"] == "not_found" and "POST /v1/rerank, /v2/rerank, /rerank" in error["message"]


def test_gradio_keeps_its_own_routes_and_404s(url: str, bert_model: ScoringModel, bert_dir: Path) -> None:
    from fastapi.testclient import TestClient

    assert httpx.get(f"{url}/gradio_api/info", timeout=HANG_S).status_code == 200
    assert httpx.get(f"{url}/config", timeout=HANG_S).status_code == 200
    # Under Gradio's API prefix, and for its own routes' misses, Gradio's clients get Gradio's answer.
    for path in ("/gradio_api/no-such-route", "/assets/no-such-file.js"):
        missing = httpx.get(f"{url}{path}", timeout=HANG_S)
        assert missing.status_code == 404 and "detail" in missing.json(), path
    # Without the UI (the Ray Serve ingress builds the same API) an unknown path is answered alike.
    with Reranker(bert_model, model_settings(bert_dir)) as reranker:
        response = TestClient(create_app(reranker, ui=False)).post("/v1/rank", json={})
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found"
    assert "/v1/rerank" in response.json()["error"]["message"]


def test_health_routes_answer_head(url: str) -> None:
    assert httpx.head(f"{url}/healthz", timeout=HANG_S).status_code == 200
    assert httpx.head(f"{url}/readyz", timeout=HANG_S).status_code == 200


def test_a_body_not_sent_as_json_says_how_to_send_it(url: str) -> None:
    plain = httpx.post(f"{url}/v1/rerank", content=b'{"query": "q", "documents": ["a"]}', timeout=HANG_S,
                       headers={"content-type": "application/x-www-form-urlencoded"})
    assert plain.status_code == 422 and "Content-Type: application/json" in plain.json()["error"]["message"]
    import gzip

    packed = httpx.post(f"{url}/rerank", content=gzip.compress(b'{"query": "q", "texts": ["a"]}'), timeout=HANG_S,
                        headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert packed.status_code == 400 and "send it uncompressed" in error_message(packed)


def test_healthz_answers_at_once_while_every_worker_thread_waits_on_scoring(bert_model: ScoringModel,
                                                                           bert_dir: Path) -> None:
    """A liveness probe must not queue behind scoring: the rerank routes wait for their scores on threads of a
    bounded pool (40), and a synchronous /healthz took 5.8 s and then 20.3 s behind them under load."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.test_faults import GatedScorer, wait_until

    scorer = GatedScorer(bert_model)
    with Reranker(bert_model, model_settings(bert_dir, cache_size=0), score_fn=scorer) as reranker, \
            serve(create_app(reranker, ui=False)) as url, ThreadPoolExecutor(60) as pool:
        calls = [pool.submit(post, url, "/v1/rerank", {"query": f"q{i}", "documents": ["a", "b"]}) for i in range(60)]
        assert scorer.first_batch.wait(HANG_S)
        wait_until(lambda: reranker.queued_pairs >= 80)  # the pool's 40 threads wait on the held device
        # While the device is held: a /healthz on that pool could only answer once the gate opens (after HANG_S).
        for method in (httpx.get, httpx.head):
            assert method(f"{url}/healthz", timeout=30).status_code == 200
        scorer.gate.set()
        assert all(call.result().status_code == 200 for call in calls)


def test_the_health_routes_answer_head(url: str) -> None:
    """Load balancers probe with HEAD: /info as /healthz and /readyz."""
    for path in ("/healthz", "/readyz", "/info"):
        response = httpx.head(f"{url}{path}", timeout=HANG_S)
        assert response.status_code == 200 and response.content == b"", path


def test_the_docs_page_links_only_this_server(url: str) -> None:
    page = httpx.get(f"{url}/docs", timeout=HANG_S)
    assert page.status_code == 200
    links = re.findall(r'(?:src|href|url)\s*[=:]\s*["\']([^"\']+)["\']', page.text)
    assert links and not [link for link in links if "//" in link], links
    for link, kind in [("/docs/swagger-ui-bundle.js", "javascript"), ("/docs/swagger-ui.css", "text/css"),
                       ("/docs/favicon-32x32.png", "image/png"), ("/openapi.json", "application/json")]:
        assert link in links
        asset = httpx.get(f"{url}{link}", timeout=HANG_S)
        assert asset.status_code == 200 and kind in asset.headers["content-type"], link
