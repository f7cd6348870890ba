"""Request and response bodies of the JSON routes (Cohere/Jina, TEI, Gradio-style /api/predict)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, WithJsonSchema

# Document lists are taken untyped and their items checked by the route and the engine, which stop at the
# first bad one: pydantic would build an error per item (two per item for a union) before any limit is
# looked at, seconds of event-loop time for a body of a few hundred kB. The schema still says what is expected.
_TEXT_OBJECT = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
CohereDocuments = Annotated[list[Any], WithJsonSchema(
    {"type": "array", "items": {"anyOf": [{"type": "string"}, _TEXT_OBJECT]}})]
Texts = Annotated[list[Any], WithJsonSchema({"type": "array", "items": {"type": "string"}})]


class _Body(BaseModel):
    # Unknown fields are ignored, as the hosted APIs do, so existing clients keep working.
    model_config = ConfigDict(extra="ignore")


class TextDocument(_Body):
    text: StrictStr


class CohereRerankRequest(_Body):
    query: StrictStr = Field(description="What to rank the documents against.")
    documents: CohereDocuments = Field(description="Strings, or objects with a `text` field.")
    top_n: StrictInt | None = Field(None, description="Return only the best N (all when absent).")
    return_documents: StrictBool = Field(True, description="Echo each document's text in the results.")
    raw_scores: StrictBool = Field(False, description="Raw logits instead of sigmoid probabilities.")
    model: StrictStr | None = Field(None, description="Accepted for compatibility; the loaded model answers.")
    instruction: StrictStr | None = Field(None, description="Task instruction, for models that take one.")


class CohereResult(BaseModel):
    index: int
    relevance_score: float
    document: TextDocument | None = None


class Usage(BaseModel):
    total_tokens: int


class CohereRerankResponse(BaseModel):
    id: str
    model: str
    results: list[CohereResult]
    usage: Usage


class TeiRerankRequest(_Body):
    query: StrictStr
    texts: Texts
    raw_scores: StrictBool = False
    return_text: StrictBool = False
    truncate: StrictBool | None = Field(None, description="Accepted; long texts follow RERANKER_LONG_DOCS.")
    top_n: StrictInt | None = None


class TeiResult(BaseModel):
    index: int
    score: float
    text: str | None = None


class PredictRequest(_Body):
    data: list[Any] = Field(
        description="[query, documents, top_n?, instruction?]; documents: newline-separated text or a list"
    )


class PredictResult(BaseModel):
    index: int
    score: float
    document: str


class PredictResponse(BaseModel):
    data: list[list[PredictResult]]
    duration: float


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail
