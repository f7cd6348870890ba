"""The JSON routes: Cohere/Jina /v1/rerank, Cohere v2 /v2/rerank, TEI /rerank, Gradio-style /api/predict,
health and info."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from reranker import RerankResult
from web.backend import Backend
from web.errors import COHERE_V1, COHERE_V2, TEI, HttpError
from web.middleware import LIMITED_PATHS
from web.request_id import current_request_id, new_request_id
from web.schemas import (
    COHERE_V2_MAX_TOKENS_PER_DOC,
    ApiVersion,
    BilledUnits,
    CohereErrorResponse,
    CohereMeta,
    CohereRerankRequest,
    CohereRerankResponse,
    CohereResult,
    CohereV1ErrorResponse,
    CohereV2RerankRequest,
    CohereV2RerankResponse,
    CohereV2Result,
    ErrorResponse,
    MetaTokens,
    PredictRequest,
    PredictResponse,
    PredictResult,
    Ready,
    TeiErrorResponse,
    TeiRerankRequest,
    TeiResult,
    Usage,
)
from web.service import RerankCall, form_top_n, split_lines
from web.strict_json import StrictJsonRoute
from web.versions import package_versions as package_versions  # app.py's start-up line names them


def _header(description: str) -> dict[str, Any]:
    return {"description": description, "schema": {"type": "string"}}


RETRY_AFTER = {"Retry-After": _header("seconds to wait before retrying")}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": meaning, **({"headers": headers} if headers else {})}
    for status, meaning, headers in [
        (400, "a bad field or malformed JSON", None),
        (401, "missing or wrong API key", {"WWW-Authenticate": _header("Bearer")}),
        (408, "the body did not arrive within RERANKER_BODY_TIMEOUT_SECONDS; the connection is closed", None),
        (413, "over a limit", None), (422, "wrong shape or type", None),
        (429, "overloaded: retry after Retry-After", RETRY_AFTER), (500, "internal error", None),
        (503, "not ready yet, or shutting down (retry on another instance)", RETRY_AFTER),
    ]
}


def _error_responses(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """ERROR_RESPONSES with the error body of a route that answers in its hosted API's shape (HttpError.body)."""
    return {status: {**answer, "model": model} for status, answer in ERROR_RESPONSES.items()}


COHERE_ERROR_RESPONSES = _error_responses(CohereErrorResponse)
COHERE_V1_ERROR_RESPONSES = _error_responses(CohereV1ErrorResponse)
TEI_ERROR_RESPONSES = _error_responses(TeiErrorResponse)
# Cohere bills a search unit per query and up to 100 documents; its clients may read the figure.
DOCUMENTS_PER_SEARCH_UNIT = 100


def cohere_meta(api_version: str, result: RerankResult) -> CohereMeta:
    return CohereMeta(
        api_version=ApiVersion(version=api_version),
        billed_units=BilledUnits(search_units=math.ceil(result.stats.n_docs / DOCUMENTS_PER_SEARCH_UNIT)),
        tokens=MetaTokens(input_tokens=result.stats.tokens),
    )


def cohere_texts(documents: list[Any], rank_fields: list[str] | None = None) -> list[Any]:
    """What the model ranks of each document: a string as it is; an object's `text`, or with `rank_fields` the
    fields it names, in their order (one field: its value; more: a `name: value` line each, as Cohere suggests
    writing structured documents). Anything else passes as it is, for the engine to check (it names the first bad
    item)."""
    texts = []
    for i, doc in enumerate(documents):
        if isinstance(doc, dict):
            doc = _object_text(i, doc, rank_fields) if rank_fields else doc.get("text")
            if not isinstance(doc, str):
                raise HttpError(422, "invalid_shape",
                                f'documents[{i}] must be a string or an object with a string "text" field')
        texts.append(doc)
    return texts


def _object_text(i: int, doc: dict[str, Any], rank_fields: list[str]) -> str:
    present = [field for field in rank_fields if field in doc]
    if not present:
        raise HttpError(422, "invalid_shape", f"documents[{i}] has none of the fields rank_fields names")
    for field in present:
        if not isinstance(doc[field], str):  # named by its place in rank_fields: no request text is echoed
            raise HttpError(422, "invalid_shape", f"documents[{i}] must hold a string in each field it has of "
                                                  f"rank_fields; rank_fields[{rank_fields.index(field)}] is not one")
    if len(rank_fields) == 1:
        return doc[present[0]]
    return "\n".join(f"{field}: {doc[field]}" for field in present)


def echoed(documents: list[Any], index: int) -> dict[str, Any]:
    """Document `index` as sent, as Cohere and Jina echo it: an object whole, a string as `{"text": ...}`."""
    sent = documents[index]
    return sent if isinstance(sent, dict) else {"text": sent}


def _wrong_method(path: str, allow: str = "POST", takes: str = "POST with a JSON body") -> Callable[[], None]:
    def refuse() -> None:
        # Not counted as a rerank request: a probe or a typo never reached one.
        raise HttpError(405, "method_not_allowed", f"{path} takes {takes}", counted=True, headers={"Allow": allow})
    return refuse


def _trailing_slash(path: str) -> Callable[[], None]:
    def refuse() -> None:
        raise HttpError(404, "not_found", f"no route {path}/; POST to {path} (no trailing slash)", counted=True)
    return refuse


def no_route() -> HttpError:
    """The 404 of a path that no route serves, naming those that do; the path is not echoed."""
    return HttpError(404, "not_found", "no such route; the JSON routes are POST /v1/rerank, /v2/rerank, /rerank and "
                     "/api/predict, and GET /healthz, /readyz and /info (all listed at /docs)", counted=True)


def build_router(backend: Backend) -> APIRouter:
    """Routes over one backend: this process's engine, or Ray Serve replicas (the bearer key is checked by
    web.middleware before them)."""
    router = APIRouter(route_class=StrictJsonRoute)

    @router.post(COHERE_V1, response_model=CohereRerankResponse, response_model_exclude_none=True,
                 responses=COHERE_V1_ERROR_RESPONSES, tags=["rerank"], summary="Cohere/Jina-compatible rerank")
    async def cohere_rerank(body: CohereRerankRequest, request: Request) -> CohereRerankResponse:
        texts = cohere_texts(body.documents, body.rank_fields)
        result = await backend.rerank(request, COHERE_V1, RerankCall(
            body.query, texts, body.top_n, body.instruction, bool(body.raw_scores), max_chunks=body.max_chunks_per_doc))
        echo = body.return_documents is not False  # absent and null: true
        return CohereRerankResponse(
            id=str(uuid.uuid4()),
            model=await backend.model_id(),
            results=[CohereResult(index=r.index, relevance_score=r.score,
                                  document=echoed(body.documents, r.index) if echo else None)
                     for r in result.results],
            usage=Usage(total_tokens=result.stats.tokens),
            meta=cohere_meta("1", result),
        )

    @router.post(COHERE_V2, response_model=CohereV2RerankResponse, response_model_exclude_none=True,
                 responses=COHERE_ERROR_RESPONSES,
                 tags=["rerank"], summary="Cohere v2-compatible rerank (cohere.ClientV2)")
    async def cohere_v2_rerank(body: CohereV2RerankRequest, request: Request) -> CohereV2RerankResponse:
        if body.relevant_spans is not None and body.relevant_spans.mode != "disabled":
            raise HttpError(400, "invalid_request", 'relevant_spans is not supported: this service scores whole '
                                                    'documents; leave it out or set its mode to "disabled"')
        max_doc_tokens = body.max_tokens_per_doc
        result = await backend.rerank(request, COHERE_V2, RerankCall(
            body.query, cohere_texts(body.documents, body.rank_fields), body.top_n, body.instruction,
            bool(body.raw_scores), COHERE_V2_MAX_TOKENS_PER_DOC if max_doc_tokens is None else max_doc_tokens,
            max_chunks=body.max_chunks_per_doc))
        return CohereV2RerankResponse(
            id=current_request_id() or new_request_id(),
            results=[CohereV2Result(index=r.index, relevance_score=r.score,
                                    document=echoed(body.documents, r.index) if body.return_documents else None)
                     for r in result.results],
            meta=cohere_meta("2", result),
        )

    @router.post(TEI, response_model=list[TeiResult], response_model_exclude_none=True,
                 responses=TEI_ERROR_RESPONSES, tags=["rerank"],
                 summary="Hugging Face TEI-compatible rerank")
    async def tei_rerank(body: TeiRerankRequest, request: Request) -> list[TeiResult]:
        direction = body.truncation_direction
        if direction is not None and direction.lower() != "right":  # TEI takes "Left"/"Right"; case as TEI's clients
            # Not echoed: a request's text never reaches an error message or the log.
            raise HttpError(400, "invalid_request", 'truncation_direction takes only "Right" here: a long text is '
                                                    "cut at its end (or split into windows, with "
                                                    'RERANKER_LONG_DOCS=chunk); leave it out or set it to "Right"')
        call = RerankCall(body.query, body.texts, body.top_n, None, bool(body.raw_scores), documents_field="texts",
                          truncate=body.truncate is not False)
        result = await backend.rerank(request, TEI, call)
        return [TeiResult(index=r.index, score=r.score, text=r.document if body.return_text else None)
                for r in result.results]

    @router.post("/api/predict", response_model=PredictResponse, responses=ERROR_RESPONSES,
                 tags=["rerank"], summary="Gradio-style predict, for older Gradio clients")
    async def gradio_predict(body: PredictRequest, request: Request) -> PredictResponse:
        data = body.data
        if not 2 <= len(data) <= 4:
            raise HttpError(422, "invalid_shape",
                            "data must be [query, documents, top_n?, instruction?] (2 to 4 items)")
        documents = split_lines(data[1]) if isinstance(data[1], str) else data[1]
        top_n = form_top_n(data[2]) if len(data) > 2 else None
        instruction = data[3] if len(data) > 3 and data[3] not in (None, "") else None
        result = await backend.rerank(request, "/api/predict", RerankCall(data[0], documents, top_n, instruction))
        return PredictResponse(
            data=[[PredictResult(index=r.index, score=r.score, document=r.document) for r in result.results]],
            duration=result.stats.total_seconds,
        )

    # Without these, a wrong method or a trailing slash on a rerank route fell through to the Gradio app
    # mounted at / and got its bare 404 instead of this API's error shape.
    for path in LIMITED_PATHS:
        router.add_api_route(path, _wrong_method(path), methods=["GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS"],
                             include_in_schema=False)
        router.add_api_route(path + "/", _trailing_slash(path),
                             methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)

    # async: answered on the event loop, never queued behind the scoring calls that hold the thread pool.
    @router.get("/healthz", tags=["health"], summary="200 while the process serves")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz", tags=["health"], summary="200 once the model is loaded and warmed, else 503",
                responses={200: {"model": Ready}, 503: {"model": ErrorResponse}})
    async def readyz() -> JSONResponse:
        refusal = await backend.readiness()
        if refusal is not None:
            return JSONResponse(refusal.body(), status_code=refusal.status)
        return JSONResponse({"status": "ready", "model": await backend.model_id()})

    @router.get("/info", tags=["health"], summary="Model, device, limits and versions")
    async def info() -> dict[str, Any]:
        return await backend.info()

    for probe in (healthz, readyz, info):  # load balancers may probe with HEAD; kept out of the schema
        path = f"/{probe.__name__}"
        router.add_api_route(path, probe, methods=["HEAD"], include_in_schema=False)
        # Another method fell through to the Gradio app mounted at / and got a 404 naming this very route.
        router.add_api_route(path, _wrong_method(path, "GET, HEAD", "GET or HEAD"),
                             methods=["POST", "PUT", "PATCH", "DELETE", "OPTIONS"], include_in_schema=False)

    return router
