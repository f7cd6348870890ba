"""Request validation: types, emptiness, text that cannot be tokenized, and the configured limits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from reranker.errors import EmptyInputError, InvalidTypeError, LimitExceededError, ValidationError
from reranker.settings import Settings

if TYPE_CHECKING:
    from reranker.model import ScoringModel


def validate_request(s: Settings, model: ScoringModel, query: object, documents: object, top_n: object = None,
                     instruction: object = None, max_doc_tokens: object = None, *,
                     documents_field: str = "documents", max_chunks: object = None) -> None:
    """Raise ValidationError (LimitExceededError for sizes) saying what to change; nothing is queued before.

    `documents_field` is what the caller's API calls the list (TEI's `texts`), so a message names the field sent."""
    if not isinstance(query, str):
        raise InvalidTypeError(f"query must be a string, got {type(query).__name__}")
    if not query.strip():
        raise EmptyInputError("query is empty; send the text to rank the documents against")
    _check_text("query", query)
    if len(query) > s.max_query_chars:
        raise LimitExceededError(
            f"query has {len(query)} characters; the limit is RERANKER_MAX_QUERY_CHARS={s.max_query_chars}"
        )
    if isinstance(documents, (str, bytes)) or not isinstance(documents, Sequence):
        raise InvalidTypeError(f"{documents_field} must be a list of strings")
    if not documents:
        raise EmptyInputError(f"{documents_field} is empty; send at least one document")
    if len(documents) > s.max_docs:
        raise LimitExceededError(
            f"{len(documents)} documents sent; the limit is RERANKER_MAX_DOCS={s.max_docs} per request"
        )
    for i, doc in enumerate(documents):
        if not isinstance(doc, str):
            raise InvalidTypeError(f"{documents_field}[{i}] must be a string, got {type(doc).__name__}")
        _check_text(f"{documents_field}[{i}]", doc)
        if len(doc) > s.max_doc_chars:
            raise LimitExceededError(
                f"{documents_field}[{i}] has {len(doc)} characters; the limit is "
                f"RERANKER_MAX_DOC_CHARS={s.max_doc_chars}"
            )
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int)):
        raise InvalidTypeError(f"top_n must be a positive integer or null, got {_brief(top_n)}")
    if top_n is not None and top_n < 1:
        raise ValidationError(f"top_n must be a positive integer or null, got {_brief(top_n)}")
    for name, value in (("max_tokens_per_doc", max_doc_tokens), ("max_chunks_per_doc", max_chunks)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidTypeError(f"{name} must be a positive integer, got {_brief(value)}")
        if value < 1:
            raise ValidationError(f"{name} must be a positive integer, got {_brief(value)}")
    if instruction is not None:
        if not isinstance(instruction, str):
            raise InvalidTypeError(f"instruction must be a string, got {type(instruction).__name__}")
        _check_text("instruction", instruction)
        if instruction.strip() and not model.accepts_instruction:
            raise ValidationError(
                f"model {model.model_id!r} does not take an instruction; leave instruction empty"
            )
        if len(instruction) > s.max_query_chars:
            raise LimitExceededError(
                f"instruction has {len(instruction)} characters; the limit is "
                f"RERANKER_MAX_QUERY_CHARS={s.max_query_chars}"
            )


def _check_text(name: str, text: str) -> None:
    if "\x00" in text:
        raise ValidationError(f"{name} contains a NUL character (\\u0000); remove it")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValidationError(
            f"{name} is not valid Unicode (a lone surrogate at position {err.start}); send UTF-8 text"
        ) from None


def _brief(value: object) -> str:
    """A request value fit for an error message, which is logged: a short number as it is, anything else (a
    string could be a pasted document) by its type only."""
    if isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool) and abs(value) < 10**15):
        return repr(value)
    return f"a value of type {type(value).__name__}"
