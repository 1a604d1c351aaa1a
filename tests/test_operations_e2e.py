"""Runtime operations end to end: the `autodeploy` CLI as a subprocess and the HTTP API
against a real `autodeploy serve`; revisions, edit rules and drift from the files."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import psutil

from conftest import PY, deployment_yaml

CLI = str(Path(PY).parent / "autodeploy")
REV = "Deploy-Revision"


def cli(s, *args: str, stdin: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess:
    """Run `autodeploy ARGS --url <this gateway>`; stdin is not a terminal unless given."""
    return subprocess.run([CLI, *args, "--url", s.url], stdin=stdin, capture_output=True, text=True, timeout=60)


def post(s, name: str, action: str, **body) -> tuple[int, dict]:
    r = s.post(f"/api/deployments/{name}/{action}", json=body)
    return r.status_code, r.json()


def ready(s, name: str) -> int:
    return s.status(name)["replicas"]["ready"]


def alive(s, name: str) -> int:
    return len([i for i in s.instances(name) if i["state"] in ("starting", "ready")])


def messages(s, name: str) -> str:
    return "\n".join(f"{e['kind']}: {e['message']}" for e in s.status(name)["events"])


def test_scale_keeps_n_instances_records_drift_and_a_new_file_content_clears_it(serve):
    s = serve({"hello.yaml": deployment_yaml("hello", max_replicas=3)})
    out = cli(s, "scale", "hello", "2")
    assert out.returncode == 0, out.stderr
    assert "hello: keeping 2 instance(s) (file: minReplicas 0)" in out.stdout
    s.wait_for(lambda: ready(s, "hello") == 2, what="2 instances after scale 2")
    drift = s.status("hello")["drift"]
    assert drift["changes"] == [{"field": "replicas", "file": "minReplicas 0", "runtime": 2,
                                 "by": "autodeploy scale"}]
    diff = cli(s, "diff")
    assert diff.returncode == 0 and "hello: runtime differs from" in diff.stdout
    assert "replicas  minReplicas 0  2" in diff.stdout
    # The same through the HTTP API: down to 1 (the extra one drains).
    code, body = post(s, "hello", "scale", replicas=1)
    assert code == 200 and body["drift"]["changes"][0]["runtime"] == 1
    s.wait_for(lambda: len(s.instances("hello")) == 1, what="scaled down to 1")
    # Above maxReplicas: a coded error, from both.
    code, body = post(s, "hello", "scale", replicas=5)
    assert (code, body["code"]) == (422, 1018)
    assert body["msg"] == "replicas out of range: 5 is outside 0..3 (maxReplicas of hello in " \
        f"{s.deployments / 'hello.yaml'})"
    bad = cli(s, "scale", "hello", "5")
    assert bad.returncode == 1 and bad.stderr.startswith("error 1018: replicas out of range")
    # A new content of the file wins: the drift is gone, the file's minReplicas rules again.
    (s.deployments / "hello.yaml").write_text(deployment_yaml("hello", max_replicas=4))
    s.wait_for(lambda: s.status("hello")["drift"] is None, what="drift cleared by the new file")
    assert s.status("hello")["replicas"]["min"] == 0
    assert "drift: " in messages(s, "hello") and "it wins over the runtime overrides (scale 1)" in messages(s, "hello")
    assert cli(s, "diff", "hello").stdout.startswith("no drift")


def test_stop_shuts_instances_down_and_start_resumes_via_cli_and_http(serve):
    s = serve({"svc.yaml": deployment_yaml("svc", min_replicas=1)})
    s.wait_for(lambda: ready(s, "svc") == 1, what="minReplicas instance")
    pid = s.instances("svc")[0]["pid"]
    out = cli(s, "stop", "svc")
    assert out.returncode == 0, out.stderr
    assert "endpoint answers 1002 deployment stopped" in out.stdout
    s.wait_for(lambda: s.instances("svc") == [], what="instances shut down")
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    r = s.get("/d/svc/whoami")
    assert (r.status_code, r.json()["code"]) == (503, 1002)
    dep = s.status("svc")
    assert dep["state"] == "stopped"
    assert dep["drift"]["changes"] == [{"field": "state", "file": "running", "runtime": "stopped",
                                        "by": "autodeploy stop"}]
    code, body = post(s, "svc", "start")
    assert code == 200 and body["drift"] is None
    s.wait_for(lambda: ready(s, "svc") == 1, what="minReplicas instance after start")
    assert s.get("/d/svc/whoami").status_code == 200
    # HTTP stop, CLI start: the same semantics either way.
    assert post(s, "svc", "stop")[0] == 200
    s.wait_for(lambda: s.instances("svc") == [], what="instances shut down again")
    assert cli(s, "start", "svc").returncode == 0
    assert s.get("/d/svc/whoami").status_code == 200


def test_delete_asks_for_confirmation_then_removes_instances_endpoint_and_state(serve):
    s = serve({"gone.yaml": deployment_yaml("gone", min_replicas=1), "keep.yaml": deployment_yaml("keep")})
    s.wait_for(lambda: ready(s, "gone") == 1, what="instance")
    pid = s.instances("gone")[0]["pid"]
    refused = cli(s, "delete", "gone")  # stdin is not a terminal and no --yes
    assert refused.returncode == 1
    assert refused.stderr.startswith("error 1017: confirmation required: stdin is not a terminal")
    code, body = post(s, "gone", "delete")
    assert (code, body["code"]) == (409, 1017)
    assert s.get("/d/gone/whoami").status_code == 200  # still there
    # On a terminal it asks; a wrong answer deletes nothing.
    master, slave = os.openpty()
    os.write(master, b"keep\n")
    asked = cli(s, "delete", "gone", stdin=slave)
    os.close(slave)
    os.close(master)
    assert asked.returncode == 1 and "Type the deployment name (gone) to confirm" in asked.stdout
    assert asked.stdout.rstrip().endswith("not deleted")
    assert s.get("/d/gone/whoami").status_code == 200
    out = cli(s, "delete", "gone", "--yes")
    assert out.returncode == 0, out.stderr
    assert "it stays deleted until its content there changes" in out.stdout
    s.wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
               what="instance process stopped")
    r = s.get("/d/gone/whoami")
    assert (r.status_code, r.json()["code"]) == (404, 1001)
    assert s.get("/api/deployments/gone").json()["code"] == 1001
    assert s.get("/api/deployments/gone/history").json()["code"] == 1001  # revisions forgotten
    assert [d["name"] for d in s.status()["deployments"]] == ["keep"]
    assert "gone: runtime differs" in cli(s, "diff").stdout
    # Reloading the same content (another file changed) keeps it deleted...
    (s.deployments / "keep.yaml").write_text(deployment_yaml("keep", max_replicas=2))
    s.wait_for(lambda: s.status("keep")["revision"]["number"] == 2, what="reload")
    assert s.get("/d/gone/whoami").json()["code"] == 1001
    # ...a new content of its file brings it back, as a new deployment with fresh history.
    (s.deployments / "gone.yaml").write_text(deployment_yaml("gone", max_replicas=2))
    s.wait_for(lambda: s.get("/api/deployments/gone").status_code == 200, what="recreated by the file")
    assert s.status("gone")["revision"]["number"] == 1
    assert s.status("gone")["drift"] is None


def test_rollback_history_and_rollout_status(serve):
    s = serve({"m.yaml": deployment_yaml("m", min_replicas=1)})
    s.wait_for(lambda: ready(s, "m") == 1, what="instance")
    (s.deployments / "m.yaml").write_text(deployment_yaml("m", min_replicas=1).replace("version: v1", "version: v2"))
    s.wait_for(lambda: (s.get("/api/deployments/m/rollout").json()["rollout"] or {}).get("phase") == "succeeded",
               what="rollout to v2")
    assert s.get("/d/m/whoami").headers[REV] == "2"
    hist = cli(s, "history", "m")
    assert hist.returncode == 0, hist.stderr
    lines = hist.stdout.splitlines()
    assert lines[0].split() == ["REV", "APPLIED", "FILE", "CHANGE"]
    assert lines[1].split()[0] == "1" and lines[1].rstrip().endswith("created")
    assert lines[2].split()[:2] == ["2", "*f"]
    assert lines[2].rstrip().endswith("[rollout] spec.model.version: v1 -> v2")
    status = cli(s, "rollout", "status", "m")
    assert status.stdout.startswith("m: rolling rollout revision 1 -> 2: succeeded"), status.stdout
    assert "reason: rolling update: 1/1 new ready" in status.stdout
    # Back to the revision before, by CLI: a rolling update to revision 1, shown as drift.
    back = cli(s, "rollback", "m")
    assert back.returncode == 0 and "rolling back from revision 2 to revision 1" in back.stdout
    s.wait_for(lambda: s.get("/d/m/whoami").headers[REV] == "1", what="serving revision 1")
    dep = s.status("m")
    assert dep["model"]["version"] == "v1" and dep["revision"]["number"] == 1
    assert dep["drift"]["changes"] == [{"field": "revision", "file": 2, "runtime": 1,
                                        "by": "manual rollback (by operator)"}]
    # An unknown revision is a coded error from both the CLI and the API.
    bad = cli(s, "rollback", "m", "--to", "7")
    assert bad.returncode == 1 and bad.stderr.strip() == "error 1016: revision not found: m has no revision 7 " \
        "(revisions: 1, 2)"
    code, body = post(s, "m", "rollback", to=7)
    assert (code, body["code"]) == (404, 1016)
    # Forward again to the file's revision over HTTP: no drift left.
    code, body = post(s, "m", "rollback", to=2)
    assert code == 200 and body["drift"] is None
    s.wait_for(lambda: s.get("/d/m/whoami").headers[REV] == "2", what="serving revision 2 again")
    assert "rollback: to revision 1 from 2 (by operator)" in messages(s, "m")


def test_edits_apply_in_place_or_roll_instances_by_the_guide_rules(serve):
    s = serve({"e.yaml": deployment_yaml("e", min_replicas=1)})
    s.wait_for(lambda: ready(s, "e") == 1, what="instance")
    first = s.instances("e")[0]["id"]
    # Description, replicas, health check: in place, the same instance keeps serving revision 2.
    edited = deployment_yaml("e", min_replicas=1, max_replicas=5).replace(
        "metadata:\n  name: e\n", "metadata:\n  name: e\n  description: now with a description\n")
    (s.deployments / "e.yaml").write_text(edited)
    s.wait_for(lambda: s.get("/d/e/whoami").headers[REV] == "2", what="revision 2 in place")
    assert [i["id"] for i in s.instances("e")] == [first]
    assert ("edit: revision 2: applied in place, no instance restarted (metadata.description: set to now with a "
            "description; spec.scaling.maxReplicas: 3 -> 5)") in messages(s, "e")
    # env: a process sees it only when it starts, so the instance is rolled and the event says why.
    (s.deployments / "e.yaml").write_text(edited + "  env: {GREETING: hi}\n")
    s.wait_for(lambda: s.get("/d/e/whoami").headers[REV] == "3", what="revision 3")
    s.wait_for(lambda: [i["id"] for i in s.instances("e")] != [first], what="instance replaced")
    assert "env changes reach a process only when it starts: rolling instances (spec.env.GREETING: set to hi)" \
        in messages(s, "e")
    hist = s.get("/api/deployments/e/history").json()["revisions"]
    assert [h["kind"] for h in hist] == ["created", "in_place", "restart"]


def test_a_rename_is_a_new_deployment_and_the_event_says_so(serve):
    s = serve({"r.yaml": deployment_yaml("old-name")})
    assert s.get("/d/old-name/whoami").status_code == 200
    (s.deployments / "r.yaml").write_text(deployment_yaml("new-name"))
    s.wait_for(lambda: s.get("/api/deployments/new-name").status_code == 200, what="new name served")
    assert s.get("/d/old-name/whoami").json()["code"] == 1001
    s.wait_for(lambda: "metadata.name cannot change: if old-name was renamed to new-name, that is a new "
               "deployment with its own endpoint /d/new-name/, and old-name (endpoint /d/old-name/) is removed"
               in s.log(), what="rename event in the log")
    assert s.status("new-name")["revision"]["number"] == 1


def test_unknown_action_and_write_by_get_are_coded(serve):
    s = serve({"u.yaml": deployment_yaml("u")})
    code, body = post(s, "u", "explode")
    assert (code, body["code"]) == (404, 1019)
    r = s.get("/api/deployments/u/scale")
    assert (r.status_code, r.json()["code"]) == (400, 1013)
    r = s.get("/api/deployments/nope/history")
    assert (r.status_code, r.json()["code"]) == (404, 1001)
    code, body = post(s, "u", "scale", replicas="two")
    assert (code, body["code"]) == (400, 1013)
