"""Fuzz every rerank surface of a real server on loopback: never a 5xx or a hang, errors in the documented
shape, every request counted, and the service still healthy and correct afterwards."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from gradio_client import Client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from reranker import Reranker
from reranker.metrics import Metrics
from reranker.model import ScoringModel
from tests import fuzz_inputs as inputs
from tests.conftest import model_settings
from tests.fuzz_inputs import EMOJI, MB, RTL_AND_MARKS, Raw, dump
from tests.servers import HANG_S, serve
from web.http import create_app
from web.service import split_lines

TIMEOUT = HANG_S  # seconds: a request slower than this is a hang, not a loaded machine
ROUTES = ("/v1/rerank", "/v2/rerank", "/rerank", "/api/predict")
COHERE = ("/v1/rerank", "/v2/rerank")
# Bounded so that the module runs in well under a minute on two cores.
# No Hypothesis deadline: an example slowed down by a busy machine is no failure (Hypothesis calls one that is
# fast on its replay "flaky"); a hang still fails, on TIMEOUT.
# Derandomized: every run tries the same examples, so CI cannot fail at random on an input no earlier run met
# (set derandomize=False locally to explore others).
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@pytest.fixture(scope="module")
def live(bert_model: ScoringModel, bert_dir: Path) -> Iterator[tuple[str, Reranker]]:
    """The whole app, UI included, with the default limits (1000 documents, 100,000 characters, 64 MiB)."""
    with Reranker(bert_model, model_settings(bert_dir), metrics=Metrics(CollectorRegistry())) as reranker:
        with serve(create_app(reranker)) as url:
            yield url, reranker


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=TIMEOUT) as client:
        yield client


def requests_total(reranker: Reranker, route: str) -> float:
    """reranker_requests_total of `route`, summed over statuses."""
    return sum(sample.value for family in reranker.metrics.registry.collect() if family.name == "reranker_requests"
               for sample in family.samples
               if sample.name == "reranker_requests_total" and sample.labels["route"] == route)


def post(http: httpx.Client, url: str, path: str, body: bytes) -> httpx.Response:
    return http.post(f"{url}{path}", content=body, headers={"content-type": "application/json"})


def sent_documents(route: str, body: dict[str, Any]) -> tuple[list[str], int | None]:
    """The documents and top_n of a request the server accepted."""
    if route in COHERE:
        docs = [d if isinstance(d, str) else d["text"] for d in body["documents"]]
        return docs, body.get("top_n")
    if route == "/rerank":
        return body["texts"], body.get("top_n")
    data = body["data"]
    docs = split_lines(data[1]) if isinstance(data[1], str) else data[1]
    return docs, data[2] if len(data) > 2 and data[2] not in (None, 0, "") else None


def check_answer(route: str, body: Any, response: httpx.Response) -> None:
    """A JSON route's answer: 4xx in the error shape, or 200 with this request's documents, best first."""
    assert response.status_code < 500, response.text[:500]
    payload = response.json()
    if response.status_code >= 400:  # each route in its hosted API's shape
        if route == "/rerank":
            assert set(payload) == {"error", "error_type"}, payload
            assert all(isinstance(v, str) and v for v in payload.values()), payload
            return
        if route == "/v2/rerank":  # Cohere v2's own: an id and a message
            assert set(payload) == {"id", "message"} and isinstance(payload["message"], str), payload
            assert payload["message"], payload
            return
        assert set(payload) == ({"error", "message", "detail"} if route == "/v1/rerank" else {"error"}), payload
        assert set(payload["error"]) == {"type", "message"}, payload
        assert all(isinstance(v, str) and v for v in payload["error"].values()), payload
        return
    assert response.status_code == 200
    docs, top_n = sent_documents(route, body)
    if route in COHERE:
        rows = [(r["index"], r["relevance_score"], (r.get("document") or {}).get("text")) for r in payload["results"]]
    elif route == "/rerank":
        rows = [(r["index"], r["score"], r.get("text")) for r in payload]
    else:
        rows = [(r["index"], r["score"], r["document"]) for r in payload["data"][0]]
    assert len(rows) == min(top_n or len(docs), len(docs))
    assert len({i for i, _, _ in rows}) == len(rows) and all(0 <= i < len(docs) for i, _, _ in rows)
    scores = [s for _, s, _ in rows]
    assert all(math.isfinite(s) for s in scores) and scores == sorted(scores, reverse=True)
    assert all(text is None or text == docs[i] for i, _, text in rows)


def assert_still_serving(http: httpx.Client, url: str, reranker: Reranker) -> None:
    """Health, readiness, and a normal request scored exactly as CrossEncoder.predict scores it."""
    assert http.get(f"{url}/healthz").status_code == 200
    assert http.get(f"{url}/readyz").status_code == 200
    query, docs = "which server keeps a cache", ["a cache server", "tea on hills", "the queue", EMOJI]
    response = http.post(f"{url}/v1/rerank", json={"query": query, "documents": docs})
    assert response.status_code == 200
    got = {r["index"]: r["relevance_score"] for r in response.json()["results"]}
    expected = reranker.model.cross_encoder.predict([(query, d) for d in docs], show_progress_bar=False)
    np.testing.assert_allclose([got[i] for i in range(len(docs))], expected, atol=1e-5)


def fuzz_json_routes(http: httpx.Client, url: str, reranker: Reranker,
                     bodies: Callable[[str], st.SearchStrategy[Any]]) -> Counter[int]:
    """Send hypothesis' bodies to random JSON routes; each is answered well and counted once. Returns how many
    got each status."""
    sent: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    before = {route: requests_total(reranker, route) for route in ROUTES}

    @FUZZ
    @given(route=st.sampled_from(ROUTES), data=st.data(), ascii=st.booleans())
    def one(route: str, data: st.DataObject, ascii: bool) -> None:
        body = data.draw(bodies(route), label="body")
        count = requests_total(reranker, route)
        response = post(http, url, route, dump(body, ascii=ascii))
        sent[route] += 1
        statuses[response.status_code] += 1
        check_answer(route, body, response)
        assert requests_total(reranker, route) == count + 1

    one()
    assert {route: requests_total(reranker, route) - before[route] for route in sent} == dict(sent)
    return statuses


def test_json_routes_survive_well_shaped_bodies_with_hostile_fields(
        live: tuple[str, Reranker], http: httpx.Client) -> None:
    url, reranker = live
    statuses = fuzz_json_routes(http, url, reranker, inputs.SHAPED.__getitem__)
    print(f"statuses: {dict(statuses)}")
    assert statuses[200] > 0, statuses  # so check_answer's checks of a ranking ran too
    assert_still_serving(http, url, reranker)


def test_json_routes_survive_arbitrary_json(live: tuple[str, Reranker], http: httpx.Client) -> None:
    url, reranker = live
    fuzz_json_routes(http, url, reranker, lambda route: inputs.values)
    assert_still_serving(http, url, reranker)


@FUZZ
@given(route=st.sampled_from(ROUTES), body=st.binary(max_size=200))
def test_json_routes_survive_arbitrary_bytes(live: tuple[str, Reranker], http: httpx.Client, route: str,
                                             body: bytes) -> None:
    url, reranker = live
    count = requests_total(reranker, route)
    check_answer(route, None, post(http, url, route, body))
    assert requests_total(reranker, route) == count + 1


def edge_body(route: str, query: Any, documents: Any, top_n: Any = None) -> dict[str, Any]:
    extra = {} if top_n is None else {"top_n": top_n}
    if route in COHERE:
        return {"query": query, "documents": documents, **extra}
    if route == "/rerank":
        return {"query": query, "texts": documents, **extra}
    return {"data": [query, documents, top_n]}


# (case, body for a route, expected status): the inputs the issue names, on every JSON route.
EDGE_CASES: list[tuple[str, Callable[[str], Any], int]] = [
    ("200000 [", lambda r: inputs.DEEP, 400),
    ("top_n 1e400", lambda r: edge_body(r, "q", ["a"], Raw(b"1e400")), 400),
    ("top_n 2**70", lambda r: edge_body(r, "q", ["a"], 2**70), 200),  # past the documents: all of them
    ("top_n NaN", lambda r: edge_body(r, "q", ["a"], Raw(b"NaN")), 400),
    ("top_n -Infinity", lambda r: edge_body(r, "q", ["a"], Raw(b"-Infinity")), 400),
    ("invalid UTF-8", lambda r: edge_body(r, Raw(b'"\xc3\x28"'), ["a"]), 400),
    ("NUL in a document", lambda r: edge_body(r, "q", ["a\x00b"]), 400),
    ("lone surrogate", lambda r: edge_body(r, "q\ud800", ["a"]), 400),
    ("RTL and combining marks", lambda r: edge_body(r, RTL_AND_MARKS, [RTL_AND_MARKS, "\u0301" * 500, "a"]), 200),
    ("emoji", lambda r: edge_body(r, EMOJI, [EMOJI, "cache \U0001f600 server"]), 200),
    ("1 MB document", lambda r: edge_body(r, "q", ["d" * MB]), 413),
    ("1 MB query", lambda r: edge_body(r, "q" * MB, ["a"]), 413),
    ("10,001 documents", lambda r: edge_body(r, "q", ["a"] * 10_001), 413),
]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("case", "make", "status"), EDGE_CASES, ids=[c[0] for c in EDGE_CASES])
@pytest.mark.parametrize("ascii", [True, False], ids=["escaped", "utf8"])
def test_named_edge_cases(live: tuple[str, Reranker], http: httpx.Client, route: str, case: str,
                          make: Callable[[str], Any], status: int, ascii: bool) -> None:
    url, reranker = live
    body = make(route)
    count = requests_total(reranker, route)
    response = post(http, url, route, dump(body, ascii=ascii))
    # Raw UTF-8 cannot carry a lone surrogate: it arrives as invalid UTF-8, which is a 400 too.
    assert response.status_code == status, response.text[:300]
    check_answer(route, body, response)
    assert requests_total(reranker, route) == count + 1
    if status == 200:
        query, docs = body["data"][:2] if route == "/api/predict" else (body["query"], sent_documents(route, body)[0])
        expected = reranker.model.cross_encoder.predict([(query, d) for d in docs], show_progress_bar=False)
        got = {row["index"]: row.get("relevance_score", row.get("score")) for row in
               (response.json()["results"] if route in COHERE else
                response.json()["data"][0] if route == "/api/predict" else response.json())}
        np.testing.assert_allclose([got[i] for i in range(len(docs))], expected, atol=1e-5)


def gradio_call(http: httpx.Client, url: str, data: Any, ascii: bool) -> str:
    """POST /gradio_api/call/predict and read its event stream; return 'refused', 'complete' or 'error'."""
    posted = post(http, url, "/gradio_api/call/predict", dump({"data": data}, ascii=ascii))
    assert posted.status_code < 500, posted.text[:300]
    if posted.status_code != 200:
        return "refused"
    stream = http.get(f"{url}/gradio_api/call/predict/{posted.json()['event_id']}").text
    outcomes = [kind for kind in ("complete", "error") if f"event: {kind}\n" in stream]
    assert len(outcomes) == 1, stream[:300]
    return outcomes[0]


def test_gradio_api_survives_hostile_inputs(live: tuple[str, Reranker], http: httpx.Client) -> None:
    url, reranker = live
    before = requests_total(reranker, "ui")
    sent = 0

    @settings(FUZZ, max_examples=120)
    @given(data=inputs.gradio_data, ascii=st.booleans(), direct=st.booleans())
    def one(data: Any, ascii: bool, direct: bool) -> None:
        nonlocal sent
        count = requests_total(reranker, "ui")
        if direct:
            response = post(http, url, "/gradio_api/api/predict", dump({"data": data}, ascii=ascii))
            assert response.status_code < 500, response.text[:300]
        else:
            gradio_call(http, url, data, ascii)
        sent += 1
        assert requests_total(reranker, "ui") == count + 1

    one()
    assert requests_total(reranker, "ui") - before == sent
    assert_still_serving(http, url, reranker)


GRADIO_EDGE_CASES: list[tuple[str, list[Any], str]] = [
    ("top_n 1e400", ["q", "a", Raw(b"1e400"), "", False, None], "error"),
    ("top_n NaN", ["q", "a", Raw(b"NaN"), "", False, None], "error"),
    ("top_n -Infinity", ["q", "a", Raw(b"-Infinity"), "", False, None], "error"),
    ("top_n 2**70", ["q", "a", 2**70, "", False, None], "complete"),
    ("invalid UTF-8", [Raw(b'"\xc3\x28"'), "a", None, "", False, None], "refused"),
    ("200000 [", [inputs.DEEP], "refused"),
    ("NUL", ["q\x00", "a", None, "", False, None], "error"),
    ("lone surrogate", ["\ud800", "a", None, "", False, None], "error"),
    ("RTL and combining marks", [RTL_AND_MARKS, RTL_AND_MARKS + "\n" + "\u0301" * 500, None, "", False,
                                 None], "complete"),
    ("emoji", [EMOJI, f"{EMOJI}\ncache", None, "", False, None], "complete"),
    ("1 MB document", ["q", "d" * MB, None, "", False, None], "error"),
    ("10,001 documents", ["q", "a\n" * 10_001, None, "", False, None], "error"),
    ("a file outside the upload folder", ["q", "a", None, "", False,
                                          {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}], "error"),
]


@pytest.mark.parametrize(("case", "data", "outcome"), GRADIO_EDGE_CASES, ids=[c[0] for c in GRADIO_EDGE_CASES])
def test_gradio_api_edge_cases(live: tuple[str, Reranker], http: httpx.Client, case: str, data: list[Any],
                               outcome: str) -> None:
    url, reranker = live
    count = requests_total(reranker, "ui")
    assert gradio_call(http, url, data, ascii=True) == outcome
    assert requests_total(reranker, "ui") == count + 1


@pytest.fixture(scope="module")
def gradio_client(live: tuple[str, Reranker]) -> Iterator[Client]:
    client = Client(live[0], verbose=False)
    yield client
    client.close()


def _encodable(text: str) -> bool:
    return not any("\ud800" <= c <= "\udfff" for c in text)


# gradio_client itself cannot send a lone surrogate (httpx refuses to encode it); the HTTP tests send them.
client_texts = inputs.texts.filter(_encodable)


@settings(FUZZ, max_examples=12)
@given(query=client_texts, documents=st.lists(client_texts, max_size=4).map("\n".join))
def test_gradio_client_survives_hostile_text(live: tuple[str, Reranker], gradio_client: Client, query: str,
                                             documents: str) -> None:
    from gradio_client.exceptions import AppError

    count = requests_total(live[1], "ui")
    job = gradio_client.submit(query, documents, api_name="/predict")
    try:
        table, status = job.result(timeout=TIMEOUT)
        assert [row[2] for row in table["data"]] != [] and "documents" in status
    except AppError:
        pass  # a refusal: the caller gets the message, the service stays up
    assert requests_total(live[1], "ui") == count + 1
