"""The PyTorch backend: the CrossEncoder's own module on the CPU or one CUDA device, optionally compiled."""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from reranker.backends import Padded
from reranker.compiling import bucketed, mark_step, uncompiled

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder


class TorchBackend:
    """Runs padded batches through `cross_encoder` on its device. `compiled` is the RERANKER_COMPILE mode in
    force (set by reranker.compiling); under `cudagraphs` batches are padded to shape buckets."""

    name = "torch"
    stream_threads: int | None = None  # a pass takes every thread

    def __init__(self, cross_encoder: CrossEncoder, extras: dict[str, Any], max_length: int) -> None:
        self.cross_encoder = cross_encoder
        self.device = str(cross_encoder.device)
        self.dtype = str(next(cross_encoder.parameters()).dtype).removeprefix("torch.")
        self.compiled = "off"
        self._extras = extras  # the non-tensor features sentence-transformers' preprocess adds (logits_to_keep)
        self._max_length = max_length
        self._cuda = self.device.startswith("cuda")

    def padded_shape(self, rows: int, width: int) -> tuple[int, int]:
        return bucketed(rows, width, self._max_length) if self.compiled == "cudagraphs" else (rows, width)

    @torch.inference_mode()
    def launch(self, batch: Padded) -> PendingScores:
        """Copy a batch to the device and start its forward pass; on a GPU this returns at once."""
        device = self.cross_encoder.device
        features: dict[str, Any] = dict(self._extras)
        for name, array in batch.arrays().items():
            tensor = torch.from_numpy(array)
            # Pinned staging makes the copies asynchronous; pinning here keeps every CUDA call on this thread.
            features[name] = tensor.pin_memory().to(device, non_blocking=True) if self._cuda else tensor
        eager = batch.exact and self.compiled == "cudagraphs"
        if self.compiled == "cudagraphs" and not eager:
            mark_step()
        network = self.cross_encoder.transformers_model
        with uncompiled(network) if eager and network is not None else nullcontext():
            scores = self.cross_encoder(features)["scores"]
        if scores.ndim > 1:
            scores = scores.squeeze(-1)
        scores = scores[:batch.rows].float()
        if not self._cuda:
            return PendingScores(scores)
        host = torch.empty(scores.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(scores, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return PendingScores(host, done)


class PendingScores:
    """The scores of a launched batch; `wait` blocks until they are on the host."""

    def __init__(self, host: torch.Tensor, done: torch.cuda.Event | None = None) -> None:
        self._host = host
        self._done = done

    seconds = None  # one pass at a time on the device: the worker's clock times it

    @property
    def ran(self) -> bool:
        return self._done is None  # no event: a CPU pass, finished inside launch

    def wait(self) -> np.ndarray:
        if self._done is not None:
            self._done.synchronize()  # deliberate: the one synchronisation per batch, after its scores copy
        return self._host.numpy()  # a view: the array keeps the (pinned) host tensor alive
