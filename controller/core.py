"""The controller: single writer of instance state, reconcile loop, capacity broker.

Gateway workers talk to it over IPC (`controller.ipc`): `sync` reports their in-flight
counts and activity and returns the routing snapshot; `acquire` asks for capacity
(cold start, scale-out, a specific instance). Decisions come from `controller.policy`;
the driver acts.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from controller import errors
from controller.alerting import Alerting
from controller.autoscaler import Autoscaler
from controller.coldstart import ColdStarts
from controller.contracts import Address, HealthProbe, RouteEntry, Snapshot, SyncReply
from controller.drivers.base import Driver, Instance
from controller.errors import AutoDeployError
from controller.fleet import DRAINING, READY, STARTING, STOPPING, DepRuntime, Fleet, Probes, Rec
from controller.loader import LoadResult, SpecError
from controller.node_watch import NodeWatch, place_instance
from controller.operations import Operations, spec_from_revision
from controller.policy.autoscale import idle_instances
from controller.policy.capacity import Capacity, decide_acquire, hold_through_failure
from controller.policy.edits import rename_message
from controller.policy.status import status_word
from controller.rollouts import RolloutDriver
from controller.spec import Deployment
from controller.store import Commit, Store
from controller.traffic import Traffic

log = logging.getLogger("autodeploy.controller")

WORKER_STALE_S = 3.0  # a worker that has not synced for this long is gone (gunicorn restarts it)
DRAIN_TIMEOUT_S = 30.0  # an instance being released stops after this even with requests in flight
# A connect refused by a ready instance: it is polled up to this many times, this far apart
# (0.5 s at most), since an exiting process closes its socket before it can be reaped.
UNREACHABLE_CHECKS = 10
UNREACHABLE_CHECK_INTERVAL_S = 0.05
HISTORY_SAVE_S = 5.0  # the dashboard's chart minutes are saved in the store this often (a restart keeps them)

__all__ = ["Controller", "DepRuntime", "Rec", "WorkerView", "drain_timeout_s"]


def drain_timeout_s(spec: Deployment) -> float:
    """How long a drain waits for what is in flight: an open WebSocket counts, and it ends
    by spec.tunnelTimeout at the latest, so a drain waits that long for one."""
    return max(DRAIN_TIMEOUT_S, spec.tunnel_timeout_s)


@dataclass
class WorkerView:
    version: int = 0
    inflight: dict[str, int] = field(default_factory=dict)
    last_seen: float = 0.0


class Controller:
    def __init__(self, driver: Driver, store: Store, *, inventory: Any, prices: Any,
                 queue_limit: int = 256, stop_timeout: float = 10.0,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep,
                 probes: Probes | None = None) -> None:
        self.driver = driver
        self.store = store
        self.inventory = inventory
        self.queue_limit = queue_limit
        self.stop_timeout = stop_timeout
        self.clock = clock
        self.coldstarts = ColdStarts()  # the phases of every instance start (controller.coldstart)
        self.fleet = Fleet(driver, store, inventory=inventory, prices=prices, stop_timeout=stop_timeout,
                           clock=clock, sleep=sleep, probes=probes, coldstarts=self.coldstarts)
        self.probes = self.fleet.probes
        self.spec_errors: list[SpecError] = []
        self.workers: dict[int, WorkerView] = {}
        self._snapshot: Snapshot | None = None
        self.rollouts = RolloutDriver(self.fleet, store)
        self.operations = Operations(self.fleet, store, self.rollouts, clock=clock, inflight=self.inflight)
        self.rollouts.on_rolled_back = self.operations.rolled_back
        self.traffic = Traffic()  # request windows and resource use, for status, /metrics, autoscaling
        self.autoscaler = Autoscaler(self.fleet, self.traffic, owns=self.rollouts.owns)
        # Endpoint keys of a deployment (hash -> may scale out) for the routing snapshot;
        # serve wires controller.auth.AuthStore.key_table here.
        self.keys_for: Callable[[str], dict[str, bool]] = lambda _name: {}
        self.source: Any = None  # controller.sources.SourceWatcher, set by serve: status and git sync
        self.node_watch = NodeWatch(self.fleet)  # several Docker hosts: lost and returning nodes
        if getattr(driver, "nodes", None) is not None:
            self.fleet.placer = lambda spec: place_instance(self.fleet, self.node_watch, spec)
        self.alerts = Alerting(self.fleet, self.traffic, self.coldstarts)  # spec.alerts, evaluated in tick
        # What a restart must not forget: firing alerts and the charts' last hour (controller.store).
        self.alerts.restore(clock())
        self.traffic.restore_minutes(store.minutes())
        self._history_saved = clock()

    @property
    def deps(self) -> dict[str, DepRuntime]:
        return self.fleet.deps

    @property
    def version(self) -> int:
        return self.fleet.version

    # ------------------------------------------------------------------ desired state
    def apply(self, result: LoadResult, commit: Commit | None = None) -> None:
        """Adopt the valid deployments of a load; files with errors keep their last good revision.
        `commit`: the git commit the load came from (a git source), recorded with new revisions."""
        now = self.clock()
        bad_files = {e.file for e in result.errors}
        fleet = self.fleet
        with fleet:
            self.spec_errors = list(result.errors)
            for err in result.errors:
                log.error("invalid spec: %s", err)
            new = {d.name: d for d in result.deployments}
            for name, rt in self.deps.items():
                if name not in new and not rt.removed and rt.spec.source_file not in bad_files:
                    rt.removed = True
                    fleet.event(name, "removed", rename_message(name, rt.spec.source_file, [
                        n for n, d in new.items() if d.source_file == rt.spec.source_file and n not in self.deps]))
                    for rec in rt.by_phase(READY):
                        fleet.drain(rec, "deployment removed")
            for name, spec in new.items():
                self._apply_one(spec, now, commit)
            fleet.bump()

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
            rt = DepRuntime(spec=spec, revision_number=number, rr_slot=self.fleet.new_slot(),
                            instances=dict(old_instances))
            self.deps[spec.name] = rt
            self.fleet.event(spec.name, "applied", f"revision {number} ({spec.revision}) from {spec.source_file}")
            return
        old, old_number = rt.spec, rt.revision_number
        rt.spec, rt.revision_number = spec, number
        self.fleet.event(spec.name, "applied", f"revision {number} ({spec.revision}) from {spec.source_file}")
        self.rollouts.changed(rt, old, old_number, now)  # in place, rolling restart, or rollout

    # ------------------------------------------------------------------ gateway side
    def acquire(self, name: str, rule: str | None, timeout: float) -> Address:
        """Block until an instance fits the request; returns its address or raises a coded error."""
        deadline = time.monotonic() + timeout
        arrived = self.clock()
        with self.fleet:
            rt = self.fleet.runtime(name)
            rt.waiting += 1
            try:
                return self._acquire_locked(rt, rule, deadline, arrived)
            finally:
                rt.waiting -= 1

    def _acquire_locked(self, rt: DepRuntime, rule: str | None, deadline: float, arrived: float) -> Address:
        fleet = self.fleet
        while True:
            if fleet.closing:
                raise AutoDeployError(errors.SHUTTING_DOWN)
            if rt.removed:
                raise AutoDeployError(errors.UNKNOWN_DEPLOYMENT, rt.spec.name)
            decision = decide_acquire(rule, self._capacity(rt, exclude_self=True), self.clock())
            if decision.action == "reject":
                assert decision.error is not None
                private = None
                if decision.error is errors.INSTANCE_START_FAILED and rt.last_error:
                    private = f"last failure: {rt.last_error}"  # may hold a log tail: operators only
                raise AutoDeployError(decision.error, decision.reason, decision.retry_after, private)
            if decision.action == "start":
                rec = fleet.start(rt, decision.reason, queued_since=arrived)
            elif decision.action == "revive":
                rec = rt.instances[decision.instance or ""]
                fleet.revive(rec, "request arrived while it was being released")
            elif decision.action == "use":
                rec = rt.instances[decision.instance or ""]
            else:  # wait: for a named starting instance, for any change, or until a backoff ends
                rec = rt.instances[decision.instance] if decision.instance else None
            target = self._wait_for(rec, deadline, rt, decision.until)
            if target is not None:
                return target

    def _wait_for(self, rec: Rec | None, deadline: float, rt: DepRuntime,
                  until: float | None = None) -> Address | None:
        """Wait until `rec` is ready (its address), failed (raise), or gone (None: decide again);
        with `until` (the clock's time), decide again then even if nothing changed."""
        while True:
            if rec is not None:
                if rec.phase == READY and rec.inst is not None:
                    return _address(rec)
                if rec.error is not None and rec.phase not in (STARTING, READY):
                    if rec.error.error is errors.INSTANCE_START_FAILED and \
                            hold_through_failure(rt.failures, rt.crashed):
                        return None  # not yet a crash loop: held for the next start, as at a cold start
                    raise rec.error  # failed to start
                if rec.phase not in (STARTING, READY):
                    return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AutoDeployError(errors.START_TIMEOUT, f"no instance of {rt.spec.name} became ready in time",
                                      retry_after=5.0)
            if self.fleet.closing:
                raise AutoDeployError(errors.SHUTTING_DOWN)
            if until is not None and self.clock() >= until:
                return None
            version = self.fleet.version
            step = min(remaining, 1.0) if until is None else max(0.001, min(remaining, 1.0, until - self.clock()))
            self.fleet.wait(step)
            if rec is None and self.fleet.version != version:
                return None

    def sync(self, worker: int, version: int, inflight: dict[str, int],
             activity: dict[str, list[float]], wait: float, metrics: dict[str, dict] | None = None) -> SyncReply:
        """A gateway worker's report; answers with the routing snapshot when it changed."""
        fleet = self.fleet
        with fleet:
            now = self.clock()
            view = self.workers.setdefault(worker, WorkerView())
            view.version, view.inflight, view.last_seen = version, inflight, now
            for iid, (last_done, served, errs) in activity.items():
                rec = fleet.find(iid)
                if rec is None:
                    continue
                rec.last_activity = max(rec.last_activity, last_done)
                rec.served += int(served)
                rec.errors += int(errs)
            if metrics:
                self.rollouts.record_metrics(metrics, now)
                self.traffic.observe(now, metrics)
            if version == fleet.version and wait > 0:
                fleet.wait(wait)
            if version == fleet.version:
                return SyncReply(fleet.version)
            return SyncReply(fleet.version, self.snapshot())

    def report_unreachable(self, instance_id: str) -> None:
        """A worker could not connect to an instance: check it now rather than at the next tick.
        A process that is exiting refuses connections a moment before it can be reaped, so the
        check is repeated for a short, bounded while: the worker's retry then meets the crash
        booked (and is held for a replacement), not the same dead address again."""
        with self.fleet:
            rec = self.fleet.find(instance_id)
        for _ in range(UNREACHABLE_CHECKS):
            if rec is None or rec.phase != READY:
                return
            self.fleet.check(rec)
            if rec.driver_failures:  # the poll itself failed: marked, and retried with backoff
                return
            if rec.phase == READY:
                self.fleet.sleep(UNREACHABLE_CHECK_INTERVAL_S)

    def snapshot(self) -> Snapshot:
        """What workers route by: ready instances per deployment (caller holds the lock).
        Built once per version; its wire form too (`Snapshot.to_json`)."""
        version = self.fleet.version
        if self._snapshot is None or self._snapshot.version != version:
            deps = {}
            for name, rt in self.deps.items():
                if rt.removed:
                    continue
                spec = rt.spec
                deps[name] = RouteEntry(
                    state=spec.state, algorithm=spec.load_balancer.algorithm,
                    sticky=spec.load_balancer.sticky_sessions, rr_slot=rt.rr_slot, access=spec.access,
                    keys=self.keys_for(name) if spec.access == "private" else {},
                    revision=rt.revision_number, split=self.rollouts.split(name),
                    request_timeout=spec.request_timeout_s,
                    ready=tuple(_address(r) for r in rt.by_phase(READY) if r.inst is not None and not r.unhealthy),
                    health=_health(spec), protocol=spec.protocol, tunnel_timeout=spec.tunnel_timeout_s,
                    tunnel_idle_timeout=spec.tunnel_idle_timeout_s)
            self._snapshot = Snapshot(version, deps)
        return self._snapshot

    # ------------------------------------------------------------------ reconcile
    def tick(self) -> None:
        """One reconcile pass: crashes, idle release, drains, minReplicas, forgotten deployments.
        A driver call that raises marks its instance (`Fleet.check`) and the pass goes on."""
        fleet = self.fleet
        self.node_watch.step(self.driver)
        fleet.poll_all(self.clock())
        fleet.retry_stops(self.clock())
        with fleet:
            now = self.clock()
            self._forget_stale_workers(now)
            inflight = self.inflight()
            for name in list(self.deps):
                self._reconcile(self.deps[name], inflight, now)
            self.autoscaler.step(inflight, now)
            self.alerts.step(now)
            if now - self._history_saved >= HISTORY_SAVE_S:
                self._history_saved = now
                self.store.save_minutes(self.traffic.unsaved_minutes())
            self.coldstarts.expire(now)
            self.traffic.forget({i for rt in self.deps.values() for i in rt.instances}, set(self.deps))
            self.coldstarts.forget({i for rt in self.deps.values() for i in rt.instances}, set(self.deps), now)

    def _reconcile(self, rt: DepRuntime, inflight: dict[str, int], now: float) -> None:
        fleet = self.fleet
        rolling = self.rollouts.drive(rt, now)  # a rollout in progress owns the instance count
        spec = rt.spec
        if not rt.removed and spec.state == "running" and not rolling:
            ready = rt.by_phase(READY)
            release = idle_instances({r.id: r.last_activity for r in ready},
                                     {r.id: inflight.get(r.id, 0) for r in ready},
                                     spec.scaling.idle_timeout_s, now, keep=spec.scaling.min_replicas)
            for iid in release:
                fleet.drain(rt.instances[iid], f"idle for {spec.scaling.idle_timeout_s:g} s")
        elif spec.state == "stopped" or rt.removed:
            for rec in rt.by_phase(READY):
                fleet.drain(rec, "deployment removed" if rt.removed else "deployment stopped")
        for rec in rt.by_phase(DRAINING):
            if rec.last_activity > rec.drain_started and fleet.can_revive(rt, rec, by_traffic=True):
                fleet.revive(rec, "traffic arrived while it was being released")
            elif self._drained(rec, inflight) or now - rec.drain_started > drain_timeout_s(spec):
                fleet.stop(rec, rec.reason)
        if rt.removed:
            if not rt.instances:
                fleet.remove_deployment(spec.name)
            return
        alive = len(rt.alive())
        if spec.state == "running" and not rolling and alive < spec.scaling.min_replicas \
                and now >= rt.backoff_until:
            for _ in range(spec.scaling.min_replicas - alive):
                if fleet.try_start(rt, f"minReplicas {spec.scaling.min_replicas}", now) is None:
                    break

    def _drained(self, rec: Rec, inflight: dict[str, int]) -> bool:
        if inflight.get(rec.id, 0) > 0:
            return False
        return all(w.version >= rec.drain_version for w in self.workers.values())

    def inflight(self) -> dict[str, int]:
        """Requests in flight per instance, summed over every gateway worker's last report."""
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
        """Re-attach to instances a previous `serve` left running; book the rest as gone.
        A driver call that raises for one stored instance books that one as lost."""
        fleet = self.fleet
        now = self.clock()
        resume: dict[str, tuple[Deployment, int]] = {}
        for stored in self.store.instances(driver=self.driver.name):
            inst = stored.instance
            rt = self.deps.get(inst.deployment)
            adopt_error = None
            try:
                alive = self.driver.adopt(inst)
            except Exception as exc:  # noqa: BLE001 - one bad record must not stop the others' adoption
                log.warning("driver.adopt of %s raised", inst.id, exc_info=True)
                adopt_error = f"driver.adopt raised ({errors.DRIVER_FAILED.code}) {type(exc).__name__}: {exc}"
                fleet.event(inst.deployment, "adopt-failed", adopt_error, inst.id)
                alive = False
            # An instance of an earlier revision means a rollout was under way when the last
            # controller stopped: keep it serving and roll it again from here.
            earlier = None
            if alive and rt is not None and not rt.removed and inst.revision != rt.spec.revision \
                    and rt.spec.state == "running":
                earlier = resume.get(rt.spec.name) or self._stored_spec(rt.spec.name, inst.revision)
            if alive and rt is not None and not rt.removed and (inst.revision == rt.spec.revision or earlier):
                if earlier is not None:
                    resume[rt.spec.name] = earlier
                number = earlier[1] if earlier else rt.revision_number
                why = f"pid {inst.pid} port {inst.port} still running"
                runs = earlier[0] if earlier else rt.spec  # the spec of the revision it runs
                ready = self.probes.ready(inst, runs.load_balancer.health_check,
                                          self.driver.tcp_accept_means_ready, runs.protocol)
                with fleet:
                    if ready:
                        fleet.adopt(rt, inst, number, why, node=inst.node)
                    else:  # loading, or slow to answer one probe: awaited, not killed
                        fleet.adopt_starting(rt, inst, number, why, runs)
                continue
            if alive or adopt_error:
                # Not wanted, or unknown (adopt raised): stopped, so nothing is orphaned.
                if adopt_error:
                    why = f"{adopt_error}: stopped rather than left unwatched"
                else:
                    why = "its deployment or revision is no longer wanted"
                try:
                    self.driver.stop(inst, self.stop_timeout)
                except Exception as exc:  # noqa: BLE001 - booked as lost with the reason; the others go on
                    log.warning("driver.stop of %s raised", inst.id, exc_info=True)
                    why += f"; driver.stop raised ({errors.DRIVER_FAILED.code}) {type(exc).__name__}: {exc}"
            else:
                why = "process is gone"
            fleet.event(inst.deployment, "lost", f"stored instance not adopted: {why}", inst.id)
            self.store.remove_instance(inst.id, now)
        with fleet:
            for name, (stable, number) in resume.items():
                rt = self.deps[name]
                self.rollouts.begin(rt, stable, number, "rollout", rt.spec.rollout.strategy,
                                    "resumed after a controller restart", now)
        known = {s.instance.id for s in self.store.instances()}
        try:
            found = self.driver.discover()
        except Exception as exc:  # noqa: BLE001 - discovery is a report; serving goes on without it
            log.warning("driver.discover raised", exc_info=True)
            fleet.event("controller", "discover-failed", f"driver.discover raised ({errors.DRIVER_FAILED.code}) "
                        f"{type(exc).__name__}: {exc}; unknown instances are not reported")
            found = []
        owner = getattr(self.driver, "owner", None)
        for inst in found:
            with fleet:
                # The store lags the fleet: an instance started since `known` was read (a resumed
                # rollout's first new one) has its record here before its process exists.
                recorded = fleet.find(inst.id) is not None
            if inst.id in known or recorded:
                continue
            if owner is not None and inst.owner == owner:
                self._recover(inst)  # ours, forgotten by a lost or corrupt store
                continue
            fleet.event(inst.deployment, "unknown", f"{self.driver.name} instance {inst.container_id or inst.id}"
                        " carries our labels but is not in the store and another serve started it: left running,"
                        " not adopted", inst.id)
        with fleet:
            fleet.bump()

    def _recover(self, inst: Instance) -> None:
        """An instance this serve's state dir started that the store does not know (the database
        was lost or corrupt): adopted when it is wanted and fits (as starting while it still loads
        its model), else stopped; never orphaned."""
        fleet = self.fleet
        how = "its process environment" if self.driver.name == "local" else "its container labels"
        rt = self.deps.get(inst.deployment)
        why = None
        if rt is None or rt.removed:
            why = "its deployment is not in the files any more"
        elif rt.spec.state != "running":
            why = "its deployment is stopped"
        elif inst.revision != rt.spec.revision:
            why = f"it runs revision {inst.revision}, not {rt.spec.revision}"
        elif len(rt.alive()) >= rt.spec.scaling.max_replicas:
            why = f"maxReplicas {rt.spec.scaling.max_replicas} are already running"
        try:
            owned = self.driver.adopt(inst)
        except Exception as exc:  # noqa: BLE001 - one bad instance must not stop the others' recovery
            log.warning("driver.adopt of %s raised", inst.id, exc_info=True)
            owned, why = False, why or f"driver.adopt raised ({errors.DRIVER_FAILED.code}) {type(exc).__name__}: {exc}"
        if not owned:
            fleet.event(inst.deployment or "controller", "lost", f"found by {how}, not in the store, but "
                        f"{why or 'it is gone'}: nothing to adopt", inst.id)
            return
        if why is None and rt is not None:
            ready = self.probes.ready(inst, rt.spec.load_balancer.health_check, self.driver.tcp_accept_means_ready,
                                      rt.spec.protocol)
            self.store.put_instance(inst, self.driver.name, (READY if ready else STARTING).value, fleet.price(rt.spec))
            said = (f"found by {how}, not in the store (the database was lost or corrupt): adopted, "
                    f"pid {inst.pid} port {inst.port}")
            with fleet:
                if ready:
                    fleet.adopt(rt, inst, rt.revision_number, said, node=inst.node)
                else:  # still loading its model: awaited within startTimeout, not killed and started over
                    fleet.adopt_starting(rt, inst, rt.revision_number, said)
            return
        try:
            self.driver.stop(inst, self.stop_timeout)
            done = "stopped"
        except Exception as exc:  # noqa: BLE001 - reported with the reason; the others go on
            log.warning("driver.stop of %s raised", inst.id, exc_info=True)
            done = f"stop failed ({errors.DRIVER_FAILED.code}) {type(exc).__name__}: {exc}"
        fleet.event(inst.deployment or "controller", "stopped", f"found by {how}, not in the store: {done} "
                    f"({why})", inst.id)

    def _stored_spec(self, name: str, revision: str) -> tuple[Deployment, int] | None:
        """The applied spec with this content hash, rebuilt from the store, and its number."""
        for row in reversed(self.store.revisions(name)):
            if row.revision != revision:
                continue
            try:
                spec = spec_from_revision(row)
            except AutoDeployError:
                continue
            if spec.revision == revision:
                return spec, row.number
        return None

    # ------------------------------------------------------------------ operations
    def action(self, name: str, action: str, args: dict) -> dict:
        """scale / stop / start / delete / rollback, and the history, rollout and drift views
        (`controller.operations`); the same for the CLI and the HTTP API."""
        with self.fleet:
            return self.operations.act(name, action, args)

    # ------------------------------------------------------------------ status
    def status(self, name: str | None = None) -> dict:
        with self.fleet:
            now = self.clock()
            booked = self.store.booked_cost()
            inflight = self.inflight()
            if name is not None:
                rt = self.fleet.runtime(name)
                return self._dep_status(rt, booked, inflight, now, events=True)
            return {"deployments": [self._dep_status(rt, booked, inflight, now, events=False)
                                    for _, rt in sorted(self.deps.items()) if not rt.removed],
                    "errors": [str(e) for e in self.spec_errors],
                    "driver": self.driver.name,
                    "gpu_inventory": getattr(self.inventory, "source", None),
                    "source": self.source.status() if self.source is not None else None,
                    "nodes": self.node_watch.status()}

    def _dep_status(self, rt: DepRuntime, booked: dict, inflight: dict[str, int], now: float,
                    events: bool) -> dict:
        spec = rt.spec
        recs = sorted(rt.instances.values(), key=lambda r: r.created)
        price = self.fleet.price(spec)
        running_s = sum(now - (r.inst.started_at if r.inst else r.created) for r in recs)
        booked_s, booked_cost = booked.get(spec.name, (0.0, 0.0))
        status = status_word(spec.state, sum(r.phase == READY for r in recs), len(recs), rt.failures)
        file_errors = [str(e) for e in self.spec_errors if e.file == spec.source_file]
        out: dict[str, Any] = {
            "name": spec.name, "description": spec.description, "environment": spec.environment,
            "model": {"id": spec.model_id, "version": spec.model_version},
            "endpoint": f"/d/{spec.name}/", "access": spec.access, "state": spec.state, "status": status,
            "revision": {"number": rt.revision_number, "hash": spec.revision, "file": spec.source_file,
                         "commit": _commit_json(self.store.revision_commit(spec.name, rt.revision_number))},
            "replicas": {"min": spec.scaling.min_replicas, "max": spec.scaling.max_replicas,
                         "current": len(recs), "ready": sum(r.phase == READY for r in recs)},
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
        return {"id": rec.id, "state": rec.phase.value, "revision": rec.revision, "revision_number": rec.number,
                "pid": inst.pid if inst else None, "port": inst.port if inst else None,
                "container_id": inst.container_id if inst else None, "gpu_ids": rec.gpu_ids, "node": rec.node,
                "started": inst.started_at if inst else rec.created, "ready_at": rec.ready_at,
                "last_request": rec.last_activity if rec.served else None,
                "requests_served": rec.served, "errors": rec.errors, "in_flight": inflight.get(rec.id, 0),
                "healthy": not rec.unhealthy, "health_failures": rec.health_failures,
                "driver_error": rec.driver_error, "driver_failures": rec.driver_failures,
                "start": self.coldstarts.of(rec.id, self.clock()),
                "metrics": self.traffic.instance_metrics(rec.id, inflight.get(rec.id, 0), self.clock())}

    # ------------------------------------------------------------------ shutdown
    def shutdown(self) -> None:
        """Stop every instance this controller started (in parallel) and wake every waiter."""
        self.fleet.shutdown()
        self.alerts.close()
        with self.fleet:
            self.store.save_minutes(self.traffic.unsaved_minutes())

    def first_byte(self, instance_id: str, at: float) -> bool:
        """The gateway got the first response byte for a request that waited on this instance's start."""
        return self.coldstarts.first_byte(instance_id, at)

    def log_tail(self, name: str, instance_id: str, lines: int) -> dict:
        """The last lines of one instance's output (the dashboard's log tail)."""
        with self.fleet:
            rec = self.fleet.runtime(name).instances.get(instance_id)
        if rec is None or rec.inst is None:
            raise AutoDeployError(errors.INSTANCE_NOT_FOUND, f"{name} has no running instance {instance_id!r}")
        return {"instance": instance_id, "lines": lines, "text": self.driver.log_tail(rec.inst, lines)}

    def events_after(self, after: int, name: str | None, limit: int) -> list[dict]:
        """Events with an id above `after` (oldest first), or the latest `limit` when `after` < 0."""
        if name is not None:
            with self.fleet:
                self.fleet.runtime(name)
        return [{"id": e.id, "at": e.at, "deployment": e.deployment, "instance": e.instance, "kind": e.kind,
                 "message": e.message}
                for e in (self.store.events(name, limit) if after < 0 else self.store.events_after(after, name, limit))]

    def routing_changed(self) -> None:
        """Something the routing snapshot carries changed outside the controller (endpoint keys)."""
        with self.fleet:
            self.fleet.bump()

    # ------------------------------------------------------------------ helpers
    def _capacity(self, rt: DepRuntime, exclude_self: bool) -> Capacity:
        fleet = self.fleet
        return Capacity(
            ready=tuple(r.id for r in rt.by_phase(READY) if not r.unhealthy),
            starting=tuple(r.id for r in rt.by_phase(STARTING)),
            draining=tuple(r.id for r in rt.by_phase(DRAINING) if fleet.can_revive(rt, r)),
            # An unhealthy instance still holds its slot (and GPU) but takes no request.
            stopping=len(rt.by_phase(STOPPING)) + sum(
                1 for r in rt.by_phase(DRAINING) if r.revision != rt.spec.revision) + sum(
                1 for r in rt.by_phase(READY) if r.unhealthy),
            max_replicas=rt.spec.scaling.max_replicas,
            waiting=rt.waiting - (1 if exclude_self else 0),
            queue_limit=self.queue_limit, backoff_until=rt.backoff_until,
            running=rt.spec.state == "running", failures=rt.failures, crashed=rt.crashed)


def _address(rec: Rec) -> Address:
    assert rec.inst is not None
    return Address(rec.id, rec.inst.host, rec.inst.port, rec.number, rec.deployment, rec.slot)


def _commit_json(commit: Commit | None) -> dict | None:
    return commit.to_json() if commit is not None else None


def _health(spec: Deployment) -> HealthProbe | None:
    """What the haproxy data plane renders a backend's check from (gateway/haproxy_config.backend_of)."""
    hc = spec.load_balancer.health_check
    return None if hc is None else HealthProbe(hc.path, hc.interval_s, hc.timeout_s, hc.failure_threshold)
