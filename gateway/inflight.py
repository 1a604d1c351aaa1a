"""Requests in flight per instance, shared by every gunicorn worker without IPC.

Least-connections must compare instances by what *all* workers have in flight, and
it must see a request the moment it starts: a count the controller gathers from
worker reports is up to a sync period old, long enough for every worker to pile onto
the same "idle" instance. So the counts live in one mmap'd file.

Layout: a matrix of int64 cells, one column per instance slot (assigned by the
controller, carried in the routing snapshot) and one row per worker. A worker only
ever writes its own row, so no cross-process lock is needed on the hot path (an
aligned 8-byte store is atomic on the machines we run on), and a reader sums a
column. A worker claims its row with a POSIX record lock, which the kernel drops when
the process dies; a new worker zeroes every row whose owner is gone, so a crashed
worker's in-flight requests do not stay counted forever.
"""
from __future__ import annotations

import fcntl
import mmap
import os

ROWS = 64  # gunicorn workers per gateway; more is refused with a clear error
SLOTS = 4096  # instance slots; the controller hands them out round the ring
_CELL = 8


class SharedInflight:
    def __init__(self, path: str) -> None:
        size = ROWS * SLOTS * _CELL
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self._fd).st_size < size:
            os.ftruncate(self._fd, size)
        self._map = mmap.mmap(self._fd, size)
        self._cells = memoryview(self._map).cast("q")
        self._lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        self.row = self._claim_row()

    def _try_lock(self, row: int) -> bool:
        try:
            fcntl.lockf(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, row)
            return True
        except (BlockingIOError, PermissionError):
            return False

    def _claim_row(self) -> int:
        mine: int | None = None
        for row in range(ROWS):
            if not self._try_lock(row):
                continue  # a live worker owns it
            self._zero(row)  # free: never used, or its worker died with requests counted
            if mine is None:
                mine = row
            else:
                fcntl.lockf(self._lock_fd, fcntl.LOCK_UN, 1, row)
        if mine is None:
            raise RuntimeError(f"more than {ROWS} gateway workers share {self._map!r}; run fewer workers")
        return mine

    def _zero(self, row: int) -> None:
        cells = self._cells
        for slot in range(SLOTS):
            cells[slot * ROWS + row] = 0

    def add(self, slot: int, delta: int) -> None:
        """Change this worker's count for `slot` (callers serialise their own threads)."""
        if slot < 0:
            return
        i = (slot % SLOTS) * ROWS + self.row
        self._cells[i] = max(0, self._cells[i] + delta)

    def count(self, slot: int) -> int:
        """Requests in flight on `slot` summed over every worker."""
        if slot < 0:
            return 0
        start = (slot % SLOTS) * ROWS
        return max(0, sum(self._cells[start:start + ROWS]))

    def close(self) -> None:
        self._cells.release()
        self._map.close()
        os.close(self._lock_fd)
        os.close(self._fd)
