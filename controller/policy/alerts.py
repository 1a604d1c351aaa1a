"""Alert rules (`spec.alerts`): when a rule fires and when it resolves.

Pure: the caller measures the signals and passes `now`. A rule is `ok` while its
metric is at or under `above`; the first evaluation above makes it `pending`; it
`fires` once it has been above for `for_s` (at the first evaluation at or after
`pending since + for`), like a Prometheus alerting rule. Any evaluation at or under
the threshold (or with no value: no requests in the window) clears `pending` and
resolves a firing rule. A rule removed from the spec while firing resolves.

After a controller restart the states come back from the store, but the windows the
signals come from start empty: until `hold_until` a rule that is pending or firing
keeps its state while its metric has no value, rather than resolving on "no data"
(then re-firing, with a second webhook) only because nothing was measured yet.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from controller.humantime import duration as _dur
from controller.spec import AlertRule

ERROR_RATE = "errorRate"
P95 = "p95LatencyMs"
RESTARTS = "restarts"
COLD_START = "coldStartMs"
METRICS = (ERROR_RATE, P95, RESTARTS, COLD_START)
UNITS = {ERROR_RATE: "%", P95: " ms", RESTARTS: " in 10 min", COLD_START: " ms"}

RESTARTS_WINDOW_S = 600.0  # restarts are counted over the last 10 minutes
COLD_START_WINDOW_S = 600.0  # coldStartMs: the slowest cold start of the last 10 minutes

# Webhook deliveries: attempts and the pause before each retry.
WEBHOOK_ATTEMPTS = 6
WEBHOOK_BACKOFF_S = 0.5
WEBHOOK_BACKOFF_MAX_S = 30.0


@dataclass(frozen=True)
class Signals:
    """One deployment's measurements at one evaluation; None = nothing to judge."""
    error_rate_pct: float | None = None
    p95_ms: float | None = None
    restarts: int = 0
    cold_start_ms: float | None = None

    def value(self, metric: str) -> float | None:
        if metric == ERROR_RATE:
            return self.error_rate_pct
        if metric == P95:
            return self.p95_ms
        if metric == RESTARTS:
            return float(self.restarts)
        if metric == COLD_START:
            return self.cold_start_ms
        raise ValueError(f"unknown alert metric {metric!r}")


@dataclass(frozen=True)
class RuleState:
    state: str = "ok"  # ok | pending | firing
    since: float | None = None  # pending: when it went above; firing: when it fired
    above_since: float | None = None  # when the metric went above (kept while firing)
    value: float | None = None  # the last evaluated value


@dataclass(frozen=True)
class Transition:
    rule: AlertRule
    kind: str  # firing | resolved
    value: float | None
    message: str


def rule_key(rule: AlertRule) -> tuple:
    """A rule's identity across revisions: editing its threshold makes it a new rule."""
    return (rule.metric, rule.above, rule.for_s, rule.webhook)


def show(metric: str, value: float | None) -> str:
    if value is None:
        return "no data"
    return f"{value:.4g}{UNITS.get(metric, '')}"


def evaluate(rules: Iterable[AlertRule], signals: Signals, states: Mapping[tuple, RuleState],
             now: float, hold_until: float = 0.0) -> tuple[dict[tuple, RuleState], list[Transition]]:
    """New states (keyed by `rule_key`) and the firing / resolving transitions of this evaluation.
    `hold_until`: before it, a rule without a value keeps a pending or firing state (module docstring)."""
    out: dict[tuple, RuleState] = {}
    transitions: list[Transition] = []
    rules = list(rules)
    for rule in rules:
        key = rule_key(rule)
        prev = states.get(key, RuleState())
        value = signals.value(rule.metric)
        above = value is not None and value > rule.above
        if value is None and now < hold_until and prev.state != "ok":
            out[key] = prev
            continue
        if above:
            started = prev.above_since if prev.state != "ok" and prev.above_since is not None else now
            if prev.state == "firing":
                out[key] = replace(prev, value=value)
            elif now - started >= rule.for_s:
                out[key] = RuleState("firing", now, started, value)
                transitions.append(Transition(rule, "firing", value, (
                    f"{rule.label} for {_dur(now - started)}: {rule.metric} is {show(rule.metric, value)}"
                    f" (threshold {show(rule.metric, rule.above)}, for {_dur(rule.for_s)})")))
            else:
                out[key] = RuleState("pending", started, started, value)
        else:
            if prev.state == "firing":
                transitions.append(Transition(rule, "resolved", value, (
                    f"{rule.label} resolved after {_dur(now - (prev.since or now))}: {rule.metric} is "
                    f"{show(rule.metric, value)}")))
            out[key] = RuleState("ok", None, None, value)
    live = {rule_key(r) for r in rules}
    for key, prev in states.items():
        if key not in live and prev.state == "firing":
            gone = AlertRule(metric=key[0], above=key[1], for_s=key[2], webhook=key[3])
            transitions.append(Transition(gone, "resolved", prev.value,
                                          f"{gone.label} resolved: the rule was removed from the spec"))
    return out, transitions


def webhook_retry_delay(attempt: int) -> float | None:
    """Seconds to wait before attempt `attempt + 1` after `attempt` failed; None = give up."""
    if attempt >= WEBHOOK_ATTEMPTS:
        return None
    return min(WEBHOOK_BACKOFF_MAX_S, WEBHOOK_BACKOFF_S * 2 ** (attempt - 1))
