"""How pairs are grouped into passes: the one fit rule (`joins`) that cutting a round into batches and the cut-ins
share, and `cut_batches`, which plans a whole set of pairs with it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

# (rows, longest pair) -> the shape the scorer pads such a batch to.
PaddedShape = Callable[[int, int], tuple[int, int]]


def unpadded(rows: int, width: int) -> tuple[int, int]:
    return rows, width


def joins(rows: int, width: int, length: int, budget: int, shape: PaddedShape = unpadded) -> bool:
    """Whether a pair of `length` tokens joins a batch of `rows` pairs whose longest has `width`: while the batch's
    padded size (rows x longest, after `shape` rounds them up to the scorer's buckets) stays within the token budget,
    and past it where the padding is paid for already (a bucket of 8 rows costs the same with 1 or 8)."""
    if rows == 0:
        return True
    grown = shape(rows + 1, max(width, length))
    return grown[0] * grown[1] <= budget or grown == shape(rows, width)


def cut_batches(lengths: Sequence[int], budget: int, shape: PaddedShape = unpadded) -> list[list[int]]:
    """Group indices, shortest first, into batches each of which `joins` allows."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        if not joins(len(current), lengths[current[-1]] if current else 0, lengths[index], budget, shape):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches
