"""Long documents: windows of a document's tokens that fit max_length beside the query."""

from __future__ import annotations

from collections.abc import Sequence


def window_spans(
    offsets: Sequence[tuple[int, int]], window_tokens: int, overlap_tokens: int
) -> list[tuple[int, int]]:
    """Character spans of overlapping token windows covering a document; one span if it fits.

    `offsets` are the character spans of the document's tokens. Each window holds at most
    `window_tokens` tokens and starts `window_tokens - overlap_tokens` tokens after the last. Windows begin
    and end on character boundaries: byte-level tokenizers split a multi-byte character into tokens that
    share its span, and a window cut between them would bring the whole character, and more tokens, back.
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
        spans.append((offsets[start][0], offsets[end - 1][1]))
        if end == len(offsets):
            return spans
        previous, start = start, start + stride
        while start - 1 > previous and _same_character(offsets, start):
            start -= 1  # begin with the character's first token, so the window holds all of it


def _same_character(offsets: Sequence[tuple[int, int]], index: int) -> bool:
    """Whether token `index` continues the character of the token before it."""
    return offsets[index][0] == offsets[index - 1][0] and offsets[index][0] < offsets[index][1]
