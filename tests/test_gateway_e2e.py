"""End to end through a real `autodeploy serve`: real gunicorn, real instance processes,
real sockets. Each test names the behaviour of the seeds' contract it proves."""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import requests

from conftest import deployment_yaml, echo_command

RULE = "Deploy-Route-Rule"
TARGET = "Deploy-Route-Target"


def test_first_request_cold_starts_one_instance_and_answers(serve, data_plane):
    s = serve({"hello.yaml": deployment_yaml("hello")})
    assert s.status("hello")["status"] == "Standby"
    r = s.post("/d/hello/v1/predict", json={"x": 1})
    assert r.status_code == 200
    assert r.json()["input"] == {"x": 1}
    assert r.headers[TARGET] == r.json()["instance"]
    assert len(r.headers[TARGET]) == 8 and r.headers[TARGET].isalpha() and r.headers[TARGET].islower()
    dep = s.status("hello")
    assert dep["status"] == "Running"
    assert [i["id"] for i in dep["instances"]] == [r.headers[TARGET]]


def test_burst_at_zero_starts_exactly_one_instance(serve, data_plane):
    s = serve({"hello.yaml": deployment_yaml("hello", echo_command("--load-seconds 0.5"), max_replicas=5)})
    with ThreadPoolExecutor(50) as pool:
        responses = list(pool.map(lambda i: s.get(f"/d/hello/whoami?i={i}"), range(50)))
    assert [r.status_code for r in responses] == [200] * 50
    assert len({r.headers[TARGET] for r in responses}) == 1
    assert len(s.instances("hello")) == 1


def test_max_replicas_holds_under_concurrent_scale_out_across_workers(serve):
    s = serve({"hello.yaml": deployment_yaml("hello", max_replicas=3)}, "--workers", "3")
    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda _: s.get("/d/hello/whoami", headers={RULE: "scale-out"}), range(20)))
    ok = [r for r in responses if r.status_code == 200]
    assert len(ok) == 3
    assert {r.json()["code"] for r in responses if r.status_code != 200} == {1007}
    assert len(s.instances("hello")) == 3


def test_random_and_round_robin_with_no_instance_return_1006(serve):
    s = serve({"hello.yaml": deployment_yaml("hello")})
    for rule in ("random", "round-robin"):
        r = s.get("/d/hello/", headers={RULE: rule})
        assert r.status_code == 404
        assert r.json()["code"] == 1006
        assert r.json()["msg"].startswith("route target not found")
    assert s.instances("hello") == []


def test_round_robin_walks_instances_in_sequence_across_workers(serve, data_plane):
    s = serve({"hello.yaml": deployment_yaml("hello")}, "--workers", "2")
    ids = {s.get("/d/hello/whoami", headers={RULE: "scale-out"}).headers[TARGET] for _ in range(3)}
    assert len(ids) == 3
    seen = [s.get("/d/hello/whoami", headers={RULE: "round-robin"}).headers[TARGET] for _ in range(9)]
    assert set(seen) == ids
    # a strict cycle: every window of 3 consecutive answers names all 3 instances
    for i in range(len(seen) - 2):
        assert len(set(seen[i:i + 3])) == 3, seen


def test_random_spreads_over_running_instances(serve):
    s = serve({"hello.yaml": deployment_yaml("hello")})
    ids = {s.get("/d/hello/whoami", headers={RULE: "scale-out"}).headers[TARGET] for _ in range(2)}
    seen = {s.get("/d/hello/whoami", headers={RULE: "random"}).headers[TARGET] for _ in range(40)}
    assert seen == ids


def test_instance_id_rule_routes_to_that_instance_only(serve, data_plane):
    s = serve({"a.yaml": deployment_yaml("alpha"), "b.yaml": deployment_yaml("beta")})
    a1 = s.get("/d/alpha/whoami", headers={RULE: "scale-out"}).headers[TARGET]
    s.get("/d/alpha/whoami", headers={RULE: "scale-out"})
    b1 = s.get("/d/beta/whoami").headers[TARGET]
    for _ in range(5):
        r = s.get("/d/alpha/whoami", headers={RULE: a1})
        assert r.headers[TARGET] == a1 and r.json()["instance"] == a1
    unknown = s.get("/d/alpha/whoami", headers={RULE: "zzzzzzzz"})
    assert (unknown.status_code, unknown.json()["code"]) == (404, 1006)
    other = s.get("/d/alpha/whoami", headers={RULE: b1})
    assert (other.status_code, other.json()["code"]) == (404, 1006)


def test_unknown_and_stopped_deployments_answer_coded_errors(serve, data_plane):
    s = serve({"paused.yaml": deployment_yaml("paused", state="stopped")})
    unknown = s.get("/d/nothere/x")
    assert (unknown.status_code, unknown.json()["code"]) == (404, 1001)
    stopped = s.get("/d/paused/x")
    assert (stopped.status_code, stopped.json()["code"]) == (503, 1002)
    assert s.instances("paused") == []


def test_proxy_forwards_method_path_query_headers_and_body(serve, data_plane):
    s = serve({"hello.yaml": deployment_yaml("hello")})
    r = requests.put(s.url + "/d/hello/some/path?a=1&b=two%20words", data=b"payload",
                     headers={"X-Custom": "yes", "Connection": "keep-alive, X-Drop-Me", "X-Drop-Me": "1",
                              "X-Forwarded-For": "203.0.113.9"}, timeout=30)
    seen = r.json()
    assert seen["method"] == "PUT"
    assert seen["path"] == "/some/path"
    assert seen["query"] == "a=1&b=two%20words"
    assert seen["body_bytes"] == 7
    h = seen["headers"]
    assert h["x-custom"] == "yes"
    assert "x-drop-me" not in h and "deploy-route-rule" not in h
    assert h["x-forwarded-for"] == "127.0.0.1"  # a client's own is replaced: the peer is no trusted proxy
    assert h["x-forwarded-proto"] == "http"
    assert h["x-forwarded-host"] == s.url.removeprefix("http://")
    assert r.headers[TARGET] == seen["instance"]


def test_large_upload_streams_through_intact(serve):
    s = serve({"hello.yaml": deployment_yaml("hello")})
    blob = os.urandom(1 << 20) * 64  # 64 MiB
    r = s.post("/d/hello/upload", data=blob, timeout=120)
    assert r.json() == {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}


def test_chunked_upload_is_forwarded(serve):
    s = serve({"hello.yaml": deployment_yaml("hello")})
    parts = [os.urandom(10_000) for _ in range(20)]
    r = s.post("/d/hello/upload", data=iter(parts))
    assert r.json()["bytes"] == 200_000
    assert r.json()["sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()


def test_server_sent_events_stream_before_the_response_ends(serve, data_plane):
    s = serve({"hello.yaml": deployment_yaml("hello")})
    s.get("/d/hello/health")  # warm: the timing below is the stream, not the cold start
    with requests.get(s.url + "/d/hello/stream?n=5&ms=300", stream=True, timeout=30) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        assert r.headers[TARGET]
        started = time.monotonic()
        lines = r.iter_lines()
        first = next(line for line in lines if line)
        first_at = time.monotonic() - started
        rest = [line for line in lines if line]
        total = time.monotonic() - started
    assert json.loads(first.removeprefix(b"data: "))["i"] == 0
    assert len(rest) == 4
    assert first_at < total / 2  # the first event came well before the last


def test_errors_from_the_instance_pass_through_untouched(serve, data_plane):
    s = serve({"hello.yaml": deployment_yaml("hello")})
    r = s.get("/d/hello/status/503")
    assert r.status_code == 503
    assert r.json()["from"] == "model"
    assert r.headers["X-From-Model"] == "1"
    assert r.headers[TARGET]


def test_requests_arriving_during_idle_release_are_all_served(serve, data_plane):
    s = serve({"hello.yaml": deployment_yaml("hello", idle="300ms")}, "--workers", "2")
    codes = []
    for i in range(30):
        codes.append(s.get(f"/d/hello/whoami?i={i}").status_code)
        time.sleep(0.05 + (i % 10) * 0.04)  # walk across the idle boundary repeatedly
    assert codes == [200] * 30
    kinds = [e["kind"] for e in s.status("hello")["events"]]
    assert "release" in kinds  # the race was actually exercised


def test_instance_that_exits_fails_held_requests_and_its_log_tail_stays_in_the_api(serve):
    s = serve({"bad.yaml": deployment_yaml("bad", "echo model weights missing; exit 3", health=None)})
    r = s.get("/d/bad/")
    assert r.status_code == 502
    body = r.json()
    assert body["code"] == 1003
    # Endpoint clients never get log lines (they may hold secrets); the authenticated API does.
    assert "exited with code 3" in body["msg"] and "model weights missing" not in body["msg"]
    assert "autodeploy logs bad" in body["msg"]
    assert "model weights missing" in s.status("bad")["last_error"]
    again = s.get("/d/bad/")  # restarts back off: answered at once with Retry-After
    assert again.json()["code"] == 1003
    assert int(again.headers["Retry-After"]) >= 1


def test_instance_not_ready_within_start_timeout_fails_with_coded_error(serve):
    s = serve({"slow.yaml": deployment_yaml("slow", "echo loading forever on ${PORT}; sleep 30", start_timeout="1s",
                                             health="/health")})
    r = s.get("/d/slow/")
    assert (r.status_code, r.json()["code"]) == (502, 1003)
    assert "not ready after 1 s" in r.json()["msg"] and "loading forever" not in r.json()["msg"]
    assert "loading forever" in s.status("slow")["last_error"]
    s.wait_for(lambda: s.instances("slow") == [], what="failed instance removed")


def test_queue_overflow_answers_1004_with_retry_after(serve):
    s = serve({"hello.yaml": deployment_yaml("hello", echo_command("--load-seconds 1.5"))}, "--queue-limit", "2")
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: s.get("/d/hello/whoami"), range(6)))
    codes = sorted(r.status_code for r in responses)
    full = [r for r in responses if r.status_code == 503]
    assert codes.count(200) == 2 and len(full) == 4
    assert all(r.json()["code"] == 1004 and r.headers["Retry-After"] for r in full)


def test_queue_timeout_answers_1005_with_retry_after(serve):
    s = serve({"hello.yaml": deployment_yaml("hello", echo_command("--load-seconds 3"))}, "--queue-timeout", "0.5")
    r = s.get("/d/hello/whoami")
    assert (r.status_code, r.json()["code"]) == (504, 1005)
    assert r.headers["Retry-After"]


def test_crashed_instance_is_noticed_and_the_next_request_is_served(serve, data_plane):
    s = serve({"hello.yaml": deployment_yaml("hello")})
    first = s.get("/d/hello/whoami")
    os.killpg(os.getpgid(first.json()["pid"]), signal.SIGKILL)
    dropped = []

    def served() -> requests.Response | None:
        try:
            r = s.get("/d/hello/whoami")
        except requests.ConnectionError as exc:
            # A request racing the crash may lose its connection (seen once in haproxy mode
            # under CI load, never reproduced); what this test proves is the recovery.
            dropped.append(exc)
            return None
        return r if r.status_code == 200 else None
    r = s.wait_for(served, timeout=20, what="a request served after the crash")
    assert r.headers[TARGET] != first.headers[TARGET]
    assert len(dropped) <= 1, dropped  # at most the request that raced the crash


def test_invalid_change_is_reported_and_last_good_revision_keeps_serving(serve):
    s = serve({"hello.yaml": deployment_yaml("hello")})
    assert s.get("/d/hello/whoami").status_code == 200
    (s.deployments / "hello.yaml").write_text(deployment_yaml("hello").replace("maxReplicas", "maxReplica"))
    s.wait_for(lambda: s.status()["errors"], what="spec error reported")
    errors = s.status()["errors"]
    assert any("hello.yaml:" in e and "maxReplicas" in e for e in errors), errors
    assert s.status("hello")["spec_errors"]
    assert s.get("/d/hello/whoami").status_code == 200
    assert s.status("hello")["revision"]["number"] == 1
    (s.deployments / "hello.yaml").write_text(deployment_yaml("hello", max_replicas=4))
    s.wait_for(lambda: s.status("hello")["revision"]["number"] == 2, what="fixed file applied")
    assert s.status()["errors"] == []
    assert s.status("hello")["replicas"]["max"] == 4


def test_status_reports_cost_from_stack_prices(serve):
    s = serve({"hello.yaml": deployment_yaml("hello", idle="1s")})
    s.get("/d/hello/whoami")
    s.wait_for(lambda: s.status("hello")["status"] == "Standby", what="release")
    cost = s.status("hello")["cost"]
    assert cost["price_per_hour"] == 0.05  # the dev stack's CPU-only price
    assert cost["instance_seconds"] > 0
    assert abs(cost["total"] - cost["instance_seconds"] * 0.05 / 3600) < 1e-6


def test_restart_adopts_running_instances_instead_of_duplicating(serve, tmp_path, data_plane):
    files = {"hello.yaml": deployment_yaml("hello")}
    s = serve(files)
    first = s.get("/d/hello/whoami")
    iid, pid = first.headers[TARGET], s.instances("hello")[0]["pid"]
    s.terminate(signal.SIGKILL)  # a crash of the controller: instances keep running
    s.wait_for(lambda: not s.descendants() or all(p.name() == "sh" or "echo_model" in " ".join(p.cmdline())
                                                  for p in s.descendants()), what="gateway gone")
    assert psutil.pid_exists(pid)
    s2 = serve(files, state_dir=s.state_dir)
    inst = s2.instances("hello")
    assert [(i["id"], i["pid"]) for i in inst] == [(iid, pid)]
    r = s2.get("/d/hello/whoami")
    assert r.headers[TARGET] == iid
    assert "adopted" in [e["kind"] for e in s2.status("hello")["events"]]


def test_sigterm_finishes_in_flight_requests_and_leaves_no_process(serve, data_plane):
    s = serve({"hello.yaml": deployment_yaml("hello")})
    s.get("/d/hello/whoami", headers={RULE: "scale-out"})
    s.get("/d/hello/whoami", headers={RULE: "scale-out"})
    tree = [p.pid for p in s.descendants()]
    assert len(tree) >= 4  # gunicorn master + workers + instance processes
    result: dict = {}

    def slow() -> None:
        conn = http.client.HTTPConnection(s.url.removeprefix("http://"), timeout=30)
        conn.request("GET", "/d/hello/slow?ms=1500")
        result["status"] = conn.getresponse().status

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.5)
    assert s.terminate() == 0
    t.join()
    assert result["status"] == 200
    alive = [pid for pid in tree if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert alive == []


def test_status_command_prints_deployments_and_instances(serve):
    import subprocess
    import sys
    from pathlib import Path
    s = serve({"hello.yaml": deployment_yaml("hello")})
    iid = s.get("/d/hello/whoami").headers[TARGET]
    exe = str(Path(sys.executable).parent / "autodeploy")
    table = subprocess.run([exe, "status", "--url", s.url], capture_output=True, text=True, timeout=30)
    assert table.returncode == 0, table.stderr
    assert "hello" in table.stdout and "Running" in table.stdout and "/d/hello/" in table.stdout
    one = subprocess.run([exe, "status", "hello", "--url", s.url], capture_output=True, text=True, timeout=30)
    assert iid in one.stdout and "ready" in one.stdout
    down = subprocess.run([exe, "status", "--url", "http://127.0.0.1:9"], capture_output=True, text=True, timeout=30)
    assert down.returncode != 0 and "autodeploy serve" in down.stderr


def test_sigint_stops_like_sigterm(serve):
    s = serve({"hello.yaml": deployment_yaml("hello")})
    pid = s.instances("hello") or s.get("/d/hello/whoami").json()["pid"]
    assert s.terminate(signal.SIGINT) == 0
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_logs_command_shows_a_local_instance_output(serve):
    import subprocess
    import sys
    from pathlib import Path
    s = serve({"hello.yaml": deployment_yaml("hello")})
    iid = s.get("/d/hello/whoami").headers[TARGET]
    exe = str(Path(sys.executable).parent / "autodeploy")
    out = subprocess.run([exe, "logs", "hello", "--instance", iid, "--state-dir", str(s.state_dir)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and f"echo model {iid} listening" in out.stdout
    missing = subprocess.run([exe, "logs", "nothere", "--state-dir", str(s.state_dir)],
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 1 and "no logs for nothere" in missing.stdout


def test_unknown_gateway_path_answers_a_coded_404(serve):
    s = serve({"hello.yaml": deployment_yaml("hello")})
    r = s.get("/nowhere")
    assert (r.status_code, r.json()["code"]) == (404, 1020)
    assert "/d/<name>/" in r.json()["msg"]
