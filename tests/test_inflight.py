"""Shared in-flight counters (gateway.inflight) between real processes: each worker
counts in its own row, every worker reads the sum, and a dead worker's counts go."""
from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

from gateway.inflight import SharedInflight


def _hold(path: str, slot: int, n: int, ready, release, rows) -> None:
    counters = SharedInflight(path)
    rows.put(counters.row)
    counters.add(slot, n)
    ready.set()
    release.wait(30)


def test_counts_of_all_workers_add_up_and_a_dead_worker_is_forgotten(tmp_path: Path):
    ctx = mp.get_context("fork")
    path = str(tmp_path / "inflight.bin")
    rows = ctx.Queue()
    # One release event each: killing a process that waits on a shared Event wedges it.
    readies, releases = [ctx.Event(), ctx.Event()], [ctx.Event(), ctx.Event()]
    workers = [ctx.Process(target=_hold, args=(path, 7, n, readies[i], releases[i], rows))
               for i, n in enumerate((3, 4))]
    for w in workers:
        w.start()
    for r in readies:
        assert r.wait(30)
    # One row each. Which ones depends on timing: a claimer briefly locks every free row it
    # zeroes, so a worker claiming at the same moment may skip one.
    claimed = {rows.get(timeout=5), rows.get(timeout=5)}
    assert len(claimed) == 2
    reader = SharedInflight(path)
    assert reader.row not in claimed
    assert reader.count(7) == 7
    assert reader.count(8) == 0
    workers[0].kill()
    workers[0].join()
    # A worker that starts after a crash claims a free row and zeroes the dead one's.
    fresh = SharedInflight(path)
    assert fresh.count(7) == 4
    releases[1].set()
    workers[1].join(30)
    assert workers[1].exitcode == 0


def test_a_worker_never_counts_below_zero(tmp_path: Path):
    counters = SharedInflight(str(tmp_path / "inflight.bin"))
    counters.add(3, -1)
    assert counters.count(3) == 0
    counters.add(3, 2)
    counters.add(-1, 5)  # an address without a slot is not counted
    assert counters.count(3) == 2 and counters.count(-1) == 0
    counters.close()
