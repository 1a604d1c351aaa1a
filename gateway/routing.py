"""A gateway worker's view of the controller: the routing snapshot, in-flight counts,
activity reports, and the capacity requests it forwards to the controller.

The hot path (a ready instance exists) touches only local memory; the controller is
asked only for cold starts, scale-out, and instances not in the snapshot.
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from dataclasses import dataclass, replace

from controller import errors
from controller.contracts import EMPTY_SNAPSHOT, Acquire, Address, RouteEntry, Snapshot, Sync, Unreachable
from controller.errors import AutoDeployError
from controller.ipc import IpcClient
from controller.latency import bucket_of
from controller.policy.capacity import RANDOM, ROUND_ROBIN, SCALE_OUT
from gateway.balancer import RequestKey, choose
from gateway.counters import SharedCounters
from gateway.split import split_ready
from gateway.inflight import SharedInflight
from gateway.metrics import GatewayMetrics
from gateway.outliers import Outliers

log = logging.getLogger("autodeploy.gateway")

SYNC_WAIT_S = 0.25


_UNKNOWN = RouteEntry(ready=())  # the defaults, for a deployment this snapshot does not know


@dataclass(frozen=True)
class Target:
    id: str
    host: str
    port: int
    revision: int | str
    slot: int = -1  # column in the shared in-flight counters
    deployment: str = ""
    cold: bool = False  # handed out by the controller (a start may have waited for this request)


def _target(a: Address) -> Target:
    return Target(a.id, a.host, a.port, a.revision, a.slot, a.deployment)


class Lease:
    """One request counted in flight on one instance, released exactly once on every path.

    Like Knative's lbPolicy, which hands back a release callback with the pick: the count
    must come down whatever happens (an exception, a client that went away, a retry
    elsewhere), or the instance looks busy forever and is never released for idleness."""

    __slots__ = ("router", "target", "started", "_open")

    def __init__(self, router: "Router", target: Target, started: float) -> None:
        self.router, self.target, self.started = router, target, started
        self._open = True

    @property
    def open(self) -> bool:
        return self._open

    def done(self, ok: bool, status: int | None = None) -> None:
        """The request is over: `status` is the upstream's (None: no response at all)."""
        if self._open:
            self._open = False
            self.router.done(self.target, ok=ok, status=status, started=self.started)

    def unreachable(self) -> None:
        """Nothing reached the instance (connect refused): released, and the instance reported."""
        if self._open:
            self._open = False
            self.router.unreachable(self.target)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.done(ok=False)


class Router:
    def __init__(self, ipc: IpcClient, counters: SharedCounters, acquire_timeout: float,
                 inflight: SharedInflight | None = None, metrics: GatewayMetrics | None = None) -> None:
        self.ipc = ipc
        self.counters = counters
        self.acquire_timeout = acquire_timeout
        self.shared_inflight = inflight
        self.metrics = metrics
        self.outliers = Outliers(on_eject=self._ejected)
        # id -> {"d": deployment, "n": finished, "e": failed, "h": latency histogram}, sent with each sync
        self._report: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._snapshot: Snapshot = EMPTY_SNAPSHOT
        self._inflight: dict[str, int] = {}
        self._activity: dict[str, list[float]] = {}  # id -> [last_done, served, errors]
        self._rand = random.Random()
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._thread = threading.Thread(target=self._sync_loop, daemon=True, name="sync")
        self._thread.start()

    # ------------------------------------------------------------------ sync with the controller
    def _sync_loop(self) -> None:
        pid = os.getpid()
        while not self._stop.is_set():
            with self._lock:
                version = self._snapshot.version
                inflight = {k: v for k, v in self._inflight.items() if v}
                activity, self._activity = self._activity, {}
                report, self._report = self._report, {}
            try:
                reply = self.ipc.request(Sync(worker=pid, version=version, inflight=inflight, activity=activity,
                                              wait=SYNC_WAIT_S if version else 0, metrics=report))
            except AutoDeployError as exc:
                log.warning("sync with controller failed: %s", exc.message)
                with self._lock:  # keep the activity for the next report
                    for k, v in activity.items():
                        self._merge_activity(k, v)
                    for k, m in report.items():
                        self._merge_report(k, m)
                self._stop.wait(0.2)
                continue
            snapshot = reply.snapshot
            if snapshot is not None:  # decoded once per version (controller.contracts)
                with self._lock:
                    self._snapshot = snapshot
                self.outliers.forget(r.id for d in snapshot.deployments.values() for r in d.ready)
                self._synced.set()

    def _merge_activity(self, iid: str, v: list[float]) -> None:
        cur = self._activity.setdefault(iid, [0.0, 0, 0])
        cur[0] = max(cur[0], v[0])
        cur[1] += v[1]
        cur[2] += v[2]

    def _merge_report(self, iid: str, m: dict) -> None:
        cur = self._report.setdefault(iid, {"d": m["d"], "n": 0, "e": 0, "h": {}})
        cur["n"] += m["n"]
        cur["e"] += m["e"]
        for b, n in m["h"].items():
            cur["h"][b] = cur["h"].get(b, 0) + n

    def _ejected(self, instance_id: str) -> None:
        if self.metrics is not None:
            self.metrics.ejected(self._deployment_of(instance_id), instance_id)

    def _deployment_of(self, instance_id: str) -> str:
        for name, dep in self._snapshot.deployments.items():
            if any(r.id == instance_id for r in dep.ready):
                return name
        return ""

    def known(self, name: str) -> bool:
        return name in self._snapshot.deployments

    def access(self, name: str) -> tuple[str, dict[str, bool]]:
        """spec.access of a deployment and its endpoint keys (hash -> may scale out), from the
        snapshot. Unknown: 1001 (the worker routes nothing it has no entry for, so a
        deployment is never reached before its access rule is known here)."""
        if not self._synced.is_set():
            self.wait_synced(5.0)
        dep = self._snapshot.deployments.get(name)
        if dep is None:
            self.deployment(name)  # raises 1011 before the first sync, else 1001
        assert dep is not None
        return dep.access, dep.keys

    def sticky(self, name: str) -> bool:
        """stickySessions of a deployment (False once it is gone from the snapshot)."""
        dep = self._snapshot.deployments.get(name)
        return dep is not None and dep.sticky

    def protocol(self, name: str) -> str:
        """spec.protocol of a deployment ("http" for one this snapshot does not know)."""
        return self._snapshot.deployments.get(name, _UNKNOWN).protocol

    def tunnel_bounds(self, name: str) -> tuple[float, float]:
        """(spec.tunnelTimeout, spec.tunnelIdleTimeout) of a deployment, in seconds."""
        dep = self._snapshot.deployments.get(name, _UNKNOWN)
        return dep.tunnel_timeout, dep.tunnel_idle_timeout

    def wait_synced(self, timeout: float) -> bool:
        return self._synced.wait(timeout)

    def close(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ picking
    def deployment(self, name: str) -> RouteEntry:
        dep = self._snapshot.deployments.get(name)
        if dep is None:
            if not self._synced.is_set():
                raise AutoDeployError(errors.CONTROLLER_UNAVAILABLE, "no routing table from the controller yet",
                                      retry_after=1.0)
            raise AutoDeployError(errors.UNKNOWN_DEPLOYMENT, f"no deployment named {name!r}")
        if dep.state == "stopped":
            raise AutoDeployError(errors.DEPLOYMENT_STOPPED, f"{name} is stopped")
        return dep

    def acquire(self, name: str, rule: str | None, key: RequestKey = RequestKey(),
                avoid: frozenset[str] = frozenset()) -> Target:
        """Pick an instance and count the request in flight on it (call `done` after).

        `avoid`: instances this request already failed on (a retry goes elsewhere when it can)."""
        if not self._synced.is_set():
            self.wait_synced(5.0)
        with self._lock:
            dep = self.deployment(name)
            target = self._pick_local(dep, rule, key, avoid)
            if target is not None:
                self._count_in(target)
                return target
        reply = self.ipc.request(Acquire(deployment=name, rule=rule, timeout=self.acquire_timeout))
        target = replace(_target(reply.instance), cold=True)
        with self._lock:
            self._count_in(target)
        return target

    def lease(self, name: str, rule: str | None, key: RequestKey = RequestKey(),
              avoid: frozenset[str] = frozenset(), started: float | None = None) -> Lease:
        """`acquire`, with its release bound to the returned lease."""
        target = self.acquire(name, rule, key, avoid)
        return Lease(self, target, time.monotonic() if started is None else started)

    def request_timeout(self, name: str) -> float:
        """spec.requestTimeout of a deployment: how long an instance has to send its headers."""
        return self._snapshot.deployments.get(name, _UNKNOWN).request_timeout

    def _count_in(self, target: Target) -> None:
        self._inflight[target.id] = self._inflight.get(target.id, 0) + 1
        if self.shared_inflight is not None:
            self.shared_inflight.add(target.slot, 1)
        if self.metrics is not None:
            self.metrics.started(target.deployment, target.id)

    def _count_out(self, target: Target) -> None:
        self._inflight[target.id] = self._inflight.get(target.id, 1) - 1
        if self.shared_inflight is not None:
            self.shared_inflight.add(target.slot, -1)
        if self.metrics is not None:
            self.metrics.finished(target.deployment, target.id)

    def _pick_local(self, dep: RouteEntry, rule: str | None, key: RequestKey = RequestKey(),
                    avoid: frozenset[str] = frozenset()) -> Target | None:
        ready = [r for r in dep.ready if r.id not in avoid] if avoid else dep.ready
        if rule == SCALE_OUT or not ready:
            return None
        if rule is not None and rule not in (RANDOM, ROUND_ROBIN):
            chosen = next((r for r in ready if r.id == rule), None)  # an instance id: ejected or not
            return None if chosen is None else _target(chosen)
        out = self.outliers.ejected()
        routable = [r for r in ready if r.id not in out] if out else ready
        routable = routable or ready  # all ejected: a bad instance beats none
        if dep.split is not None:  # a rollout is moving traffic between revisions
            routable = split_ready(dep.split, routable, self.counters.next)
        if rule == RANDOM:
            chosen = self._rand.choice(routable)
        elif rule == ROUND_ROBIN:
            chosen = routable[self.counters.next(dep.rr_slot) % len(routable)]
        else:
            chosen = choose(dep, routable, key, inflight=self._shared_count, rr_next=self.counters.next,
                            rand=self._rand)
        return _target(chosen)

    def _shared_count(self, addr: Address) -> int:
        if self.shared_inflight is None:
            return self._inflight.get(addr.id, 0)
        return self.shared_inflight.count(addr.slot)

    def done(self, target: Target, ok: bool, status: int | None = None, started: float | None = None) -> None:
        """The request on `target` is over: `status` is the upstream's (None: no response at all)."""
        elapsed = None if started is None else time.monotonic() - started
        with self._lock:
            self._count_out(target)
            self._merge_activity(target.id, [time.time(), 1, 0 if ok else 1])
            rep = self._report.get(target.id)
            if rep is None:
                rep = self._report[target.id] = {"d": target.deployment, "n": 0, "e": 0, "h": {}}
            rep["n"] += 1
            rep["e"] += 0 if ok else 1
            if elapsed is not None:
                b = bucket_of(elapsed * 1000.0)
                rep["h"][b] = rep["h"].get(b, 0) + 1
            total = len(self._snapshot.deployments.get(target.deployment, _UNKNOWN).ready) or 1
        # A response that broke off, or no response after a retry, counts like a 5xx; only a
        # connection that never opened (`unreachable`) counts as a connect failure.
        self.outliers.record(target.id, (status or 200) if ok else max(status or 502, 500), total)
        if self.metrics is not None:
            self.metrics.response(target.deployment, target.id, status, elapsed)

    def unreachable(self, target: Target) -> None:
        with self._lock:
            self._count_out(target)
            total = len(self._snapshot.deployments.get(target.deployment, _UNKNOWN).ready) or 1
        self.outliers.record(target.id, None, total)
        if self.metrics is not None:
            self.metrics.upstream_failure(target.deployment, target.id, "connect")
        with self._lock:  # stop routing to it from this worker at once (same version: a local copy)
            snap = self._snapshot
            if any(r.id == target.id for d in snap.deployments.values() for r in d.ready):
                self._snapshot = Snapshot(snap.version, {
                    name: replace(d, ready=tuple(r for r in d.ready if r.id != target.id)) if any(
                        r.id == target.id for r in d.ready) else d for name, d in snap.deployments.items()})
        try:
            self.ipc.request(Unreachable(instance=target.id))
        except AutoDeployError as exc:
            log.warning("could not report unreachable %s: %s", target.id, exc.message)
