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


def brief_error(text: str | None, limit: int = 240) -> str:
    """One line for a Failing status: the error's first line and, for a multi-line error such as
    "exited ...; last log lines:" + the log, its last non-empty line (usually the cause)."""
    if not text:
        return ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    out = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return out if len(out) <= limit else out[:limit - 3] + "..."
