"""A loaded cross-encoder (ScoringModel): pairs encoded, padded and scored a batch at a time; its length limits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import Tokenizer

from reranker.backends import Backend, Padded, Pending
from reranker.errors import ModelLoadError
from reranker.tokens import (
    EncodedPair,
    PairEncoder,
    TextPairEncoder,
    build_encoder,
    text_pair_encoder,
)

if TYPE_CHECKING:  # annotations only: they take seconds to import, and a start from the conversion cache needs none
    from sentence_transformers import CrossEncoder
    from torch import nn

    from reranker.backends.pytorch import TorchBackend


# Tokenizers report this sentinel (or larger) when they have no length limit of their own.
_NO_LIMIT = 1_000_000


@dataclass(frozen=True)
class TokenizerFacts:
    """What serving asks of a tokenizer, all that a start from the conversion cache (`ScoringModel.from_spec`)
    has without transformers: the Rust tokenizer, the sides it pads and truncates on, the inputs it makes."""

    backend_tokenizer: Tokenizer
    pad_token_id: int | None
    padding_side: str
    truncation_side: str
    model_input_names: tuple[str, ...]


class Unloaded:
    """The backend of a model started from the conversion cache until OpenVINO has compiled it: pads as it is
    and runs nothing."""

    name = "none"
    device = "cpu"
    dtype = "float32"
    stream_threads: int | None = None

    def padded_shape(self, rows: int, width: int) -> tuple[int, int]:
        return rows, width

    def launch(self, batch: Padded) -> Pending:
        raise RuntimeError("the model's backend is not loaded yet")


class ScoringModel:
    """A loaded cross-encoder: pairs in (see reranker.tokens), float32 logits out, one padded batch at a time.

    Scoring is split for the worker's pipeline: `collate` pads on the CPU (any thread), `launch` starts the
    backend's forward pass (the worker thread only), and `wait` returns the scores. `cross_encoder` is the
    PyTorch model as loaded (`from_cross_encoder`); the torch backend runs it. A model started from the
    conversion cache has none: OpenVINO runs the network and `tokenizer` is a TokenizerFacts.
    """

    def __init__(self, *, model_id: str, max_length: int, tokenizer: Any, encoder: PairEncoder, is_causal: bool,
                 token_types: bool, length_limit: int | None, cross_encoder: CrossEncoder | None = None,
                 extras: dict[str, Any] | None = None, templated: bool | None = None) -> None:
        self._cross_encoder = cross_encoder
        self.model_id = model_id
        self.max_length = max_length
        self.length_limit = length_limit  # the model's own, before RERANKER_MAX_LENGTH
        self.load_seconds = 0.0  # set by load_model once the model is warm
        self.is_causal = is_causal  # scored from the yes/no next-token logits
        # Pairs rendered through a chat template (a causal reranker's; a Qwen3-Reranker sequence-classifier's too):
        # the template has an instruction's place and cuts the document alone.
        self.templated = is_causal if templated is None else templated
        self.tokenizer = tokenizer
        self.encoder = encoder
        self._pad_id = tokenizer.pad_token_id or 0
        self._pad_left = tokenizer.padding_side == "left"
        self._token_types = token_types
        # The non-tensor features preprocess adds (modality, logits_to_keep) are the same for every batch.
        self.extras = extras or {}
        self.torch: TorchBackend | None = None
        if cross_encoder is not None:
            from reranker.backends.pytorch import TorchBackend

            self.torch = TorchBackend(cross_encoder, self.extras, max_length)
        self.backend: Backend = self.torch if self.torch is not None else Unloaded()
        self.backend_reason = "RERANKER_BACKEND=torch"
        self.dtype_reason = f"RERANKER_DTYPE={self.torch.dtype if self.torch else 'float32'}"
        self.convert_seconds = 0.0  # conversion for a backend other than torch, 0 when it came from the cache

    @property
    def from_cache(self) -> bool:
        """Started from the conversion cache alone (`from_spec`): no PyTorch model was loaded."""
        return self._cross_encoder is None

    @property
    def cross_encoder(self) -> CrossEncoder:
        """The PyTorch model as loaded; one started from the conversion cache (`from_cache`) has none."""
        if self._cross_encoder is None:
            raise RuntimeError(f"model {self.model_id!r} started from the conversion cache: no PyTorch model is loaded")
        return self._cross_encoder

    @classmethod
    def from_cross_encoder(cls, cross_encoder: CrossEncoder, *, model_id: str, max_length: int,
                           length_limit: int | None = None) -> ScoringModel:
        import torch
        from sentence_transformers.cross_encoder.modules import LogitScore

        tokenizer = cross_encoder.tokenizer
        if tokenizer is None:
            raise ModelLoadError(f"model {model_id!r} has no tokenizer; a text reranker needs one")
        check_vocabulary(model_id, len(tokenizer), cross_encoder.config)
        causal = any(isinstance(module, LogitScore) for module in cross_encoder)
        templated = causal or "message" in getattr(cross_encoder[0], "modality_config", {})
        probe = cross_encoder.preprocess([("q", "d")])
        return cls(model_id=model_id, max_length=max_length, tokenizer=tokenizer,
                   encoder=build_encoder(cross_encoder, tokenizer, max_length, templated=templated),
                   is_causal=causal, templated=templated,
                   token_types="token_type_ids" in probe, length_limit=length_limit, cross_encoder=cross_encoder,
                   extras={k: v for k, v in probe.items() if not isinstance(v, torch.Tensor)})

    @classmethod
    def from_spec(cls, spec: dict[str, Any], *, model_id: str, max_length: int) -> ScoringModel:
        """A model whose network is still to be loaded, tokenizing as `serving_spec` recorded; raises
        ValueError or KeyError on a spec it cannot use."""
        try:
            backend = Tokenizer.from_str(spec["tokenizer"])
        except Exception as err:  # the Rust tokenizer raises a bare Exception on a bad definition
            raise ValueError(f"the stored tokenizer cannot be read: {err}") from err
        tokenizer = TokenizerFacts(backend, spec["pad_token_id"], spec["padding_side"], spec["truncation_side"],
                                   tuple(spec["model_input_names"]))
        limit = spec["length_limit"]
        max_length = capped(max_length, limit)
        return cls(model_id=model_id, max_length=max_length, tokenizer=tokenizer,
                   encoder=text_pair_encoder(tokenizer, max_length), is_causal=False,
                   token_types=bool(spec["token_types"]), length_limit=limit)

    @property
    def tokenizes_alone(self) -> bool:
        """The one-pass text-pair encoder, checked against preprocess at load, serves this model: its
        tokenizing needs nothing of transformers and can be stored (`serving_spec`)."""
        return isinstance(self.encoder, TextPairEncoder)  # causal models take the chat-template encoder

    def serving_spec(self) -> dict[str, Any]:
        """How this model tokenizes and pads, as JSON: what `from_spec` needs to serve it without PyTorch."""
        tokenizer = self.tokenizer
        return {"tokenizer": tokenizer.backend_tokenizer.to_str(), "pad_token_id": tokenizer.pad_token_id,
                "padding_side": tokenizer.padding_side, "truncation_side": tokenizer.truncation_side,
                "model_input_names": list(tokenizer.model_input_names), "token_types": self._token_types,
                "length_limit": self.length_limit}

    @property
    def device(self) -> str:
        return self.backend.device

    @property
    def dtype(self) -> str:
        return self.backend.dtype

    @property
    def compiled(self) -> str:
        """The RERANKER_COMPILE mode in force (torch only; `off` on other backends)."""
        return self.torch.compiled if self.torch is not None and self.backend is self.torch else "off"

    @compiled.setter
    def compiled(self, mode: str) -> None:
        if self.torch is None:
            raise ModelLoadError("RERANKER_COMPILE applies to the torch backend; set RERANKER_COMPILE=off")
        self.torch.compiled = mode

    @property
    def network(self) -> nn.Module | None:
        return None if self._cross_encoder is None else self._cross_encoder.transformers_model

    @property
    def accepts_instruction(self) -> bool:
        """Rerankers prompted through a chat template take a task instruction; classic cross-encoders do not."""
        return self.templated

    def encode(self, pairs: Sequence[tuple[str, str]], instruction: str | None = None) -> list[EncodedPair]:
        """Tokenize arbitrary pairs exactly as CrossEncoder.predict would, truncating the document to max_length (a
        query that leaves a document no room, which the engine refuses, keeps no document and may run over it)."""
        out: list[EncodedPair] = []
        for query, document in pairs:
            out.extend(doc.pair for doc in self.encoder.encode(query, [document], instruction))
        return out

    def padded_shape(self, rows: int, width: int) -> tuple[int, int]:
        """The shape `collate` pads a batch of `rows` pairs, the longest `width` tokens, to."""
        return self.backend.padded_shape(rows, width)

    def collate(self, batch: Sequence[EncodedPair], *, exact: bool = False) -> Padded:
        """Pad a batch to its longest pair, on the tokenizer's side. The backend may round the shape up to a
        bucket (CUDA graphs); the extra rows repeat the first pair and their scores are dropped. An `exact`
        batch (a retry) keeps its own shape."""
        longest = max(pair.n_tokens for pair in batch)
        rows, width = (len(batch), longest) if exact else self.padded_shape(len(batch), longest)
        ids = np.full((rows, width), self._pad_id, dtype=np.int64)
        mask = np.zeros((rows, width), dtype=np.int64)
        types = np.zeros((rows, width), dtype=np.int64) if self._token_types else None
        for row in range(rows):
            pair = batch[row] if row < len(batch) else batch[0]
            columns = slice(width - pair.n_tokens, width) if self._pad_left else slice(0, pair.n_tokens)
            ids[row, columns] = pair.input_ids
            mask[row, columns] = 1
            if types is not None and pair.token_type_ids is not None:
                types[row, columns] = pair.token_type_ids
        return Padded(ids, mask, types, rows=len(batch), exact=exact)

    def launch(self, batch: Padded) -> Pending:
        """Start the forward pass of a collated batch on the backend; on a GPU this returns at once."""
        return self.backend.launch(batch)

    def score(self, batch: Sequence[EncodedPair]) -> np.ndarray:
        """Raw logits of a batch as a 1-D float32 array, in batch order (collate, launch, wait)."""
        return self.launch(self.collate(batch)).wait()

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        return self.score(self.encode(pairs))


def check_vocabulary(model_id: str, tokens: int, config: Any) -> None:
    """Refuse a tokenizer that knows under half of the model's vocabulary: transformers builds an all but empty one
    when a folder lacks its tokenizer files, which made every word unknown and served wrong scores without a word."""
    try:
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    except ValueError:  # a composite config with more than one text model: nothing to compare against
        return
    vocabulary = getattr(text_config, "vocab_size", None)
    if isinstance(vocabulary, int) and tokens < vocabulary // 2:
        raise ModelLoadError(
            f"model {model_id!r}: its tokenizer knows {tokens} tokens where the model has {vocabulary}, so its "
            "tokenizer files (tokenizer.json, or vocab.txt / sentencepiece.bpe.model with tokenizer_config.json) are "
            "missing or wrong; copy every file of the model's repository into the folder RERANKER_MODEL names")


def model_length_limit(tokenizer_max_length: int | None, config: Any) -> int | None:
    """The longest input the model can take: the lesser of its tokenizer's limit and its position embeddings'
    (Qwen3-Reranker's tokenizer says 131072 where the model has 40960 positions)."""
    limits = []
    if tokenizer_max_length is not None and 0 < tokenizer_max_length < _NO_LIMIT:
        limits.append(int(tokenizer_max_length))
    positions = getattr(config, "max_position_embeddings", None)
    if positions:
        pad = getattr(config, "pad_token_id", None)
        if "roberta" in str(getattr(config, "model_type", "")) and pad is not None:
            # RoBERTa-style position ids start after the padding index: 514 embeddings hold 512 tokens.
            limits.append(int(positions) - int(pad) - 1)
        else:
            limits.append(int(positions))
    return min(limits, default=None)


def capped(max_length: int, limit: int | None) -> int:
    """RERANKER_MAX_LENGTH, no longer than the model's own limit where it has one."""
    return min(max_length, limit) if limit else max_length
