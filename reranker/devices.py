"""Where and at what precision the model runs: RERANKER_DEVICE and RERANKER_DTYPE resolved."""

from __future__ import annotations

import glob
from typing import TYPE_CHECKING

from reranker.backends.cpu import Precision, auto_precision, explicit, native_bf16
from reranker.errors import ModelLoadError
from reranker.logs import quiet_libraries

if TYPE_CHECKING:  # imported where a model is loaded in PyTorch: it takes seconds, and a start from the conversion
    import torch  # cache needs none of it

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
