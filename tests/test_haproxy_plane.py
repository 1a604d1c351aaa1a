"""The haproxy data plane against a real HAProxy and real instances (echo model processes):
servers added, weighted, drained and deleted over the Runtime API, the activator
fallback, coded errors, the request log, seamless reloads and adoption."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest
import requests

from controller.contracts import Snapshot, SyncReply
from conftest import free_port
from gateway.haproxy_config import Settings
from gateway.haproxy_plane import HaproxyDataPlane, find_haproxy
from conftest import ECHO_MODEL, PY, accepts, wait_until

HAPROXY = find_haproxy()


def _echo(instance_id: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([PY, str(ECHO_MODEL), "--port", str(port)],
                            env=dict(os.environ, AUTODEPLOY_INSTANCE_ID=instance_id),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: accepts(port), f"echo {instance_id} listening", 10)
    return proc, port


class Rig:
    def __init__(self, tmp: Path, **settings) -> None:
        assert HAPROXY, "haproxy must be installed (apt-get install haproxy); CI installs it"
        self.procs: list[subprocess.Popen] = []
        self.ports: dict[str, int] = {}
        for iid in ("instanca", "instancb", "activator"):
            proc, port = _echo(iid)
            self.procs.append(proc)
            self.ports[iid] = port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state = tmp / "state"
        self.settings = Settings(bind_host="127.0.0.1", bind_port=self.port, activator_host="127.0.0.1",
                                 activator_port=self.ports["activator"], http_request_timeout_s=1.0, **settings)
        self.plane = self.new_plane()
        self.plane.boot()

    def new_plane(self) -> HaproxyDataPlane:
        return HaproxyDataPlane(HAPROXY, self.state, self.settings, sync=lambda msg: SyncReply(msg.version))

    def ready(self, *ids: str, revision: int = 1) -> list[dict]:
        return [{"id": i, "host": "127.0.0.1", "port": self.ports[i], "revision": revision, "deployment": "d"}
                for i in ids]

    def snapshot(self, version: int, **deps: dict) -> Snapshot:
        """A snapshot as the wire carries it, decoded like the data plane's sync does."""
        base = {"state": "running", "algorithm": "round-robin", "sticky": False, "split": None, "ready": []}
        return Snapshot.from_json({"version": version, "deployments": {k: {**base, **v} for k, v in deps.items()}})

    def close(self) -> None:
        self.plane.close(stop_haproxy=True, timeout=5)
        for p in self.procs:
            p.kill()
            p.wait()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def test_servers_added_at_run_time_carry_warm_traffic_with_route_headers(rig):
    rig.plane.apply(rig.snapshot(2, d={"ready": rig.ready("instanca", "instancb", revision=7)}))
    seen = Counter()
    for _ in range(10):
        r = requests.get(rig.url + "/d/d/whoami", timeout=5)
        assert r.status_code == 200
        assert r.headers["Deploy-Route-Target"] == r.headers["X-Instance"]
        assert r.headers["Deploy-Revision"] == "7"
        seen[r.headers["Deploy-Route-Target"]] += 1
    assert seen == {"instanca": 5, "instancb": 5}  # round-robin
    r = requests.get(rig.url + "/d/d/echo/path?q=1", timeout=5)
    assert r.headers["X-Instance"] == "instanca" or r.headers["X-Instance"] == "instancb"
    seen_path = json.loads(r.text)
    assert (seen_path["path"], seen_path["query"]) == ("/echo/path", "q=1")


def test_no_usable_server_and_route_rules_go_to_the_activator(rig):
    rig.plane.apply(rig.snapshot(2, d={"ready": []}, e={"ready": rig.ready("instanca")}))
    assert requests.get(rig.url + "/d/d/x", timeout=5).headers["X-Instance"] == "activator"
    assert requests.get(rig.url + "/d/e/x", timeout=5).headers["X-Instance"] == "instanca"
    ruled = requests.get(rig.url + "/d/e/x", headers={"Deploy-Route-Rule": "scale-out"}, timeout=5)
    assert ruled.headers["X-Instance"] == "activator"
    assert requests.get(rig.url + "/api/deployments", timeout=5).headers["X-Instance"] == "activator"


def test_a_removed_instance_drains_then_is_deleted_without_failing_its_request(rig):
    rig.plane.apply(rig.snapshot(2, d={"ready": rig.ready("instanca")}))
    result: dict = {}

    def slow() -> None:
        result["r"] = requests.get(rig.url + "/d/d/slow?ms=1500", timeout=10)

    t = threading.Thread(target=slow)
    t.start()
    wait_until(lambda: any(s.scur for s in rig.plane.api.show_stat()), "request in flight", 5)
    rig.plane.apply(rig.snapshot(3, d={"ready": rig.ready("instancb")}))
    states = {s.name: s for s in rig.plane.api.show_stat()}
    assert states["instanca"].admin_state == "DRAIN" and states["instanca"].scur == 1
    for _ in range(5):
        assert requests.get(rig.url + "/d/d/whoami", timeout=5).headers["X-Instance"] == "instancb"
    t.join()
    assert result["r"].status_code == 200 and result["r"].headers["Deploy-Route-Target"] == "instanca"
    rig.plane.apply(rig.snapshot(3, d={"ready": rig.ready("instancb")}))
    assert {s.name for s in rig.plane.api.show_stat()} == {"instancb"}


def test_canary_weights_are_set_at_run_time(rig):
    ready = rig.ready("instanca") + rig.ready("instancb", revision=2)
    rig.plane.apply(rig.snapshot(2, d={"ready": ready,
                                       "split": {"slot": 0, "new_revision": 2, "new_weight": 0, "old_weight": 100}}))
    assert {requests.get(rig.url + "/d/d/x", timeout=5).headers["X-Instance"] for _ in range(6)} == {"instanca"}
    rig.plane.apply(rig.snapshot(3, d={"ready": ready,
                                       "split": {"slot": 0, "new_revision": 2, "new_weight": 100, "old_weight": 0}}))
    got = {requests.get(rig.url + "/d/d/x", timeout=5).headers["Deploy-Revision"] for _ in range(6)}
    assert got == {"2"}


def test_sticky_cookie_names_the_instance_and_keeps_the_client_there(rig):
    rig.plane.apply(rig.snapshot(2, d={"sticky": True, "ready": rig.ready("instanca", "instancb")}))
    s = requests.Session()
    first = s.get(rig.url + "/d/d/x", timeout=5)
    pinned = first.headers["Deploy-Route-Target"]
    assert s.cookies.get("autodeploy-d") == pinned
    assert {s.get(rig.url + "/d/d/x", timeout=5).headers["Deploy-Route-Target"] for _ in range(6)} == {pinned}
    other = "instancb" if pinned == "instanca" else "instanca"
    jar = {"autodeploy-d": other}
    assert {requests.get(rig.url + "/d/d/x", cookies=jar, timeout=5).headers["X-Instance"] for _ in range(4)} == {other}


def test_hung_instance_answers_coded_504_after_the_request_timeout(rig):
    rig.plane.apply(rig.snapshot(2, d={"request_timeout": 1, "ready": rig.ready("instanca")}))
    r = requests.get(rig.url + "/d/d/slow?ms=5000", timeout=10)
    assert r.status_code == 504 and r.headers["Content-Type"] == "application/json"
    assert r.json()["code"] == 1080


def test_a_slow_client_is_cut_off_by_the_request_head_timeout_and_others_are_served(rig):
    rig.plane.apply(rig.snapshot(2, d={"ready": rig.ready("instanca")}))
    slow = socket.create_connection(("127.0.0.1", rig.port), timeout=10)
    slow.sendall(b"GET /d/d/x HTTP/1.1\r\nHost: x\r\n")  # never finishes its head
    assert requests.get(rig.url + "/d/d/x", timeout=5).status_code == 200
    answer = slow.recv(4096).decode()
    slow.close()
    # HAProxy 2.6 answers an unfinished head from its connection layer, which ignores
    # http-error/errorfile: this one 408 stays HAProxy's own page (README, known limits).
    assert answer.startswith("HTTP/1.1 408")


def test_request_log_reports_requests_errors_and_latency_per_instance(rig):
    rig.plane.apply(rig.snapshot(2, d={"ready": rig.ready("instanca")}))
    rig.plane.requests.take()
    for path in ("/d/d/x", "/d/d/x", "/d/d/status/503"):
        requests.get(rig.url + path, timeout=5)

    def logged() -> dict:
        got = rig.plane.requests.take()
        logged.acc.update({k: {**logged.acc.get(k, {"n": 0, "e": 0}), "d": v["d"],
                               "n": logged.acc.get(k, {"n": 0})["n"] + v["n"],
                               "e": logged.acc.get(k, {"e": 0})["e"] + v["e"]} for k, v in got.items()})
        return logged.acc if logged.acc.get("instanca", {}).get("n", 0) >= 3 else {}
    logged.acc = {}  # type: ignore[attr-defined]
    report = wait_until(logged, "three log lines", 5, 0.05)
    assert report["instanca"] == {"d": "d", "n": 3, "e": 1}


def test_request_log_samples_above_its_rate_and_its_weights_keep_the_counts(tmp_path):
    """Above log_lines_per_s a deployment's successes are logged with probability 1/k and
    weight k; errors are always logged, weight 1. The counts stay unbiased estimates."""
    rig = Rig(tmp_path, log_lines_per_s=20)
    try:
        rig.plane.apply(rig.snapshot(2, d={"ready": rig.ready("instanca")}))
        lines = []
        feed = rig.plane.requests.feed
        rig.plane.requests.feed = lambda line: (lines.append(line), feed(line))  # count what arrives
        rig.plane.requests.take()
        sent, errors = 1000, 0
        with requests.Session() as http:
            for i in range(sent):
                failing = i % 50 == 0
                r = http.get(rig.url + ("/d/d/status/503" if failing else "/d/d/x"), timeout=5)
                assert r.status_code == (503 if failing else 200)
                errors += failing
        total = {"n": 0, "e": 0}

        def logged() -> bool:
            for v in rig.plane.requests.take().values():
                total["n"] += v["n"]
                total["e"] += v["e"]
            return total["e"] >= errors
        wait_until(logged, "the error lines", 5, 0.05)
        time.sleep(0.3)  # the last sampled lines of the burst
        logged()
        assert total["e"] == errors  # every error logged, weight 1
        assert len(lines) < sent / 2, len(lines)  # sampled: far fewer lines than requests
        assert any(line.split()[-1] not in ("1", "-") for line in lines)  # weights above 1 were carried
        # An estimate of what was sent: its relative error shrinks as 1/sqrt(sampled lines),
        # four of those (or 40%) are allowed, so a slow machine (fewer, lighter-weight lines) passes.
        tolerance = max(0.4, 4 / (len(lines) - errors) ** 0.5)
        assert abs(total["n"] - sent) < tolerance * sent, (total, len(lines))
    finally:
        rig.close()


def test_adding_a_deployment_reloads_haproxy_without_a_failed_request(rig):
    rig.plane.apply(rig.snapshot(2, d={"ready": rig.ready("instanca")}))
    outcomes: Counter = Counter()
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                with requests.get(rig.url + "/d/d/x", timeout=5) as r:
                    outcomes[r.status_code] += 1
            except requests.RequestException as exc:
                outcomes[type(exc).__name__] += 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for v in range(3, 6):
            names = {f"n{i}": {"ready": []} for i in range(v - 2)}
            rig.plane.apply(rig.snapshot(v, d={"ready": rig.ready("instanca")}, **names))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert set(outcomes) == {200} and outcomes[200] > 0, outcomes
    assert requests.get(rig.url + "/d/d/x", timeout=5).headers["X-Instance"] == "instanca"  # survived the reloads


def test_a_new_data_plane_adopts_the_running_haproxy(rig):
    rig.plane.apply(rig.snapshot(2, d={"ready": rig.ready("instanca")}))
    master = rig.plane.process.master_pid()
    rig.plane.close(stop_haproxy=False)  # what a SIGKILLed serve leaves behind
    assert requests.get(rig.url + "/d/d/x", timeout=5).headers["X-Instance"] == "instanca"
    rig.plane = rig.new_plane()
    rig.plane.boot()
    assert rig.plane.adopted and rig.plane.process.master_pid() == master
    rig.plane.apply(rig.snapshot(1, d={"ready": rig.ready("instanca", "instancb")}))
    assert {requests.get(rig.url + "/d/d/x", timeout=5).headers["X-Instance"] for _ in range(4)} == \
        {"instanca", "instancb"}


def test_a_weighted_log_line_counts_as_that_many_requests_in_the_metrics(tmp_path, monkeypatch):
    from prometheus_client import generate_latest
    from gateway.haproxy_runtime import RequestLog
    from gateway.metrics import GatewayMetrics
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics = GatewayMetrics()
    log = RequestLog(str(tmp_path / "log.sock"), metrics)
    try:
        log.feed("AD1 be_d instanca 200 12 ---- 40")  # stands for 40 responses like it
        log.feed("AD1 be_d instanca 503 3 ---- -")  # an error: always logged, weight 1
        log.feed("AD1 be_d instanca 200 7 ----")  # a line without the field (an older HAProxy config)
        assert log.take() == {"instanca": {"d": "d", "n": 42, "e": 1, "h": log_buckets({12: 40, 3: 1, 7: 1})}}
        text = generate_latest(metrics.registry).decode()
        assert 'autodeploy_requests_total{deployment="d",instance="instanca",status="200"} 41.0' in text
        assert 'autodeploy_request_duration_seconds_count{deployment="d",instance="instanca"} 42.0' in text
        assert 'autodeploy_request_duration_seconds_bucket{deployment="d",instance="instanca",le="0.025"} 42.0' in text
        assert 'autodeploy_request_duration_seconds_bucket{deployment="d",instance="instanca",le="0.01"} 2.0' in text
        assert 'autodeploy_request_duration_seconds_sum{deployment="d",instance="instanca"} 0.49' in text
    finally:
        log.close()


def log_buckets(ms_counts: dict[int, int]) -> dict[int, int]:
    from controller.latency import bucket_of
    out: dict[int, int] = {}
    for ms, n in ms_counts.items():
        out[bucket_of(float(ms))] = out.get(bucket_of(float(ms)), 0) + n
    return out
