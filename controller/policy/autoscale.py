"""Autoscaling decision: how many instances a deployment should have now.

Modelled on Knative's KPA: a long *stable* window decides normal sizing, a short
*panic* window reacts to bursts, and panic never scales down. Scale-down waits
for `scale_down_delay_s` of continuously lower desire so oscillating load does
not oscillate GPU instances (each start costs a model load). Scale to zero is a
separate, stricter rule: no traffic at all for `idle_timeout_s`.

Everything here is a pure function of its arguments; `now` comes from the caller.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from controller.spec import Autoscaling, Scaling


@dataclass(frozen=True)
class Sample:
    """Deployment-wide metrics at one instant.

    `in_flight` is the total number of concurrent requests (queued at the gateway
    included). cpu/mem/gpu are the average utilisation per ready instance, in
    percent of its limit; None means the signal is missing for this sample.
    `requests` counts requests that arrived since the previous sample: short
    requests can start and finish between two samples, and they are traffic too.
    """

    at: float
    in_flight: float
    cpu_pct: float | None
    mem_pct: float | None
    gpu_pct: float | None
    ready: int
    requests: int = 0


@dataclass(frozen=True)
class ScaleState:
    """What `decide` must remember between calls; start with None."""

    # In panic while now < panic_until; every panic-worthy sample pushes it a
    # stable window further (Knative keeps panicking for one stable window).
    panic_until: float | None = None
    # When the size last went up; shown in events, not used to decide.
    last_scale_up_at: float | None = None
    # Sizes asked for during the last scale_down_delay_s, oldest first. Like
    # Knative's scale-down delay, a scale-down goes to the highest of them, and
    # only when all are below the current size: the desire has been lower for the
    # whole delay. `tracked_since` is the first decision, so a fresh state cannot
    # claim a delay's worth of history it never saw.
    recent: tuple[tuple[float, int], ...] = ()
    tracked_since: float | None = None
    # Last time a sample showed any traffic; None = none seen.
    last_request_at: float | None = None


@dataclass(frozen=True)
class ScaleDecision:
    replicas: int
    state: ScaleState
    reason: str
    signal: str | None  # the signal that set the size; None when no signal did
    values: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Signal:
    name: str
    target: float
    unit: str  # "" for concurrency, "%" for utilisations


def _enabled_signals(a: Autoscaling) -> list[_Signal]:
    pairs = [("concurrency", a.target_concurrency, ""), ("cpu", a.target_cpu_utilization, "%"),
             ("memory", a.target_memory_utilization, "%"), ("gpu", a.target_gpu_utilization, "%")]
    out = []
    for name, target, unit in pairs:
        if target is None:
            continue
        if target <= 0:
            # The loader rejects this; reaching here is a programming error.
            raise ValueError(f"autoscaling target for {name} must be > 0, got {target}")
        out.append(_Signal(name, float(target), unit))
    return out


def _load(sample: Sample, name: str) -> float | None:
    """The signal's total load in units of `target` (None = missing).

    Utilisation is multiplied by the sample's own ready count: the load is spread
    over instances that serve, not over ones still loading a model.
    """
    if name == "concurrency":
        return float(sample.in_flight)
    pct = {"cpu": sample.cpu_pct, "memory": sample.mem_pct, "gpu": sample.gpu_pct}[name]
    return None if pct is None else float(pct) * sample.ready


@dataclass(frozen=True)
class _Desire:
    signal: str
    load: float  # window-average total load
    ready: float  # window-average ready count, for the message
    replicas: int


def _desire(signal: _Signal, samples: Sequence[Sample]) -> _Desire | None:
    pairs = [(load, s.ready) for s in samples if (load := _load(s, signal.name)) is not None]
    if not pairs:
        return None
    load = sum(p[0] for p in pairs) / len(pairs)
    ready = sum(p[1] for p in pairs) / len(pairs)
    # A tiny epsilon so 8.0000001 / 4 does not ask for a third instance.
    return _Desire(signal.name, load, ready, max(0, math.ceil(load / signal.target - 1e-9)))


def _describe(signal: _Signal, d: _Desire, window: str) -> str:
    if signal.unit:
        per = d.load / d.ready if d.ready else 0.0
        obs = f"{signal.name} {per:.1f}% on {d.ready:g} ready"
        tgt = f"target {signal.target:g}%"
    else:
        obs, tgt = f"{signal.name} {d.load:.1f}", f"target {signal.target:g}"
    return f"{obs} / {tgt} -> {d.replicas} ({window})"


def _best(signals: list[_Signal], samples: Sequence[Sample]) -> tuple[_Signal, _Desire] | None:
    """The signal that asks for the most instances (ties: first enabled)."""
    best: tuple[_Signal, _Desire] | None = None
    for sig in signals:
        d = _desire(sig, samples)
        if d is not None and (best is None or d.replicas > best[1].replicas):
            best = (sig, d)
    return best


def _clamp(n: int, scaling: Scaling) -> int:
    return max(scaling.min_replicas, min(scaling.max_replicas, n))


def decide(scaling: Scaling, current: int, window: Sequence[Sample], now: float,
           state: ScaleState | None) -> ScaleDecision:
    """How many instances to run now; `window` is every recent sample (older ones are ignored)."""
    a = scaling.autoscaling
    if state is None:
        # A controller restart must not release warm instances before a full idle
        # timeout has passed, so running instances count as just used.
        state = ScaleState(tracked_since=now, last_request_at=now if current > 0 else None)
    if not a.enabled:
        n = _clamp(current, scaling)
        return ScaleDecision(n, state, "autoscaling disabled", None, {"current": float(current)})

    samples = [s for s in window if s.at <= now]
    stable = [s for s in samples if s.at > now - a.stable_window_s]
    panic = [s for s in samples if s.at > now - a.panic_window_s]
    stable_w, panic_w = f"stable window {a.stable_window_s:g}s", f"panic window {a.panic_window_s:g}s"

    last_req = state.last_request_at
    for s in samples:
        if s.in_flight > 0 or s.requests > 0:
            last_req = s.at if last_req is None else max(last_req, s.at)
    state = replace(state, last_request_at=last_req)
    values: dict[str, float] = {"current": float(current)}

    idle_for = math.inf if last_req is None else now - last_req
    if idle_for >= scaling.idle_timeout_s:
        # No request for a whole idle period: resource signals only show an idle
        # model's background use, so they do not keep it alive.
        n = _clamp(0, scaling)
        since = "no traffic seen" if last_req is None else f"no traffic for {idle_for:g}s"
        reason = f"{since} >= idleTimeout {scaling.idle_timeout_s:g}s -> {n}"
        if n > 0:
            reason += f" (minReplicas {scaling.min_replicas})"
        values["idle_s"] = idle_for
        new_state = replace(state, panic_until=None, recent=())
        return ScaleDecision(n, new_state, reason, None, values)

    signals = _enabled_signals(a)
    stable_best = _best(signals, stable)
    panic_best = _best(signals, panic)
    for sig in signals:
        for suffix, win in (("", stable), ("_panic", panic)):
            d = _desire(sig, win)
            if d is not None:
                values[sig.name + suffix] = d.load
    if stable_best is None:
        n = _clamp(current, scaling)
        why = "no autoscaling target set" if not signals else "no samples for " + ", ".join(
            s.name for s in signals)
        return ScaleDecision(n, state, f"{why} in {stable_w}; holding {n}", None, values)
    values["desired_stable"] = float(stable_best[1].replicas)
    if panic_best is not None:
        values["desired_panic"] = float(panic_best[1].replicas)

    panic_until = state.panic_until
    if panic_best is not None and panic_best[1].replicas >= a.panic_threshold * max(1, current) \
            and panic_best[1].replicas > current:
        panic_until = now + a.stable_window_s
    in_panic = panic_until is not None and now < panic_until
    if not in_panic:
        panic_until = None

    if in_panic:
        # No sample in the panic window (a gap in metrics) falls back to the stable one.
        sig, d = panic_best if panic_best is not None else stable_best
        label = panic_w if panic_best is not None else stable_w
        # Panic never scales down: the burst may come back before the stable
        # window has caught up with it.
        want = max(current, d.replicas)
        why = f"panic until t={panic_until:g}s: " + _describe(sig, d, label)
    else:
        sig, d = stable_best
        want = d.replicas
        why = _describe(sig, d, stable_w)
    if want < 1 and current > 0:
        # Traffic within the idle period: keep one warm; zero is the idle rule's call.
        want = 1
        why += f"; keeping 1 until idle for idleTimeout {scaling.idle_timeout_s:g}s"
    target = _clamp(want, scaling)
    if target != want:
        bound = "maxReplicas" if want > target else "minReplicas"
        why += f"; clamped to {bound} {target}"

    # Panic holds the size, so what it records is at least the current size: the
    # scale-down delay starts counting only once panic is over.
    asked = max(target, current) if in_panic else target
    delay = a.scale_down_delay_s
    recent = tuple((t, n) for t, n in state.recent if t > now - delay) + ((now, asked),)
    state = replace(state, panic_until=panic_until, recent=recent)
    if target > current or (target < current and current > scaling.max_replicas):
        # Up is immediate; so is obeying a lowered maxReplicas.
        up_at = now if target > current else state.last_scale_up_at
        return ScaleDecision(target, replace(state, last_scale_up_at=up_at), why, sig.name, values)
    if target == current or in_panic:
        return ScaleDecision(current, state, why, sig.name, values)

    peak = max(n for _, n in recent)
    tracked = now - (state.tracked_since if state.tracked_since is not None else now)
    if peak < current and tracked >= delay:
        why += f"; below {current} for scaleDownDelay {delay:g}s, highest {peak} -> {peak}"
        return ScaleDecision(peak, state, why, sig.name, values)
    why += f"; keeping {current} until desire stays lower for scaleDownDelay {delay:g}s"
    return ScaleDecision(current, state, why, sig.name, values)


def idle_instances(last_activity: Mapping[str, float], in_flight: Mapping[str, int],
                   idle_timeout_s: float, now: float, keep: int) -> list[str]:
    """Ids of instances to release, most idle first, keeping at least `keep` instances.

    An instance is idle when it has nothing in flight and its last activity is at
    least `idle_timeout_s` old. An instance without a recorded activity is not
    idle: we cannot tell, and releasing a GPU model by mistake costs a cold start.
    """
    total = len(set(last_activity) | set(in_flight))
    room = max(0, total - max(0, keep))
    idle = [(t, iid) for iid, t in last_activity.items()
            if in_flight.get(iid, 0) <= 0 and now - t >= idle_timeout_s]
    idle.sort()  # oldest activity first; the id breaks ties so the answer is stable
    return [iid for _, iid in idle[:room]]


@dataclass(frozen=True)
class DrainCandidate:
    id: str
    unhealthy: bool
    in_flight: int
    created: float


def scale_down_choice(candidates: Sequence[DrainCandidate], n: int) -> list[str]:
    """Which `n` ready instances a scale-down drains: unhealthy first, then the least busy,
    newest first (the oldest have the warmest caches)."""
    ordered = sorted(candidates, key=lambda c: (not c.unhealthy, c.in_flight, -c.created, c.id))
    return [c.id for c in ordered[:max(0, n)]]
