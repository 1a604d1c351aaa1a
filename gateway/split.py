"""The canary / blue-green traffic split, applied by every gateway worker per request.

The controller publishes `split` in a deployment's routing snapshot while a
rollout moves traffic: the new revision's number and the weights (percent) of
the new and the old revisions. Each request draws its key from a counter shared
by all gunicorn workers (`SharedCounters`, one slot per rollout), spread over
[0, 1) by the golden ratio (a Weyl sequence). Any run of N consecutive requests
then lands within a couple of requests of weight x N on the new revision, across
workers, rather than within a binomial spread as independent random draws would.
"""
from __future__ import annotations

from typing import Callable, Sequence

from controller.contracts import Address, Split
from controller.policy.balance import weighted_split

GOLDEN = (5 ** 0.5 - 1) / 2


def split_key(n: int) -> float:
    """The n-th key of the low-discrepancy sequence, in [0, 1)."""
    return (n * GOLDEN) % 1.0


def split_ready(split: Split, ready: Sequence[Address], counter_next: Callable[[int], int]) -> Sequence[Address]:
    """The ready instances of the revision this request goes to.

    A side with weight 0 gets nothing (blue-green before and after its switch); a side
    with no ready instance in this worker's snapshot gives its share to the other.
    """
    new_rev = split.new_revision
    new = [r for r in ready if r.revision == new_rev]
    old = [r for r in ready if r.revision != new_rev]
    if not new or split.new_weight <= 0:
        return old or ready
    if not old or split.old_weight <= 0:
        return new
    side = weighted_split({"new": split.new_weight, "old": split.old_weight},
                          split_key(counter_next(split.slot)))
    return new if side == "new" else old
