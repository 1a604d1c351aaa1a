"""The gateway's canary split: shared low-discrepancy keys over weighted_split."""
from __future__ import annotations

from itertools import count

from controller.contracts import Address, Split
from gateway.split import split_key, split_ready

OLD = [Address("aaaaaaaa", "h", 1, 1), Address("bbbbbbbb", "h", 2, 1)]
NEW = [Address("cccccccc", "h", 3, 2)]


def split(new_weight: float) -> Split:
    return Split(slot=7, new_revision=2, new_weight=new_weight, old_weight=100.0 - new_weight)


def shared_counter():
    """Like SharedCounters.next: one sequence per slot, whoever asks."""
    seqs: dict[int, count] = {}
    return lambda slot: next(seqs.setdefault(slot, count()))


def test_any_run_of_requests_lands_within_two_of_the_weight():
    for weight in (1, 10, 30, 50, 90):
        nxt = shared_counter()
        sides = ["new" if split_ready(split(weight), OLD + NEW, nxt)[0].revision == 2 else "old"
                 for _ in range(1000)]
        for n in (50, 100, 200, 1000):
            for start in (0, 137, 500):
                window = sides[start:start + n]
                if len(window) < n:
                    continue
                assert abs(window.count("new") - weight / 100 * n) <= 2, (weight, n, start)


def test_two_workers_sharing_the_counter_split_as_one():
    nxt = shared_counter()
    worker_a, worker_b = [], []
    for i in range(600):  # interleaved unevenly, as two gunicorn workers would be
        side = split_ready(split(30), OLD + NEW, nxt)[0].revision
        (worker_a if i % 3 else worker_b).append(side)
    total = worker_a + worker_b
    assert abs(total.count(2) - 180) <= 2


def test_zero_weight_side_gets_nothing_and_missing_side_gives_way():
    nxt = shared_counter()
    assert split_ready(split(0), OLD + NEW, nxt) == OLD  # blue-green before the switch
    assert split_ready(split(100), OLD + NEW, nxt) == NEW  # after it
    assert split_ready(split(30), OLD, nxt) == OLD  # no new instance ready in this snapshot
    assert split_ready(split(30), NEW, nxt) == NEW


def test_keys_are_in_the_unit_interval():
    assert all(0.0 <= split_key(n) < 1.0 for n in range(10000))
