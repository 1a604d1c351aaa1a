"""When a desired-state source polls next: pure, with the clock passed in."""
from __future__ import annotations

MAX_BACKOFF_S = 300.0  # a dead remote is tried at least every 5 minutes


def fetch_retry_delay(failures: int, interval_s: float, cap_s: float = MAX_BACKOFF_S) -> float:
    """Seconds until the next fetch after `failures` consecutive failed fetches.

    No failure: the poll interval. Then the interval doubles with each failure, up to
    `cap_s` (never below the interval itself): a remote that is down is not hammered,
    and one that comes back is noticed within the cap.
    """
    if failures <= 0:
        return interval_s
    return min(max(cap_s, interval_s), interval_s * 2 ** min(failures, 32))


def next_poll_at(last_attempt: float, failures: int, interval_s: float) -> float:
    """When the next poll is due (a sync request polls before that, at once)."""
    return last_attempt + fetch_retry_delay(failures, interval_s)
