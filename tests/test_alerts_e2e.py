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


def test_a_firing_alert_and_the_chart_history_survive_a_controller_kill(serve):
    """SIGKILL the controller while an alert fires: the restarted one (same --state-dir)
    still has it firing since the same time, sends no second "firing" webhook, still
    sends "resolved" on recovery, and serves the chart minutes from before the kill."""
    import signal
    import sqlite3

    hook = WebhookReceiver()
    try:
        spec = deployment_yaml("sticky", min_replicas=1, max_replicas=1, extra_spec=f"""
            alerts:
              - metric: errorRate
                above: 50
                for: {FOR_S:g}s
                notify: {{webhook: '{hook.url}'}}
        """)
        s = serve({"sticky.yaml": spec})
        s.wait_for(lambda: s.status("sticky")["status"] == "Running", what="sticky running")
        assert s.get("/d/sticky/admin/errors?status=500").status_code == 200

        def fail_once(url: str) -> None:
            assert requests.get(url + "/d/sticky/predict", timeout=10).status_code == 500
            time.sleep(0.05)

        def firing_hooks() -> list[dict]:
            return [b for b in hook.accepted() if b["status"] == "firing"]

        wait_until(lambda: fail_once(s.url) or firing_hooks(), "the firing webhook", timeout=60)
        [before] = s.status("sticky")["alerts"]
        assert before["state"] == "firing" and before["since"] is not None
        db = s.state_dir / "autodeploy.db"

        def saved_minutes() -> list[tuple]:
            fail_once(s.url)
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                return conn.execute("SELECT minute, requests FROM minute_samples WHERE deployment='sticky'"
                                    " AND requests > 0").fetchall()

        wait_until(saved_minutes, "chart minutes saved in the store", timeout=30)
        points = {p["t"]: p["requests"] for p in s.status("sticky")["history"] if p["requests"]}
        saved = dict(saved_minutes())
        assert saved and set(saved) <= {int(t) // 60 for t in points}
        s.terminate(signal.SIGKILL)  # the instance keeps running (and answering 500s)

        s2 = serve({}, state_dir=s.state_dir)
        [after] = s2.status("sticky")["alerts"]
        assert after["state"] == "firing" and after["since"] == before["since"], after
        history = {p["t"]: p["requests"] for p in s2.status("sticky")["history"]}
        assert all(history.get(m * 60, 0) >= n for m, n in saved.items()), (saved, history)
        # The restarted controller measures 500s again and evaluates them: still firing, no second webhook.
        s2.wait_for(lambda: fail_once(s2.url) or s2.status("sticky")["metrics"]["requests"] >= 10,
                    what="requests counted after the restart", timeout=30)
        evaluated = time.time()
        while time.time() - evaluated < 3 * EVAL_S:  # a few evaluations over measured errors
            fail_once(s2.url)
        [still] = s2.status("sticky")["alerts"]
        assert still["state"] == "firing" and still["since"] == before["since"], still
        assert len(firing_hooks()) == 1, hook.accepted()
        kinds = [e["kind"] for e in s2.status("sticky")["events"]]
        assert kinds.count("alert-firing") == 1, kinds

        assert s2.get("/d/sticky/admin/errors?status=0").status_code == 200

        def resolved() -> dict | None:
            for _ in range(5):
                assert requests.get(s2.url + "/d/sticky/predict", timeout=10).status_code == 200
            return next((b for b in hook.accepted() if b["status"] == "resolved"), None)

        done = wait_until(resolved, "the resolved webhook after the restart", timeout=60)
        assert done["deployment"] == "sticky"
        assert len(firing_hooks()) == 1
    finally:
        hook.close()
