"""Which precision RERANKER_DTYPE=auto runs at on the CPU: bfloat16 where the CPU computes it natively."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    """The precision `auto` picks on this CPU and the reason, as /info and reranker_model_info say it."""

    dtype: str
    reason: str


def torch_native_bf16() -> list[str]:
    """The CPU features that give torch's oneDNN kernels native bfloat16 (AMX tiles, AVX512-BF16); empty when
    bfloat16 would be emulated. The same probes torch's CPU dispatch uses (cpuinfo through torch.cpu)."""
    features = []
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        features.append("amx_bf16")
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        features.append("avx512_bf16")
    return features


def auto_precision(native: list[str]) -> Precision:
    """bfloat16 when `native` names the features that run it, else float32."""
    if native:
        return Precision("bfloat16", f"auto: this CPU runs bfloat16 natively ({', '.join(native)})")
    return Precision("float32", "auto: no native bfloat16 on this CPU (no AMX-BF16 or AVX512-BF16)")


def explicit(dtype: str) -> Precision:
    return Precision(dtype, f"RERANKER_DTYPE={dtype}")
