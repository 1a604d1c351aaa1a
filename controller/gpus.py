"""The GPU inventory: what GPUs this host has, from NVML or else from the stack config.

NVML is the truth where it exists. Where it does not (development machines, CI), the
controller places instances on the GPUs the stack config declares, and every listing
says which of the two it used, so a fake GPU is never mistaken for a real one.
"""
from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any

import pynvml

from controller.inventory import Gpu, Inventory

__all__ = ["Gpu", "Inventory", "NvmlGpuSource", "discover_inventory", "format_inventory"]

if TYPE_CHECKING:
    from controller.stack import StackConfig

_MIB = 1024 * 1024  # NVML counts bytes; we show MiB like nvidia-smi does.


def _text(value: str | bytes) -> str:
    # Old pynvml releases return bytes.
    return value.decode() if isinstance(value, bytes) else value


class NvmlGpuSource:
    """Reads GPUs through NVML. `nvml` is the pynvml module, or one with its interface.

    NVML is initialised once, on first use, and released by `close()`.
    """

    def __init__(self, nvml: Any = pynvml) -> None:
        self._nvml = nvml
        self._initialized = False
        self.unavailable_reason: str | None = None

    def available(self) -> bool:
        """Whether NVML answers here; when not, `unavailable_reason` says why."""
        if self._initialized:
            return True
        try:
            self._nvml.nvmlInit()
        except self._nvml.NVMLError as exc:  # NVMLError_LibraryNotFound is one of these
            self.unavailable_reason = f"NVML unavailable: {exc}"
            return False
        self._initialized = True
        self.unavailable_reason = None
        return True

    def _ensure(self) -> None:
        if not self._initialized:
            self._nvml.nvmlInit()
            self._initialized = True

    def close(self) -> None:
        if self._initialized:
            self._initialized = False
            self._nvml.nvmlShutdown()

    def __enter__(self) -> "NvmlGpuSource":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _utilization_of(self, handle: Any) -> int | None:
        try:
            return int(self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except self._nvml.NVMLError_NotSupported:
            # MIG instances and some boards do not report it; None reads as "unknown".
            return None

    def list(self) -> list[Gpu]:
        self._ensure()
        nvml = self._nvml
        gpus: list[Gpu] = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(Gpu(
                index=index,
                uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                name=_text(nvml.nvmlDeviceGetName(handle)),
                memory_total_mb=int(memory.total) // _MIB,
                memory_used_mb=int(memory.used) // _MIB,
                utilization_pct=self._utilization_of(handle)))
        return gpus

    def process_usage(self, pid: int, *more_pids: int) -> dict[str, int | None]:
        """GPU uuid -> MiB used by these processes, for every GPU they use.

        Pass the children too when the instance is a shell wrapping the model process:
        NVML reports the process that opened the device. None means NVML knows the GPU
        is used but cannot tell how much (it says so on some drivers).
        """
        self._ensure()
        nvml = self._nvml
        wanted = {pid, *more_pids}
        usage: dict[str, int | None] = {}
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            uuid: str | None = None
            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid not in wanted:
                    continue
                uuid = uuid or _text(nvml.nvmlDeviceGetUUID(handle))
                used = proc.usedGpuMemory
                if used is None or usage.get(uuid, 0) is None:
                    usage[uuid] = None
                else:
                    usage[uuid] = (usage.get(uuid) or 0) + int(used) // _MIB
        return usage

    def utilization(self, uuid: str) -> int | None:
        """GPU busy percent, or None for a GPU NVML does not know or cannot measure."""
        self._ensure()
        try:
            handle = self._nvml.nvmlDeviceGetHandleByUUID(uuid)
        except (self._nvml.NVMLError_NotFound, self._nvml.NVMLError_InvalidArgument):
            # e.g. "declared-0": a stack-config GPU has no NVML counterpart.
            return None
        return self._utilization_of(handle)


def _declared(stack: StackConfig) -> list[Gpu]:
    return [Gpu(index=g.index, uuid=g.uuid or f"declared-{g.index}", name=g.name,
                memory_total_mb=g.memory_mb or 0)
            for g in sorted(stack.gpus, key=lambda g: g.index)]


def discover_inventory(stack: StackConfig, nvml: NvmlGpuSource | None = None) -> Inventory:
    """NVML's GPUs when NVML answers, else the GPUs the stack config declares.

    A source passed in stays open (the caller owns it); one made here is closed.
    """
    source = nvml if nvml is not None else NvmlGpuSource()
    try:
        if source.available():
            gpus = source.list()
            detail = (f"{len(stack.gpus)} GPU(s) declared in {stack.source} are not used"
                      if stack.gpus else "")
            return Inventory(gpus, "nvml", detail)
        reason = source.unavailable_reason or "NVML unavailable"
    finally:
        if nvml is None:
            source.close()
    if stack.gpus:
        return Inventory(_declared(stack), f"stack config {stack.source}", reason)
    return Inventory([], "none", f"{reason}; {stack.source} declares no autodeploy:gpus")


def _memory(gpu: Gpu) -> str:
    if gpu.memory_total_mb <= 0:
        return "-"
    if gpu.memory_used_mb is None:
        return f"{gpu.memory_total_mb} MiB"
    return f"{gpu.memory_used_mb} / {gpu.memory_total_mb} MiB"


def format_inventory(inv: Inventory) -> str:
    """The table `autodeploy gpus` prints."""
    head = f"source: {inv.source}" + (f" ({inv.detail})" if inv.detail else "")
    if not inv.gpus:
        return f"{head}\nno GPUs"
    rows = [("INDEX", "UUID", "NAME", "MEMORY", "UTIL")]
    rows += [(str(g.index), g.uuid, g.name, _memory(g),
              "-" if g.utilization_pct is None else f"{g.utilization_pct}%") for g in inv.gpus]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join([head, *lines])
