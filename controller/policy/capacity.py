"""What to do with a request that needs an instance: the cold-start and route-rule decision.

The gateway answers from its snapshot when a ready instance fits; everything else
(cold start, scale-out, waiting for a starting instance, reviving one that is being
released) is decided here, by the controller, so `maxReplicas` holds across workers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from controller import errors
from controller.errors import ErrorCode

SCALE_OUT = "scale-out"
RANDOM = "random"
ROUND_ROBIN = "round-robin"
RESERVED_RULES = (SCALE_OUT, RANDOM, ROUND_ROBIN)


# A crash is not a crash loop: after a ready instance crashed, requests that arrive while
# its restart backs off are held (as at a cold start) rather than failed, until this many
# failures in a row (the crash, then failed restarts) make it a crash loop.
CRASH_LOOP_AFTER = 3


@dataclass(frozen=True)
class Capacity:
    """One deployment's instances by phase, as the controller sees them now."""
    ready: tuple[str, ...]
    starting: tuple[str, ...]
    draining: tuple[str, ...]  # being released for idleness: still alive, can be revived
    stopping: int  # told to stop: gone soon, but still holds its slot (and GPU)
    max_replicas: int
    waiting: int  # requests already held for this deployment
    queue_limit: int
    backoff_until: float  # restarts back off after failures until then
    running: bool = True  # spec.state == running
    failures: int = 0  # consecutive failures (crashes and failed starts) with no ready instance since
    crashed: bool = False  # the failures began with a ready instance crashing (not a failed cold start)


@dataclass(frozen=True)
class AcquireDecision:
    action: Literal["use", "revive", "wait", "start", "reject"]
    instance: str | None = None
    error: ErrorCode | None = None
    retry_after: float | None = None
    reason: str = ""
    until: float | None = None  # wait: decide again at this time even if nothing changed

    @staticmethod
    def reject(error: ErrorCode, reason: str, retry_after: float | None = None) -> "AcquireDecision":
        return AcquireDecision("reject", error=error, reason=reason, retry_after=retry_after)


def total(cap: Capacity) -> int:
    return len(cap.ready) + len(cap.starting) + len(cap.draining) + cap.stopping


def decide_acquire(rule: str | None, cap: Capacity, now: float) -> AcquireDecision:
    if not cap.running:
        return AcquireDecision.reject(errors.DEPLOYMENT_STOPPED, "spec.state is stopped")
    if rule == SCALE_OUT:
        if total(cap) >= cap.max_replicas:
            return AcquireDecision.reject(errors.REPLICA_QUOTA_EXCEEDED,
                                          f"{total(cap)} of maxReplicas {cap.max_replicas} started")
        return _start_or_backoff(cap, now, "scale-out requested")
    if rule in (RANDOM, ROUND_ROBIN):
        if cap.ready:
            return AcquireDecision("use", cap.ready[0], reason=f"{rule}: ready instance")
        if cap.draining:
            return AcquireDecision("revive", cap.draining[0], reason=f"{rule}: revive idle instance")
        return AcquireDecision.reject(errors.ROUTE_TARGET_NOT_FOUND, f"{rule}: no running instance")
    if rule is not None:
        if rule in cap.ready:
            return AcquireDecision("use", rule, reason="instance id")
        if rule in cap.draining:
            return AcquireDecision("revive", rule, reason="instance id: revive idle instance")
        if rule in cap.starting:
            return _wait(cap, rule, "instance id: still starting")
        return AcquireDecision.reject(errors.ROUTE_TARGET_NOT_FOUND, f"no instance {rule!r} in this deployment")
    if cap.ready:
        return AcquireDecision("use", cap.ready[0], reason="ready instance")
    if cap.draining:
        return AcquireDecision("revive", cap.draining[0], reason="request during idle release")
    if cap.starting:
        return _wait(cap, cap.starting[0], "instance starting")
    if total(cap) < cap.max_replicas:
        return _start_or_backoff(cap, now, "cold start: no instance")
    return _wait(cap, None, "at maxReplicas: waiting for a stopping instance to free its slot")


def _wait(cap: Capacity, instance: str | None, reason: str) -> AcquireDecision:
    if cap.waiting >= cap.queue_limit:
        return AcquireDecision.reject(errors.QUEUE_FULL, f"{cap.waiting} requests already held",
                                      retry_after=1.0)
    return AcquireDecision("wait", instance, reason=reason)


def _start_or_backoff(cap: Capacity, now: float, reason: str) -> AcquireDecision:
    if now < cap.backoff_until:
        if hold_through_failure(cap.failures, cap.crashed):
            if cap.waiting >= cap.queue_limit:
                return AcquireDecision.reject(errors.QUEUE_FULL, f"{cap.waiting} requests already held",
                                              retry_after=1.0)
            return AcquireDecision("wait", reason=f"held: a restart after {cap.failures} failure(s) is due in "
                                   f"{cap.backoff_until - now:.3g} s", until=cap.backoff_until)
        return AcquireDecision.reject(errors.INSTANCE_START_FAILED,
                                      f"restarts are backing off after {cap.failures} failures in a row",
                                      retry_after=round(cap.backoff_until - now, 3))
    if cap.waiting >= cap.queue_limit:
        return AcquireDecision.reject(errors.QUEUE_FULL, f"{cap.waiting} requests already held",
                                      retry_after=1.0)
    return AcquireDecision("start", reason=reason)


def hold_through_failure(failures: int, crashed: bool) -> bool:
    """Hold a request through a failure (for the next start), or fail it (1003)? Held only
    after a crash of a ready instance, and only until that becomes a crash loop."""
    return crashed and failures < CRASH_LOOP_AFTER


def restart_backoff(failures: int, base: float = 1.0, cap: float = 60.0) -> float:
    """Seconds to wait before the next start after `failures` consecutive failures."""
    if failures <= 0:
        return 0.0
    return min(cap, base * 2 ** (failures - 1))


def readiness_poll_interval(elapsed: float) -> float:
    """Tight polling while a fast process would come up (adds <= ~10 ms), then relaxed."""
    if elapsed < 10.0:
        return 0.005 if elapsed < 2.0 else 0.01
    return 0.1
