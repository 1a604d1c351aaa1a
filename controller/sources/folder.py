"""The folder source (the default): a directory of Deployment YAML, watched by polling its
files' names, sizes and modification times."""
from __future__ import annotations

import logging
from pathlib import Path

from controller import errors
from controller.errors import AutoDeployError
from controller.loader import load_paths
from controller.sources import LoadArgs, SourceUpdate

log = logging.getLogger("autodeploy.sources.folder")

WATCH_S = 0.5


def spec_signature(directory: Path) -> tuple:
    try:
        entries = sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml"))
    except FileNotFoundError:
        return ()
    sig = []
    for p in entries:
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        sig.append((p.name, st.st_mtime_ns, st.st_size))
    return tuple(sig)


class FolderSource:
    """Each changed signature is a full reload: valid files apply, a file with errors keeps
    its last good revision (the controller sorts that out per file)."""
    kind = "folder"

    def __init__(self, directory: Path, load_args: LoadArgs, interval_s: float = WATCH_S) -> None:
        self.directory = directory
        self.load_args = load_args
        self.interval_s = interval_s
        self._last: tuple | None = None
        self._last_poll = 0.0
        self._loaded_at: float | None = None

    def initial(self, now: float) -> SourceUpdate | None:
        self._last_poll = now
        self._last = spec_signature(self.directory)
        return SourceUpdate(load_paths([self.directory], **self.load_args()))

    def poll(self, now: float) -> SourceUpdate | None:
        self._last_poll = now
        sig = spec_signature(self.directory)
        if sig == self._last:
            return None
        self._last = sig
        log.info("deployments changed in %s: reloading", self.directory)
        return SourceUpdate(load_paths([self.directory], **self.load_args()))

    def applied(self, update: SourceUpdate, now: float) -> None:
        self._loaded_at = now

    def next_poll_at(self) -> float:
        return self._last_poll + self.interval_s

    def status(self) -> dict:
        return {"kind": self.kind, "path": str(self.directory), "loaded_at": self._loaded_at}

    def sync_outcome(self) -> dict:
        raise AutoDeployError(errors.GIT_NOT_CONFIGURED, "this serve reads a folder")
