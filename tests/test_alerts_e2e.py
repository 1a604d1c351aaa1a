"""Alerts end to end: a real serve, a real instance that starts answering 500s, a real webhook receiver."""
from __future__ import annotations

import time

import requests

from conftest import deployment_yaml, wait_until
from controller.alerting import EVAL_S
from webhook_receiver import WebhookReceiver

FOR_S = 2.0


def test_error_rate_alert_fires_and_resolves_through_the_webhook(serve):
    hook = WebhookReceiver(statuses=[503])  # the first delivery fails once: it is retried
    try:
        spec = deployment_yaml("flaky", min_replicas=1, max_replicas=1, extra_spec=f"""
            alerts:
              - metric: errorRate
                above: 50
                for: {FOR_S:g}s
                notify: {{webhook: '{hook.url}'}}
        """)
        s = serve({"flaky.yaml": spec})
        s.wait_for(lambda: s.status("flaky")["status"] == "Running", what="flaky running")
        assert s.get("/d/flaky/anything").status_code == 200
        assert s.get("/d/flaky/admin/errors?status=500").status_code == 200
        broke = time.time()
        bad = 0

        def firing() -> dict | None:
            nonlocal bad
            r = requests.get(s.url + "/d/flaky/predict", timeout=10)
            assert r.status_code == 500
            bad += 1
            time.sleep(0.05)
            return next((b for b in hook.accepted() if b["status"] == "firing"), None)

        fired = wait_until(firing, "the firing webhook", timeout=60)
        took = time.time() - broke
        assert fired["deployment"] == "flaky"
        assert fired["alert"]["metric"] == "errorRate" and fired["alert"]["above"] == 50
        assert fired["alert"]["line"] > 0 and fired["alert"]["file"].endswith("flaky.yaml")
        assert fired["value"] > 50
        # The evaluator fires at its first pass at or after for: within for + one evaluation period
        # of the first pass that saw the error rate above the threshold (its own clock).
        assert FOR_S <= fired["at"] - fired["since"] <= FOR_S + EVAL_S + 0.5, fired
        dep = s.status("flaky")
        assert [a["state"] for a in dep["alerts"]] == ["firing"]
        assert any(e["kind"] == "alert-firing" for e in dep["events"])

        assert s.get("/d/flaky/admin/errors?status=0").status_code == 200

        def resolved() -> dict | None:
            for _ in range(5):
                assert requests.get(s.url + "/d/flaky/predict", timeout=10).status_code == 200
            return next((b for b in hook.accepted() if b["status"] == "resolved"), None)

        done = wait_until(resolved, "the resolved webhook", timeout=60)
        assert done["deployment"] == "flaky" and done["value"] <= 50
        events = s.status("flaky")["events"]
        kinds = [e["kind"] for e in events]
        assert "alert-resolved" in kinds
        assert any(e["kind"] == "alert-webhook" and "delivered (attempt 2)" in e["message"] for e in events)
        assert [a["state"] for a in s.status("flaky")["alerts"]] == ["ok"]
        print(f"errorRate > 50 for {FOR_S:g}s: firing webhook {took:.2f} s after the first 500 "
              f"({bad} failed requests)")
    finally:
        hook.close()
