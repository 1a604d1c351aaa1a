"""Durations and moments as people read them: "4m 10s", "in 4m 10s", "2h 5m ago".

Pure: `now` is an argument wherever a moment is compared with the present.
"""
from __future__ import annotations


def duration(seconds: float) -> str:
    """850ms, 42s, 4m 10s, 2h 5m, 3d 4h (two units at most; the larger one first)."""
    s = abs(float(seconds))
    if s == 0:
        return "0s"
    if s < 1:
        return f"{s * 1000:.0f}ms"
    if s < 10:
        text = f"{s:.1f}".rstrip("0").rstrip(".")
        return f"{text}s"
    total = int(round(s))
    days, rem = divmod(total, 86400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    while parts and parts[0][0] == 0:
        parts.pop(0)
    shown = [f"{n}{u}" for n, u in parts[:2] if n]
    return " ".join(shown) or "0s"


def ago(ts: float | None, now: float) -> str:
    """'4m 10s ago' for a past moment, 'in 4m 10s' for a future one, '-' for none."""
    if not ts:
        return "-"
    delta = now - ts
    if abs(delta) < 0.5:
        return "just now"
    return f"{duration(delta)} ago" if delta > 0 else f"in {duration(delta)}"


def until(ts: float | None, now: float) -> str:
    """'in 4m 10s' for a future moment; a past one reads '4m 10s ago'."""
    if not ts:
        return "-"
    return ago(ts, now)
