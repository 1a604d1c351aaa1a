"""An hour of per-minute samples per deployment, for the dashboard's charts.

Fed by the same worker reports as the 60 s windows (`controller.traffic`): each
minute keeps its request count, errors and merged latency histogram, so a minute's
p50/p95/p99 are exact over every gateway worker. Pure data: `now` is an argument. The
controller saves the minutes in its store every few seconds and restores them on
start (`controller.store.Store.save_minutes`), so a restart does not blank the charts.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

from controller.latency import Slot, add_hist, percentile

MINUTES = 60


class MinuteSeries:
    def __init__(self, minutes: int = MINUTES) -> None:
        self.minutes = minutes
        self._slots: deque[Slot] = deque()

    def add(self, now: float, count: int, errors: int, hist: Mapping[int | str, int]) -> int:
        """Count a report into its minute; returns the minute (unix seconds // 60) it went into."""
        minute = int(now // 60)
        if not self._slots or self._slots[-1].second < minute:
            self._slots.append(Slot(minute))
        slot = self._slots[-1]  # a late report goes into the newest minute rather than reordering
        slot.count += int(count)
        slot.errors += int(errors)
        add_hist(slot.hist, hist)
        while self._slots and self._slots[0].second <= minute - self.minutes:
            self._slots.popleft()
        return slot.second

    def slot(self, minute: int) -> Slot | None:
        return next((s for s in reversed(self._slots) if s.second == minute), None)

    def restore(self, slots: list[Slot]) -> None:
        """Minutes saved before a restart (`controller.store.Store.minutes`). A minute also
        counted since the restart holds only the reports after it: the two are added."""
        by_minute = {s.second: s for s in self._slots}
        for saved in slots:
            mine = by_minute.get(saved.second)
            if mine is None:
                by_minute[saved.second] = Slot(saved.second, saved.count, saved.errors, dict(saved.hist))
            else:
                mine.count += saved.count
                mine.errors += saved.errors
                add_hist(mine.hist, saved.hist)
        self._slots = deque(by_minute[m] for m in sorted(by_minute))
        newest = self._slots[-1].second if self._slots else 0
        while self._slots and self._slots[0].second <= newest - self.minutes:
            self._slots.popleft()

    def samples(self, now: float) -> list[dict[str, Any]]:
        """One entry per minute of the last hour, oldest first; minutes without requests are zeros."""
        current = int(now // 60)
        by_minute = {s.second: s for s in self._slots}
        out = []
        for m in range(current - self.minutes + 1, current + 1):
            s = by_minute.get(m)
            # The current minute is not over: its rate is over the seconds it has had.
            span = max(1.0, now - m * 60) if m == current else 60.0
            if s is None or s.count == 0:
                out.append({"t": m * 60, "requests": 0, "requests_per_s": 0.0, "errors": 0, "error_rate": 0.0,
                            "p50": None, "p95": None, "p99": None})
                continue
            q = {f"p{int(p * 100)}": _r(percentile(s.hist, p)) for p in (0.5, 0.95, 0.99)}
            out.append({"t": m * 60, "requests": s.count, "requests_per_s": round(s.count / span, 3),
                        "errors": s.errors, "error_rate": round(s.errors / s.count, 4), **q})
        return out


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)
