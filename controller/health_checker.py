"""Active health checks: GET `healthCheck.path` on every ready instance every
`intervalSeconds`, each with `timeoutSeconds`.

One failed check takes the instance out of routing at once (the snapshot and the
controller's own capacity decisions skip it); a passing check puts it back.
`failureThreshold` consecutive failures (`controller.policy.balance.health_update`)
stop it and start a replacement once it is gone, so the deployment keeps its size
without ever going over `maxReplicas`.

Checks run in a small thread pool so one hung instance does not delay the others;
results are applied under the fleet's lock, through its transitions.
"""
from __future__ import annotations

import http.client
import logging
import time
from dataclasses import dataclass
from typing import Callable

from controller.background import PeriodicPass
from controller.fleet import READY, Fleet, Rec
from controller.health import grpc_health, grpc_service
from controller.policy.balance import health_update
from controller.spec import HealthCheck

log = logging.getLogger("autodeploy.health")

LOOP_S = 0.1


@dataclass(frozen=True)
class Probe:
    ok: bool
    detail: str  # "HTTP 200", "HTTP 503", "timed out after 2 s", "connection refused"


def probe(host: str, port: int, path: str, timeout: float, protocol: str = "http") -> Probe:
    """One GET; 2xx and 3xx are healthy (the schema's contract). gRPC instances: one
    grpc.health.v1 Check of the service named by the path ("/" = the whole server)."""
    if protocol == "grpc":
        serving, detail = grpc_health(host, port, grpc_service(path), timeout)
        return Probe(bool(serving), detail)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": "autodeploy-health", "Connection": "close"})
        status = conn.getresponse().status
        return Probe(200 <= status < 400, f"HTTP {status}")
    except TimeoutError:
        return Probe(False, f"timed out after {timeout:g} s")
    except (OSError, http.client.HTTPException) as exc:
        return Probe(False, f"{type(exc).__name__}: {exc}".rstrip(": "))
    finally:
        conn.close()


@dataclass
class _Replacement:
    deployment: str
    old: str
    alive_before: int  # ready + starting when the failing instance was stopped


def next_check(last: float, interval_s: float) -> float:
    return last + interval_s


class HealthChecker(PeriodicPass):
    name = "health"

    def __init__(self, fleet: Fleet, clock: Callable[[], float] = time.time,
                 max_parallel: int = 8) -> None:
        super().__init__(LOOP_S, max_parallel)
        self.fleet = fleet
        self.clock = clock
        self._due: dict[str, float] = {}
        self._running: set[str] = set()
        self._pending: list[_Replacement] = []

    def run_once(self) -> None:
        """Start the checks that are due and the replacements that now fit."""
        now = self.clock()
        due: list[tuple[Rec, HealthCheck]] = []
        with self.fleet:
            live: set[str] = set()
            for rt in self.fleet.deps.values():
                hc = rt.spec.load_balancer.health_check
                for rec in rt.instances.values():
                    if rec.phase != READY or rec.inst is None or hc is None:
                        continue
                    live.add(rec.id)
                    first = next_check(rec.ready_at or now, hc.interval_s)
                    if rec.id not in self._running and now >= self._due.setdefault(rec.id, first):
                        self._running.add(rec.id)
                        due.append((rec, hc))
            for iid in [i for i in self._due if i not in live and i not in self._running]:
                del self._due[iid]
            self._replace(now)
        for rec, hc in due:
            self._pool.submit(self._check, rec, hc)

    def _check(self, rec: Rec, hc: HealthCheck) -> None:
        try:
            assert rec.inst is not None
            rt = self.fleet.deps.get(rec.deployment)
            protocol = rt.spec.protocol if rt is not None else "http"
            result = probe(rec.inst.host, rec.inst.port, hc.path, hc.timeout_s, protocol)
            self._apply(rec, hc, result)
        finally:
            with self.fleet:
                self._running.discard(rec.id)

    def _apply(self, rec: Rec, hc: HealthCheck, result: Probe) -> None:
        fleet = self.fleet
        with fleet:
            now = self.clock()
            self._due[rec.id] = next_check(now, hc.interval_s)
            if rec.phase != READY:
                return  # released or gone while the check ran
            failures, replace = health_update(rec.health_failures, result.ok, hc.failure_threshold)
            rec.health_failures = failures
            rt = fleet.deps.get(rec.deployment)
            grpc = rt is not None and rt.spec.protocol == "grpc"
            check = f"{'gRPC health Check(' + repr(grpc_service(hc.path)) + ')' if grpc else 'GET ' + hc.path}: " \
                    f"{result.detail}"
            if result.ok:
                if rec.unhealthy:
                    fleet.event(rec.deployment, "healthy", f"{check}; back in routing", rec.id)
                    fleet.set_health(rec, unhealthy=False)
                return
            if replace:
                rt = fleet.deps.get(rec.deployment)
                alive = 0 if rt is None else len(rt.alive())
                fleet.event(rec.deployment, "unhealthy", f"{check}; failed {failures} checks in a row "
                            f"(failureThreshold {hc.failure_threshold}): replacing it", rec.id)
                fleet.set_health(rec, unhealthy=True)
                fleet.stop(rec, f"replaced after {failures} failed health checks")
                if rt is not None and rt.serving():
                    self._pending.append(_Replacement(rec.deployment, rec.id, alive))
                return
            if not rec.unhealthy:
                fleet.event(rec.deployment, "unhealthy", f"{check}; out of routing "
                            f"({failures}/{hc.failure_threshold} before it is replaced)", rec.id)
                fleet.set_health(rec, unhealthy=True)

    def _replace(self, now: float) -> None:
        """Start replacements whose failing instance is gone (caller holds the lock)."""
        keep: list[_Replacement] = []
        for r in self._pending:
            rt = self.fleet.deps.get(r.deployment)
            if rt is None or not rt.serving():
                continue
            if r.old in rt.instances:
                keep.append(r)  # still stopping: it holds its slot (and its GPU) until gone
                continue
            if len(rt.alive()) >= r.alive_before or rt.holding() >= rt.spec.scaling.max_replicas:
                continue  # something else (minReplicas, a cold start) already replaced it
            if now < rt.backoff_until:
                keep.append(r)
                continue
            if self.fleet.try_start(rt, f"replacing unhealthy instance {r.old}", now) is None:
                keep.append(r)
        self._pending = keep
