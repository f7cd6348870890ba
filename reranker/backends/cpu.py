"""Which precision RERANKER_DTYPE=auto runs at on the CPU: bfloat16 where the CPU computes it natively."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Precision:
    """The precision `auto` picks on this CPU and the reason, as /info and reranker_model_info say it."""

    dtype: str
    reason: str


def torch_native_bf16() -> list[str]:
    """The CPU features that give torch's oneDNN kernels native bfloat16 (AMX tiles, AVX512-BF16); empty when
    bfloat16 would be emulated. The same probes torch's CPU dispatch uses (cpuinfo through torch.cpu)."""
    import torch  # here, not at the top: a start from the conversion cache on a CPU without BF16 never asks

    features = []
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        features.append("amx_bf16")
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        features.append("avx512_bf16")
    return features


def cpuinfo() -> list[dict[str, str]]:
    """Linux's /proc/cpuinfo, one dict of fields per logical CPU; empty where the file cannot be read."""
    try:
        blocks = Path("/proc/cpuinfo").read_text().split("\n\n")
    except OSError:
        return []
    parsed = [{key.strip(): value.strip() for key, _, value in (line.partition(":") for line in block.splitlines())}
              for block in blocks]
    return [fields for fields in parsed if "processor" in fields]


def cpu_flags() -> set[str]:
    """The feature flags the kernel lists for this CPU (avx2, avx512_bf16, amx_tile, ...)."""
    cpus = cpuinfo()
    return set(cpus[0].get("flags", "").split()) if cpus else set()


def kernel_bf16_flags() -> list[str]:
    """The native-bfloat16 features (amx_bf16, avx512_bf16) by the names Linux's /proc/cpuinfo gives them, read
    without importing torch; empty where the file cannot be read."""
    return kernel_flags(("amx_bf16", "avx512_bf16"))


def kernel_flags(names: tuple[str, ...]) -> list[str]:
    """Those of `names` that the kernel lists among this CPU's flags, in the order given."""
    flags = cpu_flags()
    return [name for name in names if name in flags]


def physical_cores() -> int:
    """The physical cores this process may run on (hyperthread siblings counted once), from /proc/cpuinfo."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = {(cpu.get("physical id"), cpu.get("core id", cpu["processor"])) for cpu in cpuinfo()
             if cpu["processor"].isdigit() and int(cpu["processor"]) in allowed}
    return len(cores) or len(allowed)


def native_bf16() -> list[str]:
    """The native-bfloat16 features, read from /proc/cpuinfo until torch is loaded (a start from the conversion
    cache never loads it: importing it took 1.6 s and 160 MB), else by torch's own probes."""
    if "torch" not in sys.modules and cpuinfo():
        return kernel_bf16_flags()
    return torch_native_bf16()


# By the names both Linux's /proc/cpuinfo and torch.cpu.get_capabilities() give them.
INT8_DOT_PRODUCTS = ("amx_int8", "avx512_vnni", "avx_vnni")


def int8_dot_products() -> list[str]:
    """The CPU features that multiply int8 matrices at int8 speed (AMX-INT8, AVX512-VNNI, AVX-VNNI), as torch's
    cpuinfo reports them. Without them the products go through AVX2's 16-bit multiply-adds: on the AVX2-only EPYC
    static int8 ran 1.05x float32 and weights-only int8 slower than float32 (docs/cpu.md). Read from
    /proc/cpuinfo, by the same names, until torch is loaded, as native_bf16 is: an int8 start from the conversion
    cache never loads it."""
    if "torch" not in sys.modules and cpuinfo():
        return kernel_flags(INT8_DOT_PRODUCTS)
    import torch

    capabilities = torch.cpu.get_capabilities()
    return [name for name in INT8_DOT_PRODUCTS if capabilities.get(name)]


def auto_precision(native: list[str]) -> Precision:
    """bfloat16 when `native` names the features that run it, else float32."""
    if native:
        return Precision("bfloat16", f"auto: this CPU runs bfloat16 natively ({', '.join(native)})")
    return Precision("float32", "auto: no native bfloat16 on this CPU (no AMX-BF16 or AVX512-BF16)")


def explicit(dtype: str) -> Precision:
    return Precision(dtype, f"RERANKER_DTYPE={dtype}")
