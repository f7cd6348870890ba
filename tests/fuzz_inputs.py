"""Hostile request bodies for the fuzz tests: hypothesis strategies and a JSON writer that can lie.

`dump` writes what `json.dumps` refuses to: literal tokens such as `1e400` or a 5,000-digit integer,
invalid UTF-8 and (with `ascii=False`) lone surrogates as raw bytes.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st


class Raw(bytes):
    """A JSON token written as is."""


def dump(value: Any, *, ascii: bool = True) -> bytes:
    """Serialize `value`; strings are \\u-escaped (ascii) or raw UTF-8 with surrogates passed through."""
    if isinstance(value, Raw):
        return bytes(value)
    if isinstance(value, dict):
        items = (dump(str(k), ascii=ascii) + b":" + dump(v, ascii=ascii) for k, v in value.items())
        return b"{" + b",".join(items) + b"}"
    if isinstance(value, (list, tuple)):
        return b"[" + b",".join(dump(v, ascii=ascii) for v in value) + b"]"
    if isinstance(value, str) and not ascii:
        return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return json.dumps(value).encode()  # NaN and Infinity come out as the literals


MB = 1_000_000
DEEP = Raw(b"[" * 200_000)
TOKENS = [
    Raw(b"1e400"), Raw(b"-1e400"), Raw(b"NaN"), Raw(b"-Infinity"), Raw(b"Infinity"), Raw(b"9" * 5000),
    Raw(b'"\xc3\x28"'), Raw(b'"\xff\xfe"'), Raw(b'"\\ud800"'), Raw(b'"\\udfff\\ud800"'), DEEP,
]
RTL_AND_MARKS = "\u202e\u0645\u0631\u062d\u0628\u0627 \u05e9\u05dc\u05d5\u05dd e\u0301\u0302\u0303 \u0627\u0651\u064f"
EMOJI = "\U0001f600 \U0001f469\u200d\U0001f469\u200d\U0001f467 \U0001f1eb\U0001f1f7 \u2764\ufe0f"
NASTY_TEXT = [
    "", " \t\n", "\x00", "a\x00b", "\ud800", "x\udfff", RTL_AND_MARKS, EMOJI, "\ufeffbom", "\u200b",
    "\r\n\u2028\u2029\x85\x0b", "\u0301" * 300, "q" * 10_001, "d" * MB,
]
NASTY_NUMBERS = [0, -1, 1, 2**31, 2**63, 2**70, -(2**70), 1e308, -0.0, 0.5, 1.0, True, False]

texts = st.one_of(
    st.text(st.characters(exclude_categories=()), max_size=40),
    st.sampled_from(NASTY_TEXT),
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.sampled_from(NASTY_NUMBERS), texts,
    st.sampled_from(TOKENS),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)),
    max_leaves=12,
)
# Mostly well-formed pieces, so that fuzzing reaches past the first type check.
query = st.one_of(st.text(max_size=40).filter(str.strip), texts, values)
doc_lists = st.one_of(
    st.lists(st.one_of(st.text(max_size=60), texts), min_size=1, max_size=8),
    st.just(["a"] * 10_001),
    values,
)
numbers = st.one_of(st.integers(-3, 12), st.none(), st.sampled_from(NASTY_NUMBERS), st.sampled_from(TOKENS), values)
flags = st.one_of(st.booleans(), values)


def _optional(**fields: st.SearchStrategy[Any]) -> dict[str, st.SearchStrategy[Any]]:
    return fields


cohere_bodies = st.fixed_dictionaries(
    {"query": query, "documents": st.one_of(doc_lists, st.lists(st.fixed_dictionaries({"text": texts}), max_size=4))},
    optional=_optional(top_n=numbers, return_documents=flags, raw_scores=flags, model=values, instruction=values),
)
cohere_v2_bodies = st.fixed_dictionaries(
    {"query": query, "documents": st.one_of(doc_lists, st.lists(st.fixed_dictionaries({"text": texts}), max_size=4))},
    optional=_optional(model=values, top_n=numbers, max_tokens_per_doc=numbers, return_documents=flags,
                       rank_fields=values, priority=numbers, relevant_spans=values, raw_scores=flags,
                       instruction=values),
)
tei_bodies = st.fixed_dictionaries(
    {"query": query, "texts": doc_lists},
    optional=_optional(top_n=numbers, raw_scores=flags, return_text=flags, truncate=flags),
)
predict_bodies = st.fixed_dictionaries({"data": st.one_of(
    st.tuples(query, st.one_of(texts, doc_lists)).map(list),
    st.tuples(query, st.one_of(texts, doc_lists), numbers, st.one_of(st.none(), texts)).map(list),
    st.lists(values, max_size=6),
    values,
)})
SHAPED = {"/v1/rerank": cohere_bodies, "/v2/rerank": cohere_v2_bodies, "/rerank": tei_bodies,
          "/api/predict": predict_bodies}

# The Gradio event `predict` takes [query, documents, top_n, instruction, raw_scores, file].
gradio_data = st.one_of(
    st.tuples(query, st.one_of(texts, values), numbers, st.one_of(st.none(), texts), flags, st.none()).map(list),
    st.lists(values, max_size=7),
)
