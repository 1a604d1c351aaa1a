"""The autoscaler's mechanism: samples each autoscaled deployment's signals, asks the
pure policy (`controller.policy.autoscale.decide`) for a size, and turns a changed size
into instance starts and drains, each with an event that says why.

It runs inside `Controller.tick`, under the fleet's lock, so it is part of the
single writer: the same `maxReplicas` accounting as cold starts and scale-out.

Signals per sample:
  * concurrency: requests in flight on the deployment's instances, summed over every
    gateway worker's last report, plus requests held at the controller waiting for
    capacity (a cold start or a full deployment queues them there);
  * requests: requests that finished since the previous sample (short requests can
    start and end between two samples and are traffic too);
  * cpu / memory / gpu: the mean use per ready instance, from `controller.usage`
    (samples older than USAGE_FRESH_S are treated as missing).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import replace
from typing import Any, Callable

from controller.fleet import DRAINING, READY, DepRuntime, Fleet, Rec
from controller.policy.autoscale import (DrainCandidate, Sample, ScaleDecision, ScaleState, decide,
                                        scale_down_choice)
from controller.spec import Autoscaling
from controller.traffic import Traffic

USAGE_FRESH_S = 10.0


def sample_period(a: Autoscaling) -> float:
    """Seconds between samples: at least six per panic window, at most one a second."""
    return max(0.1, min(1.0, a.panic_window_s / 6.0))


def readable(d: ScaleDecision, now: float) -> str:
    """The policy's reason with its absolute panic deadline turned into time left."""
    until = d.state.panic_until
    prefix = f"panic until t={until:g}s" if until is not None else None
    if prefix is not None and d.reason.startswith(prefix):
        return f"panic ({until - now:.1f}s left)" + d.reason[len(prefix):]
    return d.reason


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


class Autoscaler:
    def __init__(self, fleet: Fleet, traffic: Traffic, owns: Callable[[str], bool] = lambda name: False) -> None:
        self.fleet = fleet
        self.traffic = traffic
        self.owns = owns  # True while a rollout owns the deployment's instance count
        self._samples: dict[str, deque[Sample]] = {}
        self._state: dict[str, ScaleState | None] = {}
        self._last_sample: dict[str, float] = {}
        self._seen_requests: dict[str, int] = {}
        self.last: dict[str, ScaleDecision] = {}

    def forget(self, name: str) -> None:
        for d in (self._samples, self._state, self._last_sample, self._seen_requests, self.last):
            d.pop(name, None)  # type: ignore[attr-defined]

    def step(self, inflight: dict[str, int], now: float) -> None:
        """One pass over every deployment (the caller holds the fleet's lock)."""
        for name, rt in list(self.fleet.deps.items()):
            a = rt.spec.scaling.autoscaling
            if rt.removed or rt.spec.state != "running" or not a.enabled:
                self.forget(name)
                continue
            if self.owns(name):
                continue  # a rollout in progress owns the instance count
            if now - self._last_sample.get(name, -math.inf) < sample_period(a):
                continue
            self._last_sample[name] = now
            sample = self._sample(rt, inflight, now)
            current = self._current(rt)
            if not current and sample.in_flight <= 0:
                # At zero with nothing waiting there is nothing to decide (a cold start is the
                # gateway's call). The next instance starts a fresh history: load remembered
                # from before an idle release is no reason to grow, and a first decision
                # counts running instances as just used.
                self._samples.pop(name, None)
                self._state.pop(name, None)
                continue
            samples = self._samples.setdefault(name, deque())
            samples.append(sample)
            while samples and samples[0].at <= now - a.stable_window_s:
                samples.popleft()
            d = decide(rt.spec.scaling, len(current), list(samples), now, self._state.get(name))
            d = replace(d, reason=readable(d, now))
            self._state[name], self.last[name] = d.state, d
            if d.replicas > len(current):
                self._grow(rt, len(current), d, now)
            elif d.replicas < len(current):
                self._shrink(rt, current, d, inflight)

    @staticmethod
    def _current(rt: DepRuntime) -> list[Rec]:
        return rt.alive()

    def _sample(self, rt: DepRuntime, inflight: dict[str, int], now: float) -> Sample:
        name = rt.spec.name
        serving = [r for r in rt.by_phase(READY) if not r.unhealthy]
        fresh = [u for r in serving
                 if (u := self.traffic.usage.get(r.id)) is not None and u.at > now - USAGE_FRESH_S]
        total = self.traffic.requests_total.get(name, 0)
        requests = max(0, total - self._seen_requests.get(name, total))
        self._seen_requests[name] = total
        in_flight = sum(inflight.get(r.id, 0) for r in rt.instances.values()) + rt.waiting
        return Sample(at=now, in_flight=float(in_flight),
                      cpu_pct=_mean([u.cpu_pct for u in fresh]), mem_pct=_mean([u.mem_pct for u in fresh]),
                      gpu_pct=_mean([u.gpu_pct for u in fresh]), ready=len(serving), requests=requests)

    def _grow(self, rt: DepRuntime, current: int, d: ScaleDecision, now: float) -> None:
        spec, fleet = rt.spec, self.fleet
        fleet.event(spec.name, "autoscale", f"{current} -> {d.replicas}: {d.reason}")
        why = f"autoscale {current} -> {d.replicas} ({d.signal or 'minReplicas'})"
        for _ in range(d.replicas - current):
            # An instance being released is warm: take it back before starting a new one.
            revivable = [r for r in rt.by_phase(DRAINING) if fleet.can_revive(rt, r)]
            if revivable:
                fleet.revive(revivable[-1], why)
                continue
            if rt.holding() >= spec.scaling.max_replicas or now < rt.backoff_until:
                break
            if fleet.try_start(rt, why, now) is None:
                break

    def _shrink(self, rt: DepRuntime, current: list[Rec], d: ScaleDecision,
                inflight: dict[str, int]) -> None:
        # Only ready instances are drained: one still starting may not have its process yet.
        ready = [DrainCandidate(r.id, r.unhealthy, inflight.get(r.id, 0), r.created)
                 for r in current if r.phase == READY]
        victims = [rt.instances[i] for i in scale_down_choice(ready, len(current) - d.replicas)]
        if not victims:
            return
        self.fleet.event(rt.spec.name, "autoscale", f"{len(current)} -> {len(current) - len(victims)}: {d.reason}")
        # A signal-driven scale-down must not be undone by the requests still finishing on
        # the instance; an idle release may be, when traffic comes back.
        revivable = d.signal is None
        for rec in victims:
            self.fleet.drain(rec, f"autoscale down to {len(current) - len(victims)}", revivable=revivable)

    def status(self, name: str, enabled: bool, now: float) -> dict[str, Any]:
        d = self.last.get(name)
        if not enabled:
            return {"enabled": False}
        if d is None:
            return {"enabled": True, "desired": None, "reason": "no sample yet"}
        panic_until = d.state.panic_until
        return {"enabled": True, "desired": d.replicas, "reason": d.reason, "signal": d.signal,
                "panic": panic_until is not None and now < panic_until,
                "values": {k: round(v, 3) for k, v in d.values.items() if math.isfinite(v)}}
