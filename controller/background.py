"""A controller-side background pass that runs every `period_s` on its own thread and
fans its I/O out to a small pool (health probes, resource sampling)."""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("autodeploy.controller")


class PeriodicPass:
    name = "pass"

    def __init__(self, period_s: float, max_parallel: int) -> None:
        self.period_s = period_s
        self._pool = ThreadPoolExecutor(max_parallel, thread_name_prefix=self.name)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=self.name)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - the pass must outlive one bad round; it is logged
                log.exception("%s pass failed", self.name)

    def run_once(self) -> None:
        raise NotImplementedError
