"""Moving a deployment from its old revision to a new one: rolling, blue-green, canary.

`step` is a level-triggered state machine: it looks at what exists now
(`Observed`) and returns the next state and the actions that move towards the
goal. Counts in actions are deltas from the observation, so the controller must
apply them (and have them show up in the next observation, as starting or
stopped instances) before calling `step` again. The contract on StopOld/StopNew:
stop instances that are not ready before ready ones; the availability bound of
rolling updates relies on it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Union

from controller.humantime import duration
from controller.spec import Rollout

STRATEGIES = ("rolling", "blue-green", "canary")
PHASES = ("progressing", "paused", "switched", "succeeded", "rolled_back")
TERMINAL = ("succeeded", "rolled_back")


def _resolve(value: int | str, desired: int, round_up: bool, what: str) -> int:
    if isinstance(value, int):
        n = value
    else:
        text = value.strip()
        if text.endswith("%"):
            pct = float(text[:-1])
            exact = desired * pct / 100.0
            # Integer-valued percentages of small counts can land a hair off an
            # integer in floating point; round before ceil/floor.
            exact = round(exact, 9)
            n = math.ceil(exact) if round_up else math.floor(exact)
        else:
            n = int(text)
    if n < 0:
        raise ValueError(f"{what} must be >= 0, got {value!r}")
    return n


def resolve_surge_unavailable(desired: int, max_surge: int | str,
                              max_unavailable: int | str) -> tuple[int, int]:
    """Kubernetes' fenceposts: surge rounds up, unavailable rounds down, never both zero.

    Rounding this way errs towards availability; both zero could never make
    progress, so unavailable becomes 1 (as Kubernetes does).
    """
    surge = _resolve(max_surge, desired, True, "maxSurge")
    unavailable = _resolve(max_unavailable, desired, False, "maxUnavailable")
    if surge == 0 and unavailable == 0:
        unavailable = 1
    return surge, unavailable


@dataclass(frozen=True)
class RolloutSpec:
    strategy: str
    desired: int
    max_surge: int | str = "25%"
    max_unavailable: int | str = "25%"
    canary_steps: tuple[int, ...] = (10, 50, 100)
    step_pause_s: float = 30.0
    keep_old_s: float = 300.0
    # Canary analysis: the new revision fails a step when its error rate exceeds
    # the old one's by more than this (absolute), or its p99 exceeds old p99 x ratio.
    max_error_rate_increase: float = 0.05
    max_p99_ratio: float = 1.5
    # ...and only when it also exceeds old p99 + this: on fast endpoints a ratio alone
    # fails on scheduling noise of a few milliseconds.
    p99_tolerance_ms: float = 0.0
    min_requests: int = 20
    # With fewer than min_requests after this many pauses the step is promoted
    # anyway (the reason says "inconclusive"): low-traffic GPU services would
    # otherwise never finish a canary.
    max_inconclusive_pauses: int = 3

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown rollout strategy {self.strategy!r}; use one of {STRATEGIES}")
        if self.desired < 0:
            raise ValueError(f"desired must be >= 0, got {self.desired}")
        if any(not 0 < w <= 100 for w in self.canary_steps):
            raise ValueError(f"canary steps are percentages in (0, 100], got {self.canary_steps}")

    @classmethod
    def from_rollout(cls, rollout: Rollout, desired: int) -> "RolloutSpec":
        return cls(rollout.strategy, desired, rollout.max_surge, rollout.max_unavailable,
                   tuple(rollout.canary_steps), rollout.step_pause_s, rollout.keep_old_s,
                   max_error_rate_increase=rollout.max_error_rate_increase,
                   max_p99_ratio=rollout.max_p99_ratio, p99_tolerance_ms=rollout.p99_tolerance_ms,
                   min_requests=rollout.min_requests)

    @property
    def steps(self) -> tuple[int, ...]:
        """Canary weights, ascending, ending at 100 (added when missing)."""
        s = sorted(set(self.canary_steps) | {100})
        return tuple(s)

    def fenceposts(self) -> tuple[int, int]:
        return resolve_surge_unavailable(self.desired, self.max_surge, self.max_unavailable)


@dataclass(frozen=True)
class RevisionStats:
    """Traffic of one revision; for canary, counted since the current step's weights were set."""

    requests: int
    errors: int
    p99_ms: float

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class Observed:
    """Instances per revision; *_total counts every one that exists (ready, starting or failed)."""

    old_ready: int
    new_ready: int
    new_starting: int
    new_failed: int
    old_total: int
    new_total: int
    old_stats: RevisionStats | None = None
    new_stats: RevisionStats | None = None


@dataclass(frozen=True)
class RolloutState:
    phase: str = "progressing"
    step: int = 0  # canary step index
    step_started_at: float = 0.0  # rollout start, or when the current canary step's weights were set
    switched_at: float | None = None  # blue-green: when traffic moved to the new set
    reason: str = ""


@dataclass(frozen=True)
class StartNew:
    n: int


@dataclass(frozen=True)
class StopNew:
    n: int


@dataclass(frozen=True)
class StartOld:
    """Restore old instances on rollback (rolling updates have stopped some)."""

    n: int


@dataclass(frozen=True)
class StopOld:
    n: int


@dataclass(frozen=True)
class SetWeights:
    """Traffic split between revisions, in percent."""

    old: float
    new: float


@dataclass(frozen=True)
class Done:
    outcome: str  # succeeded | rolled_back
    reason: str


Action = Union[StartNew, StopNew, StartOld, StopOld, SetWeights, Done]


def _rollback(spec: RolloutSpec, obs: Observed, state: RolloutState,
              reason: str) -> tuple[RolloutState, list[Action]]:
    # Traffic leaves the new revision first, then the old set is made whole again.
    actions: list[Action] = [SetWeights(100.0, 0.0)]
    if obs.old_total < spec.desired:
        actions.append(StartOld(spec.desired - obs.old_total))
    if obs.new_total > 0:
        actions.append(StopNew(obs.new_total))
    actions.append(Done("rolled_back", reason))
    return replace(state, phase="rolled_back", reason=reason), actions


def abort(spec: RolloutSpec, observed: Observed, state: RolloutState,
          reason: str) -> tuple[RolloutState, list[Action]]:
    """Roll back now, whatever the phase (a manual rollback during a rollout)."""
    if state.phase in TERMINAL:
        return state, []
    return _rollback(spec, observed, state, reason)


def _succeed(state: RolloutState, obs: Observed, reason: str,
             weights: bool) -> tuple[RolloutState, list[Action]]:
    actions: list[Action] = [SetWeights(0.0, 100.0)] if weights else []
    if obs.old_total > 0:
        actions.append(StopOld(obs.old_total))
    actions.append(Done("succeeded", reason))
    return replace(state, phase="succeeded", reason=reason), actions


def _failed_reason(obs: Observed) -> str:
    return f"{obs.new_failed} new instance(s) failed ({obs.new_ready} ready, {obs.new_starting} starting)"


def step(spec: RolloutSpec, observed: Observed, state: RolloutState | None,
         now: float) -> tuple[RolloutState, list[Action]]:
    """Next state and actions; a finished rollout returns itself and no actions."""
    if state is None:
        state = RolloutState("progressing", 0, now, None, f"{spec.strategy} rollout started")
        first = True
    else:
        first = False
    if state.phase in TERMINAL:
        return state, []
    if spec.strategy == "rolling":
        return _rolling(spec, observed, state)
    if spec.strategy == "blue-green":
        return _blue_green(spec, observed, state, now, first)
    return _canary(spec, observed, state, now, first)


def _rolling(spec: RolloutSpec, obs: Observed, state: RolloutState) -> tuple[RolloutState, list[Action]]:
    if obs.new_failed > 0:
        return _rollback(spec, obs, state, "rolling update: " + _failed_reason(obs))
    d = spec.desired
    surge, unavailable = spec.fenceposts()
    if obs.new_ready >= d and obs.old_total == 0:
        return _succeed(state, obs, f"rolling update: {obs.new_ready}/{d} new ready", weights=False)
    actions: list[Action] = []
    # Old instances that do not serve cost no availability; the rest may go only
    # while ready instances stay at or above desired - maxUnavailable, which is
    # what makes new instances become ready before old ones stop.
    not_ready_old = obs.old_total - obs.old_ready
    spare_ready = max(0, obs.old_ready + obs.new_ready - (d - unavailable))
    stop_old = min(obs.old_total, not_ready_old + min(obs.old_ready, spare_ready))
    if stop_old > 0:
        actions.append(StopOld(stop_old))
    # New instances fill the room under desired + maxSurge, counted before the
    # stops above take effect, so the bound holds whatever order they apply in.
    start_new = max(0, min(d - obs.new_total, d + surge - (obs.old_total + obs.new_total)))
    if start_new > 0:
        actions.append(StartNew(start_new))
    reason = (f"rolling update: new {obs.new_ready} ready/{obs.new_total}, old {obs.old_ready} "
              f"ready/{obs.old_total}, desired {d} (maxSurge {surge}, maxUnavailable {unavailable})")
    return replace(state, phase="progressing", reason=reason), actions


def _blue_green(spec: RolloutSpec, obs: Observed, state: RolloutState, now: float,
                first: bool) -> tuple[RolloutState, list[Action]]:
    d = spec.desired
    if state.phase == "switched":
        assert state.switched_at is not None
        if obs.new_failed > 0:
            # The old set is still up and untouched: switching back is the quick rollback.
            return _rollback(spec, obs, state, "blue-green: after switch, " + _failed_reason(obs))
        kept = now - state.switched_at
        if kept >= spec.keep_old_s:
            return _succeed(state, obs, f"blue-green: old set kept {kept:g}s >= {spec.keep_old_s:g}s, "
                                        "stopped", weights=False)
        return replace(state, reason=f"blue-green: switched; keeping the old set for a quick rollback, "
                                     f"stopping it in {duration(spec.keep_old_s - kept)}"
                                     f" (keepOldFor {duration(spec.keep_old_s)})"), []
    if obs.new_failed > 0:
        return _rollback(spec, obs, state, "blue-green: before switch, " + _failed_reason(obs))
    # The new set starts in full beside the old one (no surge limit: that is the
    # strategy's price) and gets no traffic until every instance is ready.
    actions: list[Action] = [SetWeights(100.0, 0.0)] if first else []
    if obs.new_ready >= d:
        reason = f"blue-green: {obs.new_ready}/{d} new ready, traffic switched"
        return replace(state, phase="switched", switched_at=now, reason=reason), \
            actions + [SetWeights(0.0, 100.0)]
    if obs.new_total < d:
        actions.append(StartNew(d - obs.new_total))
    reason = f"blue-green: waiting for new set, {obs.new_ready}/{d} ready"
    return replace(state, phase="progressing", reason=reason), actions


def _analyse(spec: RolloutSpec, obs: Observed) -> tuple[str, str]:
    """("pass" | "fail" | "inconclusive", why) for the current canary step."""
    new = obs.new_stats or RevisionStats(0, 0, 0.0)
    old = obs.old_stats
    old_rate = old.error_rate if old is not None and old.requests else 0.0
    limit = old_rate + spec.max_error_rate_increase
    if new.requests < spec.min_requests:
        # Errors that no run of successes up to min_requests could dilute under the limit
        # fail now: a failing canary that the gateway ejected (so it gets little traffic)
        # must not be promoted as "inconclusive".
        if new.errors > limit * spec.min_requests:
            return "fail", (f"{new.errors} errors in {new.requests} requests: the error rate stays above "
                            f"old {old_rate:.3f} + {spec.max_error_rate_increase:g} even if the next "
                            f"{spec.min_requests - new.requests} succeed")
        return "inconclusive", f"{new.requests} requests < {spec.min_requests} needed"
    if new.error_rate > limit:
        return "fail", (f"error rate {new.error_rate:.3f} > old {old_rate:.3f} + "
                        f"{spec.max_error_rate_increase:g}")
    why = f"error rate {new.error_rate:.3f} <= {limit:.3f}"
    if old is not None and old.requests and old.p99_ms > 0:
        p99_limit = max(old.p99_ms * spec.max_p99_ratio, old.p99_ms + spec.p99_tolerance_ms)
        if new.p99_ms > p99_limit:
            return "fail", (f"p99 {new.p99_ms:g}ms > old {old.p99_ms:g}ms x {spec.max_p99_ratio:g}"
                            + (f" and + {spec.p99_tolerance_ms:g}ms" if spec.p99_tolerance_ms else ""))
        why += f", p99 {new.p99_ms:g}ms <= {p99_limit:g}ms"
    else:
        why += ", p99 not compared (no old latency)"
    return "pass", why + f" over {new.requests} requests"


def canary_size(desired: int, weight: float) -> int:
    """New instances for a traffic weight: proportional, at least one, at most desired."""
    return min(max(desired, 1), max(1, math.ceil(round(desired * weight / 100.0, 9))))


def _canary(spec: RolloutSpec, obs: Observed, state: RolloutState, now: float,
            first: bool) -> tuple[RolloutState, list[Action]]:
    steps = spec.steps
    i = state.step
    weight = steps[i]
    label = f"canary step {i + 1}/{len(steps)} ({weight}%)"
    if obs.new_failed > 0:
        return _rollback(spec, obs, state, f"{label}: " + _failed_reason(obs))
    # The old set stays at full size until the end, so a rollback is only a
    # weight change; the price is extra instances during the canary.
    actions: list[Action] = [SetWeights(100.0, 0.0)] if first else []
    want = spec.desired if weight >= 100 else canary_size(spec.desired, weight)

    if state.phase == "progressing":
        if obs.new_ready < want:
            if obs.new_total < want:
                actions.append(StartNew(want - obs.new_total))
            return replace(state, reason=f"{label}: waiting for {want} new ready, "
                                         f"{obs.new_ready} so far"), actions
        if weight >= 100:
            # With all traffic on the new revision there is nothing left to compare.
            return _succeed(state, obs, f"{label}: {obs.new_ready}/{spec.desired} new ready, "
                                        "old stopped", weights=True)
        actions.append(SetWeights(100.0 - weight, float(weight)))
        return replace(state, phase="paused", step_started_at=now,
                       reason=f"{label}: weights set, pausing {spec.step_pause_s:g}s"), actions

    waited = now - state.step_started_at
    if waited < spec.step_pause_s:
        return replace(state, reason=f"{label}: pausing, {waited:g}s of {spec.step_pause_s:g}s"), actions
    verdict, why = _analyse(spec, obs)
    if verdict == "fail":
        return _rollback(spec, obs, state, f"{label}: analysis failed: {why}")
    if verdict == "inconclusive":
        limit = spec.step_pause_s * spec.max_inconclusive_pauses
        if waited < limit:
            return replace(state, reason=f"{label}: waiting for traffic, {why}"), actions
        why = f"analysis inconclusive after {waited:g}s ({why}), promoted"
    reason = f"{label}: passed: {why}"
    nxt = replace(state, phase="progressing", step=i + 1, reason=reason)
    # Start the next step's instances now rather than on the next tick.
    more_state, more = _canary(spec, obs, nxt, now, False)
    return replace(more_state, reason=reason + "; " + more_state.reason), actions + more
