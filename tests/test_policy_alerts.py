"""Alert rules as a pure policy: fake clock, no I/O."""
from __future__ import annotations

from controller.loader import load_text
from controller.policy.alerts import (WEBHOOK_ATTEMPTS, Signals, evaluate, rule_key, webhook_retry_delay)
from controller.spec import AlertRule

RULE = AlertRule(metric="errorRate", above=5.0, for_s=30.0, webhook="http://127.0.0.1:9/hook")


def run(rule: AlertRule, series: list[tuple[float, Signals]]):
    states: dict = {}
    seen = []
    for now, sig in series:
        states, transitions = evaluate([rule], sig, states, now)
        seen += [(now, t.kind) for t in transitions]
    return states, seen


def test_rule_fires_only_after_the_metric_stays_above_for_its_duration():
    series = [(t, Signals(error_rate_pct=50.0)) for t in range(0, 40, 5)]
    states, seen = run(RULE, series)
    assert seen == [(30, "firing")]
    assert states[rule_key(RULE)].state == "firing"
    assert states[rule_key(RULE)].above_since == 0


def test_a_dip_under_the_threshold_restarts_the_for_clock():
    series = [(0, Signals(error_rate_pct=50.0)), (20, Signals(error_rate_pct=1.0)),
              (25, Signals(error_rate_pct=50.0)), (50, Signals(error_rate_pct=50.0)),
              (55, Signals(error_rate_pct=50.0))]
    _, seen = run(RULE, series)
    assert seen == [(55, "firing")]


def test_firing_rule_resolves_when_the_metric_drops_or_has_no_data():
    for calm in (Signals(error_rate_pct=2.0), Signals(error_rate_pct=None)):
        series = [(0, Signals(error_rate_pct=80.0)), (30, Signals(error_rate_pct=80.0)), (31, calm)]
        states, seen = run(RULE, series)
        assert seen == [(30, "firing"), (31, "resolved")]
        assert states[rule_key(RULE)].state == "ok"


def test_equal_to_the_threshold_is_not_above():
    _, seen = run(AlertRule("p95LatencyMs", 200.0, 0.0), [(0, Signals(p95_ms=200.0)), (1, Signals(p95_ms=200.1))])
    assert seen == [(1, "firing")]


def test_for_zero_fires_at_the_first_evaluation_above():
    _, seen = run(AlertRule("restarts", 2.0, 0.0), [(0, Signals(restarts=2)), (1, Signals(restarts=3))])
    assert seen == [(1, "firing")]


def test_cold_start_metric_reads_the_slowest_recent_start():
    rule = AlertRule("coldStartMs", 1000.0, 0.0)
    _, seen = run(rule, [(0, Signals(cold_start_ms=900.0)), (1, Signals(cold_start_ms=1500.0)),
                         (2, Signals(cold_start_ms=None))])
    assert seen == [(1, "firing"), (2, "resolved")]


def test_a_firing_rule_removed_from_the_spec_resolves():
    states, _ = run(RULE, [(0, Signals(error_rate_pct=90.0)), (30, Signals(error_rate_pct=90.0))])
    states, transitions = evaluate([], Signals(error_rate_pct=90.0), states, 40)
    assert [t.kind for t in transitions] == ["resolved"]
    assert "removed" in transitions[0].message
    assert states == {}


def test_firing_message_names_value_threshold_and_duration():
    _, transitions = evaluate([RULE], Signals(error_rate_pct=100.0), {}, 0)
    assert transitions == []
    states, _ = evaluate([RULE], Signals(error_rate_pct=100.0), {}, 0)
    _, transitions = evaluate([RULE], Signals(error_rate_pct=100.0), states, 250)
    assert transitions[0].message == ("errorRate > 5 for 4m 10s: errorRate is 100% (threshold 5%, for 30s)")


def test_webhook_retries_back_off_exponentially_and_give_up():
    delays = [webhook_retry_delay(a) for a in range(1, WEBHOOK_ATTEMPTS + 1)]
    assert delays[:3] == [0.5, 1.0, 2.0]
    assert delays[-1] is None
    assert all(d is not None and d <= 30 for d in delays[:-1])


def _doc(alerts: str) -> str:
    return ("apiVersion: autodeploy/v1\nkind: Deployment\nmetadata: {name: a}\nspec:\n"
            "  model: {id: m, version: v1}\n  command: run\n  port: 8080\n  alerts:\n" + alerts)


def test_alert_rules_load_with_defaults_and_lines():
    result = load_text(_doc("    - metric: errorRate\n      above: 5\n      for: 2m\n"
                            "      notify: {webhook: 'http://hooks.example:9000/x'}\n"
                            "    - {metric: restarts, above: 3}\n"), "d.yaml")
    assert result.ok, result.errors
    rules = result.deployments[0].alerts
    assert rules[0] == AlertRule("errorRate", 5.0, 120.0, "http://hooks.example:9000/x", line=9)
    assert rules[1].for_s == 60.0 and rules[1].webhook is None and rules[1].line == 13


def test_bad_alert_rules_are_reported_with_file_and_line():
    result = load_text(_doc("    - metric: errorrate\n      above: 5\n"
                            "    - metric: errorRate\n      above: 250\n"
                            "    - metric: p95LatencyMs\n      above: 100\n      for: soon\n"
                            "    - metric: restarts\n      above: 1\n      notify: {webhook: 'ftp://x'}\n"
                            "    - metric: restarts\n"), "d.yaml")
    text = "\n".join(map(str, result.errors))
    assert "d.yaml:9: spec.alerts[0].metric must be one of errorRate, p95LatencyMs, restarts, coldStartMs" in text
    assert "d.yaml:12: spec.alerts[1].above is 250 but errorRate is a percentage" in text
    assert "d.yaml:15: spec.alerts[2].for: 'soon' is not a duration" in text
    assert "d.yaml:18: spec.alerts[3].notify.webhook must be an http:// or https:// URL" in text
    assert "d.yaml:19: spec.alerts[4] is missing the required key 'above'" in text
    assert len(result.errors) == 5


def test_after_a_restart_no_data_holds_a_firing_rule_until_the_hold_ends():
    states, seen = run(RULE, [(0, Signals(error_rate_pct=80.0)), (30, Signals(error_rate_pct=80.0))])
    assert seen == [(30, "firing")]
    # The controller restarted at 100: its windows are empty until 160.
    held, transitions = evaluate([RULE], Signals(error_rate_pct=None), states, 101.0, hold_until=160.0)
    assert transitions == [] and held[rule_key(RULE)] == states[rule_key(RULE)]  # since, above_since kept
    still, transitions = evaluate([RULE], Signals(error_rate_pct=90.0), held, 102.0, hold_until=160.0)
    assert transitions == [] and still[rule_key(RULE)].since == 30 and still[rule_key(RULE)].value == 90.0
    calm, transitions = evaluate([RULE], Signals(error_rate_pct=1.0), still, 103.0, hold_until=160.0)
    assert [t.kind for t in transitions] == ["resolved"]  # a measured value is judged at once
    _, transitions = evaluate([RULE], Signals(error_rate_pct=None), held, 160.0, hold_until=160.0)
    assert [t.kind for t in transitions] == ["resolved"]  # the hold is over: no data resolves again
    fresh, transitions = evaluate([RULE], Signals(error_rate_pct=None), {}, 101.0, hold_until=160.0)
    assert transitions == [] and fresh[rule_key(RULE)].state == "ok"  # nothing to hold
