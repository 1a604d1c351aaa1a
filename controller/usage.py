"""Resource use per instance: CPU and memory from the driver (psutil for local
processes, the Engine's stats for containers), GPU utilization from NVML.

Sampled in a background thread, never in the reconcile pass or on a request: the
Engine's stats take a second or two per container. Each instance is sampled by at
most one pool thread at a time; results land in `Traffic.usage` for the
autoscaler, the status API and /metrics.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Mapping

import psutil

from controller.background import PeriodicPass
from controller.errors import AutoDeployError
from controller.fleet import DRAINING, READY, Fleet
from controller.spec import Resources
from controller.traffic import Traffic, Usage

if TYPE_CHECKING:
    from controller.drivers.base import Instance
    from controller.gpus import NvmlGpuSource

log = logging.getLogger("autodeploy.usage")

PERIOD_S = 1.0
_GIB = 1024 ** 3


def usage_of(raw: Mapping[str, float], resources: Resources, gpu_pcts: list[int | None], now: float) -> Usage:
    """Turn a driver's stats and NVML readings into percentages of the instance's limits.

    `cpu_cores` (local driver) is divided by `resources.cpu` (1 core when unset);
    `cpu_pct` (docker: already of the container's limit) is taken as is. Memory is a
    percentage of `memoryGb` unless the driver measured it against a real limit.
    """
    cpu: float | None
    if "cpu_cores" in raw:
        cpu = 100.0 * raw["cpu_cores"] / (resources.cpu or 1.0)
    else:
        cpu = raw.get("cpu_pct")
    mem_bytes = raw.get("mem_bytes")
    mem: float | None = raw.get("mem_pct")
    if mem is None and mem_bytes is not None and resources.memory_gb:
        mem = 100.0 * mem_bytes / (resources.memory_gb * _GIB)
    gpus = [g for g in gpu_pcts if g is not None]
    return Usage(at=now, cpu_pct=cpu, mem_pct=mem, mem_bytes=mem_bytes,
                 gpu_pct=sum(gpus) / len(gpus) if gpus else None)


class UsageSampler(PeriodicPass):
    name = "usage"

    def __init__(self, fleet: Fleet, traffic: Traffic, nvml: "NvmlGpuSource | None", period_s: float = PERIOD_S,
                 clock: Callable[[], float] = time.time, max_parallel: int = 8) -> None:
        super().__init__(period_s, max_parallel)
        self.fleet = fleet
        self.traffic = traffic
        self.nvml = nvml
        self.clock = clock
        self._stats: Callable[[Instance], dict[str, float]] | None = getattr(fleet.driver, "stats", None)
        self._running: set[str] = set()
        self._lock = threading.Lock()

    def run_once(self) -> None:
        with self.fleet:
            targets = [(r.id, r.inst, rt.spec.resources, list(r.gpu_ids))
                       for rt in self.fleet.deps.values() for r in rt.instances.values()
                       if r.phase in (READY, DRAINING) and r.inst is not None]
        for iid, inst, resources, gpu_ids in targets:
            with self._lock:
                if iid in self._running:
                    continue
                self._running.add(iid)
            self._pool.submit(self._sample, iid, inst, resources, gpu_ids)

    def _gpu_memory(self, pid: int, gpu_ids: list[str]) -> float | None:
        """MiB of its GPUs that the instance's process tree holds (NVML lists the process
        that opened the device, usually a child of the shell the local driver starts)."""
        assert self.nvml is not None
        try:
            pids = [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]
            used = self.nvml.process_usage(*pids)
        except Exception as exc:  # noqa: BLE001 - psutil or NVML errors lose one reading, logged
            log.debug("GPU memory of pid %s unknown: %s", pid, exc)
            return None
        values = [v for uuid, v in used.items() if uuid in gpu_ids and v is not None]
        return float(sum(values)) if values else None

    def _sample(self, iid: str, inst: "Instance", resources: Resources, gpu_ids: list[str]) -> None:
        try:
            raw: dict[str, Any] = {}
            if self._stats is not None:
                try:
                    raw = self._stats(inst)
                except AutoDeployError as exc:
                    log.debug("no stats for %s: %s", iid, exc.message)
            gpu: list[int | None] = []
            if self.nvml is not None:
                for uuid in gpu_ids:
                    try:
                        gpu.append(self.nvml.utilization(uuid))
                    except Exception as exc:  # noqa: BLE001 - an NVML error loses one reading, logged
                        log.debug("NVML utilization of %s failed: %s", uuid, exc)
            usage = usage_of(raw, resources, gpu, self.clock())
            if self.nvml is not None and gpu_ids and inst.pid is not None:
                usage = replace(usage, gpu_mem_mb=self._gpu_memory(inst.pid, gpu_ids))
            with self.fleet:
                if self.fleet.find(iid) is not None:
                    self.traffic.set_usage(iid, usage)
        finally:
            with self._lock:
                self._running.discard(iid)
