"""The load test's requests: query-specific documents, repeats, bad inputs, and the checks on each answer.

Every good request has a unique token; its query starts with it and document j is `<token>/<j> words`,
so an answer holding another request's document, or a document under the wrong index, fails its check.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from typing import Any

from tests.tiny_models import random_text

SURFACES = ("/v1/rerank", "/rerank", "/api/predict", "gradio_client")
GRADIO = "gradio_client"
REPEAT_SHARE = 0.10
BAD_SHARE = 0.05
# Bad inputs and the status each must get (RERANKER_MAX_DOCS and _MAX_DOC_CHARS at their defaults).
MAX_DOCS = 1000
MAX_DOC_CHARS = 100_000
BAD_STATUS = {
    "empty query": 400, "top_n negative": 400, "too many documents": 413, "document too long": 413,
    "query not a string": 422, "malformed JSON": 400,
}
# gradio_client sends what its components accept: a number query becomes text, and it writes the JSON.
GRADIO_BAD = ("empty query", "top_n negative", "too many documents", "document too long")


@dataclass(frozen=True)
class Call:
    number: int
    surface: str
    token: str
    query: Any
    documents: list[str]
    top_n: int | None = None
    bad: str | None = None  # the kind of bad input; None for a good request


def build_calls(n: int, max_docs: int, seed: int = 0, prefix: str = "r") -> list[Call]:
    """`n` seeded calls over every surface: 1..max_docs documents, ~10% repeats, ~5% bad."""
    rng = random.Random(seed)
    calls: list[Call] = []
    good: list[Call] = []
    for number in range(n):
        surface = SURFACES[rng.randrange(len(SURFACES))]
        draw = rng.random()
        if draw < REPEAT_SHARE and good:
            calls.append(replace(rng.choice(good), number=number, surface=surface))
        elif draw < REPEAT_SHARE + BAD_SHARE:
            kind = rng.choice(GRADIO_BAD if surface == GRADIO else tuple(BAD_STATUS))
            calls.append(_bad(number, surface, kind))
        else:
            token = f"{prefix}{number:05d}x{rng.randrange(16**6):06x}"
            docs = [f"{token}/{j} {random_text(rng, rng.randint(3, 20))}" for j in range(rng.randint(1, max_docs))]
            top_n = None if rng.random() < 0.5 else rng.randint(1, len(docs) + 3)
            call = Call(number, surface, token, f"{token} {random_text(rng, rng.randint(2, 10))}", docs, top_n)
            good.append(call)
            calls.append(call)
    return calls


def _bad(number: int, surface: str, kind: str) -> Call:
    token = f"bad{number:05d}"
    call = Call(number, surface, token, f"{token} query", [f"{token}/0 a document"], bad=kind)
    if kind == "empty query":
        return replace(call, query="")
    if kind == "top_n negative":
        return replace(call, top_n=-1)
    if kind == "too many documents":
        return replace(call, documents=[f"{token}/{j}" for j in range(MAX_DOCS + 1)])
    if kind == "document too long":
        return replace(call, documents=["x" * (MAX_DOC_CHARS + 1)])
    if kind == "query not a string":
        return replace(call, query=12345)
    return call  # malformed JSON: the body is cut short when sent


def json_body(call: Call) -> bytes:
    """The request body of a JSON route."""
    extra = {} if call.top_n is None else {"top_n": call.top_n}
    if call.surface == "/v1/rerank":
        body: dict[str, Any] = {"query": call.query, "documents": call.documents, **extra}
    elif call.surface == "/rerank":
        body = {"query": call.query, "texts": call.documents, "return_text": True, **extra}
    else:
        body = {"data": [call.query, call.documents, call.top_n]}
    raw = json.dumps(body).encode()
    return raw[: len(raw) // 2] if call.bad == "malformed JSON" else raw


def rows_of(call: Call, payload: Any) -> list[tuple[int, float, str]]:
    """(index, score, text) of each result, from any surface's answer."""
    if call.surface == "/v1/rerank":
        return [(r["index"], r["relevance_score"], r["document"]["text"]) for r in payload["results"]]
    if call.surface == "/rerank":
        return [(r["index"], r["score"], r["text"]) for r in payload]
    if call.surface == "/api/predict":
        return [(r["index"], r["score"], r["document"]) for r in payload["data"][0]]
    table = payload[0]  # gradio_client: (table, status line); rows are [rank, score, index, preview]
    return [(row[2], row[1], row[3]) for row in table["data"]]


def check(call: Call, payload: Any) -> str | None:
    """None if the answer is this request's documents, each under its own index, best first; else why not."""
    rows = rows_of(call, payload)
    expected = min(call.top_n or len(call.documents), len(call.documents))
    if len(rows) != expected:
        return f"{len(rows)} results, expected {expected}"
    indices = [index for index, _, _ in rows]
    if len(set(indices)) != len(indices):
        return "an index returned twice"
    for index, _, text in rows:
        if not 0 <= index < len(call.documents) or not text.startswith(f"{call.token}/{index} "):
            return f"result {index} is not this request's document {index}: {text[:40]!r}"
        if text != call.documents[index]:
            return f"result {index} has the wrong text"
    scores = [score for _, score, _ in rows]
    if scores != sorted(scores, reverse=True):
        return "results are not sorted best first"
    return None
