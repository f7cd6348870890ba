"""The runtimes a model's forward pass runs on, behind one small protocol: a padded batch in, logits out.

reranker.model tokenizes and pads (`Padded`), reranker.loading picks the runtime; a backend only runs the network.
Adding a runtime (ONNX Runtime, say) is one module with a `launch`, plus a line in `choose_backend`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Padded:
    """One batch as the network takes it: int64 arrays of `shape` (rows, width), padded on the tokenizer's
    side. `rows` of them are real; the rest (shape buckets) repeat the first pair and their scores are
    dropped. An `exact` batch is a retry at its own shape, run without what only pays off on repeats."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray | None
    rows: int
    exact: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        rows, width = self.input_ids.shape
        return int(rows), int(width)

    def arrays(self) -> dict[str, np.ndarray]:
        """The network's inputs by name."""
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.token_type_ids is not None:
            out["token_type_ids"] = self.token_type_ids
        return out


class Pending(Protocol):
    """The scores of a launched batch."""

    @property
    def ran(self) -> bool:
        """True when the pass already ran inside `launch` (one CPU stream): nothing is gained by holding it."""

    def wait(self) -> np.ndarray:
        """Block until the batch's scores (float32, one per real row) are on the host."""

    @property
    def seconds(self) -> float | None:
        """After `wait`: how long the pass ran, where the backend timed it because passes run side by side
        (OpenVINO's streams); None where they run one at a time and the worker's clock tells."""


class Finished:
    """The scores of a pass that ran to completion inside `launch`."""

    ran = True
    seconds = None

    def __init__(self, scores: np.ndarray) -> None:
        self._scores = scores

    def wait(self) -> np.ndarray:
        return self._scores


class ConversionError(Exception):
    """A backend cannot convert or compile this model; the service serves it with torch."""


class Backend(Protocol):
    """A loaded network on one device. Only the worker's device thread calls `launch`."""

    name: str  # "torch", "openvino"
    device: str
    dtype: str  # the precision the network runs at: float32, float16, bfloat16, int8
    stream_threads: int | None  # the threads one pass runs on, where it is a share of them (an OpenVINO stream)

    def padded_shape(self, rows: int, width: int) -> tuple[int, int]:
        """The shape a batch of `rows` pairs, the longest `width` tokens, is padded to for this backend."""

    def launch(self, batch: Padded) -> Pending:
        """Start the forward pass of a padded batch."""


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def nncf_installed() -> bool:
    """NNCF, which quantizes for RERANKER_DTYPE=int8."""
    return importlib.util.find_spec("nncf") is not None


def choose_backend(setting: str, device: str, dtype: str, compile_mode: str = "off") -> tuple[str, str]:
    """RERANKER_BACKEND resolved for a device, RERANKER_DTYPE and RERANKER_COMPILE: the backend and why it was
    picked. `auto` takes OpenVINO on the CPU when it is installed and runs what was asked for, else torch."""
    if setting != "auto":
        return setting, f"RERANKER_BACKEND={setting}"
    if device != "cpu":
        return "torch", f"auto: {device}"
    if dtype == "float16":
        return "torch", "auto: OpenVINO's CPU plugin does not take float16"
    if compile_mode != "off":
        return "torch", f"auto: RERANKER_COMPILE={compile_mode} compiles the torch model"
    if not openvino_installed():
        return "torch", "auto: openvino is not installed"
    return "openvino", "auto: the CPU, openvino installed"


def decline_openvino_telemetry() -> None:
    """OpenVINO (on import, and on each conversion) and NNCF send usage events to Google Analytics unless the
    user ran `opt_in_out --opt_out` or a CI variable is set. This service never phones home: every consent check
    in this process answers "declined", without writing the user's own consent file."""
    try:
        from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker
    except ImportError:  # no telemetry package: OpenVINO and NNCF use their stubs
        return

    def declined(self: OptInChecker, *args: object, **kwargs: object) -> ConsentCheckResult:
        return ConsentCheckResult.DECLINED

    OptInChecker.check = declined


# Before any module of this package imports openvino: its import alone sends an event.
decline_openvino_telemetry()
