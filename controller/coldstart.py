"""Cold-start explain: where the time of every instance start went.

Each start is cut into phases, each ending at a mark taken by the controller:

  queue       the first waiting request arrived -> the controller decided to start
  placement   -> GPUs placed
  create      -> the driver started the process / container
  port        -> the port accepts connections
  health      -> the health path answers 2xx (0 without a health path)
  first_byte  -> the gateway got the first response byte for the waiting request

`queue` and `first_byte` exist only for starts a request waited for (a cold start);
starts for minReplicas, scale-out or the autoscaler end at `health`. Recent starts
are shown by `autodeploy describe` and the dashboard; every phase and the total go
into a histogram for `/metrics` (`autodeploy_cold_start_phase_seconds`).
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

PHASES = ("queue", "placement", "create", "port", "health", "first_byte")
WORDS = {"queue": "queued for capacity", "placement": "placing on GPUs", "create": "starting the process",
         "port": "waiting for the port to open", "health": "waiting for the health path",
         "first_byte": "waiting for the first response byte"}
BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
RECENT = 20  # finished starts kept per deployment
FIRST_BYTE_WAIT_S = 60.0  # a ready instance whose waiting request never reported is closed after this


@dataclass
class StartRecord:
    instance: str
    deployment: str
    reason: str
    requested_at: float
    want_first_byte: bool
    marks: dict[str, float] = field(default_factory=dict)
    outcome: str | None = None  # ready | served | failed | cancelled
    finished_at: float | None = None

    def current(self) -> str | None:
        if self.outcome is not None:
            return None
        for p in PHASES:
            if p == "first_byte" and not self.want_first_byte:
                return None
            if p not in self.marks:
                return p
        return None

    def phase_ms(self) -> list[tuple[str, float]]:
        out, prev = [], self.requested_at
        for p in PHASES:
            at = self.marks.get(p)
            if at is None:
                continue
            out.append((p, max(0.0, (at - prev) * 1000.0)))
            prev = at
        return out

    def total_ms(self) -> float | None:
        if not self.marks:
            return None
        return max(0.0, (max(self.marks.values()) - self.requested_at) * 1000.0)

    def to_json(self, now: float) -> dict[str, Any]:
        current = self.current()
        return {"instance": self.instance, "reason": self.reason, "requested_at": self.requested_at,
                "cold": self.want_first_byte, "outcome": self.outcome, "current": current,
                "current_words": WORDS.get(current or "", None),
                "current_for_ms": round((now - max([self.requested_at, *self.marks.values()])) * 1000.0, 1)
                if current else None,
                "phases": [{"phase": p, "ms": round(ms, 3)} for p, ms in self.phase_ms()],
                "total_ms": None if self.total_ms() is None else round(self.total_ms() or 0.0, 3)}


class _Hist:
    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS_S) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        i = 0
        while i < len(BUCKETS_S) and seconds > BUCKETS_S[i]:
            i += 1
        self.counts[i] += 1
        self.sum += seconds
        self.count += 1


class ColdStarts:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.live: dict[str, StartRecord] = {}
        self.recent: dict[str, deque[StartRecord]] = {}
        self.hist: dict[tuple[str, str], _Hist] = {}

    def begin(self, instance: str, deployment: str, reason: str, queued_since: float | None, now: float) -> None:
        with self._lock:
            rec = StartRecord(instance, deployment, reason, queued_since if queued_since is not None else now,
                              want_first_byte=queued_since is not None)
            self.live[instance] = rec
            self._mark(rec, "queue", now)

    def mark(self, instance: str, phase: str, at: float) -> None:
        with self._lock:
            rec = self.live.get(instance)
            if rec is not None and rec.outcome is None:
                self._mark(rec, phase, at)

    def ready(self, instance: str, at: float) -> None:
        with self._lock:
            rec = self.live.get(instance)
            if rec is None or rec.outcome is not None:
                return
            for p in ("placement", "create", "port", "health"):
                self._mark(rec, p, at)
            if not rec.want_first_byte:
                self._finish(rec, "ready", at)

    def first_byte(self, instance: str, at: float) -> bool:
        """The gateway's report for a request that waited on `instance`; False when no start waits for one."""
        with self._lock:
            rec = self.live.get(instance)
            if rec is None or rec.outcome is not None or not rec.want_first_byte or "health" not in rec.marks:
                return False
            self._mark(rec, "first_byte", max(at, rec.marks["health"]))
            self._finish(rec, "served", at)
            return True

    def failed(self, instance: str, at: float) -> None:
        with self._lock:
            rec = self.live.get(instance)
            if rec is not None and rec.outcome is None:
                self._finish(rec, "failed", at)

    def expire(self, now: float) -> None:
        """Close ready starts whose first byte never came (the waiting request gave up)."""
        with self._lock:
            for rec in list(self.live.values()):
                if rec.outcome is None and "health" in rec.marks and now - rec.marks["health"] > FIRST_BYTE_WAIT_S:
                    self._finish(rec, "ready", rec.marks["health"])

    def forget(self, live_instances: set[str], live_deployments: set[str], now: float | None = None) -> None:
        with self._lock:
            for iid in [i for i in self.live if i not in live_instances]:
                rec = self.live.pop(iid)
                if rec.outcome is None:  # stopped while starting (shutdown, removal): not a start time
                    rec.outcome, rec.finished_at = "cancelled", now if now is not None else rec.requested_at
                    self.recent.setdefault(rec.deployment, deque(maxlen=RECENT)).append(rec)
            for dep in [d for d in self.recent if d not in live_deployments]:
                del self.recent[dep]
            for key in [k for k in self.hist if k[0] not in live_deployments]:
                del self.hist[key]

    def of(self, instance: str, now: float) -> dict[str, Any] | None:
        with self._lock:
            rec = self.live.get(instance)
            return None if rec is None else rec.to_json(now)

    def recent_of(self, deployment: str, now: float, limit: int = 5) -> list[dict[str, Any]]:
        with self._lock:
            return [r.to_json(now) for r in list(self.recent.get(deployment, ()))[-limit:]][::-1]

    def slowest_since(self, deployment: str, since: float) -> float | None:
        """ms of the slowest successful start that finished at or after `since`."""
        with self._lock:
            totals = [r.total_ms() for r in self.recent.get(deployment, ())
                      if r.outcome in ("ready", "served") and (r.finished_at or 0) >= since]
        vals = [t for t in totals if t is not None]
        return max(vals) if vals else None

    def histograms(self) -> dict[str, Any]:
        """Cumulative bucket counts per (deployment, phase), the shape /metrics renders."""
        with self._lock:
            series = []
            for (dep, phase), h in sorted(self.hist.items()):
                cumulative, acc = [], 0
                for n in h.counts:
                    acc += n
                    cumulative.append(acc)
                series.append({"deployment": dep, "phase": phase, "cumulative": cumulative,
                               "sum": round(h.sum, 6), "count": h.count})
        return {"buckets": list(BUCKETS_S), "series": series}

    # -- with the lock held
    def _mark(self, rec: StartRecord, phase: str, at: float) -> None:
        if phase in rec.marks:
            return
        before = [rec.requested_at] + [rec.marks[p] for p in PHASES[:PHASES.index(phase)] if p in rec.marks]
        at = max(at, max(before))
        rec.marks[phase] = at
        self.hist.setdefault((rec.deployment, phase), _Hist()).observe(at - max(before))

    def _finish(self, rec: StartRecord, outcome: str, at: float) -> None:
        rec.outcome, rec.finished_at = outcome, at
        if outcome != "failed":
            total = rec.total_ms()
            if total is not None:
                self.hist.setdefault((rec.deployment, "total"), _Hist()).observe(total / 1000.0)
        self.recent.setdefault(rec.deployment, deque(maxlen=RECENT)).append(rec)
