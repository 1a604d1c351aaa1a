"""GPUs as plain data: what a host has, and where that list came from.

No I/O here: `controller.gpus` reads NVML or the stack config into these, and the pure
placement policy (`controller.policy.placement`) decides over them.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    memory_total_mb: int  # MiB; 0 when a declared GPU leaves memoryMb out
    memory_used_mb: int | None = None
    utilization_pct: int | None = None


@dataclass
class Inventory:
    gpus: list[Gpu]
    source: str  # "nvml" | "stack config <file>" | "none"
    detail: str = ""  # why this source, e.g. why NVML was not used
