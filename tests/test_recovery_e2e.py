"""Crashes while requests wait, and a lost or corrupt database, through real `serve`
processes and real instance processes: nothing is failed that could be held, nothing is
orphaned that serve started."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import requests

from conftest import deployment_yaml, echo_command, process_running

RULE = "Deploy-Route-Rule"
TARGET = "Deploy-Route-Target"


def test_only_instance_crashing_while_requests_arrive_holds_them_and_starts_a_replacement(serve):
    s = serve({"hello.yaml": deployment_yaml("hello", max_replicas=1)})
    first = s.get("/d/hello/whoami").headers[TARGET]
    pid = s.instances("hello")[0]["pid"]
    results: list[tuple[float, int, int | None]] = []
    stop = threading.Event()

    def client() -> None:
        session = requests.Session()
        while not stop.is_set():
            r = session.get(s.url + "/d/hello/whoami", timeout=60)
            results.append((time.monotonic(), r.status_code, None if r.ok else r.json()["code"]))

    clients = [threading.Thread(target=client) for _ in range(4)]
    for t in clients:
        t.start()
    s.wait_for(lambda: len(results) > 20, what="traffic flowing")
    crashed_at = time.monotonic()
    os.killpg(pid, signal.SIGKILL)
    s.wait_for(lambda: any(ts > crashed_at and st == 200 for ts, st, _ in results[-50:])
               and s.instances("hello") and s.instances("hello")[0]["id"] != first, timeout=30,
               what="answers from a replacement")
    stop.set()
    for t in clients:
        t.join()
    after = [r for r in results if r[0] >= crashed_at]
    failed = [r for r in after if r[1] != 200]
    # Only requests already on the instance when it died may fail (one per client at most);
    # none that arrived after it is failed with 1003 while the replacement starts.
    assert len(failed) <= len(clients), failed
    assert all(code != 1003 for _, _, code in failed), failed
    kinds = [e["kind"] for e in s.status("hello")["events"]]
    assert "crashed" in kinds and kinds.count("start") >= 2


def test_a_crash_loop_still_backs_off_and_answers_1003_after_3_failures_in_a_row(serve, tmp_path):
    # Ready once, then every restart dies before it is ready (the weights went missing).
    marker = tmp_path / "started-once"
    command = f"if [ -e {marker} ]; then echo weights missing; exit 3; fi; touch {marker}; exec " + echo_command()
    s = serve({"bad.yaml": deployment_yaml("bad", command)})
    assert s.get("/d/bad/whoami").status_code == 200
    os.killpg(s.instances("bad")[0]["pid"], signal.SIGKILL)
    r = s.get("/d/bad/whoami", timeout=60)  # held through the crash and 2 failed restarts, then failed
    assert (r.status_code, r.json()["code"]) == (502, 1003)
    assert "exited with code 3" in r.json()["msg"]
    assert "weights missing" in (s.status("bad")["last_error"] or "")  # log tails stay out of client bodies
    kinds = [e["kind"] for e in s.status("bad")["events"]]
    assert kinds.count("crashed") == 1 and kinds.count("failed") == 2
    again = s.get("/d/bad/whoami")  # a crash loop now: answered at once, backing off
    assert again.json()["code"] == 1003 and "3 failures in a row" in again.json()["msg"]
    assert int(again.headers["Retry-After"]) >= 1


def test_a_cold_start_that_fails_is_answered_at_once_not_held(serve):
    s = serve({"bad.yaml": deployment_yaml("bad", "echo weights missing; exit 3", health=None)})
    r = s.get("/d/bad/")
    assert (r.status_code, r.json()["code"]) == (502, 1003)
    assert [e["kind"] for e in s.status("bad")["events"]].count("failed") == 1


def test_a_deleted_database_never_orphans_instances_nor_exceeds_max_replicas(serve):
    s = serve({"hello.yaml": deployment_yaml("hello", max_replicas=3), "gone.yaml": deployment_yaml("gone")})
    ids = {s.get("/d/hello/whoami", headers={RULE: "scale-out"}).headers[TARGET] for _ in range(3)}
    gone_id = s.get("/d/gone/whoami").headers[TARGET]
    pids = {i["id"]: i["pid"] for i in s.instances("hello") + s.instances("gone")}
    s.crash()
    for f in s.state_dir.glob("autodeploy.db*"):
        f.unlink()
    (s.deployments / "gone.yaml").unlink()  # its instance is no longer wanted
    again = serve({}, state_dir=s.state_dir)
    adopted = again.instances("hello")
    assert {i["id"] for i in adopted} == ids and all(i["state"] == "ready" for i in adopted)
    assert {i["pid"] for i in adopted} == {pids[i] for i in ids}
    events = again.status("hello")["events"]
    assert sum(e["kind"] == "adopted" and "not in the store" in e["message"] for e in events) == 3
    over = again.get("/d/hello/whoami", headers={RULE: "scale-out"})
    assert (over.status_code, over.json()["code"]) == (429, 1007)  # maxReplicas 3 holds
    assert again.get("/d/hello/whoami").headers[TARGET] in ids
    again.wait_for(lambda: not process_running(pids[gone_id]), what="the unwanted orphan stopped")
    # "gone" is no deployment any more: its instance's events are read from all of them.
    said = [e for e in again.get("/api/events?limit=1000").json() if e["instance"] == gone_id]
    assert [e["kind"] for e in said] == ["stopped"], said
    assert "not in the store: stopped (its deployment is not in the files any more)" in said[0]["message"]


def test_a_corrupt_database_adopts_what_runs(serve):
    s = serve({"hello.yaml": deployment_yaml("hello", max_replicas=2)})
    ids = {s.get("/d/hello/whoami", headers={RULE: "scale-out"}).headers[TARGET] for _ in range(2)}
    s.crash()
    db = s.state_dir / "autodeploy.db"
    for f in s.state_dir.glob("autodeploy.db-*"):
        f.unlink()  # the WAL would otherwise carry the rows back
    data = bytearray(db.read_bytes())
    data[0:16] = b"not a database.."
    db.write_bytes(bytes(data))
    again = serve({}, state_dir=s.state_dir)
    assert {i["id"] for i in again.instances("hello")} == ids
    assert list(s.state_dir.glob("autodeploy.db.corrupt-*"))


@pytest.mark.docker
def test_docker_containers_of_a_lost_database_are_adopted_by_their_owner_label(serve, tmp_path):
    from docker_images import busybox_image, docker_client_or_skip
    client = docker_client_or_skip()
    name = "i11lost"
    try:
        image = busybox_image(client)
        text = (f"apiVersion: autodeploy/v1\nkind: Deployment\nmetadata: {{name: {name}}}\nspec:\n"
                f"  model: {{id: busybox, version: v1}}\n  image: {image}\n  command: 'httpd -f -p ${{PORT}} -h /www'\n"
                "  port: 8080\n  scaling: {minReplicas: 0, maxReplicas: 2, idleTimeout: 5m}\n"
                "  loadBalancer: {healthCheck: {path: /health, intervalSeconds: 10, timeoutSeconds: 2}}\n")
        s = serve({f"{name}.yaml": text}, "--driver", "docker")
        iid = s.get(f"/d/{name}/health").headers[TARGET]
        [container] = client.containers.list(filters={"label": f"autodeploy.instance={iid}"})
        assert container.labels["autodeploy.owner"].endswith(str(s.state_dir.resolve()))
        s.crash()
        for f in s.state_dir.glob("autodeploy.db*"):
            f.unlink()
        again = serve({}, "--driver", "docker", state_dir=s.state_dir)
        assert [i["id"] for i in again.instances(name)] == [iid]
        assert any(e["kind"] == "adopted" and "container labels" in e["message"]
                   for e in again.status(name)["events"])
        assert again.get(f"/d/{name}/health").headers[TARGET] == iid
    finally:
        for c in client.containers.list(all=True, filters={"label": f"autodeploy.deployment={name}"}):
            c.remove(force=True)
        client.close()
