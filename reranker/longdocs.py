"""Long documents: windows of a document's tokens that fit max_length beside the query, and documents cut
to their first N tokens (Cohere v2's `max_tokens_per_doc`)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer

# How many tokens a window's edge may move back to reach a word boundary; a longer word is cut where it falls.
WORD_TOKENS = 8
# Scripts written without spaces between words, where any character boundary is as good as another: Thai, Lao,
# Myanmar, Khmer, and CJK (radicals, kana, ideographs, compatibility ideographs).
UNSPACED = ((0x0E00, 0x0EFF), (0x1000, 0x109F), (0x1780, 0x17FF), (0x2E80, 0x9FFF), (0xF900, 0xFAFF))


def window_spans(
    offsets: Sequence[tuple[int, int]], window_tokens: int, overlap_tokens: int, text: str | None = None
) -> list[tuple[int, int]]:
    """Character spans of overlapping token windows covering a document; one span if it fits.

    `offsets` are the character spans of the document's tokens. Each window holds at most
    `window_tokens` tokens and starts `window_tokens - overlap_tokens` tokens after the last. Windows begin
    and end on character boundaries: byte-level tokenizers split a multi-byte character into tokens that
    share its span, and a window cut between them would bring the whole character, and more tokens, back.
    Given the document's `text`, windows also begin and end between words where one is within WORD_TOKENS
    tokens (a window starting with the "##ing" of a word scores a fragment), ending no earlier than the next
    window begins, so that no token is left out.
    """
    if window_tokens < 1:
        raise ValueError("window_tokens must be at least 1")
    if not offsets or len(offsets) <= window_tokens:
        return [(0, offsets[-1][1] if offsets else 0)]
    stride = max(1, window_tokens - max(0, overlap_tokens))
    spans = []
    previous, start = -1, 0
    while True:
        end = min(start + window_tokens, len(offsets))
        while start + 1 < end < len(offsets) and _same_character(offsets, end):
            end -= 1  # the next token finishes the last character: leave that character to the next window
        if text is not None and end < len(offsets):
            end = _word_edge(text, offsets, end, lowest=start + stride)  # stride >= 1: never an empty window
        spans.append((offsets[start][0], offsets[end - 1][1]))
        if end == len(offsets):
            return spans
        previous, start = start, start + stride
        while start - 1 > previous and _same_character(offsets, start):
            start -= 1  # begin with the character's first token, so the window holds all of it
        if text is not None:
            start = _word_edge(text, offsets, start, lowest=previous + 1)


def _word_edge(text: str, offsets: Sequence[tuple[int, int]], index: int, lowest: int) -> int:
    """The nearest boundary at or before token `index`, down to `lowest` and WORD_TOKENS tokens back, that falls
    between words; `index` itself where there is none."""
    for candidate in range(index, max(lowest, index - WORD_TOKENS) - 1, -1):
        # Not beside a zero-width token (a special or an empty piece): an edge there can leave a window empty.
        if (not _inside_word(text, offsets, candidate) and not _same_character(offsets, candidate)
                and not _zero_width(offsets[candidate - 1]) and not _zero_width(offsets[candidate])):
            return candidate
    return index


def _zero_width(span: tuple[int, int]) -> bool:
    return span[0] >= span[1]


def _same_character(offsets: Sequence[tuple[int, int]], index: int) -> bool:
    """Whether token `index` continues the character of the token before it."""
    return offsets[index][0] == offsets[index - 1][0] and offsets[index][0] < offsets[index][1]


def _inside_word(text: str, offsets: Sequence[tuple[int, int]], index: int) -> bool:
    """Whether token `index` continues the word of the token before it: the two touch, with a letter or digit on
    either side, in a script written with spaces between words."""
    at = offsets[index][0]
    if index == 0 or at != offsets[index - 1][1] or not 0 < at < len(text):
        return False
    return all(char.isalnum() and not any(low <= ord(char) <= high for low, high in UNSPACED)
               for char in text[at - 1:at + 1])


class DocumentClipper:
    """Cuts documents to their first N tokens, counted by the model's tokenizer on the document alone.

    The cut falls on a character boundary (the end of the N-th token's character), so the text scored is a
    prefix of the document that the tokenizer turns back into at most N tokens, give or take a merge at the cut.
    """

    def __init__(self, tokenizer: Any) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        # A private Rust tokenizer: transformers rewrites the shared one's truncation on every call.
        self._backend: Tokenizer | None = None
        if backend is not None:
            self._backend = Tokenizer.from_str(backend.to_str())
            self._backend.no_truncation()
            self._backend.no_padding()
        self._tokenizer = tokenizer
        self._lock = threading.Lock()  # only for a slow (Python) tokenizer, which nothing says is thread-safe

    def clip(self, documents: Sequence[str], max_tokens: int) -> list[str | None]:
        """Per document, its first `max_tokens` tokens' text, or None where the whole document fits."""
        if self._backend is not None:
            encodings = self._backend.encode_batch(list(documents), add_special_tokens=False)
            spans: list[Sequence[tuple[int, int]]] = [encoding.offsets for encoding in encodings]
        else:
            with self._lock:
                spans = self._tokenizer(list(documents), add_special_tokens=False, return_offsets_mapping=True,
                                        verbose=False)["offset_mapping"]
        return [
            None if len(offsets) <= max_tokens else doc[:window_spans(offsets, max_tokens, 0)[0][1]]
            for doc, offsets in zip(documents, spans, strict=True)
        ]
