"""The state dir belongs to one `serve` at a time, and to its user only.

A second `serve` on the same dir would adopt the first one's instances and stop them
when it exits; the lock makes it leave before it touches anything. The lock is an
flock on `serve.lock` (released by the kernel when the holder dies, so a crashed serve
never leaves a stale lock) holding the holder's pid for the message.
"""
from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

LOCK_NAME = "serve.lock"
DIR_MODE = 0o700
FILE_MODE = 0o600
# What serve creates (and the processes it starts inherit, except instances: see
# LocalDriver's umask): files 0600, folders 0700.
SERVE_UMASK = 0o077


class StateDirBusy(Exception):
    def __init__(self, state_dir: Path, pid: int | None) -> None:
        holder = f"pid {pid}" if pid else "another process"
        super().__init__(f"state dir {state_dir} is in use by autodeploy serve ({holder}); stop that serve "
                         "first, or give this one another --state-dir")
        self.pid = pid


class StateDirLock:
    """Held for the life of the serve process (the descriptor is not inherited by children)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._fd: int | None = None

    def acquire(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        path = self.state_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise StateDirBusy(self.state_dir, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).split()[0])
    except (OSError, ValueError, IndexError):
        return None


def secure(state_dir: Path) -> None:
    """0700 on the state dir and the folders in it, 0600 on its files (a dir made by an
    older version, or by hand, may be readable by others: logs and the DB hold secrets'
    names and request data)."""
    state_dir.chmod(DIR_MODE)
    for root, dirs, files in os.walk(state_dir):
        for name in dirs:
            _chmod(Path(root) / name, DIR_MODE)
        for name in files:
            _chmod(Path(root) / name, FILE_MODE)


def _chmod(path: Path, mode: int) -> None:
    try:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode) or stat.S_ISSOCK(st.st_mode):
            return
        if stat.S_IMODE(st.st_mode) & ~mode:
            path.chmod(stat.S_IMODE(st.st_mode) & mode)
    except OSError:
        pass  # gone meanwhile, or not ours: nothing to tighten
