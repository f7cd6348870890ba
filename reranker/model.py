"""Load a sentence-transformers CrossEncoder for serving and score one padded batch of pairs."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from sentence_transformers import CrossEncoder
from sentence_transformers.cross_encoder.modules import LogitScore

from reranker.compiling import bucketed, compile_model, mark_step, uncompiled
from reranker.errors import ModelLoadError
from reranker.prompts import QWEN3_RERANKER_TEMPLATE, is_qwen3_reranker
from reranker.settings import Settings
from reranker.tokens import EncodedPair, build_encoder

logger = logging.getLogger(__name__)

# Tokenizers report this sentinel (or larger) when they have no length limit of their own.
_NO_LIMIT = 1_000_000
# collate's notes to launch: how many rows are real when shape buckets added padding rows, and that a
# retry under CUDA graphs runs uncompiled at its own shape.
_ROWS = "reranker_rows"
_EAGER = "reranker_eager"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


def resolve_dtype(setting: str, device: str, checkpoint_dtype: str | None = None) -> torch.dtype:
    """`auto`: on CUDA the checkpoint's own half type if it says bfloat16 (float16 can overflow on such
    models, Qwen3-Reranker among them), else float16; bfloat16 on a CPU with AMX-BF16; else float32."""
    if setting != "auto":
        return DTYPES[setting]
    if device.startswith("cuda"):
        return torch.bfloat16 if checkpoint_dtype == "bfloat16" else torch.float16
    return torch.bfloat16 if cpu_has_amx_bf16() else torch.float32


def checkpoint_dtype(model_id: str, trust_remote_code: bool = False) -> str | None:
    """The dtype a checkpoint's config.json declares (`dtype`, formerly `torch_dtype`), if it can be read."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    except Exception:  # the model load that follows reports the real problem
        return None
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(declared).removeprefix("torch.") if declared else None


class ScoringModel:
    """A loaded cross-encoder: pairs in (see reranker.tokens), float32 logits out, one padded batch at a time.

    Scoring is split for the worker's pipeline: `collate` pads on the CPU (any thread), `launch` copies to
    the device and starts the forward pass (the worker thread only), and `wait` returns the scores.
    """

    def __init__(self, cross_encoder: CrossEncoder, *, model_id: str, max_length: int) -> None:
        self.cross_encoder = cross_encoder
        self.model_id = model_id
        self.max_length = max_length
        self.load_seconds = 0.0  # set by load_model once the model is warm
        self.compiled = "off"  # the RERANKER_COMPILE mode in force, set by compile_model
        self.device = str(cross_encoder.device)
        self.dtype = str(next(cross_encoder.parameters()).dtype).removeprefix("torch.")
        self.is_causal = any(isinstance(module, LogitScore) for module in cross_encoder)
        tokenizer = cross_encoder.tokenizer
        if tokenizer is None:
            raise ModelLoadError(f"model {model_id!r} has no tokenizer; a text reranker needs one")
        self.tokenizer = tokenizer
        self.encoder = build_encoder(cross_encoder, tokenizer, max_length, causal=self.is_causal)
        self._pad_id = tokenizer.pad_token_id or 0
        self._pad_left = tokenizer.padding_side == "left"
        # The non-tensor features preprocess adds (modality, logits_to_keep) are the same for every batch.
        probe = cross_encoder.preprocess([("q", "d")])
        self._extras = {k: v for k, v in probe.items() if not isinstance(v, torch.Tensor)}
        self._cuda = self.device.startswith("cuda")

    @property
    def accepts_instruction(self) -> bool:
        """Causal-LM rerankers take a task instruction; classic cross-encoders do not."""
        return self.is_causal

    def encode(self, pairs: Sequence[tuple[str, str]], instruction: str | None = None) -> list[EncodedPair]:
        """Tokenize arbitrary pairs exactly as CrossEncoder.predict would, truncating to max_length."""
        out: list[EncodedPair] = []
        for query, document in pairs:
            out.extend(doc.pair for doc in self.encoder.encode(query, [document], instruction))
        return out

    def padded_shape(self, rows: int, width: int) -> tuple[int, int]:
        """The shape `collate` pads a batch of `rows` pairs, the longest `width` tokens, to."""
        return bucketed(rows, width, self.max_length) if self.compiled == "cudagraphs" else (rows, width)

    def collate(self, batch: Sequence[EncodedPair], *, exact: bool = False) -> dict[str, Any]:
        """Pad a batch to its longest pair, on the tokenizer's side, into CPU tensors. Under CUDA graphs the
        shape is rounded up to a bucket; the extra rows repeat the first pair and their scores are dropped.
        An `exact` batch (a retry) keeps its own shape and runs uncompiled (see reranker.compiling)."""
        longest = max(pair.n_tokens for pair in batch)
        rows, width = (len(batch), longest) if exact else self.padded_shape(len(batch), longest)
        ids = np.full((rows, width), self._pad_id, dtype=np.int64)
        mask = np.zeros((rows, width), dtype=np.int64)
        types = np.zeros((rows, width), dtype=np.int64) if batch[0].token_type_ids is not None else None
        for row in range(rows):
            pair = batch[row] if row < len(batch) else batch[0]
            columns = slice(width - pair.n_tokens, width) if self._pad_left else slice(0, pair.n_tokens)
            ids[row, columns] = pair.input_ids
            mask[row, columns] = 1
            if types is not None and pair.token_type_ids is not None:
                types[row, columns] = pair.token_type_ids
        features: dict[str, Any] = dict(self._extras)
        features["input_ids"] = torch.from_numpy(ids)
        features["attention_mask"] = torch.from_numpy(mask)
        if types is not None:
            features["token_type_ids"] = torch.from_numpy(types)
        if rows != len(batch):
            features[_ROWS] = len(batch)
        if exact and self.compiled == "cudagraphs":
            features[_EAGER] = True
        return features

    @torch.inference_mode()
    def launch(self, features: dict[str, Any]) -> PendingScores:
        """Copy a collated batch to the device and start its forward pass; on a GPU this returns at once."""
        device = self.cross_encoder.device
        rows, eager = features.get(_ROWS), features.get(_EAGER, False)
        features = {k: v for k, v in features.items() if k not in (_ROWS, _EAGER)}
        if self._cuda:
            # Pinned staging makes the copies asynchronous; pinning here keeps every CUDA call on this thread.
            features = {k: v.pin_memory().to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                        for k, v in features.items()}
        if self.compiled == "cudagraphs" and not eager:
            mark_step()
        network = self.cross_encoder.transformers_model
        with uncompiled(network) if eager and network is not None else nullcontext():
            scores = self.cross_encoder(features)["scores"]
        if scores.ndim > 1:
            scores = scores.squeeze(-1)
        scores = scores[:rows].float()
        if not self._cuda:
            return PendingScores(scores)
        host = torch.empty(scores.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(scores, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return PendingScores(host, done)

    def score(self, batch: Sequence[EncodedPair]) -> torch.Tensor:
        """Raw logits of a batch as a 1-D float32 CPU tensor, in batch order (collate, launch, wait)."""
        return self.launch(self.collate(batch)).wait()


class PendingScores:
    """The scores of a launched batch; `wait` blocks until they are on the host."""

    def __init__(self, host: torch.Tensor, done: torch.cuda.Event | None = None) -> None:
        self._host = host
        self._done = done

    @property
    def ran(self) -> bool:
        return self._done is None  # no event: a CPU pass, finished inside launch

    def wait(self) -> torch.Tensor:
        if self._done is not None:
            self._done.synchronize()  # deliberate: the one synchronisation per batch, after its scores copy
        return self._host


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
    on_gpu = settings.dtype == "auto" and device.startswith("cuda")
    declared = checkpoint_dtype(settings.model, settings.trust_remote_code) if on_gpu else None
    dtype = resolve_dtype(settings.dtype, device, declared)
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
    compile_model(model, settings.compile)
    model.load_seconds = time.perf_counter() - started
    logger.info(
        "model loaded",
        extra={"model": settings.model, "device": model.device, "dtype": model.dtype, "max_length": max_length,
               "compile": model.compiled},
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
