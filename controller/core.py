"""The controller: single writer of instance state, reconcile loop, capacity broker.

Gateway workers talk to it over IPC (`controller.ipc`): `sync` reports their in-flight
counts and activity and returns the routing snapshot; `acquire` asks for capacity
(cold start, scale-out, a specific instance). Decisions come from `controller.policy`;
the driver acts.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

from controller import errors
from controller.drivers.base import Driver, Instance
from controller.alerting import Alerting
from controller.autoscaler import Autoscaler
from controller.coldstart import ColdStarts
from controller.errors import AutoDeployError
from controller.health import is_ready, listener_problem, port_accepts
from controller.ids import new_instance_id
from controller.loader import LoadResult, SpecError, load_text
from controller.node_watch import NodeWatch, place_instance
from controller.operations import Operations
from controller.policy.autoscale import idle_instances
from controller.policy.capacity import Capacity, decide_acquire, readiness_poll_interval, restart_backoff
from controller.policy.edits import rename_message
from controller.policy.placement import NoPlacement, place
from controller.policy.status import status_word
from controller.rollouts import RolloutDriver
from controller.spec import Deployment
from controller.store import Commit, Store
from controller.traffic import Traffic

log = logging.getLogger("autodeploy.controller")

WORKER_STALE_S = 3.0  # a worker that has not synced for this long is gone (gunicorn restarts it)
DRAIN_TIMEOUT_S = 30.0  # an instance being released stops after this even with requests in flight


def drain_timeout_s(spec: Deployment) -> float:
    """How long a drain waits for what is in flight: an open WebSocket counts, and it ends
    by spec.tunnelTimeout at the latest, so a drain waits that long for one."""
    return max(DRAIN_TIMEOUT_S, spec.tunnel_timeout_s)


@dataclass
class Rec:
    """The controller's record of one instance."""
    id: str
    deployment: str
    revision: str
    phase: str  # starting | ready | draining | stopping | failed | gone
    created: float
    inst: Instance | None = None
    ready_at: float | None = None
    last_activity: float = 0.0
    served: int = 0
    errors: int = 0
    drain_version: int = 0
    number: int = 0  # the numbered revision it serves (Deploy-Revision)
    drain_started: float = 0.0
    error: AutoDeployError | None = None
    gpu_ids: list[str] = field(default_factory=list)
    reason: str = ""
    # Active health checks (controller.health_checker): out of routing while unhealthy.
    unhealthy: bool = False
    health_failures: int = 0
    # False for an autoscaler scale-down: requests still finishing there must not revive it.
    revivable: bool = True
    # Column in the gateway's shared in-flight counters (gateway/inflight.py).
    slot: int = field(default_factory=lambda: next(_INFLIGHT_SLOTS))
    node: str | None = None  # the Docker host it was placed on (controller.node_watch)


_INFLIGHT_SLOTS = itertools.count()


@dataclass
class DepRuntime:
    spec: Deployment
    revision_number: int
    rr_slot: int
    instances: dict[str, Rec] = field(default_factory=dict)
    waiting: int = 0
    failures: int = 0
    backoff_until: float = 0.0
    last_error: str | None = None
    removed: bool = False

    def by_phase(self, phase: str) -> list[Rec]:
        return sorted((r for r in self.instances.values() if r.phase == phase), key=lambda r: r.created)


@dataclass
class WorkerView:
    version: int = 0
    inflight: dict[str, int] = field(default_factory=dict)
    last_seen: float = 0.0


class Controller:
    def __init__(self, driver: Driver, store: Store, *, inventory: Any, prices: Any,
                 queue_limit: int = 256, stop_timeout: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.driver = driver
        self.store = store
        self.inventory = inventory
        self.prices = prices
        self.queue_limit = queue_limit
        self.stop_timeout = stop_timeout
        self.clock = clock
        self.deps: dict[str, DepRuntime] = {}
        self.spec_errors: list[SpecError] = []
        self.version = 1
        self.workers: dict[int, WorkerView] = {}
        self._cv = threading.Condition()
        self._snapshot: dict | None = None
        self._threads: set[threading.Thread] = set()
        self._closing = False
        self._next_slot = 0
        self.rollouts = RolloutDriver(self)
        self.operations = Operations(self)
        self.traffic = Traffic()  # request windows and resource use, for status, /metrics, autoscaling
        self.autoscaler = Autoscaler()
        # Endpoint keys of a deployment (hash -> may scale out) for the routing snapshot;
        # serve wires controller.auth.AuthStore.key_table here.
        self.keys_for: Callable[[str], dict[str, bool]] = lambda _name: {}
        self.source: Any = None  # controller.sources.SourceWatcher, set by serve: status and git sync
        self.node_watch = NodeWatch()  # several Docker hosts: lost and returning nodes
        self.coldstarts = ColdStarts()  # the phases of every instance start (controller.coldstart)
        self.alerts = Alerting(self)  # spec.alerts, evaluated in tick

    # ------------------------------------------------------------------ desired state
    def apply(self, result: LoadResult, commit: Commit | None = None) -> None:
        """Adopt the valid deployments of a load; files with errors keep their last good revision.
        `commit`: the git commit the load came from (a git source), recorded with new revisions."""
        now = self.clock()
        bad_files = {e.file for e in result.errors}
        with self._cv:
            self.spec_errors = list(result.errors)
            for err in result.errors:
                log.error("invalid spec: %s", err)
            new = {d.name: d for d in result.deployments}
            for name, rt in self.deps.items():
                if name not in new and not rt.removed and rt.spec.source_file not in bad_files:
                    rt.removed = True
                    self._event(name, "removed", rename_message(name, rt.spec.source_file, [
                        n for n, d in new.items() if d.source_file == rt.spec.source_file and n not in self.deps]))
                    for rec in rt.by_phase("ready"):
                        self._begin_drain(rec, "deployment removed")
            for name, spec in new.items():
                self._apply_one(spec, now, commit)
            self._bump()

    def _apply_one(self, spec: Deployment, now: float, commit: Commit | None = None) -> None:
        rt = self.deps.get(spec.name)
        effective = self.operations.effective(spec)  # runtime overrides (operations) over the file
        if effective is None:
            return  # deleted at runtime, and the file's content for it has not changed since
        if rt is not None and not rt.removed and rt.spec.revision == effective[0].revision:
            return
        number = self.store.record_revision(spec.name, spec.revision, spec.source_file, spec.raw, commit=commit)
        spec, number = effective[0], effective[1] or number
        if rt is None or rt.removed:
            old_instances = rt.instances if rt else {}
            rt = DepRuntime(spec=spec, revision_number=number, rr_slot=self._slot(),
                            instances=dict(old_instances))
            self.deps[spec.name] = rt
            self._event(spec.name, "applied", f"revision {number} ({spec.revision}) from {spec.source_file}")
            return
        old, old_number = rt.spec, rt.revision_number
        rt.spec, rt.revision_number = spec, number
        self._event(spec.name, "applied", f"revision {number} ({spec.revision}) from {spec.source_file}")
        self.rollouts.changed(rt, old, old_number, now)  # in place, rolling restart, or rollout

    def _slot(self) -> int:
        self._next_slot += 1
        return self._next_slot - 1

    # ------------------------------------------------------------------ gateway side
    def acquire(self, name: str, rule: str | None, timeout: float) -> dict:
        """Block until an instance fits the request; returns its address or raises a coded error."""
        deadline = time.monotonic() + timeout
        arrived = self.clock()
        with self._cv:
            rt = self._runtime(name)
            rt.waiting += 1
            try:
                return self._acquire_locked(rt, rule, deadline, arrived)
            finally:
                rt.waiting -= 1

    def _acquire_locked(self, rt: DepRuntime, rule: str | None, deadline: float, arrived: float) -> dict:
        while True:
            if self._closing:
                raise AutoDeployError(errors.SHUTTING_DOWN)
            if rt.removed:
                raise AutoDeployError(errors.UNKNOWN_DEPLOYMENT, rt.spec.name)
            decision = decide_acquire(rule, self._capacity(rt, exclude_self=True), self.clock())
            if decision.action == "reject":
                assert decision.error is not None
                detail = decision.reason
                if decision.error is errors.INSTANCE_START_FAILED and rt.last_error:
                    detail = f"{decision.reason}; last failure: {rt.last_error}"
                raise AutoDeployError(decision.error, detail, decision.retry_after)
            if decision.action == "start":
                rec = self._start(rt, decision.reason, queued_since=arrived)
            elif decision.action == "revive":
                rec = rt.instances[decision.instance or ""]
                rec.phase, rec.last_activity = "ready", self.clock()
                self._event(rt.spec.name, "revived", "request arrived while it was being released", rec.id)
                self._bump()
            elif decision.action == "use":
                rec = rt.instances[decision.instance or ""]
            else:  # wait: for a named starting instance, or for any change
                rec = rt.instances[decision.instance] if decision.instance else None
            target = self._wait_for(rec, deadline, rt)
            if target is not None:
                return target

    def _wait_for(self, rec: Rec | None, deadline: float, rt: DepRuntime) -> dict | None:
        """Wait until `rec` is ready (its address), failed (raise), or gone (None: decide again)."""
        while True:
            if rec is not None:
                if rec.phase == "ready" and rec.inst is not None:
                    return _address(rec)
                if rec.phase == "failed":
                    assert rec.error is not None
                    raise rec.error
                if rec.phase in ("stopping", "gone", "draining"):
                    return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AutoDeployError(errors.START_TIMEOUT, f"no instance of {rt.spec.name} became ready in time",
                                      retry_after=5.0)
            if self._closing:
                raise AutoDeployError(errors.SHUTTING_DOWN)
            version = self.version
            self._cv.wait(min(remaining, 1.0))
            if rec is None and self.version != version:
                return None

    def sync(self, worker: int, version: int, inflight: dict[str, int],
             activity: dict[str, list[float]], wait: float, metrics: dict[str, dict] | None = None) -> dict:
        """A gateway worker's report; answers with the routing snapshot when it changed."""
        with self._cv:
            now = self.clock()
            view = self.workers.setdefault(worker, WorkerView())
            view.version, view.inflight, view.last_seen = version, inflight, now
            for iid, (last_done, served, errs) in activity.items():
                rec = self._find(iid)
                if rec is None:
                    continue
                rec.last_activity = max(rec.last_activity, last_done)
                rec.served += int(served)
                rec.errors += int(errs)
            if metrics:
                self.rollouts.record_metrics(metrics, now)
                self.traffic.observe(now, metrics)
            if version == self.version and wait > 0:
                self._cv.wait(wait)
            if version == self.version:
                return {"version": self.version}
            return {"version": self.version, "snapshot": self.snapshot()}

    def report_unreachable(self, instance_id: str) -> None:
        """A worker could not connect to an instance: check it now rather than at the next tick."""
        with self._cv:
            rec = self._find(instance_id)
        if rec is not None and rec.inst is not None and rec.phase == "ready":
            gone = self.driver.poll(rec.inst)
            if gone is not None:
                self._on_exit(rec, gone.code, gone.log_tail)

    def snapshot(self) -> dict:
        """What workers route by: ready instances per deployment (caller holds the lock)."""
        if self._snapshot is None or self._snapshot["version"] != self.version:
            deps = {}
            for name, rt in self.deps.items():
                if rt.removed:
                    continue
                deps[name] = {
                    "state": rt.spec.state, "algorithm": rt.spec.load_balancer.algorithm,
                    "sticky": rt.spec.load_balancer.sticky_sessions, "rr_slot": rt.rr_slot,
                    "access": rt.spec.access,
                    "keys": self.keys_for(name) if rt.spec.access == "private" else {},
                    "revision": rt.revision_number, "split": self.rollouts.split(name),
                    "request_timeout": rt.spec.request_timeout_s,
                    "ready": [_address(r) for r in rt.by_phase("ready") if r.inst is not None and not r.unhealthy],
                    **_proxy_fields(rt.spec),
                    "protocol": rt.spec.protocol, "tunnel_timeout": rt.spec.tunnel_timeout_s,
                    "tunnel_idle_timeout": rt.spec.tunnel_idle_timeout_s,
                }
            self._snapshot = {"version": self.version, "deployments": deps}
        return self._snapshot

    # ------------------------------------------------------------------ instance lifecycle
    def _start(self, rt: DepRuntime, reason: str, queued_since: float | None = None) -> Rec:
        now = self.clock()
        taken = {i for d in self.deps.values() for i in d.instances}
        rec = Rec(id=new_instance_id(taken), deployment=rt.spec.name, revision=rt.spec.revision,
                  phase="starting", created=now, last_activity=now, reason=reason, number=rt.revision_number)
        gpu = rt.spec.resources.gpu
        if getattr(self.driver, "nodes", None) is not None:  # several Docker hosts
            rec.node, rec.gpu_ids = place_instance(self, rt.spec)
        elif gpu.count > 0:
            placed = place(self.inventory.gpus, self._assigned(), gpu)
            if isinstance(placed, NoPlacement):
                self._event(rt.spec.name, "unplaceable", placed.reason)
                raise AutoDeployError(errors.NO_FREE_GPU, placed.reason, retry_after=10.0)
            rec.gpu_ids = list(placed.gpu_ids)
        self.coldstarts.begin(rec.id, rt.spec.name, reason, queued_since, now)
        self.coldstarts.mark(rec.id, "placement", self.clock())
        rt.instances[rec.id] = rec
        self._event(rt.spec.name, "start", f"{reason}" + (f"; GPUs {','.join(rec.gpu_ids)}" if rec.gpu_ids else "")
                    + (f"; node {rec.node}" if rec.node else ""), rec.id)
        self._spawn(self._launch, rt.spec, rec)
        self._bump()
        return rec

    def _assigned(self) -> dict[str, list[str]]:
        return {r.id: r.gpu_ids for d in self.deps.values() for r in d.instances.values()
                if r.gpu_ids and r.phase not in ("failed", "gone")}

    def _launch(self, spec: Deployment, rec: Rec) -> None:
        try:
            self._launch_and_wait(spec, rec)
        except Exception as exc:  # noqa: BLE001 - never leave waiters on an instance nobody watches
            log.exception("starting %s failed", rec.id)
            self._fail(rec, AutoDeployError(errors.DRIVER_FAILED, f"{type(exc).__name__}: {exc}"))

    def _launch_and_wait(self, spec: Deployment, rec: Rec) -> None:
        try:
            inst = self.driver.start(spec, rec.id, rec.gpu_ids, **({"node": rec.node} if rec.node else {}))
        except AutoDeployError as exc:
            self._fail(rec, exc)
            return
        except Exception as exc:  # noqa: BLE001 - any driver failure becomes a coded error for the waiters
            log.exception("driver failed to start %s", rec.id)
            self._fail(rec, AutoDeployError(errors.DRIVER_FAILED, f"{type(exc).__name__}: {exc}"))
            return
        self.coldstarts.mark(rec.id, "create", self.clock())
        with self._cv:
            rec.inst = inst
            self.store.put_instance(inst, self.driver.name, "starting", self._price(spec, inst.node))
            for note in inst.notes:
                self._event(rec.deployment, "note", note, rec.id)
        health = spec.load_balancer.health_check
        path = health.path if health else None
        begin = time.monotonic()
        port_open = path is None  # with a health path, "port open" and "health answers" are two phases
        while True:
            if rec.phase != "starting":
                return  # cancelled (shutdown or removal) while starting
            gone = self.driver.poll(inst)
            if gone is not None:
                self._fail(rec, AutoDeployError(
                    errors.INSTANCE_START_FAILED,
                    f"instance {rec.id} exited with code {gone.code} before it was ready; last log lines:\n"
                    f"{gone.log_tail}"))
                return
            if not port_open and port_accepts(inst.host, inst.port, 0.2):
                port_open = True
                self.coldstarts.mark(rec.id, "port", self.clock())
            if is_ready(inst.host, inst.port, path, timeout=max(0.5, health.timeout_s if health else 1.0),
                        tcp_is_enough=self.driver.tcp_accept_means_ready, protocol=spec.protocol):
                problem = listener_problem(self.driver, inst)
                if problem is not None:
                    self._fail(rec, AutoDeployError(errors.INSTANCE_START_FAILED, f"instance {rec.id}: {problem}"))
                    return
                break
            elapsed = time.monotonic() - begin
            if elapsed > spec.start_timeout_s:
                self._fail(rec, AutoDeployError(
                    errors.INSTANCE_START_FAILED,
                    f"instance {rec.id} was not ready after {spec.start_timeout_s:g} s"
                    f" ({'GET ' + path + ' never answered 2xx' if path else f'port {inst.port} never accepted'});"
                    f" last log lines:\n{self.driver.log_tail(inst)}"))
                return
            time.sleep(readiness_poll_interval(elapsed))
        with self._cv:
            if rec.phase != "starting":
                return
            now = self.clock()
            rec.phase, rec.ready_at, rec.last_activity = "ready", now, now
            self.coldstarts.ready(rec.id, now)
            rt = self.deps.get(rec.deployment)
            if rt is not None:
                rt.failures, rt.last_error = 0, None
            self.store.set_phase(rec.id, "ready", ready_at=now)
            self._event(rec.deployment, "ready", f"ready in {now - rec.created:.3f} s on port {inst.port}", rec.id)
            self._bump()

    def _fail(self, rec: Rec, exc: AutoDeployError) -> None:
        with self._cv:
            if rec.phase in ("failed", "stopping", "gone"):
                return  # stopped on purpose while starting: not a failure
            rec.phase, rec.error = "failed", exc
            now = self.clock()
            self.coldstarts.failed(rec.id, now)
            rt = self.deps.get(rec.deployment)
            if rt is not None:
                rt.failures += 1
                rt.backoff_until = now + restart_backoff(rt.failures)
                rt.last_error = exc.message
                rt.instances.pop(rec.id, None)
            self._event(rec.deployment, "failed", exc.message, rec.id)
            self.store.remove_instance(rec.id, now)
            self._bump()
        if rec.inst is not None:
            self.driver.stop(rec.inst, self.stop_timeout)

    def _on_exit(self, rec: Rec, code: int | None, tail: str) -> None:
        """A ready instance died on its own."""
        with self._cv:
            if rec.phase not in ("ready", "draining"):
                return
            rec.phase = "gone"
            now = self.clock()
            rt = self.deps.get(rec.deployment)
            if rt is not None:
                rt.instances.pop(rec.id, None)
                rt.failures += 1
                rt.backoff_until = now + restart_backoff(rt.failures)
                rt.last_error = f"instance {rec.id} exited with code {code}; last log lines:\n{tail}"
            self._event(rec.deployment, "crashed", f"exited with code {code}; last log lines:\n{tail}", rec.id)
            self.store.remove_instance(rec.id, now)
            self._bump()
        if rec.inst is not None:
            self.driver.stop(rec.inst, self.stop_timeout)

    def _begin_drain(self, rec: Rec, reason: str, revivable: bool = True) -> None:
        rec.phase, rec.reason, rec.revivable = "draining", reason, revivable
        rec.drain_started = self.clock()
        self._bump()
        rec.drain_version = self.version
        self._event(rec.deployment, "release", reason, rec.id)

    def _stop(self, rec: Rec, reason: str) -> None:
        rec.phase = "stopping"
        self._event(rec.deployment, "stop", reason, rec.id)
        self._spawn(self._do_stop, rec)

    def _do_stop(self, rec: Rec) -> None:
        if rec.inst is not None:
            self.driver.stop(rec.inst, self.stop_timeout)
        with self._cv:
            rec.phase = "gone"
            rt = self.deps.get(rec.deployment)
            if rt is not None:
                rt.instances.pop(rec.id, None)
            self.store.remove_instance(rec.id, self.clock())
            self._bump()

    # ------------------------------------------------------------------ reconcile
    def tick(self) -> None:
        """One reconcile pass: crashes, idle release, drains, minReplicas, forgotten deployments."""
        exited: list[tuple[Rec, int | None, str]] = []
        self.node_watch.step(self)
        with self._cv:
            ready = [r for rt in self.deps.values() for r in rt.instances.values()
                     if r.phase in ("ready", "draining") and r.inst is not None]
        for rec in ready:
            assert rec.inst is not None
            gone = self.driver.poll(rec.inst)
            if gone is not None:
                exited.append((rec, gone.code, gone.log_tail))
        for rec, code, tail in exited:
            self._on_exit(rec, code, tail)
        with self._cv:
            now = self.clock()
            self._forget_stale_workers(now)
            inflight = self._inflight()
            for name in list(self.deps):
                self._reconcile(self.deps[name], inflight, now)
            self.autoscaler.step(self, inflight, now)
            self.alerts.step(now)
            self.coldstarts.expire(now)
            self.traffic.forget({i for rt in self.deps.values() for i in rt.instances}, set(self.deps))
            self.coldstarts.forget({i for rt in self.deps.values() for i in rt.instances}, set(self.deps), now)

    def _reconcile(self, rt: DepRuntime, inflight: dict[str, int], now: float) -> None:
        rolling = self.rollouts.drive(rt, now)  # a rollout in progress owns the instance count
        spec = rt.spec
        if not rt.removed and spec.state == "running" and not rolling:
            ready = rt.by_phase("ready")
            release = idle_instances({r.id: r.last_activity for r in ready},
                                     {r.id: inflight.get(r.id, 0) for r in ready},
                                     spec.scaling.idle_timeout_s, now, keep=spec.scaling.min_replicas)
            for iid in release:
                self._begin_drain(rt.instances[iid], f"idle for {spec.scaling.idle_timeout_s:g} s")
        elif spec.state == "stopped" or rt.removed:
            for rec in rt.by_phase("ready"):
                self._begin_drain(rec, "deployment removed" if rt.removed else "deployment stopped")
        for rec in rt.by_phase("draining"):
            if rec.last_activity > rec.drain_started and not rt.removed and spec.state == "running" \
                    and rec.revision == spec.revision and rec.revivable:
                rec.phase = "ready"
                self._event(spec.name, "revived", "traffic arrived while it was being released", rec.id)
                self._bump()
            elif self._drained(rec, inflight) or now - rec.drain_started > drain_timeout_s(spec):
                self._stop(rec, rec.reason)
        if rt.removed:
            if not rt.instances:
                del self.deps[spec.name]
                self._bump()
            return
        alive = len(rt.by_phase("ready")) + len(rt.by_phase("starting"))
        if spec.state == "running" and not rolling and alive < spec.scaling.min_replicas \
                and now >= rt.backoff_until:
            for _ in range(spec.scaling.min_replicas - alive):
                try:
                    self._start(rt, f"minReplicas {spec.scaling.min_replicas}")
                except AutoDeployError as exc:
                    rt.last_error = exc.message
                    rt.backoff_until = now + restart_backoff(rt.failures + 1)
                    break

    def _drained(self, rec: Rec, inflight: dict[str, int]) -> bool:
        if inflight.get(rec.id, 0) > 0:
            return False
        return all(w.version >= rec.drain_version for w in self.workers.values())

    def _inflight(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for w in self.workers.values():
            for iid, n in w.inflight.items():
                total[iid] = total.get(iid, 0) + int(n)
        return total

    def _forget_stale_workers(self, now: float) -> None:
        for pid in [p for p, w in self.workers.items() if now - w.last_seen > WORKER_STALE_S]:
            del self.workers[pid]

    # ------------------------------------------------------------------ restart adoption
    def adopt_stored(self) -> None:
        """Re-attach to instances a previous `serve` left running; book the rest as gone."""
        now = self.clock()
        resume: dict[str, tuple[Deployment, int]] = {}
        for stored in self.store.instances(driver=self.driver.name):
            inst = stored.instance
            rt = self.deps.get(inst.deployment)
            alive = self.driver.adopt(inst)
            # An instance of an earlier revision means a rollout was under way when the last
            # controller stopped: keep it serving and roll it again from here.
            earlier = None
            if alive and rt is not None and not rt.removed and inst.revision != rt.spec.revision \
                    and rt.spec.state == "running":
                earlier = resume.get(rt.spec.name) or self._stored_spec(rt.spec.name, inst.revision)
            if alive and rt is not None and not rt.removed and (inst.revision == rt.spec.revision or earlier):
                health = rt.spec.load_balancer.health_check
                if is_ready(inst.host, inst.port, health.path if health else None,
                            tcp_is_enough=self.driver.tcp_accept_means_ready, protocol=rt.spec.protocol):
                    if earlier is not None:
                        resume[rt.spec.name] = earlier
                    with self._cv:
                        rec = Rec(id=inst.id, deployment=inst.deployment, revision=inst.revision, phase="ready",
                                  created=inst.started_at, inst=inst, ready_at=now, last_activity=now,
                                  number=earlier[1] if earlier else rt.revision_number,
                                  gpu_ids=list(inst.gpu_ids), node=inst.node)
                        rt.instances[rec.id] = rec
                        self.store.set_phase(rec.id, "ready")
                        self._event(inst.deployment, "adopted", f"pid {inst.pid} port {inst.port} still running",
                                    inst.id)
                    continue
            if alive:
                self.driver.stop(inst, self.stop_timeout)
                why = "its deployment or revision is no longer wanted" if rt is None or \
                    inst.revision != rt.spec.revision else "not ready on adoption"
            else:
                why = "process is gone"
            self._event(inst.deployment, "lost", f"stored instance not adopted: {why}", inst.id)
            self.store.remove_instance(inst.id, now)
        with self._cv:
            for name, (stable, number) in resume.items():
                rt = self.deps[name]
                self.rollouts.begin(rt, stable, number, "rollout", rt.spec.rollout.strategy,
                                    "resumed after a controller restart", now)
        known = {s.instance.id for s in self.store.instances()}
        for inst in self.driver.discover():
            if inst.id not in known:
                self._event(inst.deployment, "unknown", f"{self.driver.name} instance {inst.container_id or inst.id}"
                            " carries our labels but is not in the store: left running, not adopted", inst.id)
        with self._cv:
            self._bump()

    def _stored_spec(self, name: str, revision: str) -> tuple[Deployment, int] | None:
        """The applied spec with this content hash, rebuilt from the store, and its number."""
        for row in reversed(self.store.revisions(name)):
            if row.revision != revision:
                continue
            loaded = load_text(yaml.safe_dump(row.content, sort_keys=False), row.source_file)
            if loaded.deployments and loaded.deployments[0].revision == revision:
                return loaded.deployments[0], row.number
        return None

    # ------------------------------------------------------------------ operations
    def action(self, name: str, action: str, args: dict) -> dict:
        """scale / stop / start / delete / rollback, and the history, rollout and drift views
        (`controller.operations`); the same for the CLI and the HTTP API."""
        with self._cv:
            return self.operations.act(name, action, args)

    # ------------------------------------------------------------------ status
    def status(self, name: str | None = None) -> dict:
        with self._cv:
            now = self.clock()
            booked = self.store.booked_cost()
            inflight = self._inflight()
            if name is not None:
                rt = self._runtime(name)
                return self._dep_status(rt, booked, inflight, now, events=True)
            return {"deployments": [self._dep_status(rt, booked, inflight, now, events=False)
                                    for _, rt in sorted(self.deps.items()) if not rt.removed],
                    "errors": [str(e) for e in self.spec_errors],
                    "driver": self.driver.name,
                    "gpu_inventory": getattr(self.inventory, "source", None),
                    "source": self.source.status() if self.source is not None else None,
                    "nodes": self.node_watch.status(self)}

    def _dep_status(self, rt: DepRuntime, booked: dict, inflight: dict[str, int], now: float,
                    events: bool) -> dict:
        spec = rt.spec
        recs = sorted(rt.instances.values(), key=lambda r: r.created)
        price = self._price(spec)
        running_s = sum(now - (r.inst.started_at if r.inst else r.created) for r in recs)
        booked_s, booked_cost = booked.get(spec.name, (0.0, 0.0))
        status = status_word(spec.state, sum(r.phase == "ready" for r in recs), len(recs), rt.failures)
        file_errors = [str(e) for e in self.spec_errors if e.file == spec.source_file]
        out: dict[str, Any] = {
            "name": spec.name, "description": spec.description, "environment": spec.environment,
            "model": {"id": spec.model_id, "version": spec.model_version},
            "endpoint": f"/d/{spec.name}/", "access": spec.access, "state": spec.state, "status": status,
            "revision": {"number": rt.revision_number, "hash": spec.revision, "file": spec.source_file,
                         "commit": _commit_json(self.store.revision_commit(spec.name, rt.revision_number))},
            "replicas": {"min": spec.scaling.min_replicas, "max": spec.scaling.max_replicas,
                         "current": len(recs), "ready": sum(r.phase == "ready" for r in recs)},
            "idle_timeout_s": spec.scaling.idle_timeout_s,
            "load_balancer": spec.load_balancer.algorithm,
            "resources": {"cpu": spec.resources.cpu, "memory_gb": spec.resources.memory_gb,
                          "gpu": {"count": spec.resources.gpu.count, "type": spec.resources.gpu.type}},
            "instances": [self._inst_status(r, inflight) for r in recs],
            "cost": {"currency": "USD", "price_per_hour": price,
                     "instance_seconds": round(booked_s + running_s, 3),
                     "total": round(booked_cost + running_s * price / 3600.0, 6)},
            "last_error": rt.last_error,
            "spec_errors": file_errors,
            "drift": self.operations.drift_of(spec.name),
            "rollout": self.rollouts.status(spec.name, now),
            "metrics": self.traffic.deployment_metrics(spec.name, [r.id for r in recs],
                                                       sum(inflight.get(r.id, 0) for r in recs), now),
            "autoscaling": self.autoscaler.status(spec.name, spec.scaling.autoscaling.enabled, now),
            "failures": rt.failures,
            "health_check": None if spec.load_balancer.health_check is None else {
                "path": spec.load_balancer.health_check.path,
                "interval_s": spec.load_balancer.health_check.interval_s},
            "rollout_strategy": spec.rollout.strategy,
            "alerts": self.alerts.status(rt, now),
        }
        if events:
            out["cold_starts"] = self.coldstarts.recent_of(spec.name, now)
            out["history"] = self.traffic.history(spec.name, now)
            out["events"] = [{"at": e.at, "instance": e.instance, "kind": e.kind, "message": e.message}
                             for e in self.store.events(spec.name, limit=30)]
        return out

    def _inst_status(self, rec: Rec, inflight: dict[str, int]) -> dict:
        inst = rec.inst
        return {"id": rec.id, "state": rec.phase, "revision": rec.revision, "revision_number": rec.number,
                "pid": inst.pid if inst else None, "port": inst.port if inst else None,
                "container_id": inst.container_id if inst else None, "gpu_ids": rec.gpu_ids, "node": rec.node,
                "started": inst.started_at if inst else rec.created, "ready_at": rec.ready_at,
                "last_request": rec.last_activity if rec.served else None,
                "requests_served": rec.served, "errors": rec.errors, "in_flight": inflight.get(rec.id, 0),
                "healthy": not rec.unhealthy, "health_failures": rec.health_failures,
                "start": self.coldstarts.of(rec.id, self.clock()),
                "metrics": self.traffic.instance_metrics(rec.id, inflight.get(rec.id, 0), self.clock())}

    # ------------------------------------------------------------------ shutdown
    def shutdown(self) -> None:
        """Stop every instance this controller started (in parallel) and wake every waiter."""
        with self._cv:
            self._closing = True
            recs = [r for rt in self.deps.values() for r in rt.instances.values()
                    if r.phase not in ("stopping", "gone", "failed")]
            for rec in recs:
                rec.phase = "stopping"
                self._event(rec.deployment, "stop", "controller shutdown", rec.id)
            self._cv.notify_all()
        for rec in recs:
            self._spawn(self._do_stop, rec)
        for t in list(self._threads):
            t.join(timeout=self.stop_timeout + 5)
        self.alerts.close()

    def first_byte(self, instance_id: str, at: float) -> bool:
        """The gateway got the first response byte for a request that waited on this instance's start."""
        return self.coldstarts.first_byte(instance_id, at)

    def log_tail(self, name: str, instance_id: str, lines: int) -> dict:
        """The last lines of one instance's output (the dashboard's log tail)."""
        with self._cv:
            rec = self._runtime(name).instances.get(instance_id)
        if rec is None or rec.inst is None:
            raise AutoDeployError(errors.INSTANCE_NOT_FOUND, f"{name} has no running instance {instance_id!r}")
        return {"instance": instance_id, "lines": lines, "text": self.driver.log_tail(rec.inst, lines)}

    def events_after(self, after: int, name: str | None, limit: int) -> list[dict]:
        """Events with an id above `after` (oldest first), or the latest `limit` when `after` < 0."""
        if name is not None:
            self._runtime(name)
        return [{"id": e.id, "at": e.at, "deployment": e.deployment, "instance": e.instance, "kind": e.kind,
                 "message": e.message}
                for e in (self.store.events(name, limit) if after < 0 else self.store.events_after(after, name, limit))]

    # ------------------------------------------------------------------ helpers
    def _runtime(self, name: str) -> DepRuntime:
        rt = self.deps.get(name)
        if rt is None or rt.removed:
            raise AutoDeployError(errors.UNKNOWN_DEPLOYMENT, f"no deployment named {name!r}")
        return rt

    def _capacity(self, rt: DepRuntime, exclude_self: bool) -> Capacity:
        return Capacity(
            ready=tuple(r.id for r in rt.by_phase("ready") if not r.unhealthy),
            starting=tuple(r.id for r in rt.by_phase("starting")),
            draining=tuple(r.id for r in rt.by_phase("draining")
                           if r.revision == rt.spec.revision and rt.spec.state == "running"),
            # An unhealthy instance still holds its slot (and GPU) but takes no request.
            stopping=len(rt.by_phase("stopping")) + sum(
                1 for r in rt.by_phase("draining") if r.revision != rt.spec.revision) + sum(
                1 for r in rt.by_phase("ready") if r.unhealthy),
            max_replicas=rt.spec.scaling.max_replicas,
            waiting=rt.waiting - (1 if exclude_self else 0),
            queue_limit=self.queue_limit, backoff_until=rt.backoff_until,
            running=rt.spec.state == "running")

    def _find(self, instance_id: str) -> Rec | None:
        for rt in self.deps.values():
            rec = rt.instances.get(instance_id)
            if rec is not None:
                return rec
        return None

    def _price(self, spec: Deployment, node: str | None = None) -> float:
        # Per-node prices (controller.nodes.NodePrices) when the instance has a node.
        return float(self.prices.per_hour(spec.resources.gpu, **({"node": node} if node else {})))

    def routing_changed(self) -> None:
        """Something the routing snapshot carries changed outside the controller (endpoint keys)."""
        with self._cv:
            self._bump()

    def _bump(self) -> None:
        self.version += 1
        self._cv.notify_all()

    def _event(self, deployment: str, kind: str, message: str, instance: str | None = None) -> None:
        log.info("%s %s%s: %s", deployment, kind, f" {instance}" if instance else "", message)
        self.store.event(deployment, kind, message, instance)

    def _spawn(self, fn: Callable, *args: Any) -> None:
        def run() -> None:
            try:
                fn(*args)
            finally:
                self._threads.discard(threading.current_thread())
        t = threading.Thread(target=run, daemon=True, name=f"{fn.__name__}")
        self._threads.add(t)
        t.start()


def _address(rec: Rec) -> dict:
    assert rec.inst is not None
    return {"id": rec.id, "host": rec.inst.host, "port": rec.inst.port, "revision": rec.number,
            "deployment": rec.deployment, "slot": rec.slot}


def _commit_json(commit: Commit | None) -> dict | None:
    return commit.to_json() if commit is not None else None


def _proxy_fields(spec: Deployment) -> dict:
    """What the haproxy data plane renders a backend from (gateway/haproxy_config.backend_of)."""
    hc = spec.load_balancer.health_check
    return {"health": None if hc is None else {"path": hc.path, "interval": hc.interval_s, "timeout": hc.timeout_s,
                                               "fall": hc.failure_threshold}}
