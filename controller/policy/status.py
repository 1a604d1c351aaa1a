"""The status word of a deployment, as the seeds name them plus the two they imply.

Running: at least one instance is ready. Failing: none is ready and the last start
or the last instance failed (a crash loop, a command that exits, a health path that
never answers) - shown with the last error. Idle: instances are being created or
released, none ready. Stopped: `state: stopped` (file or `autodeploy stop`).
Standby: nothing runs and nothing is wrong; the next request starts an instance.
"""
from __future__ import annotations

RUNNING, FAILING, IDLE, STOPPED, STANDBY = "Running", "Failing", "Idle", "Stopped", "Standby"
WORDS = (STANDBY, IDLE, RUNNING, FAILING, STOPPED)


def status_word(state: str, ready: int, instances: int, failures: int) -> str:
    """`failures`: failed starts and crashes since an instance was last ready."""
    if ready > 0:
        return RUNNING
    if state == "stopped":
        return IDLE if instances else STOPPED
    if failures > 0:
        return FAILING
    return IDLE if instances else STANDBY
