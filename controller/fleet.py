"""The instance table: one owner for every instance's phase.

`Fleet` holds the lock, the per-deployment tables (`DepRuntime`), the routing version
and every transition an instance makes:

    start ──▶ STARTING ──ready──▶ READY ──drain──▶ DRAINING ──stop──▶ STOPPING ──▶ GONE
                 │                  ▲ │               │ revive ▲          │
                 └──fail──▶ FAILED  │ └──exited──▶ GONE (crash)           └─ driver.stop raised:
                                    └──────────────────────┘                stays STOPPING, retried

Each transition writes its event and bumps the routing version (workers route by the
snapshot of that version). Every driver call a transition makes is guarded: a driver
that raises marks that one instance (an event, `driver_error` in status, a retry with
backoff) and never stops the others from being reconciled.

Locking: `with fleet:` takes the one lock (re-entrant). Events recorded while it is
held are written to the store when the outermost holder lets go, so no SQLite write
happens under the lock; they are written in the order they were recorded. Methods
whose names start with a verb of a transition expect the caller to hold the lock,
except `fail`, `exited`, `mark_ready` and the driver-facing `poll_all`/`retry_stops`/
`check`, which take it themselves (they are called from the launch and stop threads).
"""
from __future__ import annotations

import enum
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from controller import errors
from controller.drivers.base import Driver, Instance
from controller.errors import AutoDeployError
from controller.coldstart import ColdStarts
from controller.health import is_ready, listener_problem, port_accepts
from controller.ids import new_instance_id
from controller.policy.capacity import readiness_poll_interval, restart_backoff
from controller.policy.placement import NoPlacement, place
from controller.spec import Deployment, HealthCheck
from controller.store import Store

log = logging.getLogger("autodeploy.controller")

# A ready instance the driver could not poll this many times in a row is stopped and replaced.
POLL_FAILURE_LIMIT = 3


class InstancePhase(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPING = "stopping"
    FAILED = "failed"
    GONE = "gone"


STARTING, READY, DRAINING, STOPPING, FAILED, GONE = (
    InstancePhase.STARTING, InstancePhase.READY, InstancePhase.DRAINING, InstancePhase.STOPPING,
    InstancePhase.FAILED, InstancePhase.GONE)
ALIVE = (STARTING, READY)  # counts towards a deployment's size
ENDED = (FAILED, GONE)  # holds nothing any more


_INFLIGHT_SLOTS = itertools.count()


@dataclass
class Rec:
    """The controller's record of one instance."""
    id: str
    deployment: str
    revision: str
    phase: InstancePhase
    created: float
    inst: Instance | None = None
    ready_at: float | None = None
    last_activity: float = 0.0
    served: int = 0
    errors: int = 0
    drain_version: int = 0
    number: int = 0  # the numbered revision it serves (Deploy-Revision)
    drain_started: float = 0.0
    error: AutoDeployError | None = None  # why it failed to start (raised to the waiters)
    gpu_ids: list[str] = field(default_factory=list)
    reason: str = ""
    # Active health checks (controller.health_checker): out of routing while unhealthy.
    unhealthy: bool = False
    health_failures: int = 0
    # False for an autoscaler scale-down: requests still finishing there must not revive it.
    revivable: bool = True
    # Column in the gateway's shared in-flight counters (gateway/inflight.py).
    slot: int = field(default_factory=lambda: next(_INFLIGHT_SLOTS))
    # The last driver call that raised for it (poll or stop), how often in a row, and when
    # the next try is due.
    driver_error: str | None = None
    driver_failures: int = 0
    retry_at: float = 0.0
    stop_running: bool = False  # a stop thread is at work on it
    launching: bool = False  # driver.start has not returned yet: no process to stop so far
    node: str | None = None  # the Docker host it was placed on (controller.node_watch)


@dataclass
class DepRuntime:
    spec: Deployment
    revision_number: int
    rr_slot: int
    instances: dict[str, Rec] = field(default_factory=dict)
    waiting: int = 0
    failures: int = 0
    backoff_until: float = 0.0
    crashed: bool = False  # the failures began with a ready instance crashing: requests are held
    last_error: str | None = None
    removed: bool = False

    def by_phase(self, phase: InstancePhase) -> list[Rec]:
        return sorted((r for r in self.instances.values() if r.phase == phase), key=lambda r: r.created)

    def alive(self) -> list[Rec]:
        return [r for r in self.instances.values() if r.phase in ALIVE]

    def holding(self) -> int:
        """Instances that hold a slot of maxReplicas (everything not ended)."""
        return sum(1 for r in self.instances.values() if r.phase not in ENDED)

    def serving(self) -> bool:
        return not self.removed and self.spec.state == "running"


Listener = Callable[[Rec, "InstancePhase | None", InstancePhase], None]
Placer = Callable[[Deployment], "tuple[str | None, list[str]]"]


class Probes:
    """How a launch sees its instance come up: real sockets and HTTP. The controller
    harness passes its own (tests/fakes.py FakeDriver)."""

    def port_open(self, inst: Instance) -> bool:
        return port_accepts(inst.host, inst.port, 0.2)

    def ready(self, inst: Instance, health: HealthCheck | None, tcp_is_enough: bool, protocol: str = "http") -> bool:
        """The health path answers 2xx (gRPC: the health service answers SERVING), or
        (without one) the port accepts."""
        return is_ready(inst.host, inst.port, health.path if health else None,
                        timeout=max(0.5, health.timeout_s if health else 1.0), tcp_is_enough=tcp_is_enough,
                        protocol=protocol)

    def problem(self, driver: Driver, inst: Instance) -> str | None:
        """Why an answering port is still not this instance (see controller.health.listener_problem)."""
        return listener_problem(driver, inst)


class Fleet:
    def __init__(self, driver: Driver, store: Store, *, inventory: Any, prices: Any,
                 stop_timeout: float = 10.0, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep, probes: Probes | None = None,
                 coldstarts: ColdStarts | None = None) -> None:
        self.driver = driver
        self.store = store
        self.inventory = inventory
        self.prices = prices
        self.stop_timeout = stop_timeout
        self.clock = clock
        self.sleep = sleep
        self.probes = probes or Probes()
        self.coldstarts = coldstarts or ColdStarts()
        # Places an instance on one of several Docker hosts (node, GPUs); None: this host's GPUs.
        self.placer: Placer | None = None
        self.deps: dict[str, DepRuntime] = {}
        self.version = 1
        self.closing = False
        # Called under the lock on every phase change (old phase None: a new record), for
        # what follows instances (a data plane, metrics); it must not block.
        self.listeners: list[Listener] = []
        self._cv = threading.Condition()
        self._depth = 0  # how deep the owning thread holds the lock
        self._owner: int | None = None  # that thread
        # Events recorded under the lock wait here (a small lock of their own, never held
        # during I/O) and are written by whoever lets the lock go, one writer at a time in
        # the order they were recorded.
        self._pending: list[tuple[str, str, str, str | None, float]] = []
        self._pending_lock = threading.Lock()
        self._write = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._next_slot = 0

    # ------------------------------------------------------------------ the lock
    def __enter__(self) -> "Fleet":
        self._cv.acquire()
        self._depth += 1
        self._owner = threading.get_ident()
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth > 0:
            self._cv.release()
            return
        self._owner = None
        self._cv.release()
        self._flush()

    def _flush(self) -> None:
        """Write the recorded events (the caller does not hold the lock). Returns once the
        events recorded before the call are stored, whoever writes them."""
        with self._write:
            while True:
                with self._pending_lock:
                    batch, self._pending = self._pending, []
                if not batch:
                    return
                self._write_events(batch)

    def held(self) -> bool:
        """Whether the calling thread holds the lock."""
        return self._owner == threading.get_ident()

    def wait(self, timeout: float) -> None:
        """Wait for a change (the caller holds the lock). Events recorded so far are written
        first, with the lock let go like the wait itself lets it go; a change made meanwhile
        returns at once (the caller looks again, as after any wake-up)."""
        depth = self._depth
        self._depth, self._owner = 0, None
        try:
            if self._pending:
                version = self.version
                for _ in range(depth):
                    self._cv.release()
                try:
                    self._flush()
                finally:
                    for _ in range(depth):
                        self._cv.acquire()
                if self.version != version:
                    return
            self._cv.wait(timeout)
        finally:
            self._depth, self._owner = depth, threading.get_ident()

    def _write_events(self, batch: list[tuple[str, str, str, str | None, float]]) -> None:
        for deployment, kind, message, instance, at in batch:
            try:
                self.store.event(deployment, kind, message, instance, at=at)
            except Exception:  # noqa: BLE001 - a lost event must not undo the transition; it is logged
                log.exception("could not store event %s %s", deployment, kind)

    def bump(self) -> None:
        """The routing view changed: a new version, and every waiter wakes."""
        self.version += 1
        self._cv.notify_all()

    def event(self, deployment: str, kind: str, message: str, instance: str | None = None) -> None:
        """Record an event; it is written to the store once the lock is let go."""
        log.info("%s %s%s: %s", deployment, kind, f" {instance}" if instance else "", message)
        with self._pending_lock:
            self._pending.append((deployment, kind, message, instance, self.clock()))
        if not self.held():
            self._flush()

    # ------------------------------------------------------------------ reading
    def find(self, instance_id: str) -> Rec | None:
        for rt in self.deps.values():
            rec = rt.instances.get(instance_id)
            if rec is not None:
                return rec
        return None

    def runtime(self, name: str) -> DepRuntime:
        rt = self.deps.get(name)
        if rt is None or rt.removed:
            raise AutoDeployError(errors.UNKNOWN_DEPLOYMENT, f"no deployment named {name!r}")
        return rt

    def records(self) -> Iterator[Rec]:
        for rt in list(self.deps.values()):
            yield from list(rt.instances.values())

    def new_slot(self) -> int:
        """A column of the gateway's shared round-robin counters."""
        self._next_slot += 1
        return self._next_slot - 1

    def price(self, spec: Deployment, node: str | None = None) -> float:
        # Per-node prices (controller.nodes.NodePrices) when the instance has a node.
        return float(self.prices.per_hour(spec.resources.gpu, **({"node": node} if node else {})))

    def assigned(self) -> dict[str, list[str]]:
        """GPUs held, by instance: everything not ended holds its GPUs."""
        return {r.id: r.gpu_ids for r in self.records() if r.gpu_ids and r.phase not in ENDED}

    # ------------------------------------------------------------------ transitions (lock held)
    def _set(self, rec: Rec, phase: InstancePhase) -> None:
        old, rec.phase = rec.phase, phase
        for listener in self.listeners:
            listener(rec, old, phase)

    def start(self, rt: DepRuntime, reason: str, queued_since: float | None = None) -> Rec:
        """Place and launch a new instance of `rt`'s revision; raises NO_FREE_GPU (or the
        placer's error) when it cannot be placed. `queued_since`: when the request that
        asked for it arrived (a cold start), for the cold-start phases."""
        now = self.clock()
        taken = {i for d in self.deps.values() for i in d.instances}
        rec = Rec(id=new_instance_id(taken), deployment=rt.spec.name, revision=rt.spec.revision,
                  phase=STARTING, created=now, last_activity=now, reason=reason, number=rt.revision_number)
        gpu = rt.spec.resources.gpu
        if self.placer is not None:  # several Docker hosts
            rec.node, rec.gpu_ids = self.placer(rt.spec)
        elif gpu.count > 0:
            placed = place(self.inventory.gpus, self.assigned(), gpu)
            if isinstance(placed, NoPlacement):
                self.event(rt.spec.name, "unplaceable", placed.reason)
                raise AutoDeployError(errors.NO_FREE_GPU, placed.reason, retry_after=10.0)
            rec.gpu_ids = list(placed.gpu_ids)
        self.coldstarts.begin(rec.id, rt.spec.name, reason, queued_since, now)
        self.coldstarts.mark(rec.id, "placement", self.clock())
        rec.launching = True
        rt.instances[rec.id] = rec
        for listener in self.listeners:
            listener(rec, None, STARTING)
        self.event(rt.spec.name, "start", f"{reason}" + (f"; GPUs {','.join(rec.gpu_ids)}" if rec.gpu_ids else "")
                   + (f"; node {rec.node}" if rec.node else ""), rec.id)
        self.spawn(self._launch, rt.spec, rec)
        self.bump()
        return rec

    def try_start(self, rt: DepRuntime, reason: str, now: float) -> Rec | None:
        """`start`, or None after booking the refusal on the deployment (last error, backoff)."""
        try:
            return self.start(rt, reason)
        except AutoDeployError as exc:
            rt.last_error = exc.operator_message
            rt.backoff_until = now + restart_backoff(rt.failures + 1)
            return None

    def adopt(self, rt: DepRuntime, inst: Instance, number: int, why: str, node: str | None = None,
              stored: bool = True) -> Rec:
        """A ready instance found running (a previous controller's, or one on a node that
        answers again), owned again. `stored`: its store row is still there."""
        now = self.clock()
        rec = Rec(id=inst.id, deployment=inst.deployment, revision=inst.revision, phase=READY,
                  created=inst.started_at, inst=inst, ready_at=now, last_activity=now, number=number,
                  gpu_ids=list(inst.gpu_ids), node=node)
        rt.instances[rec.id] = rec
        for listener in self.listeners:
            listener(rec, None, READY)
        if stored:
            self.store.set_phase(rec.id, READY.value)
        else:
            self.store.put_instance(inst, self.driver.name, READY.value, self.price(rt.spec, node), ready_at=now)
        self.event(inst.deployment, "adopted", why, inst.id)
        self.bump()
        return rec

    def adopt_starting(self, rt: DepRuntime, inst: Instance, number: int, why: str,
                       spec: Deployment | None = None) -> Rec:
        """A running instance found not ready yet (still loading its model, or too busy to
        answer one probe in time), owned again as starting: its readiness is awaited as a
        launch's is, and startTimeout counts from its own start, so a loading GPU model is
        not killed and started over because the controller restarted."""
        rec = Rec(id=inst.id, deployment=inst.deployment, revision=inst.revision, phase=STARTING,
                  created=inst.started_at, inst=inst, number=number, gpu_ids=list(inst.gpu_ids), node=inst.node)
        rt.instances[rec.id] = rec
        for listener in self.listeners:
            listener(rec, None, STARTING)
        self.store.set_phase(rec.id, STARTING.value)
        self.event(inst.deployment, "adopted", why + "; not ready yet: awaiting readiness", inst.id)
        self.bump()
        self.spawn(self._adopted_wait, spec or rt.spec, rec, inst)  # spec: the revision it runs
        return rec

    def _adopted_wait(self, spec: Deployment, rec: Rec, inst: Instance) -> None:
        try:
            now = self.clock()  # a start time not on this clock (unknown: 0) counts from now
            self._await_ready(spec, rec, inst, inst.started_at if 0 < inst.started_at <= now else now)
        except Exception as exc:  # noqa: BLE001 - never leave waiters on an instance nobody watches
            log.exception("awaiting adopted %s failed", rec.id)
            self.fail(rec, AutoDeployError(errors.DRIVER_FAILED, f"{type(exc).__name__}: {exc}"))

    def lost(self, rec: Rec, why: str) -> None:
        """Out of reach with its node: gone from the table (its time booked) without a stop;
        the node's return reconciles its container."""
        self._set(rec, GONE)  # a launch thread waiting on it gives up
        rt = self.deps.get(rec.deployment)
        if rt is not None:
            rt.instances.pop(rec.id, None)
        self.event(rec.deployment, "lost", why, rec.id)
        self.store.remove_instance(rec.id, self.clock())
        self.bump()

    def stop_unowned(self, inst: Instance, deployment: str, why: str) -> None:
        """Stop (in the background) a process found running that no record owns; a driver
        that raises is logged as an event, the others go on."""
        self.event(deployment, "stale", why, inst.id or None)

        def run() -> None:
            try:
                self.driver.stop(inst, self.stop_timeout)
            except Exception as exc:  # noqa: BLE001 - an event says it; nothing else depends on it
                log.warning("driver.stop of unowned %s raised", inst.id, exc_info=True)
                self.event(deployment, "stop-failed", f"driver.stop raised ({errors.DRIVER_FAILED.code}) "
                           f"{type(exc).__name__}: {exc}", inst.id or None)
        self.spawn(run)

    def drain(self, rec: Rec, reason: str, revivable: bool = True) -> None:
        """Out of routing; stopped once the workers have seen that and its requests are done."""
        self._set(rec, DRAINING)
        rec.reason, rec.revivable = reason, revivable
        rec.drain_started = self.clock()
        self.bump()
        rec.drain_version = self.version
        self.event(rec.deployment, "release", reason, rec.id)

    def can_revive(self, rt: DepRuntime, rec: Rec, by_traffic: bool = False) -> bool:
        """The one revive rule: a draining instance of the revision the running deployment
        serves is warm and may take requests again. Traffic that was still finishing on it
        revives it only when the drain was an idle release (not a scale-down decision)."""
        return rec.phase == DRAINING and rt.serving() and rec.revision == rt.spec.revision \
            and (rec.revivable or not by_traffic)

    def revive(self, rec: Rec, why: str) -> None:
        self._set(rec, READY)
        rec.last_activity = max(rec.last_activity, self.clock())
        self.event(rec.deployment, "revived", why, rec.id)
        self.bump()

    def stop(self, rec: Rec, reason: str) -> None:
        """Stop its process (in the background); it holds its slot and GPUs until gone."""
        self._set(rec, STOPPING)
        self.event(rec.deployment, "stop", reason, rec.id)
        rec.stop_running = True
        self.spawn(self._do_stop, rec)
        self.bump()

    def release(self, rec: Rec, reason: str) -> None:
        """Drain it if it is ready (in-flight requests finish), else stop it. One still being
        launched (no process yet) is left to its launch, which sees the phase change."""
        if rec.phase == READY:
            self.drain(rec, reason)
        elif rec.phase in (STARTING, DRAINING) and rec.inst is not None:
            self.stop(rec, reason)

    def set_health(self, rec: Rec, unhealthy: bool) -> None:
        if rec.unhealthy != unhealthy:
            rec.unhealthy = unhealthy
            self.bump()

    def remove_deployment(self, name: str) -> None:
        self.deps.pop(name, None)
        self.bump()

    # ------------------------------------------------------------------ transitions (take the lock)
    def fail(self, rec: Rec, exc: AutoDeployError) -> None:
        """It never became ready: the waiters get `exc`, the deployment backs off."""
        with self:
            rec.launching = False
            if rec.phase == STOPPING and rec.inst is None and not rec.stop_running:
                self._gone(rec)  # stopped while the driver was launching it, and it never launched
                return
            if rec.phase in (FAILED, STOPPING, GONE):
                return  # stopped on purpose while starting: not a failure
            self._set(rec, FAILED)
            rec.error = exc
            now = self.clock()
            self.coldstarts.failed(rec.id, now)
            rt = self.deps.get(rec.deployment)
            if rt is not None:
                rt.failures += 1
                rt.backoff_until = now + restart_backoff(rt.failures)
                rt.last_error = exc.operator_message
                rt.instances.pop(rec.id, None)
            self.event(rec.deployment, "failed", exc.operator_message, rec.id)
            self.bump()
        self._clean_up(rec)

    def exited(self, rec: Rec, code: int | None, tail: str) -> None:
        """A ready (or draining) instance died on its own."""
        with self:
            if rec.phase not in (READY, DRAINING):
                return
            self._set(rec, GONE)
            now = self.clock()
            rt = self.deps.get(rec.deployment)
            if rt is not None:
                rt.instances.pop(rec.id, None)
                rt.failures += 1
                rt.backoff_until = now + restart_backoff(rt.failures)
                rt.last_error = f"instance {rec.id} exited with code {code}; last log lines:\n{tail}"
            if rt is not None:
                rt.crashed = True  # requests are held through its restart (policy.capacity)
            self.event(rec.deployment, "crashed", f"exited with code {code}; last log lines:\n{tail}", rec.id)
            self.bump()
        self._clean_up(rec)

    def mark_ready(self, rec: Rec) -> None:
        with self:
            if rec.phase != STARTING:
                return
            now = self.clock()
            self._set(rec, READY)
            rec.ready_at, rec.last_activity = now, now
            self.coldstarts.ready(rec.id, now)
            rt = self.deps.get(rec.deployment)
            if rt is not None:
                rt.failures, rt.last_error, rt.crashed = 0, None, False
            self.store.set_phase(rec.id, READY.value, ready_at=now)
            port = rec.inst.port if rec.inst else None
            self.event(rec.deployment, "ready", f"ready in {now - rec.created:.3f} s on port {port}", rec.id)
            self.bump()

    # ------------------------------------------------------------------ the driver, guarded
    def _clean_up(self, rec: Rec) -> None:
        """After a failure or a crash: stop what is left of the process and book its time.
        A stop that raises puts it back in the table as stopping, to be retried."""
        if rec.inst is not None and not self._driver_stop(rec):
            with self:
                rt = self.deps.get(rec.deployment)
                if rt is not None:
                    rt.instances[rec.id] = rec
                self._set(rec, STOPPING)
                self.bump()
            return
        self.store.remove_instance(rec.id, self.clock())

    def _driver_stop(self, rec: Rec) -> bool:
        assert rec.inst is not None
        try:
            self.driver.stop(rec.inst, self.stop_timeout)
            return True
        except Exception as exc:  # noqa: BLE001 - one instance's stop failure must not stall the others
            log.warning("driver.stop of %s raised", rec.id, exc_info=True)
            self._driver_failed(rec, "stop", exc)
            return False

    def _driver_failed(self, rec: Rec, call: str, exc: BaseException) -> float:
        """Book a raising driver call on the instance; returns the delay before the retry."""
        with self:
            rec.driver_failures += 1
            delay = restart_backoff(rec.driver_failures)
            rec.retry_at = self.clock() + delay
            detail = exc.operator_message if isinstance(exc, AutoDeployError) else f"{type(exc).__name__}: {exc}"
            rec.driver_error = f"{call}: {detail}"
            code = errors.DRIVER_FAILED.code
            self.event(rec.deployment, f"{call}-failed", f"driver.{call} raised ({code}) {detail}; "
                       f"retry {rec.driver_failures} in {delay:g} s", rec.id)
            self.bump()
            return delay

    def _driver_ok(self, rec: Rec, call: str) -> None:
        if rec.driver_failures:
            with self:
                self.event(rec.deployment, f"{call}-ok", f"driver.{call} works again after "
                           f"{rec.driver_failures} failure(s)", rec.id)
                rec.driver_failures, rec.driver_error, rec.retry_at = 0, None, 0.0
                self.bump()

    def _do_stop(self, rec: Rec) -> None:
        with self:
            if rec.inst is None and rec.launching:
                rec.stop_running = False
                return  # the launch hands it back here once the driver has started it
        try:
            if rec.inst is not None and not self._driver_stop(rec):
                return  # stays stopping (holding its slot and GPUs); retry_stops tries again
            with self:
                self._gone(rec)
            self.store.remove_instance(rec.id, self.clock())
        finally:
            with self:
                rec.stop_running = False

    def _gone(self, rec: Rec) -> None:
        self._set(rec, GONE)
        rec.driver_failures, rec.driver_error = 0, None
        rt = self.deps.get(rec.deployment)
        if rt is not None:
            rt.instances.pop(rec.id, None)
        self.bump()

    def retry_stops(self, now: float) -> None:
        """Try again to stop instances whose driver.stop raised, once their backoff is over."""
        with self:
            due = [r for r in self.records() if r.phase == STOPPING and not r.stop_running
                   and r.driver_failures and now >= r.retry_at]
            for rec in due:
                rec.stop_running = True
                self.spawn(self._do_stop, rec)

    def check(self, rec: Rec) -> None:
        """Poll one instance now (guarded): a crash is booked, a raising poll is retried."""
        if rec.inst is None:
            return
        try:
            gone = self.driver.poll(rec.inst)
        except Exception as exc:  # noqa: BLE001 - a poll that raises marks this instance only
            log.warning("driver.poll of %s raised", rec.id, exc_info=True)
            self._driver_failed(rec, "poll", exc)
            with self:
                if rec.driver_failures >= POLL_FAILURE_LIMIT and rec.phase in (READY, DRAINING):
                    self.stop(rec, f"the driver could not poll it {rec.driver_failures} times in a row "
                                   f"({rec.driver_error}): replaced")
            return
        self._driver_ok(rec, "poll")
        if gone is not None:
            self.exited(rec, gone.code, gone.log_tail)

    def poll_all(self, now: float) -> None:
        """Poll every ready or draining instance whose poll is due; one bad poll stalls nothing."""
        with self:
            due = [r for r in self.records() if r.phase in (READY, DRAINING) and r.inst is not None
                   and now >= r.retry_at]
        for rec in due:
            self.check(rec)

    # ------------------------------------------------------------------ launching
    def _launch(self, spec: Deployment, rec: Rec) -> None:
        try:
            self._launch_and_wait(spec, rec)
        except Exception as exc:  # noqa: BLE001 - never leave waiters on an instance nobody watches
            log.exception("starting %s failed", rec.id)
            self.fail(rec, AutoDeployError(errors.DRIVER_FAILED, f"{type(exc).__name__}: {exc}"))

    def _launch_and_wait(self, spec: Deployment, rec: Rec) -> None:
        try:
            inst = self.driver.start(spec, rec.id, rec.gpu_ids, **({"node": rec.node} if rec.node else {}))
        except AutoDeployError as exc:
            self.fail(rec, exc)
            return
        except Exception as exc:  # noqa: BLE001 - any driver failure becomes a coded error for the waiters
            log.exception("driver failed to start %s", rec.id)
            self.fail(rec, AutoDeployError(errors.DRIVER_FAILED, f"{type(exc).__name__}: {exc}"))
            return
        self.coldstarts.mark(rec.id, "create", self.clock())
        with self:
            rec.inst, rec.launching = inst, False
            self.store.put_instance(inst, self.driver.name, STARTING.value, self.price(spec, inst.node))
            for note in inst.notes:
                self.event(rec.deployment, "note", note, rec.id)
            if rec.phase != STARTING:
                # Stopped (or shut down) while the driver was launching it: now there is a process to stop.
                if rec.phase != STOPPING:
                    self._set(rec, STOPPING)
                if not rec.stop_running:
                    rec.stop_running = True
                    self.spawn(self._do_stop, rec)
                return
        self._await_ready(spec, rec, inst, self.clock())

    def _await_ready(self, spec: Deployment, rec: Rec, inst: Instance, begin: float) -> None:
        """Poll a starting instance until it is ready, exits, or outlasts spec.startTimeout
        counted from `begin`."""
        health = spec.load_balancer.health_check
        port_open = health is None  # with a health path, "port open" and "health answers" are two phases
        while True:
            if rec.phase != STARTING:
                return  # cancelled (shutdown or removal) while starting
            gone = self.driver.poll(inst)
            if gone is not None:
                self.fail(rec, AutoDeployError(
                    errors.INSTANCE_START_FAILED,
                    f"instance {rec.id} exited with code {gone.code} before it was ready",
                    private_detail=f"last log lines:\n{gone.log_tail}"))
                return
            if not port_open and self.probes.port_open(inst):
                port_open = True
                self.coldstarts.mark(rec.id, "port", self.clock())
            if self.probes.ready(inst, health, self.driver.tcp_accept_means_ready, spec.protocol):
                problem = self.probes.problem(self.driver, inst)
                if problem is not None:
                    self.fail(rec, AutoDeployError(errors.INSTANCE_START_FAILED, f"instance {rec.id}: {problem}"))
                    return
                break
            elapsed = self.clock() - begin
            if elapsed > spec.start_timeout_s:
                path = health.path if health else None
                self.fail(rec, AutoDeployError(
                    errors.INSTANCE_START_FAILED,
                    f"instance {rec.id} was not ready after {spec.start_timeout_s:g} s"
                    f" ({'GET ' + path + ' never answered 2xx' if path else f'port {inst.port} never accepted'})",
                    private_detail=f"last log lines:\n{self.driver.log_tail(inst)}"))
                return
            self.sleep(readiness_poll_interval(elapsed))
        self.mark_ready(rec)

    # ------------------------------------------------------------------ shutdown
    def shutdown(self) -> None:
        """Stop every instance (in parallel) and wake every waiter."""
        with self:
            self.closing = True
            recs = [r for r in self.records() if r.phase not in (STOPPING, GONE, FAILED)]
            for rec in recs:
                self._set(rec, STOPPING)
                rec.stop_running = True
                self.event(rec.deployment, "stop", "controller shutdown", rec.id)
            self._cv.notify_all()
        for rec in recs:
            self.spawn(self._do_stop, rec)
        self.join(self.stop_timeout + 5)

    def spawn(self, fn: Callable, *args: Any) -> None:
        def run() -> None:
            try:
                fn(*args)
            finally:
                self._threads.discard(threading.current_thread())
        t = threading.Thread(target=run, daemon=True, name=f"{fn.__name__}")
        self._threads.add(t)
        t.start()

    def join(self, timeout: float) -> bool:
        """Wait for the background launch and stop threads; True when none is left."""
        deadline = time.monotonic() + timeout
        while True:  # a launch that ends may hand its process to a new stop thread
            alive = [t for t in list(self._threads) if t.is_alive() and t is not threading.current_thread()]
            if not alive or time.monotonic() >= deadline:
                return not alive
            for t in alive:
                t.join(max(0.0, deadline - time.monotonic()))
