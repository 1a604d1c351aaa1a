"""Where the desired state comes from: a folder (the default) or a git branch.

A source only reads and validates: `poll()` answers a `SourceUpdate` (a load result, and
the commit it came from) when there is something new to apply, and nothing otherwise.
`SourceWatcher` runs the polls on one thread and hands updates to the controller through
the same `apply` path for both kinds, so a commit and a file change take the same road.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from controller import errors
from controller.errors import AutoDeployError
from controller.loader import LoadResult
from controller.store import Commit

log = logging.getLogger("autodeploy.sources")

# Events about the source itself (fetch failures, refused commits) are stored under this name.
SOURCE_EVENTS = "source"
SYNC_TIMEOUT_S = 120.0  # the longest a `POST /api/git/sync` waits for its poll


# The loader's keyword arguments for one load (require_image, owners, local_gateway_port),
# asked for at each load: `owners` are the files that serve each name now.
LoadArgs = Callable[[], dict[str, Any]]


@dataclass
class SourceUpdate:
    result: LoadResult
    commit: Commit | None = None


class Source(Protocol):
    kind: str

    def initial(self, now: float) -> SourceUpdate | None:
        """The first load when serve starts."""

    def poll(self, now: float) -> SourceUpdate | None:
        """Look for a change; an update to apply, or None."""

    def applied(self, update: SourceUpdate, now: float) -> None:
        """The controller took the update: it is what serves now."""

    def next_poll_at(self) -> float:
        """When the next poll is due (clock time)."""

    def status(self) -> dict:
        """What the status API shows for this source."""

    def sync_outcome(self) -> dict:
        """After a requested poll: the status, or raise the coded error it ended with."""


class SourceWatcher:
    """Polls one source on its own thread; `sync()` asks for a poll now and waits for it."""

    def __init__(self, source: Source, apply: Callable[[SourceUpdate], None],
                 events: Callable[[], list[dict]] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.source = source
        self._apply = apply
        self._events = events
        self.clock = clock
        self._cv = threading.Condition()
        self._sync_requested = False
        self._started = 0  # polls begun
        self._done = 0  # polls finished

    @property
    def kind(self) -> str:
        return self.source.kind

    def load_initial(self) -> None:
        self._hand_over(self.source.initial(self.clock()))

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            with self._cv:
                while not self._sync_requested and not stop.is_set():
                    delay = self.source.next_poll_at() - self.clock()
                    if delay <= 0:
                        break
                    self._cv.wait(min(delay, 0.25))
                if stop.is_set():
                    self._cv.notify_all()
                    return
                self._sync_requested = False
                self._started += 1
            try:
                self.poll_once()
            finally:
                with self._cv:
                    self._done += 1
                    self._cv.notify_all()

    def poll_once(self) -> None:
        try:
            update = self.source.poll(self.clock())
        except Exception:  # noqa: BLE001 - a failed poll must never stop serving; the next one retries
            log.exception("polling the %s source failed; the last good state keeps serving", self.kind)
            return
        self._hand_over(update)

    def _hand_over(self, update: SourceUpdate | None) -> None:
        if update is None:
            return
        try:
            self._apply(update)
        except Exception:  # noqa: BLE001 - a reload failure must not stop serving; it is logged
            log.exception("applying the %s source's update failed; the last good revisions keep serving",
                          self.kind)
            return
        self.source.applied(update, self.clock())

    def sync(self, timeout: float = SYNC_TIMEOUT_S) -> dict:
        """Poll at once (a push hook calls this through `POST /api/git/sync`) and wait for it."""
        if self.source.kind != "git":
            raise AutoDeployError(errors.GIT_NOT_CONFIGURED, "this serve reads a folder; POST /api/git/sync "
                                  "needs `autodeploy serve --git-repo URL` or autodeploy:git in the stack config")
        deadline = time.monotonic() + min(max(timeout, 0.1), SYNC_TIMEOUT_S)
        with self._cv:
            target = self._started + 1  # a poll begun after this request: it sees the push
            self._sync_requested = True
            self._cv.notify_all()
            while self._done < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AutoDeployError(errors.GIT_SYNC_TIMEOUT, f"no poll finished within {timeout:g} s")
                self._cv.wait(left)
        return self.source.sync_outcome()

    def status(self, events: bool = False) -> dict:
        out: dict[str, Any] = self.source.status()
        if events and self._events is not None:
            out["events"] = self._events()
        return out
