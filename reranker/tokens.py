"""Pair tokenization exactly as CrossEncoder.preprocess does it, in one tokenizer pass per document.

`CrossEncoder.preprocess` tokenizes a padded batch and truncates it blind; the engine also needs each
document's token count (to count truncations) and its token offsets (to cut chunk windows). The fast
encoders here get all three from one call of a private copy of the Rust tokenizer, batched (so its own
thread pool works when TOKENIZERS_PARALLELISM is on), and lay out the pair in numpy, with no torch work
per pair. At load, `build_encoder` checks a fast encoder against `preprocess` on probe pairs and falls
back to `preprocess` itself (exact, slower) for any tokenizer or template it does not reproduce.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from tokenizers import Encoding, Tokenizer

from reranker.errors import ValidationError

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder

logger = logging.getLogger(__name__)

# The per-token features a reranker's preprocess may produce; anything else needs the model's own path.
SUPPORTED_FEATURES = frozenset({"input_ids", "attention_mask", "token_type_ids"})
# Stand for the document while a chat template is rendered once per request: private-use characters
# that no tokenizer merges with their neighbours. The first one absent from the query and instruction is used.
_SENTINELS = tuple(chr(0xE000 + i) + chr(0xE001 + i) + chr(0xE000 + i) for i in range(0, 64, 2))

Offsets = list[tuple[int, int]]


@dataclass(frozen=True, eq=False)
class EncodedPair:
    """One (query, document) pair, unpadded, ready to collate: token ids and, for BERT-style models, type ids."""

    input_ids: np.ndarray
    token_type_ids: np.ndarray | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True, eq=False)
class EncodedDocument:
    """A document paired with the query: its pair fitted to max_length, and whether it had to be cut."""

    pair: EncodedPair
    fits: bool
    offsets: Offsets | None = None  # character spans of the document's tokens, when asked for and cut


class PairEncoder(Protocol):
    def overhead(self, query: str, instruction: str | None) -> int:
        """Tokens a pair spends before any document text: query, instruction, template, specials."""

    def framing_chars(self, query: str, instruction: str | None) -> int:
        """Characters the tokenizer goes through with each document besides its own (0 where the query is
        tokenized once per request): what a tokenizer slice weighs a document at, beyond its length."""

    def encode(self, query: str, documents: Sequence[str], instruction: str | None = None,
               *, offsets: bool = False) -> list[EncodedDocument]:
        """Pair each document with the query; `offsets` adds the token spans of documents that were cut."""


def min_document_room(max_length: int, *, templated: bool) -> int:
    """The fewest tokens a query (with its instruction and the template) must leave a document, below which the
    engine refuses it. A classic cross-encoder truncates longest-first, which only spares the query while it is
    under half the budget; a chat template (a causal reranker's, Qwen3-Reranker's) cuts the document alone."""
    return min(64, max_length // 4) if templated else max_length // 2


def _array(ids: Sequence[int]) -> np.ndarray:
    return np.asarray(ids, dtype=np.int64)


def _private_copy(tokenizer: Any) -> Tokenizer:
    """A Rust tokenizer nobody else reconfigures: transformers rewrites truncation/padding on every call."""
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    return backend


class TextPairEncoder:
    """BERT/RoBERTa-style cross-encoders: specials + query + specials + document + specials.

    The layout is read once from the tokenizer's own template. Longest-first truncation cuts only the
    document here, because the engine refuses queries that take over half the budget.
    """

    def __init__(self, tokenizer: Any, max_length: int, *, type_ids: bool) -> None:
        self._backend = _private_copy(tokenizer)
        self._max_length = max_length
        self._keep_end = tokenizer.truncation_side == "left"
        self._type_ids = type_ids
        probe = self._backend.encode("q", "d")
        sequence = probe.sequence_ids
        first = [i for i, s in enumerate(sequence) if s == 0]
        second = [i for i, s in enumerate(sequence) if s == 1]
        if not first or not second or first != list(range(first[0], first[-1] + 1)) or \
                second != list(range(second[0], second[-1] + 1)) or first[-1] >= second[0]:
            raise ValueError("the tokenizer's pair template is not [specials] query [specials] document [specials]")
        ids, types = probe.ids, probe.type_ids
        self._prefix = ids[:first[0]]
        self._middle = ids[first[-1] + 1:second[0]]
        self._suffix = ids[second[-1] + 1:]
        self._prefix_types = types[:first[0]]
        self._middle_types = types[first[-1] + 1:second[0]]
        self._suffix_types = types[second[-1] + 1:]
        self._query_type = types[first[0]]
        self._document_type = types[second[0]]

        # overhead() and encode() both need the query's tokens: tokenize each query once.
        self._query_ids = functools.lru_cache(maxsize=1024)(self._encode_query)

    def _encode_query(self, query: str) -> list[int]:
        ids: list[int] = self._backend.encode(query, add_special_tokens=False).ids
        return ids

    def overhead(self, query: str, instruction: str | None = None) -> int:
        return len(self._prefix) + len(self._query_ids(query)) + len(self._middle) + len(self._suffix)

    def framing_chars(self, query: str, instruction: str | None = None) -> int:
        return 0  # the query is tokenized once, and each document alone

    def encode(self, query: str, documents: Sequence[str], instruction: str | None = None,
               *, offsets: bool = False) -> list[EncodedDocument]:
        query_ids = self._query_ids(query)
        head = self._prefix + query_ids + self._middle
        # Never below 0: a negative room would slice from the document's end and keep nearly all of it. A query
        # that leaves less than min_document_room never gets here through the engine.
        room = max(0, self._max_length - len(head) - len(self._suffix))
        head_types = None
        if self._type_ids:
            head_types = self._prefix_types + [self._query_type] * len(query_ids) + self._middle_types
        encodings = self._backend.encode_batch(list(documents), add_special_tokens=False)
        out = []
        for encoding in encodings:
            ids = encoding.ids
            fits = len(ids) <= room
            if not fits:
                ids = ids[len(ids) - room:] if self._keep_end else ids[:room]
            types = None
            if head_types is not None:
                types = _array(head_types + [self._document_type] * len(ids) + self._suffix_types)
            pair = EncodedPair(_array(head + ids + self._suffix), types)
            out.append(EncodedDocument(pair, fits, None if fits or not offsets else encoding.offsets))
        return out


class ChatTemplateEncoder:
    """Rerankers whose pairs sentence-transformers renders through a chat template (causal-LM ones, Qwen3-Reranker's
    sequence-classifier conversions): the chat template is rendered once per request around a sentinel document.

    Each document is then tokenized inside the rendered text, as apply_chat_template would, and a cut
    keeps the template's tail, as sentence-transformers' suffix restore does.
    """

    def __init__(self, cross_encoder: CrossEncoder, tokenizer: Any, max_length: int) -> None:
        first: Any = cross_encoder[0]
        self._formatter = first.input_formatter
        self._tokenizer = tokenizer
        self._backend = _private_copy(tokenizer)
        self._max_length = max_length
        # Rendering goes through the tokenizer's jinja environment, which is not documented as thread-safe.
        self._render_lock = threading.Lock()
        # overhead() and encode() both need the request's frame: render each (query, instruction) once.
        self._frame = functools.lru_cache(maxsize=1024)(self._render_frame)
        head, tail = self._frame("q", None)
        self._tail_ids: list[int] = self._backend.encode(tail, add_special_tokens=False).ids
        if not self._tail_ids:
            raise ValueError("the chat template puts nothing after the document")

    def _render_frame(self, query: str, instruction: str | None) -> tuple[str, str]:
        taken = query + (instruction or "")
        placeholder = next((s for s in _SENTINELS if s not in taken), None)
        if placeholder is None:
            raise ValidationError("the query or instruction is full of private-use characters (U+E000-U+E03F) "
                                  "that this model's prompt needs; remove them")
        messages = [self._formatter.pair_to_messages((query, placeholder))]
        if instruction:
            messages = self._formatter.prepend_prompt_to_messages(messages, instruction)
        with self._render_lock:
            text = self._tokenizer.apply_chat_template(messages[0], tokenize=False)
        head, sentinel, tail = str(text).partition(placeholder)
        if not sentinel or placeholder in tail:
            raise ValueError("the chat template does not place the document verbatim, exactly once")
        return head, tail

    def overhead(self, query: str, instruction: str | None = None) -> int:
        head, tail = self._frame(query, instruction)
        return len(self._backend.encode(head + tail, add_special_tokens=False).ids)

    def framing_chars(self, query: str, instruction: str | None = None) -> int:
        head, tail = self._frame(query, instruction)
        return len(head) + len(tail)  # each document is tokenized inside the whole rendered prompt

    def encode(self, query: str, documents: Sequence[str], instruction: str | None = None,
               *, offsets: bool = False) -> list[EncodedDocument]:
        head, tail = self._frame(query, instruction)
        encodings = self._backend.encode_batch([head + doc + tail for doc in documents], add_special_tokens=False)
        keep = min(len(self._tail_ids), self._max_length)
        out = []
        for doc, encoding in zip(documents, encodings, strict=True):
            ids = encoding.ids
            fits = len(ids) <= self._max_length
            spans = None
            if not fits:
                ids = ids[:self._max_length - keep] + self._tail_ids[len(self._tail_ids) - keep:]
                if offsets:
                    spans = _document_spans(encoding, len(head), len(head) + len(doc))
            out.append(EncodedDocument(EncodedPair(_array(ids)), fits, spans))
        return out


def _document_spans(encoding: Encoding, start: int, end: int) -> Offsets:
    """Spans of the tokens that overlap [start, end), clipped to it and made relative to `start`."""
    return [(max(s, start) - start, min(e, end) - start) for s, e in encoding.offsets if s < end and e > start]


class ReferenceEncoder:
    """`CrossEncoder.preprocess` itself, plus a second pass for document lengths: exact for any model."""

    def __init__(self, cross_encoder: CrossEncoder, tokenizer: Any, max_length: int) -> None:
        self._cross_encoder = cross_encoder
        self._tokenizer = tokenizer
        self._max_length = max_length
        # transformers keeps truncation/padding on one shared Rust object that every call rewrites.
        self._lock = threading.Lock()

    def pairs(self, query: str, documents: Sequence[str], instruction: str | None) -> list[EncodedPair]:
        with self._lock:
            features = self._cross_encoder.preprocess([(query, doc) for doc in documents], prompt=instruction)
        unsupported = {k for k, v in features.items() if getattr(v, "ndim", 0) == 2} - SUPPORTED_FEATURES
        if unsupported:
            raise ValueError(f"the model's preprocess produces features this server cannot batch: {unsupported}")
        mask = features["attention_mask"].bool().numpy()
        ids = features["input_ids"].numpy()
        types = features["token_type_ids"].numpy() if "token_type_ids" in features else None
        return [
            EncodedPair(ids[row][mask[row]], None if types is None else types[row][mask[row]])
            for row in range(len(documents))
        ]

    def overhead(self, query: str, instruction: str | None = None) -> int:
        return self.pairs(query, [""], instruction)[0].n_tokens

    def framing_chars(self, query: str, instruction: str | None = None) -> int:
        return len(query) + len(instruction or "")  # preprocess tokenizes the query with every document

    def encode(self, query: str, documents: Sequence[str], instruction: str | None = None,
               *, offsets: bool = False) -> list[EncodedDocument]:
        room = self._max_length - self.overhead(query, instruction)
        with self._lock:
            spans = self._tokenizer(list(documents), add_special_tokens=False, return_offsets_mapping=True,
                                    verbose=False)["offset_mapping"]
        pairs = self.pairs(query, documents, instruction)
        return [
            EncodedDocument(pair, len(doc_spans) <= room,
                            [tuple(s) for s in doc_spans] if offsets and len(doc_spans) > room else None)
            for pair, doc_spans in zip(pairs, spans, strict=True)
        ]


def text_pair_encoder(tokenizer: Any, max_length: int) -> TextPairEncoder:
    """The one-pass encoder of a BERT/RoBERTa-style `tokenizer` (a transformers one, or reranker.model's
    TokenizerFacts); raises ValueError when its pair template has another layout."""
    return TextPairEncoder(tokenizer, max_length, type_ids="token_type_ids" in tokenizer.model_input_names)


def build_encoder(cross_encoder: CrossEncoder, tokenizer: Any, max_length: int, *, templated: bool) -> PairEncoder:
    """The fastest encoder that reproduces `preprocess` on probe pairs; the reference one otherwise. `templated`:
    sentence-transformers renders the model's pairs through a chat template."""
    reference = ReferenceEncoder(cross_encoder, tokenizer, max_length)
    try:
        fast: PairEncoder
        if templated:
            fast = ChatTemplateEncoder(cross_encoder, tokenizer, max_length)
        else:
            fast = text_pair_encoder(tokenizer, max_length)
        mismatch = _first_mismatch(fast, reference, templated=templated, max_length=max_length)
    except Exception as err:  # any tokenizer the fast path cannot read keeps the exact, slower path
        mismatch = f"{type(err).__name__}: {err}"
    if mismatch is None:
        return fast
    logger.warning("tokenizing through CrossEncoder.preprocess, which is slower: the one-pass encoder "
                   "does not reproduce it for this model", extra={"reason": mismatch})
    return reference


def _same(a: EncodedPair, b: EncodedPair) -> bool:
    if a.token_type_ids is None or b.token_type_ids is None:
        return a.token_type_ids is b.token_type_ids and np.array_equal(a.input_ids, b.input_ids)
    return np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.token_type_ids, b.token_type_ids)


def _first_mismatch(fast: PairEncoder, reference: ReferenceEncoder, *, templated: bool,
                    max_length: int) -> str | None:
    long_document = " ".join(["a long document about rivers, cheese and json parsing."] * (max_length // 4 + 8))
    documents = ["", "Short one.", "  leading and trailing spaces  ", "line\nbreaks\ttabs", "Ünïcödé ☕ 数据 🙂",
                 long_document]
    for query, instruction in [("which river is longest?", None), (" spaced  query ", None),
                               ("q", "Find passages about rivers" if templated else None)]:
        overhead = fast.overhead(query, instruction)
        # The reference counts a template longer than max_length as cut to it.
        if min(overhead, max_length) != reference.overhead(query, instruction):
            return f"overhead differs for query {query!r}"
        if max_length - overhead < min_document_room(max_length, templated=templated):
            # The engine refuses such a query before any document is encoded: at a small max_length the probe's
            # own queries are such, and comparing their pairs threw the exact one-pass encoder away.
            continue
        got = fast.encode(query, documents, instruction, offsets=True)
        want = reference.encode(query, documents, instruction, offsets=True)
        for doc, a, b in zip(documents, got, want, strict=True):
            if not _same(a.pair, b.pair):
                return f"features differ for document {doc[:30]!r}"
            if a.fits != b.fits:
                return f"truncation differs for document {doc[:30]!r}"
            # A cut document's tokens start at its first non-space character and reach its last.
            leading = len(doc) - len(doc.lstrip())
            if not a.fits and not (a.offsets and a.offsets[0][0] <= leading + 1
                                   and a.offsets[-1][1] >= len(doc.rstrip()) - 1):
                return "document token offsets do not cover the document"
    return None
