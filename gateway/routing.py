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
from dataclasses import dataclass

from controller import errors
from controller.errors import AutoDeployError
from controller.ipc import IpcClient
from controller.policy.capacity import RANDOM, ROUND_ROBIN, SCALE_OUT
from gateway.counters import SharedCounters

log = logging.getLogger("autodeploy.gateway")

SYNC_WAIT_S = 0.25


@dataclass(frozen=True)
class Target:
    id: str
    host: str
    port: int
    revision: int | str


class Router:
    def __init__(self, ipc: IpcClient, counters: SharedCounters, acquire_timeout: float) -> None:
        self.ipc = ipc
        self.counters = counters
        self.acquire_timeout = acquire_timeout
        self._lock = threading.Lock()
        self._snapshot: dict = {"version": 0, "deployments": {}}
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
                version = self._snapshot["version"]
                inflight = {k: v for k, v in self._inflight.items() if v}
                activity, self._activity = self._activity, {}
            try:
                reply = self.ipc.call("sync", worker=pid, version=version, inflight=inflight,
                                      activity=activity, wait=SYNC_WAIT_S if version else 0)
            except AutoDeployError as exc:
                log.warning("sync with controller failed: %s", exc.message)
                with self._lock:  # keep the activity for the next report
                    for k, v in activity.items():
                        self._merge_activity(k, v)
                self._stop.wait(0.2)
                continue
            if "snapshot" in reply:
                with self._lock:
                    self._snapshot = reply["snapshot"]
                self._synced.set()

    def _merge_activity(self, iid: str, v: list[float]) -> None:
        cur = self._activity.setdefault(iid, [0.0, 0, 0])
        cur[0] = max(cur[0], v[0])
        cur[1] += v[1]
        cur[2] += v[2]

    def wait_synced(self, timeout: float) -> bool:
        return self._synced.wait(timeout)

    def close(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ picking
    def deployment(self, name: str) -> dict:
        dep = self._snapshot["deployments"].get(name)
        if dep is None:
            if not self._synced.is_set():
                raise AutoDeployError(errors.CONTROLLER_UNAVAILABLE, "no routing table from the controller yet",
                                      retry_after=1.0)
            raise AutoDeployError(errors.UNKNOWN_DEPLOYMENT, f"no deployment named {name!r}")
        if dep["state"] == "stopped":
            raise AutoDeployError(errors.DEPLOYMENT_STOPPED, f"{name} is stopped")
        return dep

    def acquire(self, name: str, rule: str | None) -> Target:
        """Pick an instance and count the request in flight on it (call `done` after)."""
        if not self._synced.is_set():
            self.wait_synced(5.0)
        with self._lock:
            dep = self.deployment(name)
            target = self._pick_local(dep, rule)
            if target is not None:
                self._inflight[target.id] = self._inflight.get(target.id, 0) + 1
                return target
        reply = self.ipc.call("acquire", deployment=name, rule=rule, timeout=self.acquire_timeout)
        inst = reply["instance"]
        target = Target(inst["id"], inst["host"], int(inst["port"]), inst["revision"])
        with self._lock:
            self._inflight[target.id] = self._inflight.get(target.id, 0) + 1
        return target

    def _pick_local(self, dep: dict, rule: str | None) -> Target | None:
        ready = dep["ready"]
        if rule == SCALE_OUT or not ready:
            return None
        if rule == RANDOM:
            chosen = self._rand.choice(ready)
        elif rule is None or rule == ROUND_ROBIN:
            chosen = ready[self.counters.next(dep["rr_slot"]) % len(ready)]
        else:
            chosen = next((r for r in ready if r["id"] == rule), None)
            if chosen is None:
                return None
        return Target(chosen["id"], chosen["host"], int(chosen["port"]), chosen["revision"])

    def done(self, target: Target, ok: bool) -> None:
        with self._lock:
            self._inflight[target.id] = self._inflight.get(target.id, 1) - 1
            self._merge_activity(target.id, [time.time(), 1, 0 if ok else 1])

    def unreachable(self, target: Target) -> None:
        with self._lock:
            self._inflight[target.id] = self._inflight.get(target.id, 1) - 1
            dep_list = self._snapshot["deployments"]
            for dep in dep_list.values():  # stop routing to it from this worker at once
                dep["ready"] = [r for r in dep["ready"] if r["id"] != target.id]
        try:
            self.ipc.call("unreachable", instance=target.id)
        except AutoDeployError as exc:
            log.warning("could not report unreachable %s: %s", target.id, exc.message)
