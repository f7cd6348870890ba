"""Load a sentence-transformers CrossEncoder for serving and score one padded batch of pairs."""

from __future__ import annotations

import glob
import itertools
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import Tokenizer

from reranker.backends import Backend, Padded, Pending, choose_backend, nncf_installed, openvino_installed
from reranker.backends.cpu import Precision, auto_precision, explicit, native_bf16
from reranker.errors import ModelLoadError
from reranker.logs import quiet_libraries
from reranker.prompts import QWEN3_RERANKER_TEMPLATE, is_qwen3_reranker
from reranker.settings import Settings
from reranker.tokens import (
    EncodedPair,
    PairEncoder,
    TextPairEncoder,
    build_encoder,
    min_document_room,
    text_pair_encoder,
)

if TYPE_CHECKING:  # imported where a model is loaded in PyTorch: torch, transformers and sentence-transformers
    import torch  # take seconds, and a start from the conversion cache needs none of them
    from sentence_transformers import CrossEncoder
    from torch import nn

    from reranker.backends.pytorch import TorchBackend

logger = logging.getLogger(__name__)

# Tokenizers report this sentinel (or larger) when they have no length limit of their own.
_NO_LIMIT = 1_000_000
# Device files a GPU that torch.cuda can use shows up as: NVIDIA's, ROCm's, WSL's.
GPU_DEVICE_FILES = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/dxg")


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def gpu_device_files() -> bool:
    """Whether this machine shows any GPU device file; without one, CUDA cannot be available."""
    return any(glob.glob(pattern) for pattern in GPU_DEVICE_FILES)


def cuda_available() -> bool:
    """torch.cuda.is_available(), without importing torch on a machine with no GPU device file at all."""
    if not gpu_device_files():
        return False
    import torch

    return torch.cuda.is_available()


def resolve_device(setting: str) -> str:
    """`auto` picks CUDA when torch sees a GPU, else the CPU."""
    if setting == "auto":
        return "cuda" if cuda_available() else "cpu"
    if setting.startswith("cuda") and not cuda_available():
        raise ModelLoadError(
            f"RERANKER_DEVICE={setting} but torch sees no CUDA device; use RERANKER_DEVICE=cpu or auto"
        )
    return setting


def pick_precision(setting: str, device: str, checkpoint_dtype: str | None = None,
                   native: list[str] | None = None) -> Precision:
    """RERANKER_DTYPE resolved, with the reason. `auto`: on CUDA the checkpoint's own half type if it says
    bfloat16 (float16 can overflow on such models, Qwen3-Reranker among them), else float16; on the CPU
    bfloat16 where the CPU runs it natively (`native`, by default backends.cpu.native_bf16()), else
    float32."""
    if setting != "auto":
        return explicit(setting)
    if device.startswith("cuda"):
        if checkpoint_dtype == "bfloat16":
            return Precision("bfloat16", "auto: CUDA, the checkpoint declares bfloat16")
        return Precision("float16", "auto: CUDA")
    return auto_precision(native_bf16() if native is None else native)


def resolve_dtype(setting: str, device: str, checkpoint_dtype: str | None = None) -> torch.dtype:
    """The torch dtype `pick_precision` chooses for the torch backend."""
    return torch_dtype(pick_precision(setting, device, checkpoint_dtype).dtype)


def checkpoint_dtype(model_id: str, trust_remote_code: bool = False) -> str | None:
    """The dtype a checkpoint's config.json declares (`dtype`, formerly `torch_dtype`), if it can be read."""
    from transformers import AutoConfig

    quiet_libraries()
    try:
        config = AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    except Exception:  # the model load that follows reports the real problem
        return None
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(declared).removeprefix("torch.") if declared else None


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
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
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


def load_model(settings: Settings) -> ScoringModel:
    """Load, configure and warm the model named by RERANKER_MODEL on the backend RERANKER_BACKEND picks;
    raise ModelLoadError on failure. A model OpenVINO cannot convert is served by torch, with a warning."""
    try:
        return _load(settings)
    finally:
        # The int8 calibration pairs, read once for the start: not kept for the life of the process, whichever way
        # the start went (a conversion that fell back to torch never reached the calibration).
        int8 = sys.modules.get("reranker.backends.int8")
        if int8 is not None:
            int8.forget_calibration()


def _load(settings: Settings) -> ScoringModel:
    device = resolve_device(settings.device)
    backend, backend_reason = choose_backend(settings.backend, device, settings.dtype, settings.compile)
    _check_combination(settings, device, backend, backend_reason)
    _check_calibration(settings)
    on_gpu = settings.dtype == "auto" and device.startswith("cuda")
    declared = checkpoint_dtype(settings.model, settings.trust_remote_code) if on_gpu else None
    # OpenVINO converts the float32 module and applies its precision when it compiles.
    precision = pick_precision(settings.dtype, device, declared)
    started = time.perf_counter()
    model = _start_from_cache(settings, backend_reason) if backend == "openvino" else None
    if model is None:
        model = _load_cross_encoder(settings, device, "float32" if backend == "openvino" else precision.dtype)
        model.backend_reason, model.dtype_reason = backend_reason, precision.reason
        _check_room(model, settings)  # before any conversion or quantization
        if backend == "openvino":
            _use_openvino(model, settings, backend_reason)
    else:
        _check_room(model, settings)
    if model.backend is model.torch and precision.dtype == "bfloat16" and device == "cpu" and not native_bf16():
        logger.warning("bfloat16 is emulated on this CPU (no AMX-BF16 or AVX512-BF16) and may be slower than "
                       "float32", extra={"dtype": precision.dtype})
    _warm_up(model, settings)
    if settings.compile != "off":
        from reranker.compiling import compile_model

        compile_model(model, settings.compile)
    model.load_seconds = time.perf_counter() - started
    logger.info(
        "model loaded",
        extra={"model": settings.model, "device": model.device, "backend": model.backend.name,
               "backend_reason": model.backend_reason, "dtype": model.dtype, "dtype_reason": model.dtype_reason,
               "max_length": model.max_length, "compile": model.compiled, "from_cache": model.from_cache},
    )
    return model


def _check_room(model: ScoringModel, settings: Settings) -> None:
    """Refuse a max length that leaves a one-word query no room for a document: the service would start, report
    ready and refuse every request. A Qwen3-Reranker's prompt template alone takes over 100 tokens."""
    overhead = model.encoder.overhead("q", None)
    if overhead + min_document_room(model.max_length, templated=model.templated) <= model.max_length:
        return
    enough = next(n for n in itertools.count(model.max_length + 1)
                  if overhead + min_document_room(n, templated=model.templated) <= n)
    if model.max_length < settings.max_length:  # capped: a longer setting would be cut back to the same
        where = f" (RERANKER_MAX_LENGTH={settings.max_length} is capped at the model's own limit)"
        change = f"the model itself takes no more than {model.max_length} tokens, so it cannot serve this way"
    else:
        where = ""
        change = f"set RERANKER_MAX_LENGTH to {enough} or more (leave room for your queries too)"
    raise ModelLoadError(
        f"a max length of {model.max_length} tokens{where} leaves a document no room: {settings.model}'s "
        f"template and specials take {overhead} tokens with a one-word query, and a document needs at least "
        f"{min_document_room(model.max_length, templated=model.templated)}; {change}")


def _warm_up(model: ScoringModel, settings: Settings) -> None:
    """One pass before serving. A model that cannot run on the backend and precision picked (an operation with
    no bfloat16 kernel in torch, say) stops the start here, with what to change, not with a traceback."""
    try:
        model.score(model.encode([("warm-up query", "warm-up document")]))
    except Exception as err:
        if "out of memory" in str(err).lower():
            change = "lower RERANKER_BATCH_TOKENS or RERANKER_MAX_LENGTH, or free the device"
        elif isinstance(err, NotImplementedError) and model.dtype != "float32":  # no kernel at this precision
            change = "set RERANKER_DTYPE=float32"
        else:
            change = "check the model, or try RERANKER_BACKEND=torch" if model.backend.name != "torch" else \
                "check the model"
        raise ModelLoadError(f"{settings.model} failed its warm-up pass on {model.backend.name} at {model.dtype} "
                             f"({model.dtype_reason}): {type(err).__name__}: {str(err)[:300]}; {change}") from err


def _load_cross_encoder(settings: Settings, device: str, dtype: str) -> ScoringModel:
    """RERANKER_MODEL loaded in PyTorch through sentence-transformers, on `device` at `dtype`."""
    from sentence_transformers import CrossEncoder

    quiet_libraries()  # transformers, imported just now, installed its own log handler

    # The original Qwen3-Reranker checkpoints ship the chat template of the base LLM, which knows
    # nothing of query/document roles: give them the prompt of their model card, before loading, so
    # that sentence-transformers routes pairs through it.
    processor_kwargs = {"chat_template": QWEN3_RERANKER_TEMPLATE} if is_qwen3_reranker(settings.model) else None
    try:
        cross_encoder = CrossEncoder(
            settings.model,
            device=device,
            trust_remote_code=settings.trust_remote_code,
            model_kwargs={"dtype": torch_dtype(dtype)},
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
    max_length = capped(settings.max_length, limit)
    cross_encoder.max_seq_length = max_length
    cross_encoder.eval()
    model = ScoringModel.from_cross_encoder(cross_encoder, model_id=settings.model, max_length=max_length,
                                            length_limit=limit)
    if model.is_causal and processor_kwargs is None:
        logger.warning("a causal-LM reranker this service does not know by name is prompted through the chat "
                       "template it ships: a Qwen3-Reranker checkpoint gets its model card's prompt only where "
                       "RERANKER_MODEL's name contains 'Qwen3-Reranker' (name its folder so)",
                       extra={"model": settings.model})
    return model


def _start_from_cache(settings: Settings, backend_reason: str) -> ScoringModel | None:
    """The model straight from the conversion cache, where an earlier start stored the converted graph and how
    to tokenize for it: neither transformers nor sentence-transformers is imported, and no PyTorch weights are
    read (a replacement replica is up seconds sooner). None when the cache holds no such entry or OpenVINO
    cannot compile it: the full load follows."""
    from reranker.backends.openvino import ConversionError, cached_serving, load_openvino

    try:
        spec = cached_serving(settings)
        if spec is None:
            return None
        model = ScoringModel.from_spec(spec, model_id=settings.model, max_length=settings.max_length)
        model.backend_reason = backend_reason
        load_openvino(model, settings)
    except (ConversionError, KeyError, ValueError, TypeError, OSError) as err:
        logger.warning("the conversion cache's entry cannot start the model; loading it in full",
                       extra={"model": settings.model, "cause": f"{type(err).__name__}: {err}"[:300]})
        return None
    logger.info("model started from the conversion cache, without PyTorch weights",
                extra={"model": settings.model})
    return model


def _check_combination(settings: Settings, device: str, backend: str, backend_reason: str) -> None:
    """Refuse settings that cannot work together, or packages that are missing, before anything is loaded."""
    if backend == "openvino" and not openvino_installed():
        raise ModelLoadError(f"the OpenVINO backend ({backend_reason}) needs the openvino package, which is not "
                             "installed: pip install -r requirements.txt, or set RERANKER_BACKEND=torch")
    if backend == "openvino" and device != "cpu":
        raise ModelLoadError(f"RERANKER_BACKEND=openvino runs on the CPU, not {device}; set RERANKER_DEVICE=cpu "
                             "or RERANKER_BACKEND=torch")
    if backend == "openvino" and settings.dtype == "float16":
        raise ModelLoadError("RERANKER_DTYPE=float16 is not an OpenVINO CPU precision; use auto, float32, "
                             "bfloat16 or int8, or RERANKER_BACKEND=torch")
    if backend == "openvino" and settings.compile != "off":
        raise ModelLoadError("RERANKER_COMPILE applies to the torch backend; OpenVINO compiles the model itself: "
                             "set RERANKER_COMPILE=off or RERANKER_BACKEND=torch")
    if settings.dtype == "int8" and backend != "openvino":
        raise ModelLoadError(f"RERANKER_DTYPE=int8 runs on the OpenVINO backend on the CPU, not on torch "
                             f"({backend_reason}); install requirements.txt's openvino and nncf and use "
                             "RERANKER_DEVICE=cpu with RERANKER_BACKEND=auto or openvino and RERANKER_COMPILE=off")
    if settings.dtype == "int8" and not nncf_installed():
        raise ModelLoadError("RERANKER_DTYPE=int8 needs the nncf package, which quantizes the model and is not "
                             "installed: pip install -r requirements.txt, or choose another RERANKER_DTYPE")


def _check_calibration(settings: Settings) -> None:
    """RERANKER_INT8_CALIBRATION read and checked before minutes of loading and converting (it is read again
    where it calibrates); named where nothing calibrates, it is ignored, with a warning."""
    if settings.int8_calibration is None:
        return
    if settings.dtype != "int8" or settings.int8_mode != "static":
        logger.warning("RERANKER_INT8_CALIBRATION is ignored: only static int8 (RERANKER_DTYPE=int8 with "
                       "RERANKER_INT8_MODE=static) calibrates",
                       extra={"dtype": settings.dtype, "int8_mode": settings.int8_mode})
        return
    from reranker.backends.int8 import read_calibration

    read_calibration(Path(settings.int8_calibration), settings.max_doc_chars)


def _use_openvino(model: ScoringModel, settings: Settings, backend_reason: str) -> None:
    """Convert the loaded model for OpenVINO and serve it there; on a ConversionError stay on torch at the
    precision torch would have picked, saying why."""
    from reranker.backends.openvino import ConversionError, load_openvino

    try:
        load_openvino(model, settings)
    except ConversionError as err:
        if model.torch is None:  # started from the cache: no PyTorch model to fall back on
            raise
        precision = pick_precision("auto" if settings.dtype == "int8" else settings.dtype, "cpu")
        if settings.dtype == "int8":  # int8 is OpenVINO's alone: torch serves what auto picks, and says so
            precision = Precision(precision.dtype, f"RERANKER_DTYPE=int8 needs OpenVINO, which cannot run this model; "
                                                   f"{precision.reason}")
        logger.warning("OpenVINO cannot run this model; serving it with torch",
                       extra={"model": model.model_id, "cause": str(err), "dtype": precision.dtype})
        model.cross_encoder.to(torch_dtype(precision.dtype))
        model.torch.dtype = precision.dtype
        model.backend = model.torch
        model.backend_reason = f"{backend_reason}; OpenVINO failed ({err}), torch"
        model.dtype_reason = precision.reason


def _load_failure_message(model_id: str, err: Exception) -> str:
    cause = f"{type(err).__name__}: {err}".strip().splitlines()[0][:500]
    unreadable = _unreadable_files(model_id) if os.path.isdir(model_id) else []
    if unreadable:  # the loaders report a file they may not open as missing
        hint = (f"{len(unreadable)} of its files cannot be read by this user (uid {os.getuid()}), e.g. "
                f"{unreadable[0]!r}: make them readable (chmod a+r, as save_pretrained leaves them 0600) or run as "
                "their owner")
    elif os.path.isdir(model_id):
        hint = (
            "the directory exists but does not hold a loadable model; it needs config.json, the weights "
            "and the tokenizer files of a sentence-transformers CrossEncoder or a Hugging Face "
            "sequence-classification / causal-LM reranker"
        )
    elif os.path.sep in model_id and not _looks_like_hub_id(model_id):
        hint = "no such directory; point RERANKER_MODEL at an existing local model directory"
    else:
        hint = (
            "If this machine cannot reach the Hugging Face Hub, download the model elsewhere "
            f"(`hf download {model_id} --local-dir /models/{model_id.split('/')[-1]}`), copy the folder here "
            "and set RERANKER_MODEL to that local directory"
        )
    return f"could not load model {model_id!r}: {cause.rstrip('.')}. {hint}"


def _unreadable_files(folder: str) -> list[str]:
    """The files under `folder` (its top level and one level down, where loaders look) this process may not read."""
    found = []
    for root, dirs, files in os.walk(folder):
        found += [os.path.relpath(os.path.join(root, name), folder) for name in sorted(files)
                  if not os.access(os.path.join(root, name), os.R_OK)]
        if root != folder:
            dirs.clear()
    return found


def _looks_like_hub_id(model_id: str) -> bool:
    parts = model_id.split("/")
    return len(parts) == 2 and all(parts) and not model_id.startswith((".", "~"))
