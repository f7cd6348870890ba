"""The PyTorch model traced into an OpenVINO graph: the one part of the OpenVINO backend that needs torch, and
only on a start that does not find the graph in the conversion cache."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import openvino as ov
import torch
from torch import nn

from reranker.backends import ConversionError, Padded

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder


class Scores(nn.Module):
    """The CrossEncoder from token arrays to one float32 logit per row: what OpenVINO converts."""

    def __init__(self, cross_encoder: CrossEncoder, extras: dict[str, Any]) -> None:
        super().__init__()
        self.cross_encoder = cross_encoder
        self.extras = extras

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        features = {**self.extras, "input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            features["token_type_ids"] = token_type_ids
        return self.cross_encoder(features)["scores"].reshape(-1).float()


def convert(cross_encoder: CrossEncoder, extras: dict[str, Any], example: Padded, *, causal: bool) -> ov.Model:
    """Trace the model into an OpenVINO graph with dynamic (rows, tokens) inputs.

    A causal model is traced with eager attention: its left padding leaves the first rows of a padded
    sequence with nothing to attend to, which the SDPA path turns into NaN on OpenVINO (and NaN times a zero
    weight is still NaN); eager attention's finite mask gives the same scores as torch with no NaN."""
    network = cross_encoder.transformers_model
    previous = getattr(getattr(network, "config", None), "_attn_implementation", None)
    if causal and network is not None and previous not in (None, "eager"):
        network.set_attn_implementation("eager")
    arrays = example.arrays()
    try:
        # Tracing warns about Python branches on shapes and, in torch 2.13, about torch.jit.trace itself:
        # nothing an operator can act on; the float32 tests hold the converted graph to torch's scores.
        with torch.no_grad(), warnings.catch_warnings(), _quiet_traced_attributes(), _root_logger_kept():
            warnings.simplefilter("ignore")
            return ov.convert_model(
                Scores(cross_encoder, extras).eval(),
                example_input={name: torch.from_numpy(array) for name, array in arrays.items()},
                input=[(name, [-1, -1], ov.Type.i64) for name in arrays],
            )
    except Exception as err:
        raise ConversionError(conversion_failure(err)) from err
    finally:
        if causal and network is not None and previous not in (None, "eager"):
            network.set_attn_implementation(previous)


# torch.jit.trace reads every attribute of the modules it traces (looking for exported methods), and two getters
# log about names nothing here uses: CrossEncoder's deprecated `_target_device` (four deprecation warnings at every
# conversion) and transformers' `loss_function`, which warns that `loss_type=None` is unrecognized and "uses
# ForCausalLMLoss", on a BERT reranker as on any model whose config names no loss.
TRACED_GETTERS = {
    "sentence_transformers.base.model": "_target_device` has been deprecated",
    "transformers.modeling_utils": "`loss_type=None` was set in the config",
}


def _not_a_traced_getter(record: logging.LogRecord) -> bool:
    noise = TRACED_GETTERS.get(record.name)
    return noise is None or noise not in record.getMessage()


@contextmanager
def _quiet_traced_attributes() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in TRACED_GETTERS]
    for logger in loggers:
        logger.addFilter(_not_a_traced_getter)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(_not_a_traced_getter)


@contextmanager
def _root_logger_kept() -> Iterator[None]:
    """convert_model sets the root logger to ERROR (with a filter of its own) and puts it back only when the
    conversion succeeds: after a failed one, the service logged nothing below ERROR for the rest of its life."""
    root = logging.getLogger()
    level, filters, handlers = root.level, list(root.filters), list(root.handlers)
    try:
        yield
    finally:
        root.setLevel(level)
        root.filters[:] = filters
        root.handlers[:] = handlers


def conversion_failure(err: Exception) -> str:
    """The useful line of a conversion error: the frontend's summary of the operations it has no rule for."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    summary = [line.removeprefix("-- ") for line in lines if line.startswith("-- ")]
    return "; ".join(summary)[:300] if summary else f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def release_weights(cross_encoder: CrossEncoder) -> None:
    """Free the PyTorch weights once OpenVINO holds its own copy: tokenizing needs none of them, and a
    float32 bge-reranker-v2-m3 would otherwise sit in memory twice (2.2 GB)."""
    network = cross_encoder.transformers_model
    if network is not None:
        nn.Module.to(network, device="meta")
