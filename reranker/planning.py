"""A request's pairs: its documents tokenized once, a slice at a time (so a caller that leaves stops it), each cut
to max_length or split into windows that fit beside the query (RERANKER_LONG_DOCS)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from reranker.errors import CancelledError, LimitExceededError
from reranker.longdocs import window_spans
from reranker.model import ScoringModel
from reranker.tokens import EncodedDocument, EncodedPair, min_document_room

# Windows overlap by a quarter so a passage cut at one window's edge is whole in the next.
CHUNK_OVERLAP = 0.25
# Re-tokenizing a window's text can add a token or two at its edges.
CHUNK_MARGIN = 2
# A request is tokenized in slices of about this many characters (about 0.15 s on one core), and its caller's
# `cancel` is looked at between them: a client that leaves, or a stop, ends the tokenizing of a large request
# within a slice, where it used to run to the end (5.7 s for 1000 documents of 1500 words) and be thrown away.
SLICE_CHARS = 1 << 18


def char_slices(texts: Sequence[str], limit: int, extra: int = 0) -> Iterator[tuple[int, int]]:
    """`(start, end)` ranges over `texts`, in order, each holding at most `limit` characters unless one text
    alone has more; each text weighs `extra` characters more than its length."""
    start = size = 0
    for i, text in enumerate(texts):
        if size and size + len(text) + extra > limit:
            yield start, i
            start, size = i, 0
        size += len(text) + extra
    if start < len(texts):
        yield start, len(texts)


def given_up(cancel: threading.Event | None) -> None:
    """Raise CancelledError once the caller has set `cancel` (it went away, or a stop cut it off)."""
    if cancel is not None and cancel.is_set():
        raise CancelledError("the caller gave up")


def tokenizer_slices(texts: Sequence[str], cancel: threading.Event | None,
                     framing: int = 0) -> Iterator[tuple[int, int]]:
    """The SLICE_CHARS slices of `texts` a tokenizer pass goes through, each text with `framing` characters
    tokenized beside it (PairEncoder.framing_chars); raises CancelledError before a slice once `cancel` is set."""
    for start, end in char_slices(texts, SLICE_CHARS, framing):
        given_up(cancel)
        yield start, end


# A cache entry: the document's raw logit, and whether its scored text was cut to max_length (CUT) or scored in
# windows (SPLIT), which a request answered from the cache counts as the first one did.
CUT, SPLIT = 1, 2


@dataclass
class Plan:
    """The model passes one request needs: pairs to score and, per document, which pairs are its."""

    pairs: list[EncodedPair] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)
    cut: set[int] = field(default_factory=set)  # documents (by owner) whose pair max_length cut short
    split: set[int] = field(default_factory=set)  # documents scored in windows (chunk mode)

    def flags(self, owner: int) -> int:
        """What the cache keeps of how document `owner` was scored."""
        return (CUT if owner in self.cut else 0) | (SPLIT if owner in self.split else 0)


def encode(model: ScoringModel, query: str, documents: Sequence[str], instruction: str | None,
           cancel: threading.Event | None, *, offsets: bool = False) -> list[EncodedDocument]:
    """The model's encoder over `documents`, a slice at a time; raises CancelledError between slices once
    `cancel` is set."""
    encoded: list[EncodedDocument] = []
    framing = model.encoder.framing_chars(query, instruction)
    for start, end in tokenizer_slices(documents, cancel, framing):
        encoded += model.encoder.encode(query, documents[start:end], instruction, offsets=offsets)
    return encoded


def document_room(model: ScoringModel, query: str, instruction: str | None) -> int:
    """The tokens a pair leaves its document beside the query, the instruction and the template; raise
    LimitExceededError when that is under min_document_room."""
    max_length = model.max_length
    overhead = model.encoder.overhead(query, instruction)
    room = max_length - overhead
    min_room = min_document_room(max_length, templated=model.templated)
    if room < min_room:
        what = "the query and instruction take" if instruction else "the query takes"
        what += " (with the model's template)" if model.templated else ""
        share = (f"{overhead} of the model's {max_length} tokens, leaving {room} for a document" if room >= 0
                 else f"{overhead} tokens, over the model's limit of {max_length}")
        raise LimitExceededError(
            f"{what} {share}; shorten {'them' if instruction else 'it'} so that at least {min_room} are left "
            "for a document"
        )
    return room


def plan(model: ScoringModel, query: str, documents: Sequence[str], instruction: str | None, room: int, *,
         chunking: bool, cancel: threading.Event | None = None, need: Callable[[int], None] | None = None,
         max_chunks: int | None = None) -> Plan:
    """Tokenize each document once; note those cut to max_length, or split long ones into windows.

    `room`: the tokens a pair leaves its document (document_room). `chunking`: RERANKER_LONG_DOCS=chunk. Setting
    `cancel` stops the tokenizing within a slice (CancelledError). `need` (Room.need) is told, after each slice of
    documents, how many passes the request needs at least so far: in chunk mode a long document's windows are known
    only once it is tokenized, and a request that cannot fit is refused then, not at the end. `max_chunks` keeps a
    document's first N windows, and counts one that had more as cut."""
    encoder = model.encoder
    planned = Plan()
    chunks: list[str] = []
    chunk_owners: list[int] = []
    window = room - CHUNK_MARGIN
    for first, last in tokenizer_slices(documents, cancel, encoder.framing_chars(query, instruction)):
        encoded_slice = encoder.encode(query, documents[first:last], instruction, offsets=chunking)
        for i, encoded in enumerate(encoded_slice, first):
            if encoded.fits or not chunking:
                if not encoded.fits:
                    planned.cut.add(i)
                planned.pairs.append(encoded.pair)
                planned.owners.append(i)
                continue
            planned.split.add(i)
            assert encoded.offsets is not None
            windows = window_spans(encoded.offsets, window, int(window * CHUNK_OVERLAP), documents[i])
            if max_chunks is not None and len(windows) > max_chunks:
                windows = windows[:max_chunks]
                planned.cut.add(i)  # its end is not scored
            for start, end in windows:
                chunks.append(documents[i][start:end])
                chunk_owners.append(i)
        if need is not None and chunks:  # without chunks, the documents' count held already
            need(len(planned.pairs) + len(chunks) + len(documents) - last)
    if chunks:
        encoded_chunks = encode(model, query, chunks, instruction, cancel)
        # A window that still does not fit once tokenized on its own lost its end: say so.
        cut = {chunk_owners[k] for k, chunk in enumerate(encoded_chunks) if not chunk.fits}
        planned.cut |= cut
        planned.pairs.extend(chunk.pair for chunk in encoded_chunks)
        planned.owners.extend(chunk_owners)
    return planned
