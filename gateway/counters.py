"""Counters shared by all gunicorn workers (an mmap'd file), so round-robin is one
sequence across workers rather than one per worker."""
from __future__ import annotations

import fcntl
import mmap
import os
import struct

SLOTS = 4096
_WORD = struct.Struct("<Q")


class SharedCounters:
    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self._fd).st_size < SLOTS * _WORD.size:
            os.ftruncate(self._fd, SLOTS * _WORD.size)
        self._map = mmap.mmap(self._fd, SLOTS * _WORD.size)

    def next(self, slot: int) -> int:
        """Return the slot's value and advance it, atomically across processes."""
        offset = (slot % SLOTS) * _WORD.size
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            (value,) = _WORD.unpack_from(self._map, offset)
            _WORD.pack_into(self._map, offset, value + 1)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        return int(value)

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)
