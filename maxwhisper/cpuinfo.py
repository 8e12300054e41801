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


def has_amx() -> bool:
    """Whether this CPU multiplies bfloat16 tiles (Intel AMX)."""
    return {"amx_tile", "amx_bf16"} <= set(cpu_fields().get("flags", "").split())
