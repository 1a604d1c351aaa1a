"""Passive health: what each gateway worker learns from the responses it proxies.

In the manner of Envoy's outlier detection (`controller.policy.balance.outlier_update`):
a failed connection ejects an instance at once, five 5xx in a row eject it, each
ejection lasting longer than the last (30 s, 60 s, ... up to 300 s), and never more
than half of a deployment's instances at once. An ejected instance gets no new
requests from this worker until its time is up; it stays in the routing snapshot,
since the controller's active checks and process polling decide whether it lives.

Each worker keeps its own state, as each Envoy does: no IPC per request, and a
worker that has seen nothing wrong keeps routing normally.

`retry_allowed` is the rule for sending a failed request to another instance once.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from controller.policy.balance import OutlierState, ejected, outlier_forget, outlier_update

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})

CONNECT_FAILED = "connect"  # nothing reached the instance
RESET = "reset"  # the request may have reached it; no response byte came back


def retry_allowed(method: str, failure: str, body_replayable: bool, attempt: int) -> bool:
    """Whether a request that failed on its `attempt`-th instance (1-based) may go to another.

    Only once. A connection that never opened carried nothing, so any method may be
    resent. A reset after sending may have had effects: only idempotent methods are
    resent, and only when their body can be sent again (we stream bodies, never
    buffer them, so that means no body).
    """
    if attempt >= 2 or not body_replayable:
        return False
    if failure == CONNECT_FAILED:
        return True
    return failure == RESET and method.upper() in IDEMPOTENT


class Outliers:
    """One worker's outlier state; thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, on_eject: Callable[[str], None] | None = None,
                 consecutive_5xx: int = 5, base_ejection_s: float = 30.0) -> None:
        self.clock = clock
        self.on_eject = on_eject
        self.consecutive_5xx = consecutive_5xx
        self.base_ejection_s = base_ejection_s
        self._state = OutlierState()
        self._lock = threading.Lock()
        self._out: frozenset[str] = frozenset()
        self._out_until = float("inf")

    def record(self, instance_id: str, status: int | None, total: int) -> None:
        """A response status (None: no response at all) from an instance of a deployment of `total`."""
        if status is not None and status < 500 and instance_id not in self._state.consecutive_5xx \
                and instance_id not in self._state.consecutive_connect_failures:
            return  # the common case: a success with nothing to reset, no lock taken
        with self._lock:
            now = self.clock()
            before = self._state.ejected_until.get(instance_id)
            self._state = outlier_update(self._state, instance_id, status, now,
                                         consecutive_5xx=self.consecutive_5xx,
                                         base_ejection_s=self.base_ejection_s, total=total)
            after = self._state.ejected_until.get(instance_id)
            if after != before:
                self._refresh(now)
                if self.on_eject is not None:
                    self.on_eject(instance_id)

    def _refresh(self, now: float) -> None:
        out = ejected(self._state, now)
        self._out = frozenset(out)
        self._out_until = min((self._state.ejected_until[i] for i in out), default=float("inf"))

    def ejected(self) -> frozenset[str]:
        """Instances this worker sends nothing to now (cheap: recomputed only when one expires)."""
        if self._out and self.clock() >= self._out_until:
            with self._lock:
                self._refresh(self.clock())
        return self._out

    def forget(self, live_ids: Iterable[str]) -> None:
        with self._lock:
            self._state = outlier_forget(self._state, live_ids)
            self._refresh(self.clock())
