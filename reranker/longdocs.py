"""Long documents: windows of a document's tokens that fit max_length beside the query."""

from __future__ import annotations

from collections.abc import Sequence


def window_spans(
    offsets: Sequence[tuple[int, int]], window_tokens: int, overlap_tokens: int
) -> list[tuple[int, int]]:
    """Character spans of overlapping token windows covering a document; one span if it fits.

    `offsets` are the character spans of the document's tokens. Each window holds at most
    `window_tokens` tokens and starts `window_tokens - overlap_tokens` tokens after the last.
    """
    if window_tokens < 1:
        raise ValueError("window_tokens must be at least 1")
    if not offsets or len(offsets) <= window_tokens:
        return [(0, offsets[-1][1] if offsets else 0)]
    stride = max(1, window_tokens - max(0, overlap_tokens))
    spans = []
    start = 0
    while True:
        end = min(start + window_tokens, len(offsets))
        spans.append((offsets[start][0], offsets[end - 1][1]))
        if end == len(offsets):
            return spans
        start += stride
