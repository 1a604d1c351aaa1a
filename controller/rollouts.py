"""The controller's side of rollouts: observe, call the pure state machine, act.

`controller.policy.rollout.step` decides; this module turns a deployment's
instances into an `Observed`, keeps the `RolloutState` between reconcile passes,
and executes the actions through the fleet's transitions: `start` for new
(or restored old) instances and `release` (the drain) for instances that go, so in-flight
requests finish before a process is stopped. Traffic weights are published in
the routing snapshot (`split`), which the gateway workers apply per request.

Every method runs with the fleet's lock held (it is called from `apply`,
`tick`, `sync` and the operations).
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from controller.contracts import Split
from controller.errors import AutoDeployError
from controller.fleet import ALIVE, DRAINING, FAILED, GONE, READY, STARTING, STOPPING, DepRuntime, Fleet, Rec
from controller.latency import add_hist, percentile
from controller.policy import edits
from controller.policy.rollout import (Action, Done, Observed, RevisionStats, RolloutSpec,
                                       RolloutState, SetWeights, StartNew, StartOld, StopNew, StopOld, abort, step)
from controller.spec import Deployment
from controller.store import Store

log = logging.getLogger("autodeploy.rollouts")

MAX_REPORTS = 100_000  # per rollout; canary analysis looks at the current step only


@dataclass
class Run:
    """One rollout of a deployment from its stable revision to a new one."""
    name: str
    kind: str  # rollout (new version) | restart (env/resources) | rollback (operator)
    stable: Deployment  # what a rollback restores
    stable_number: int
    new_revision: str  # spec hash of the target (an in-place edit during the rollout moves it)
    new_number: int
    spec: RolloutSpec
    slot: int  # shared counter slot of the gateway's weighted split
    started_at: float
    why: str
    state: RolloutState | None = None
    weights: tuple[float, float] | None = None  # (old, new) percent while a split is published
    finished_at: float | None = None
    outcome: str | None = None  # succeeded | rolled_back | cancelled
    seen_new: dict[str, Rec] = field(default_factory=dict)
    retired: set[str] = field(default_factory=set)  # instances this rollout stopped on purpose
    # (arrival time, is_new, requests, errors, latency histogram): the gateway workers' reports
    reports: deque = field(default_factory=lambda: deque(maxlen=MAX_REPORTS))
    last_observed: Observed | None = None

    @property
    def done(self) -> bool:
        return self.outcome is not None


def revision_stats(reports: list[tuple[float, bool, int, int, dict]],
                   since: float) -> tuple[RevisionStats, RevisionStats]:
    """(old, new) traffic reported since `since`: counts add up, histograms merge exactly."""
    out = []
    for side in (False, True):
        n = e = 0
        hist: dict[int, int] = {}
        for at, is_new, count, errs, h in reports:
            if is_new is side and at >= since:
                n, e = n + count, e + errs
                add_hist(hist, h)
        out.append(RevisionStats(n, e, percentile(hist, 0.99) or 0.0))
    return out[0], out[1]


def describe_actions(actions: list[Action]) -> str:
    parts = []
    for a in actions:
        if isinstance(a, SetWeights):
            parts.append(f"traffic old {a.old:g}% / new {a.new:g}%")
        elif isinstance(a, StartNew):
            parts.append(f"start {a.n} new")
        elif isinstance(a, StartOld):
            parts.append(f"start {a.n} old")
        elif isinstance(a, StopNew):
            parts.append(f"stop {a.n} new")
        elif isinstance(a, StopOld):
            parts.append(f"stop {a.n} old")
    return ", ".join(parts)


class RolloutDriver:
    def __init__(self, fleet: Fleet, store: Store) -> None:
        self.fleet = fleet
        self.store = store
        # Told when a rollout is rolled back (operations remembers it as a runtime override).
        self.on_rolled_back: Callable[[str, int, str], None] = lambda name, number, reason: None
        self.active: dict[str, Run] = {}
        self.last: dict[str, Run] = {}

    # ------------------------------------------------------------------ a new spec arrived
    def changed(self, rt: DepRuntime, old: Deployment, old_number: int, now: float,
                kind: str | None = None) -> None:
        """`rt.spec` was just replaced by a new revision: apply it by the guide's edit rules."""
        new = rt.spec
        edit = edits.classify(old.raw, new.raw)
        name = new.name
        if new.state == "stopped":
            self.cancel(rt, "deployment stopped", now)
            for rec in rt.by_phase(READY):
                self.fleet.drain(rec, "deployment stopped")
            return
        if old.template_hash == new.template_hash:
            self._retag(rt, old.revision, new)
            run = self.active.get(name)
            if run is not None and run.new_revision == old.revision:
                run.new_revision, run.new_number = new.revision, rt.revision_number
            self.fleet.event(name, "edit", f"revision {rt.revision_number}: " + edits.describe(edit, ""))
            self.fleet.bump()
            return
        if kind == "rollback":
            strategy = "rolling"
        else:
            kind = "rollout" if edit.kind == edits.ROLLOUT else "restart"
            strategy = new.rollout.strategy if kind == "rollout" else "rolling"
        why = edits.describe(edit, strategy) if kind != "rollback" else \
            f"rollback to revision {rt.revision_number}: rolling update ({edit.summary})"
        self.begin(rt, old, old_number, kind, strategy, why, now)

    def _retag(self, rt: DepRuntime, old_revision: str, new: Deployment) -> None:
        for rec in rt.instances.values():
            if rec.revision == old_revision:
                rec.revision, rec.number = new.revision, rt.revision_number
                self.store.set_instance_revision(rec.id, new.revision)

    def begin(self, rt: DepRuntime, old: Deployment, old_number: int, kind: str, strategy: str,
              why: str, now: float) -> None:
        name = rt.spec.name
        previous = self.active.pop(name, None)
        if previous is not None and not previous.done:
            # A newer revision supersedes the rollout in progress: its instances count as
            # old now, and a rollback still restores the last stable revision.
            stable, stable_number, desired = previous.stable, previous.stable_number, previous.spec.desired
            self.fleet.event(name, "rollout", f"rollout to revision {previous.new_number} superseded by "
                                           f"revision {rt.revision_number}")
        else:
            stable, stable_number = old, old_number
            alive_old = [r for r in rt.instances.values()
                         if r.phase in ALIVE and r.revision != rt.spec.revision]
            desired = len(alive_old)
            if desired == 0:
                # Nothing runs the old revision: the new one serves from the next start.
                self.fleet.event(name, "edit", f"revision {rt.revision_number}: {why}; no instance runs, so nothing "
                                            "to roll: new instances start with this revision")
                self.fleet.bump()
                return
            desired = max(desired, rt.spec.scaling.min_replicas)
            desired = min(desired, max(1, rt.spec.scaling.max_replicas))
        rspec = replace(RolloutSpec.from_rollout(rt.spec.rollout, desired), strategy=strategy)
        run = Run(name=name, kind=kind, stable=stable, stable_number=stable_number,
                  new_revision=rt.spec.revision, new_number=rt.revision_number, spec=rspec,
                  slot=self.fleet.new_slot(), started_at=now, why=why)
        self.active[name] = run
        self.fleet.event(name, "rollout", f"revision {stable_number} -> {rt.revision_number}: {why}; "
                                       f"{desired} instance(s)")
        self._step(rt, run, now)
        self.fleet.bump()

    # ------------------------------------------------------------------ every reconcile pass
    def drive(self, rt: DepRuntime, now: float) -> bool:
        """Advance the deployment's rollout; True while it owns the instance count
        (idle release and minReplicas wait until it is over)."""
        run = self.active.get(rt.spec.name)
        if run is None:
            return False
        if rt.removed or rt.spec.state != "running":
            self.cancel(rt, "deployment removed" if rt.removed else "deployment stopped", now)
            return False
        self._step(rt, run, now)
        if run.done:
            self._finish(run)
            return False
        return True

    def _step(self, rt: DepRuntime, run: Run, now: float) -> None:
        obs = self._observe(rt, run)
        before = run.state
        state, actions = step(run.spec, obs, run.state, now)
        run.state = state
        self._execute(rt, run, actions, now)
        moved = before is None or before.phase != state.phase or before.step != state.step
        if (actions or moved) and not run.done:
            acts = describe_actions(actions)
            self.fleet.event(rt.spec.name, "rollout", state.reason + (f" -> {acts}" if acts else ""))

    def _observe(self, rt: DepRuntime, run: Run) -> Observed:
        for rec in rt.instances.values():
            # Only live ones: an instance of the target revision already going away (a
            # rollback to a revision just replaced) is not a failure of this rollout.
            if rec.revision == run.new_revision and rec.phase in ALIVE:
                run.seen_new.setdefault(rec.id, rec)
        new = [r for r in run.seen_new.values() if r.revision == run.new_revision]
        failed = [r for r in new if r.phase == FAILED
                  or (r.phase in (GONE, STOPPING, DRAINING) and r.id not in run.retired)]
        old = [r for r in rt.instances.values() if r.phase in ALIVE and r.revision != run.new_revision]
        old_stats = new_stats = None
        if run.spec.strategy == "canary" and run.state is not None:
            old_stats, new_stats = revision_stats(list(run.reports), run.state.step_started_at)
        obs = Observed(
            old_ready=sum(r.phase == READY for r in old),
            new_ready=sum(r.phase == READY for r in new),
            new_starting=sum(r.phase == STARTING for r in new),
            new_failed=len(failed),
            old_total=len(old),
            new_total=sum(r.phase in ALIVE for r in new) + len(failed),
            old_stats=old_stats, new_stats=new_stats)
        run.last_observed = obs
        return obs

    def _execute(self, rt: DepRuntime, run: Run, actions: list[Action], now: float) -> None:
        name = rt.spec.name
        done = next((a for a in actions if isinstance(a, Done)), None)
        if done is not None and done.outcome == "rolled_back":
            # Restore the stable revision first, so StartOld starts it.
            rt.spec, rt.revision_number = run.stable, run.stable_number
            rt.failures, rt.backoff_until = 0, 0.0
        for action in actions:
            if isinstance(action, SetWeights):
                run.weights = (action.old, action.new)
                self.fleet.bump()
            elif isinstance(action, (StartNew, StartOld)):
                what = "new" if isinstance(action, StartNew) else "old"
                for _ in range(action.n):
                    try:
                        rec = self.fleet.start(rt, f"rollout: {what} revision {rt.revision_number}")
                        if what == "new":
                            run.seen_new[rec.id] = rec  # a start that fails at once still counts
                    except AutoDeployError as exc:
                        self.fleet.event(name, "rollout", f"cannot start a {what} instance now: {exc.message}")
                        break
            elif isinstance(action, StopOld):
                old = [r for r in rt.instances.values() if r.phase in ALIVE and r.revision != run.new_revision]
                self._retire(run, old, action.n, f"rollout: replaced by revision {run.new_number}")
            elif isinstance(action, StopNew):
                new = [r for r in rt.instances.values() if r.phase in ALIVE and r.revision == run.new_revision]
                self._retire(run, new, action.n, f"rollout: revision {run.new_number} rolled back")
            elif isinstance(action, Done):
                run.outcome, run.finished_at = action.outcome, now
                run.weights = None
                if action.outcome == "rolled_back":
                    self.fleet.event(name, "rollback", f"revision {run.new_number} rolled back to revision "
                                                    f"{run.stable_number}: {action.reason}")
                    self.on_rolled_back(name, run.stable_number, action.reason)
                else:
                    self.fleet.event(name, "rollout", f"revision {run.new_number} rolled out: {action.reason}")
                self.fleet.bump()

    def _retire(self, run: Run, recs: list[Rec], n: int, reason: str) -> None:
        """Stop n of recs: those not ready first (the state machine's contract), then ready
        ones through the drain, so requests in flight finish."""
        order = sorted(recs, key=lambda r: (r.phase == READY, r.created))
        for rec in order[:n]:
            run.retired.add(rec.id)
            self.fleet.release(rec, reason)  # one still being launched: _finish stops it once it has a process

    def _finish(self, run: Run) -> None:
        """After the outcome: stop what is left of the losing side, then forget the run."""
        rt = self.fleet.deps.get(run.name)
        if rt is not None:
            losing = [r for r in rt.instances.values() if r.phase in ALIVE and
                      (r.revision == run.new_revision) == (run.outcome == "rolled_back")]
            self._retire(run, losing, len(losing), f"rollout {run.outcome}")
            if any(r.phase == STARTING and r.inst is None for r in losing):
                return  # keep the run until those have a process to stop
        self.last[run.name] = run
        self.active.pop(run.name, None)
        self.fleet.bump()

    def cancel(self, rt: DepRuntime, reason: str, now: float) -> None:
        run = self.active.pop(rt.spec.name, None)
        if run is None:
            return
        if not run.done:
            run.outcome, run.finished_at, run.weights = "cancelled", now, None
            run.state = replace(run.state or RolloutState(), reason=f"cancelled: {reason}")
            self.fleet.event(rt.spec.name, "rollout", f"rollout to revision {run.new_number} cancelled: {reason}")
        self.last[run.name] = run
        self.fleet.bump()

    def rollback_now(self, rt: DepRuntime, reason: str, now: float) -> bool:
        """Abort the rollout in progress back to its stable revision; False when none runs."""
        run = self.active.get(rt.spec.name)
        if run is None or run.done or run.state is None:
            return False
        state, actions = abort(run.spec, self._observe(rt, run), run.state, reason)
        run.state = state
        self._execute(rt, run, actions, now)
        self._finish(run)
        return True

    # ------------------------------------------------------------------ gateway facing
    def split(self, name: str) -> Split | None:
        """The traffic split for the routing snapshot, or None (all ready instances alike)."""
        run = self.active.get(name)
        if run is None or run.weights is None:
            return None
        return Split(run.slot, run.new_number, float(run.weights[1]), float(run.weights[0]))

    def record_metrics(self, metrics: dict[str, dict], now: float) -> None:
        """A gateway worker's per-instance report since its last sync ({"n": requests,
        "e": errors, "h": latency histogram}), kept per revision for canary analysis."""
        for iid, m in metrics.items():
            rec = self.fleet.find(iid)
            if rec is None:
                continue
            run = self.active.get(rec.deployment)
            if run is None or run.done or run.weights is None:
                continue
            run.reports.append((now, rec.revision == run.new_revision, int(m.get("n", 0)), int(m.get("e", 0)),
                                dict(m.get("h", {}))))

    def forget(self, name: str) -> None:
        """A deleted deployment: its last rollout goes with it."""
        self.last.pop(name, None)

    def owns(self, name: str) -> bool:
        run = self.active.get(name)
        return run is not None and not run.done

    # ------------------------------------------------------------------ status
    def status(self, name: str, now: float) -> dict[str, Any] | None:
        run = self.active.get(name) or self.last.get(name)
        if run is None:
            return None
        state = run.state or RolloutState()
        steps = list(run.spec.steps) if run.spec.strategy == "canary" else []
        obs = run.last_observed
        out: dict[str, Any] = {
            "kind": run.kind, "strategy": run.spec.strategy, "from_revision": run.stable_number,
            "to_revision": run.new_number, "desired": run.spec.desired,
            "phase": run.outcome or state.phase, "active": not run.done and name in self.active,
            "step": (state.step + 1) if steps else None, "steps": steps,
            "weights": ({"old": run.weights[0], "new": run.weights[1]} if run.weights else None),
            "reason": state.reason, "why": run.why,
            "started_at": run.started_at, "finished_at": run.finished_at,
            "elapsed_s": round((run.finished_at or now) - run.started_at, 3),
        }
        if obs is not None:
            out["instances"] = {"old": {"ready": obs.old_ready, "total": obs.old_total},
                                "new": {"ready": obs.new_ready, "starting": obs.new_starting,
                                        "failed": obs.new_failed, "total": obs.new_total}}
            if obs.new_stats is not None and obs.old_stats is not None:
                out["analysis"] = {side: {"requests": s.requests, "errors": s.errors,
                                          "error_rate": round(s.error_rate, 4), "p99_ms": round(s.p99_ms, 3)}
                                   for side, s in (("old", obs.old_stats), ("new", obs.new_stats))}
        return out
