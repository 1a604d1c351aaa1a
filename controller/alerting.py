"""Alert evaluation for the controller: measure, ask `controller.policy.alerts`, act.

Called from the reconcile pass with the controller's lock held, at most once per
`eval_s`. Firing and resolving are events (`alert-firing`, `alert-resolved`) and,
for rules with `notify.webhook`, JSON POSTs handed to the background
`controller.notify.WebhookSender` (a bounded queue: this never waits on the network).

The states are saved in the store whenever one changes (before the webhooks are
handed over) and loaded back by a restarted controller (`restore`): a rule firing
before a restart is still firing after it, with its original times, so its
"firing" webhook is not sent again and its "resolved" one is not lost.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from controller.coldstart import ColdStarts
from controller.fleet import DepRuntime, Fleet
from controller.latency import percentile
from controller.notify import Delivery, WebhookSender
from controller.store import AlertStateRow
from controller.traffic import Traffic
from controller.policy.alerts import (COLD_START, COLD_START_WINDOW_S, RESTARTS_WINDOW_S, RuleState, Signals, evaluate,
                                      rule_key)

log = logging.getLogger("autodeploy.alerts")

EVAL_S = 1.0
RESTART_KINDS = ("crashed", "failed")


class Alerting:
    def __init__(self, fleet: Fleet, traffic: Traffic, coldstarts: ColdStarts, eval_s: float = EVAL_S,
                 sender: WebhookSender | None = None) -> None:
        self.fleet = fleet
        self.store = fleet.store
        self.traffic = traffic
        self.coldstarts = coldstarts
        self.eval_s = eval_s
        self.sender = sender or WebhookSender(on_result=self._delivered)
        self.states: dict[str, dict[tuple, RuleState]] = {}
        self.last_eval = 0.0
        self.hold_until = 0.0  # `controller.policy.alerts.evaluate`: after a restart, no data is not "resolved"

    def restore(self, now: float) -> None:
        """Load the states saved before a restart; hold them while the signal windows refill."""
        for name, rows in self.store.alert_states().items():
            self.states[name] = {(r.metric, r.above, r.for_s, r.webhook): RuleState(r.state, r.since, r.above_since,
                                                                                    r.value) for r in rows}
        if self.states:
            self.hold_until = now + max(self.traffic.window_s, COLD_START_WINDOW_S if any(
                k[0] == COLD_START for st in self.states.values() for k in st) else 0.0)

    def _save(self, name: str, old: dict[tuple, RuleState], new: dict[tuple, RuleState], now: float) -> None:
        """Write `name`'s states when one changed (its value alone changing is not saved)."""
        def shape(states: dict[tuple, RuleState]) -> dict[tuple, tuple]:
            return {k: (st.state, st.since, st.above_since) for k, st in states.items()}
        if shape(old) == shape(new):
            return
        self.store.save_alert_states(name, [AlertStateRow(k[0], k[1], k[2], k[3], st.state, st.since, st.above_since,
                                                          st.value) for k, st in new.items()], at=now)

    def signals(self, rt: DepRuntime, now: float) -> Signals:
        name = rt.spec.name
        window = self.traffic.by_deployment.get(name)
        err = p95 = None
        if window is not None:
            v = window.view(now)
            if v.count:
                err = 100.0 * v.errors / v.count
                p95 = percentile(v.hist, 0.95)
        restarts = self.store.count_events(name, RESTART_KINDS, now - RESTARTS_WINDOW_S)
        cold = self.coldstarts.slowest_since(name, now - COLD_START_WINDOW_S)
        return Signals(error_rate_pct=err, p95_ms=p95, restarts=restarts, cold_start_ms=cold)

    def step(self, now: float) -> None:
        """One evaluation of every deployment's rules (caller holds the controller's lock)."""
        if now - self.last_eval < self.eval_s:
            return
        self.last_eval = now
        for name in [n for n in self.states if n not in self.fleet.deps]:
            self._save(name, self.states.pop(name), {}, now)
        for name, rt in self.fleet.deps.items():
            prev = self.states.get(name, {})
            if not rt.spec.alerts and not prev:
                continue
            rules = () if rt.removed else rt.spec.alerts
            states, transitions = evaluate(rules, self.signals(rt, now), prev, now, self.hold_until)
            self.states[name] = states
            self._save(name, prev, states, now)
            for t in transitions:
                self.fleet.event(name, f"alert-{t.kind}", t.message)
                if t.rule.webhook:
                    st = states.get(rule_key(t.rule), RuleState())
                    self.sender.send(t.rule.webhook, {
                        "deployment": name, "status": t.kind, "message": t.message,
                        "alert": {"metric": t.rule.metric, "above": t.rule.above, "for_s": t.rule.for_s,
                                  "file": rt.spec.source_file, "line": t.rule.line},
                        "value": t.value, "at": now, "since": st.above_since if t.kind == "firing" else None,
                        "endpoint": f"/d/{name}/"}, name)

    def status(self, rt: DepRuntime, now: float) -> list[dict[str, Any]]:
        states = self.states.get(rt.spec.name, {})
        out = []
        for rule in rt.spec.alerts:
            st = states.get(rule_key(rule), RuleState())
            out.append({"metric": rule.metric, "above": rule.above, "for_s": rule.for_s, "webhook": rule.webhook,
                        "line": rule.line, "state": st.state, "since": st.since, "value": st.value})
        return out

    def firing(self, name: str) -> int:
        return sum(1 for st in self.states.get(name, {}).values() if st.state == "firing")

    def close(self) -> None:
        self.sender.close()

    def _delivered(self, delivery: Delivery, outcome: str) -> None:
        """From the sender's thread: the store has its own lock, the controller's is not needed."""
        p = delivery.payload
        what = f"{p.get('status')} {p.get('alert', {}).get('metric')} > {p.get('alert', {}).get('above'):g}" \
            if isinstance(p.get("alert", {}).get("above"), (int, float)) else str(p.get("status"))
        if outcome == "delivered":
            msg = f"webhook {delivery.url}: {what} delivered (attempt {delivery.attempt})"
        else:
            msg = (f"webhook {delivery.url}: {what} {outcome} after {delivery.attempt} attempt(s): "
                   f"{'; '.join(delivery.errors[-3:])}")
            log.warning("%s: %s", delivery.deployment, msg)
        self.store.event(delivery.deployment, "alert-webhook", msg, at=time.time())

