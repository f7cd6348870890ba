"""Load a sentence-transformers CrossEncoder for serving and score one padded batch of pairs."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from sentence_transformers import CrossEncoder
from sentence_transformers.cross_encoder.modules import LogitScore

from reranker.errors import ModelLoadError
from reranker.prompts import QWEN3_RERANKER_TEMPLATE, is_qwen3_reranker
from reranker.settings import Settings

logger = logging.getLogger(__name__)

# Tokenizers report this sentinel (or larger) when they have no length limit of their own.
_NO_LIMIT = 1_000_000


@dataclass(frozen=True)
class EncodedPair:
    """One tokenized (query, document) pair: unpadded 1-D tensors plus the model's bookkeeping keys."""

    features: dict[str, torch.Tensor]
    n_tokens: int
    extras: dict[str, Any] = field(default_factory=dict)


def resolve_device(setting: str) -> str:
    """`auto` picks CUDA when torch sees a GPU, else the CPU."""
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(
            f"RERANKER_DEVICE={setting} but torch sees no CUDA device; use RERANKER_DEVICE=cpu or auto"
        )
    return setting


def cpu_has_amx_bf16() -> bool:
    """Whether this torch build reports AMX tiles (fast bfloat16 matmuls) on this CPU."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def resolve_dtype(setting: str, device: str) -> torch.dtype:
    """`auto`: float16 on CUDA, bfloat16 on a CPU with AMX-BF16, else float32."""
    if setting != "auto":
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[setting]
    if device.startswith("cuda"):
        return torch.float16
    return torch.bfloat16 if cpu_has_amx_bf16() else torch.float32


class ScoringModel:
    """A loaded cross-encoder: tokenizes pairs and turns a batch of them into float32 logits."""

    def __init__(
        self, cross_encoder: CrossEncoder, *, model_id: str, max_length: int) -> None:
        self.cross_encoder = cross_encoder
        self.model_id = model_id
        self.max_length = max_length
        self.load_seconds = 0.0  # set by load_model once the model is warm
        self.device = str(cross_encoder.device)
        self.dtype = str(next(cross_encoder.parameters()).dtype).removeprefix("torch.")
        self.is_causal = any(isinstance(module, LogitScore) for module in cross_encoder)
        tokenizer = cross_encoder.tokenizer
        if tokenizer is None:
            raise ModelLoadError(f"model {model_id!r} has no tokenizer; a text reranker needs one")
        self.tokenizer = tokenizer
        self._pad_values = {"input_ids": tokenizer.pad_token_id or 0}
        self._pad_left = tokenizer.padding_side == "left"
        # A fast tokenizer keeps its truncation/padding settings on one shared Rust object that every
        # call rewrites, so two threads tokenizing at once can cut each other's pairs.
        self._tokenizer_lock = threading.Lock()

    @property
    def accepts_instruction(self) -> bool:
        """Causal-LM rerankers take a task instruction; classic cross-encoders do not."""
        return self.is_causal

    def encode(self, pairs: Sequence[tuple[str, str]], instruction: str | None = None) -> list[EncodedPair]:
        """Tokenize pairs exactly as CrossEncoder.predict would, truncating to max_length."""
        if not pairs:
            return []
        with self._tokenizer_lock:
            features = self.cross_encoder.preprocess(list(pairs), prompt=instruction)
        mask = features["attention_mask"].bool()
        tensors = {k: v for k, v in features.items() if isinstance(v, torch.Tensor) and v.shape == mask.shape}
        extras = {k: v for k, v in features.items() if k not in tensors}
        lengths = mask.sum(dim=1).tolist()
        return [
            EncodedPair({k: v[row][mask[row]] for k, v in tensors.items()}, int(lengths[row]), extras)
            for row in range(mask.shape[0])
        ]

    def token_offsets(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        """Character spans of each text's tokens, without special tokens."""
        with self._tokenizer_lock:
            encoded = self.tokenizer(
                list(texts), add_special_tokens=False, return_offsets_mapping=True, verbose=False
            )
        return [list(map(tuple, offsets)) for offsets in encoded["offset_mapping"]]

    def pair_overhead(self, query: str, instruction: str | None = None) -> int:
        """Tokens a pair spends before any document text: query, instruction, template, specials."""
        return self.encode([(query, "")], instruction)[0].n_tokens

    def collate(self, batch: Sequence[EncodedPair]) -> dict[str, Any]:
        """Pad a batch to its longest pair on the tokenizer's side and move it to the device."""
        width = max(pair.n_tokens for pair in batch)
        features: dict[str, Any] = dict(batch[0].extras)
        for key in batch[0].features:
            pad_value = self._pad_values.get(key, 0)
            rows = []
            for pair in batch:
                row = pair.features[key]
                padding = row.new_full((width - row.shape[0],), pad_value)
                rows.append(torch.cat([padding, row] if self._pad_left else [row, padding]))
            features[key] = torch.stack(rows).to(self.cross_encoder.device)
        return features

    @torch.inference_mode()
    def score(self, batch: Sequence[EncodedPair]) -> torch.Tensor:
        """Raw logits of a batch as a 1-D float32 CPU tensor, in batch order."""
        scores = self.cross_encoder(self.collate(batch))["scores"]
        if scores.ndim > 1:
            scores = scores.squeeze(-1)
        return scores.float().cpu()


def model_length_limit(tokenizer_max_length: int | None, config: Any) -> int | None:
    """The longest input the model can take, from its tokenizer or else its position embeddings."""
    if tokenizer_max_length is not None and 0 < tokenizer_max_length < _NO_LIMIT:
        return int(tokenizer_max_length)
    positions = getattr(config, "max_position_embeddings", None)
    if not positions:
        return None
    pad = getattr(config, "pad_token_id", None)
    if "roberta" in str(getattr(config, "model_type", "")) and pad is not None:
        # RoBERTa-style position ids start after the padding index: 514 embeddings hold 512 tokens.
        return int(positions) - int(pad) - 1
    return int(positions)


def load_model(settings: Settings) -> ScoringModel:
    """Load, configure and warm the model named by RERANKER_MODEL; raise ModelLoadError on failure."""
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    # The original Qwen3-Reranker checkpoints ship the chat template of the base LLM, which knows
    # nothing of query/document roles: give them the prompt of their model card, before loading, so
    # that sentence-transformers routes pairs through it.
    processor_kwargs = {"chat_template": QWEN3_RERANKER_TEMPLATE} if is_qwen3_reranker(settings.model) else None
    started = time.perf_counter()
    try:
        cross_encoder = CrossEncoder(
            settings.model,
            device=device,
            trust_remote_code=settings.trust_remote_code,
            model_kwargs={"dtype": dtype},
            processor_kwargs=processor_kwargs,
        )
    except Exception as err:
        raise ModelLoadError(_load_failure_message(settings.model, err)) from err

    if cross_encoder.num_labels != 1:
        raise ModelLoadError(
            f"model {settings.model!r} has {cross_encoder.num_labels} output labels; a reranker needs exactly one "
            "relevance logit (use a cross-encoder trained for reranking)"
        )
    tokenizer = cross_encoder.tokenizer
    limit = model_length_limit(tokenizer.model_max_length if tokenizer else None, cross_encoder.config)
    max_length = min(settings.max_length, limit) if limit else settings.max_length
    cross_encoder.max_seq_length = max_length
    cross_encoder.eval()
    model = ScoringModel(cross_encoder, model_id=settings.model, max_length=max_length)
    model.score(model.encode([("warm-up query", "warm-up document")]))
    model.load_seconds = time.perf_counter() - started
    logger.info(
        "model loaded",
        extra={"model": settings.model, "device": model.device, "dtype": model.dtype, "max_length": max_length},
    )
    return model


def _load_failure_message(model_id: str, err: Exception) -> str:
    cause = f"{type(err).__name__}: {err}".strip().splitlines()[0][:500]
    if os.path.isdir(model_id):
        hint = (
            "the directory exists but does not hold a loadable model; it needs config.json, the weights "
            "and the tokenizer files of a sentence-transformers CrossEncoder or a Hugging Face "
            "sequence-classification / causal-LM reranker"
        )
    elif os.path.sep in model_id and not _looks_like_hub_id(model_id):
        hint = "no such directory; point RERANKER_MODEL at an existing local model directory"
    else:
        hint = (
            "if this machine cannot reach the Hugging Face Hub, download the model elsewhere "
            f"(`hf download {model_id} --local-dir /models/{model_id.split('/')[-1]}`), copy the folder here "
            "and set RERANKER_MODEL to that local directory"
        )
    return f"could not load model {model_id!r}: {cause}. {hint}"


def _looks_like_hub_id(model_id: str) -> bool:
    parts = model_id.split("/")
    return len(parts) == 2 and all(parts) and not model_id.startswith((".", "~"))
