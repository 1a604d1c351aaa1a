"""Latency histograms and sliding windows of request counts, errors and latencies.

Gateway workers bucket each request's latency into a log-scale histogram (a sparse
``{bucket: count}`` dict, a few bytes per report however many requests it covers)
and send it to the controller with their regular sync. The controller adds the
reports into one-second slots per instance and per deployment; percentiles over
the last `window_s` come from the merged histogram. Merging histograms is exact,
unlike averaging each worker's percentiles, so p99 stays a true p99 across workers.

Pure data and arithmetic: `now` is always an argument.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# Bucket i holds latencies in [BASE_MS * RATIO**i, BASE_MS * RATIO**(i+1)); bucket 0
# also holds everything faster. A 10 % ratio bounds a percentile's error to +-5 %.
BASE_MS = 0.1
RATIO = 1.1
MAX_BUCKET = 200  # 0.1 ms * 1.1**200 is about 19 000 s: longer requests land here
_LOG_RATIO = math.log(RATIO)


def bucket_of(ms: float) -> int:
    """The histogram bucket of one latency in milliseconds."""
    if ms <= BASE_MS:
        return 0
    return min(MAX_BUCKET, int(math.log(ms / BASE_MS) / _LOG_RATIO))


def bucket_bounds(i: int) -> tuple[float, float]:
    """[low, high) in milliseconds of bucket `i`."""
    low = 0.0 if i == 0 else BASE_MS * RATIO ** i
    return low, BASE_MS * RATIO ** (i + 1)


def add_hist(into: dict[int, int], other: Mapping[int | str, int]) -> None:
    """Add `other` into `into`; keys may be strings (a histogram that crossed JSON)."""
    for k, n in other.items():
        i = int(k)
        into[i] = into.get(i, 0) + int(n)


def percentile(hist: Mapping[int, int], q: float) -> float | None:
    """The q-quantile (0 < q <= 1) in milliseconds, interpolated inside its bucket; None if empty."""
    if not 0.0 < q <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {q}")
    total = sum(hist.values())
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i in sorted(hist):
        n = hist[i]
        if n <= 0:
            continue
        if seen + n >= rank:
            low, high = bucket_bounds(i)
            if i == 0:
                low = 0.0
            frac = (rank - seen) / n
            return low + (high - low) * frac
        seen += n
    return bucket_bounds(max(hist))[1]  # float rounding left `seen` a hair under `rank`


@dataclass
class Slot:
    second: int
    count: int = 0
    errors: int = 0
    hist: dict[int, int] = field(default_factory=dict)


@dataclass
class WindowView:
    """What one window holds at `now`."""
    count: int
    errors: int
    span_s: float  # seconds the rates are over: the window, or less while it fills
    hist: dict[int, int]

    @property
    def rate(self) -> float:
        return self.count / self.span_s if self.span_s > 0 else 0.0

    @property
    def error_rate(self) -> float:
        return self.errors / self.count if self.count else 0.0

    def quantiles_ms(self, qs: Iterable[float] = (0.5, 0.95, 0.99)) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for q in qs:
            v = percentile(self.hist, q)
            out[f"p{q * 100:g}"] = None if v is None else round(v, 3)
        return out


class SlidingWindow:
    """Counts, errors and a latency histogram per second over the last `window_s` seconds."""

    def __init__(self, window_s: float = 60.0, created: float | None = None) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = window_s
        self.created = created
        self._slots: deque[Slot] = deque()

    def add(self, now: float, count: int, errors: int, hist: Mapping[int | str, int]) -> None:
        sec = int(now)
        if self.created is None:
            self.created = now
        if not self._slots or self._slots[-1].second < sec:
            self._slots.append(Slot(sec))
            slot = self._slots[-1]
        else:
            # A report stamped a little in the past (worker clocks are this host's clock,
            # but reports queue): it goes into the newest slot rather than reordering.
            slot = self._slots[-1]
        slot.count += int(count)
        slot.errors += int(errors)
        add_hist(slot.hist, hist)
        self._prune(now)

    def _prune(self, now: float) -> None:
        oldest = now - self.window_s
        while self._slots and self._slots[0].second + 1 <= oldest:
            self._slots.popleft()

    def view(self, now: float) -> WindowView:
        self._prune(now)
        hist: dict[int, int] = {}
        count = errors = 0
        for s in self._slots:
            count += s.count
            errors += s.errors
            add_hist(hist, s.hist)
        age = now - self.created if self.created is not None else 0.0
        span = min(self.window_s, max(age, 1.0))
        return WindowView(count, errors, span, hist)

    def empty(self, now: float) -> bool:
        self._prune(now)
        return not self._slots
