"""RERANKER_COMPILE: torch.compile the model's forward pass, warmed on every graph it needs before serving.

`on` compiles with dynamic shapes, so a few graphs serve every batch size and length: a warm-up of three
batches (one row, which torch specialises; several rows with padding; several rows without, for models
whose mask code skips an all-ones mask) compiles all of them, and nothing compiles while serving.
`cudagraphs` compiles the same way in torch's `reduce-overhead` mode, which replays a CUDA graph per
distinct shape; batches are then padded to shape buckets (rows to a multiple of 8, tokens to 16, 32 or a
multiple of 64; the batcher's token budget counts the padded shape) so the number of graphs stays bounded.
The compile is warmed before ready; each bucket's graph is recorded on the device thread the first times
that shape is served (torch synchronises the device while it records), then replayed. Retries after a
failure (halves of a batch that ran out of memory) run uncompiled at their own shape: a bucket would pad a
lone pair back to eight rows, and recording a graph for a one-off shape needs memory that is short just then.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch
from torch import nn

from reranker.errors import ModelLoadError

logger = logging.getLogger(__name__)

TORCH_MODES = {"on": None, "cudagraphs": "reduce-overhead"}  # RERANKER_COMPILE -> torch.compile mode
ROW_BUCKET = 8
TOKEN_BUCKET = 64
SHORT_WIDTHS = (16, 32)  # below one token bucket, so short pairs are not padded fourfold


def bucketed(rows: int, width: int, max_width: int) -> tuple[int, int]:
    """The padded shape of a `rows` x `width` batch: rows rounded up to a multiple of 8, the width to 16, 32
    or a multiple of 64, never past the model's limit."""
    short = [bucket for bucket in SHORT_WIDTHS if width <= bucket]
    padded = short[0] if short else -(-width // TOKEN_BUCKET) * TOKEN_BUCKET
    return -(-rows // ROW_BUCKET) * ROW_BUCKET, min(max(width, max_width), padded)


class Compilable(Protocol):
    """What compiling needs of a loaded model (reranker.model.ScoringModel on the torch backend)."""

    model_id: str
    compiled: str  # the mode in force; collate and launch read it

    @property
    def device(self) -> str: ...

    @property
    def network(self) -> nn.Module | None:
        """The transformers module whose forward is compiled."""

    def score_pairs(self, pairs: list[tuple[str, str]]) -> object:
        """Tokenize, pad and score `pairs` (a warm-up batch)."""


def compile_model(model: Compilable, setting: str) -> float:
    """Compile `model`'s network in place for `setting` (off, on, cudagraphs) and warm it; the seconds spent.

    Raises ModelLoadError, naming RERANKER_COMPILE, when the model cannot be compiled.
    """
    if setting == "off":
        return 0.0
    if setting == "cudagraphs" and not model.device.startswith("cuda"):
        raise ModelLoadError("RERANKER_COMPILE=cudagraphs needs a CUDA device; use RERANKER_COMPILE=on or off")
    network = model.network
    if network is None:
        raise ModelLoadError(f"model {model.model_id!r} has no transformers network to compile; "
                             "set RERANKER_COMPILE=off")
    started = time.perf_counter()
    if setting == "cudagraphs":
        import torch._inductor.config as inductor

        # The buckets bound the graphs (at most one per padded shape); torch's warning past 8 would only be noise.
        inductor.triton.cudagraph_dynamic_shape_warn_limit = None
    # sentence-transformers calls the network's `forward` method, not the module, so that is what to wrap.
    network.forward = torch.compile(network.forward, dynamic=True, mode=TORCH_MODES[setting])
    model.compiled = setting
    try:
        for pairs in warm_up_pairs():
            model.score_pairs(pairs)
    except Exception as err:
        del network.forward  # the class's own forward again
        model.compiled = "off"
        cause = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        raise ModelLoadError(f"torch.compile failed on model {model.model_id!r} ({cause}); "
                             "set RERANKER_COMPILE=off to serve it uncompiled") from err
    seconds = time.perf_counter() - started
    logger.info("model compiled", extra={"compile": setting, "compile_seconds": round(seconds, 2)})
    return seconds


def warm_up_pairs() -> list[list[tuple[str, str]]]:
    """Batches that reach every graph a dynamic-shape compile makes: torch specialises a dimension of size
    one, and a batch without padding takes a different attention path from one with padding."""
    short, longer = "a short warm-up document", "a longer warm-up document, " * 6
    return [
        [("warm-up query", short)],
        [("warm-up query", short), ("warm-up query", longer), ("warm-up query", short)],
        [("warm-up query", longer), ("warm-up query", longer)],
    ]


def mark_step() -> None:
    """Tell CUDA-graph trees a new inference step begins, so a replay may reuse the last one's memory.
    The caller has already queued the copy of the previous outputs, so none is overwritten unread."""
    torch.compiler.cudagraph_mark_step_begin()


@contextmanager
def uncompiled(network: nn.Module) -> Iterator[None]:
    """Run `network` with its class's own forward inside the block. Only the device thread calls the
    network, so swapping the method there races with nothing."""
    compiled = network.__dict__.pop("forward", None)
    try:
        yield
    finally:
        if compiled is not None:
            network.forward = compiled
