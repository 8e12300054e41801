"""The host CPU as Linux's /proc/cpuinfo names it."""

from __future__ import annotations

from functools import cache
from pathlib import Path


@cache
def cpu_fields() -> dict[str, str]:
    """Model and instruction-set flags (empty where /proc/cpuinfo cannot be read)."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "flags", "Features", "CPU implementer", "CPU part") and key not in fields:
                fields[key] = value.strip()
    except OSError:
        pass
    return fields


# What AMX kernels are compiled for (precision.AMX's target, Sapphire Rapids, the first
# CPU with AMX): its vector features, which a CPU must show to run that code.
AMX_TARGET_FLAGS = ("amx_tile", "amx_bf16", "avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl",
                    "avx512ifma", "avx512vbmi", "avx512_vbmi2", "avx512_vnni", "avx512_bitalg",
                    "avx512_vpopcntdq", "avx512_bf16", "avx512_fp16", "avx_vnni", "gfni", "vaes", "vpclmulqdq")


def missing_flags(flags: tuple[str, ...]) -> list[str]:
    """The instruction-set flags of `flags` this CPU lacks (all of them off x86)."""
    have = set(cpu_fields().get("flags", "").split())
    return [f for f in flags if f not in have]
