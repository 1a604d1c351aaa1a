"""gunicorn settings file that `autodeploy serve` passes with `-c python:gateway.gunicorn_conf`.

Command-line options still set everything else; this only adds the hook that keeps
Prometheus's multiprocess files right when a worker exits (gateway/metrics.py).
"""
from __future__ import annotations

import os
from typing import Any


def child_exit(server: Any, worker: Any) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(worker.pid)
