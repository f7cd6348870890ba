"""Request and response bodies of the JSON routes (Cohere/Jina v1, Cohere v2, TEI, Gradio-style /api/predict)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, WithJsonSchema

# Document lists are taken untyped and their items checked by the route and the engine, which stop at the
# first bad one: pydantic would build an error per item (two per item for a union) before any limit is
# looked at, seconds of event-loop time for a body of a few hundred kB. The schema still says what is expected.
# The Cohere routes' objects may carry other fields, and rank on those `rank_fields` names instead of `text`.
CohereDocuments = Annotated[list[Any], WithJsonSchema(
    {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "object", "additionalProperties": True}]}})]
# In the schema only: the engine refuses a value below 1 itself (400, naming the field), as it does on every surface.
POSITIVE: dict[str, Any] = {"minimum": 1}
Texts = Annotated[list[Any], WithJsonSchema({"type": "array", "items": {"type": "string"}})]


class _Body(BaseModel):
    # Unknown fields are ignored, as the hosted APIs do, so existing clients keep working.
    model_config = ConfigDict(extra="ignore")


# The request examples /docs shows and "Try it out" sends (Swagger UI made its own of the schema before, which
# three routes of four refused: "string" as rank_fields, relevant_spans and truncation_direction). Each is sent to
# its route by tests/test_api.py, and by Swagger UI itself in tests/test_browser.py.
QUERY = "How do I read a JSON file in Python?"
DOCUMENTS = ["json.load reads a JSON document from a file object.", "Paris is the capital of France.",
             "Use open() and json.load(f) to parse a file."]


def _example(body: dict[str, Any]) -> ConfigDict:
    return ConfigDict(json_schema_extra={"examples": [body]})  # merged with _Body's config


class CohereRerankRequest(_Body):
    model_config = _example({"query": QUERY, "documents": DOCUMENTS, "top_n": 2, "return_documents": True})

    query: StrictStr = Field(description="What to rank the documents against.")
    documents: CohereDocuments = Field(
        description="Strings, or objects: with a `text` field, or with the fields `rank_fields` names.")
    top_n: StrictInt | None = Field(None, json_schema_extra=POSITIVE,
                                    description="Return only the best N (all when absent or larger).")
    rank_fields: list[StrictStr] | None = Field(
        None, description="The fields of document objects to rank on, in order (default: `text`).")
    # null as absent: Cohere's SDK sends an explicit None as null.
    return_documents: StrictBool | None = Field(True, description="Echo each document as sent (default true).")
    max_chunks_per_doc: StrictInt | None = Field(
        None, json_schema_extra=POSITIVE,
        description="With RERANKER_LONG_DOCS=chunk, score at most a document's first N windows (all when "
                    "absent); no effect when long documents are truncated.")
    raw_scores: StrictBool | None = Field(False, description="Raw logits instead of sigmoid probabilities.")
    model: StrictStr | None = Field(None, description="Accepted for compatibility; the loaded model answers.")
    instruction: StrictStr | None = Field(None, description="Task instruction, for models that take one.")


class CohereResult(BaseModel):
    index: int
    relevance_score: float
    document: dict[str, Any] | None = Field(None, description="The document as sent; a string as `{\"text\": ...}`.")


class Usage(BaseModel):
    total_tokens: int


class ApiVersion(BaseModel):
    version: str


class BilledUnits(BaseModel):
    search_units: int


class MetaTokens(BaseModel):
    input_tokens: int


class CohereMeta(BaseModel):
    """Cohere's `meta`: clients that read it (billing, logging callbacks) find what they expect."""

    api_version: ApiVersion
    billed_units: BilledUnits
    tokens: MetaTokens


class CohereRerankResponse(BaseModel):
    id: str
    model: str
    results: list[CohereResult]
    usage: Usage
    meta: CohereMeta


# Cohere v2's default for max_tokens_per_doc.
COHERE_V2_MAX_TOKENS_PER_DOC = 4096


class RelevantSpans(_Body):
    mode: StrictStr = Field(description='"enabled" or "disabled"; this service only takes "disabled".')


class CohereV2RerankRequest(_Body):
    model_config = _example({"model": "rerank-v3.5", "query": QUERY, "documents": DOCUMENTS, "top_n": 2})

    model: StrictStr | None = Field(None, description="Required by Cohere; accepted here, the loaded model answers.")
    query: StrictStr = Field(description="What to rank the documents against.")
    documents: CohereDocuments = Field(
        description="Strings (objects are taken too, as on /v1/rerank, which Cohere's earlier v2 API did).")
    top_n: StrictInt | None = Field(None, json_schema_extra=POSITIVE,
                                    description="Return only the best N (all when absent).")
    max_tokens_per_doc: StrictInt | None = Field(
        None, json_schema_extra=POSITIVE,
        description=f"Cut each document to its first N tokens before scoring ({COHERE_V2_MAX_TOKENS_PER_DOC} "
                    "when absent, as Cohere's).")
    priority: StrictInt | None = Field(None, description="Accepted for compatibility; requests are served in order.")
    relevant_spans: RelevantSpans | None = Field(None, description="Only mode \"disabled\" is supported.")
    raw_scores: StrictBool | None = Field(False, description="Raw logits instead of sigmoid probabilities (extension).")
    instruction: StrictStr | None = Field(None, description="Task instruction, for models that take one (extension).")
    # Fields of Cohere's earlier v2 API, which its SDKs up to 5.13 send: honoured as on /v1/rerank.
    return_documents: StrictBool | None = Field(False, description="Echo each document as sent (default false).")
    rank_fields: list[StrictStr] | None = Field(
        None, description="The fields of document objects to rank on, in order (default: `text`).")
    max_chunks_per_doc: StrictInt | None = Field(
        None, json_schema_extra=POSITIVE,
        description="With RERANKER_LONG_DOCS=chunk, score at most a document's first N windows.")


class CohereV2Result(BaseModel):
    index: int
    relevance_score: float
    document: dict[str, Any] | None = Field(None, description="With return_documents: the document as sent.")


class CohereV2RerankResponse(BaseModel):
    id: str
    results: list[CohereV2Result]
    meta: CohereMeta


class TeiRerankRequest(_Body):
    model_config = _example({"query": QUERY, "texts": DOCUMENTS, "return_text": True})

    query: StrictStr
    texts: Texts
    raw_scores: StrictBool | None = False  # null as absent, as on the other routes
    return_text: StrictBool | None = False
    truncate: StrictBool | None = Field(None, description="false: a text the model would cut is refused (413); "
                                                          "otherwise long texts follow RERANKER_LONG_DOCS.")
    truncation_direction: StrictStr | None = Field(
        None, description='"Right" (TEI\'s default): a long text keeps its start, as here. "Left" is refused.')
    top_n: StrictInt | None = Field(None, json_schema_extra=POSITIVE)


class TeiResult(BaseModel):
    index: int
    score: float
    text: str | None = None


class PredictRequest(_Body):
    model_config = _example({"data": [QUERY, "\n".join(DOCUMENTS), 2]})

    data: list[Any] = Field(
        description="[query, documents, top_n?, instruction?]; documents: newline-separated text or a list",
        # Declared, not enforced by pydantic: the route's own 422 says what the items are.
        json_schema_extra={"minItems": 2, "maxItems": 4},
    )


class PredictResult(BaseModel):
    index: int
    score: float
    document: str


class PredictResponse(BaseModel):
    data: list[list[PredictResult]]
    duration: float


class Ready(BaseModel):
    status: str = Field(description='"ready"')
    model: str


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class CohereV1ErrorResponse(ErrorResponse):
    """On /v1/rerank: ours, with Cohere v1's top-level `message` and Jina's `detail` beside it (Jina's clients
    raise `detail` when an answer has no results)."""

    message: str
    detail: str


class TeiErrorResponse(BaseModel):
    """TEI's error shape, used on /rerank."""

    error: str
    error_type: str = Field(description='"Validation", "Empty", "Overloaded", "Unhealthy" or "Backend", as TEI '
                                        'names them.')


class CohereErrorResponse(BaseModel):
    """Cohere's error shape, used on /v2/rerank: its SDK raises a typed error by the status."""

    id: str
    message: str
