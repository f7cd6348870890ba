"""Load RERANKER_MODEL for serving: device, backend and precision picked, loaded (or taken from the conversion cache),
checked and warmed up."""

from __future__ import annotations

import itertools
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from reranker.backends import choose_backend, nncf_installed, openvino_installed
from reranker.backends.cpu import Precision, native_bf16
from reranker.devices import checkpoint_dtype, pick_precision, resolve_device, torch_dtype
from reranker.errors import ModelLoadError
from reranker.logs import quiet_libraries
from reranker.model import ScoringModel, capped, model_length_limit
from reranker.prompts import QWEN3_RERANKER_TEMPLATE, is_qwen3_reranker
from reranker.settings import Settings
from reranker.tokens import min_document_room

logger = logging.getLogger(__name__)


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
    if processor_kwargs is None and (model.is_causal or _untemplated_qwen3(cross_encoder.config, model)):
        how = ("a causal-LM reranker this service does not know by name is prompted through the chat template it "
               "ships" if model.is_causal else "a Qwen3 sequence classifier without a prompt template of its own is "
               "scored on the bare query and document")
        logger.warning(f"{how}: a Qwen3-Reranker checkpoint (its -seq-cls conversions too) gets its model card's "
                       "prompt only where RERANKER_MODEL's name contains 'Qwen3-Reranker' (name its folder so)",
                       extra={"model": settings.model})
    return model


def _untemplated_qwen3(config: Any, model: ScoringModel) -> bool:
    """A Qwen3 one-logit classifier that renders no template: a renamed Qwen3-Reranker -seq-cls conversion, whose
    scores mean nothing without its prompt."""
    return str(getattr(config, "model_type", "")).startswith("qwen3") and not model.templated


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
