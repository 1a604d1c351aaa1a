"""Health end to end: active checks take a failing instance out of routing and replace
it; passive checks and one retry keep clients from seeing an instance die."""
from __future__ import annotations

import os
import signal
import threading
import time

import requests

from conftest import deployment_yaml

RULE = "Deploy-Route-Rule"
TARGET = "Deploy-Route-Target"


def checked(name: str, interval: str = "1", threshold: int = 3) -> str:
    return deployment_yaml(name, health=None, extra_spec=f"""
        loadBalancer:
          healthCheck: {{path: /health, intervalSeconds: {interval}, timeoutSeconds: 0.5,
                         failureThreshold: {threshold}}}
        """)


def test_failing_health_check_takes_the_instance_out_of_routing_then_replaces_it(serve, data_plane):
    s = serve({"hc.yaml": checked("hc")}, "--workers", "2")
    sick, well = [s.get("/d/hc/whoami", headers={RULE: "scale-out"}).headers[TARGET] for _ in range(2)]
    assert s.get("/d/hc/admin/health?fail=1", headers={RULE: sick}).status_code == 200

    def health_of(iid: str) -> dict | None:
        return next((i for i in s.instances("hc") if i["id"] == iid), None)

    s.wait_for(lambda: (h := health_of(sick)) is None or not h["healthy"], timeout=10,
               what="the first failed check")
    if health_of(sick) is not None:  # between the first failure and the replacement
        assert {s.get("/d/hc/whoami").headers[TARGET] for _ in range(10)} == {well}
    s.wait_for(lambda: health_of(sick) is None, timeout=15, what="the failing instance to be removed")
    s.wait_for(lambda: sum(i["state"] == "ready" for i in s.instances("hc")) == 2, timeout=15,
               what="a replacement to be ready")
    replacement = next(i["id"] for i in s.instances("hc") if i["id"] not in (sick, well))

    events = s.status("hc")["events"]
    unhealthy = [e["message"] for e in events if e["kind"] == "unhealthy" and e["instance"] == sick]
    assert any("GET /health: HTTP 503" in m and "out of routing" in m for m in unhealthy), unhealthy
    assert any("failed 3 checks in a row" in m and "replacing" in m for m in unhealthy), unhealthy
    start = next(e for e in events if e["kind"] == "start" and e["instance"] == replacement)
    assert start["message"] == f"replacing unhealthy instance {sick}"
    assert {s.get("/d/hc/whoami").headers[TARGET] for _ in range(10)} == {well, replacement}


def test_an_instance_that_recovers_comes_back_into_routing(serve, data_plane):
    s = serve({"hc.yaml": checked("hc", threshold=30)})
    flaky, other = [s.get("/d/hc/whoami", headers={RULE: "scale-out"}).headers[TARGET] for _ in range(2)]
    s.get("/d/hc/admin/health?fail=1", headers={RULE: flaky})
    s.wait_for(lambda: not next(i for i in s.instances("hc") if i["id"] == flaky)["healthy"], timeout=10,
               what="the instance to fail its check")
    # Out of routing means out of reach through the gateway, even by id: heal it directly.
    port = next(i["port"] for i in s.instances("hc") if i["id"] == flaky)
    assert requests.get(f"http://127.0.0.1:{port}/admin/health?fail=0", timeout=5).status_code == 200
    s.wait_for(lambda: next(i for i in s.instances("hc") if i["id"] == flaky)["healthy"], timeout=10,
               what="the instance to pass again")
    assert {s.get("/d/hc/whoami").headers[TARGET] for _ in range(6)} == {flaky, other}
    kinds = [e["kind"] for e in s.status("hc")["events"] if e["instance"] == flaky]
    assert "healthy" in kinds and "unhealthy" in kinds


def test_killing_one_of_two_instances_under_load_fails_no_request(serve, data_plane):
    s = serve({"kill.yaml": checked("kill", interval="10")}, "--workers", "2")
    victim, survivor = [s.get("/d/kill/whoami", headers={RULE: "scale-out"}).headers[TARGET] for _ in range(2)]
    pid = next(i["pid"] for i in s.instances("kill") if i["id"] == victim)
    results: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def client() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                r = session.get(s.url + "/d/kill/slow?ms=20", timeout=30)
                results.append((r.status_code, r.headers.get(TARGET)))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        s.wait_for(lambda: {t for _, t in results} == {victim, survivor}, timeout=10, what="both instances serving")
        os.killpg(pid, signal.SIGKILL)
        killed_at = len(results)
        s.wait_for(lambda: len(results) > killed_at + 100, timeout=30, what="100 requests after the kill")
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert [r for r in results if r[0] != 200] == []
    assert {t for _, t in results[killed_at + 20:]} == {survivor}
    events = s.status("kill")["events"]
    assert any(e["kind"] == "crashed" and e["instance"] == victim for e in events)
