"""What the controller knows about live traffic and resource use, for status, /metrics
and the autoscaler.

Gateway workers report, with every sync, per instance: the requests that finished,
how many failed (5xx or no response) and a latency histogram (`controller.latency`).
The usage sampler (`controller.usage`) stores each instance's latest CPU, memory and
GPU use. Everything is held in memory by the controller process (one writer, under
the controller's lock) and shown over a sliding window.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from controller.history import MinuteSeries
from controller.latency import SlidingWindow, Slot
from controller.store import MinuteRow

WINDOW_S = 60.0


@dataclass(frozen=True)
class Usage:
    """One instance's resource use at `at`; None = not measured (no limit to compare with, no NVML)."""
    at: float
    cpu_pct: float | None = None  # of its CPU limit (resources.cpu cores; 1 core for local without one)
    mem_pct: float | None = None  # of its memory limit (resources.memoryGb)
    mem_bytes: float | None = None
    gpu_pct: float | None = None  # NVML utilization of its GPUs, averaged
    gpu_mem_mb: float | None = None  # GPU memory its processes hold, summed over its GPUs


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(sum(vals) / len(vals), 2) if vals else None


class Traffic:
    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self.by_instance: dict[str, SlidingWindow] = {}
        self.by_deployment: dict[str, SlidingWindow] = {}
        # Finished requests per deployment since the controller started; the autoscaler
        # takes differences ("requests since my last sample").
        self.requests_total: dict[str, int] = {}
        self.usage: dict[str, Usage] = {}
        self.minutes: dict[str, MinuteSeries] = {}  # an hour of per-minute samples, for the dashboard
        self._unsaved: set[tuple[str, int]] = set()  # (deployment, minute) changed since `unsaved_minutes`

    def observe(self, now: float, report: Mapping[str, Mapping[str, Any]]) -> None:
        """One worker's report: instance id -> {"d": deployment, "n": count, "e": errors, "h": histogram}."""
        for iid, m in report.items():
            dep = str(m.get("d") or "")
            n, e, hist = int(m.get("n", 0)), int(m.get("e", 0)), m.get("h") or {}
            if n <= 0:
                continue
            self.by_instance.setdefault(iid, SlidingWindow(self.window_s, now)).add(now, n, e, hist)
            if dep:
                self.by_deployment.setdefault(dep, SlidingWindow(self.window_s, now)).add(now, n, e, hist)
                self.requests_total[dep] = self.requests_total.get(dep, 0) + n
                minute = self.minutes.setdefault(dep, MinuteSeries()).add(now, n, e, hist)
                self._unsaved.add((dep, minute))

    def unsaved_minutes(self) -> list[MinuteRow]:
        """The chart minutes changed since the last call, for the store (the controller saves
        them every few seconds, so a restart keeps the charts)."""
        rows = []
        for dep, minute in sorted(self._unsaved):
            series = self.minutes.get(dep)
            slot = series.slot(minute) if series else None
            if slot is not None:
                rows.append(MinuteRow(dep, minute, slot.count, slot.errors, {str(k): v for k, v in slot.hist.items()}))
        self._unsaved.clear()
        return rows

    def restore_minutes(self, rows: list[MinuteRow]) -> None:
        """Chart history saved before a restart."""
        by_dep: dict[str, list[Slot]] = {}
        for r in rows:
            by_dep.setdefault(r.deployment, []).append(
                Slot(r.minute, r.requests, r.errors, {int(k): int(v) for k, v in r.hist.items()}))
        for dep, slots in by_dep.items():
            self.minutes.setdefault(dep, MinuteSeries()).restore(slots)

    def set_usage(self, instance_id: str, usage: Usage) -> None:
        self.usage[instance_id] = usage

    def forget(self, live_instances: set[str], live_deployments: set[str]) -> None:
        for iid in [i for i in self.by_instance if i not in live_instances]:
            del self.by_instance[iid]
        for iid in [i for i in self.usage if i not in live_instances]:
            del self.usage[iid]
        for dep in [d for d in self.by_deployment if d not in live_deployments]:
            del self.by_deployment[dep]
            self.requests_total.pop(dep, None)
            self.minutes.pop(dep, None)

    def _window(self, w: SlidingWindow | None, now: float) -> dict[str, Any]:
        if w is None:
            return {"window_s": self.window_s, "requests": 0, "requests_per_s": 0.0, "errors": 0,
                    "error_rate": 0.0, "latency_ms": {"p50": None, "p95": None, "p99": None}}
        v = w.view(now)
        return {"window_s": self.window_s, "requests": v.count, "requests_per_s": round(v.rate, 3),
                "errors": v.errors, "error_rate": round(v.error_rate, 4), "latency_ms": v.quantiles_ms()}

    def history(self, name: str, now: float) -> list[dict[str, Any]]:
        series = self.minutes.get(name)
        return (series or MinuteSeries()).samples(now)

    def instance_metrics(self, instance_id: str, in_flight: int, now: float) -> dict[str, Any]:
        out = self._window(self.by_instance.get(instance_id), now)
        u = self.usage.get(instance_id)
        out.update({"in_flight": in_flight,
                    "cpu_pct": None if u is None or u.cpu_pct is None else round(u.cpu_pct, 2),
                    "mem_pct": None if u is None or u.mem_pct is None else round(u.mem_pct, 2),
                    "mem_bytes": None if u is None else u.mem_bytes,
                    "gpu_pct": None if u is None else u.gpu_pct,
                    "gpu_mem_mb": None if u is None else u.gpu_mem_mb})
        return out

    def deployment_metrics(self, name: str, instance_ids: list[str], in_flight: int,
                           now: float) -> dict[str, Any]:
        """Window over every request of the deployment (instances gone since included);
        resource use averaged over its current instances."""
        out = self._window(self.by_deployment.get(name), now)
        usages = [self.usage[i] for i in instance_ids if i in self.usage]
        mem = [u.mem_bytes for u in usages if u.mem_bytes is not None]
        out.update({"in_flight": in_flight,
                    "cpu_pct": _mean(u.cpu_pct for u in usages),
                    "mem_pct": _mean(u.mem_pct for u in usages),
                    "mem_bytes": sum(mem) if mem else None,
                    "gpu_pct": _mean(u.gpu_pct for u in usages)})
        return out
