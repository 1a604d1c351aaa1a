"""Hostile and broken input: alias bombs, deep nesting, oversized files, duplicate names,
the PORT trap, YAML 1.1 booleans, empty files, API bodies and `autodeploy logs` paths.
In-process for the loader's decisions, real processes for the CLI and `serve`."""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PY, ROOT, deployment_yaml
from controller.loader import MAX_DEPTH, MAX_FILE_BYTES, MAX_NODES, load_paths, load_text

AUTODEPLOY = str(Path(PY).parent / "autodeploy")

HEAD = """\
apiVersion: autodeploy/v1
kind: Deployment
metadata: {name: bomb}
spec:
  model: {id: m, version: v1}
  command: python3 serve.py --port ${PORT}
  port: 8080
"""
# "Billion laughs": 9 levels of 9 aliases each, ~730 bytes that PyYAML expands to 9^9 strings.
BOMB = HEAD + "  labels:\n" + "    a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"    a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9))


def good(name: str, command: str = "python3 serve.py --port ${PORT}", extra: str = "") -> str:
    return (f"apiVersion: autodeploy/v1\nkind: Deployment\nmetadata:\n  name: {name}\nspec:\n"
            f"  model: {{id: m, version: v1}}\n  command: {command}\n  port: 8080\n{extra}")


def test_alias_bomb_is_a_file_line_error_without_expanding_it():
    result = load_text(BOMB, "bomb.yaml")
    assert result.deployments == []
    [err] = result.errors
    assert err.file == "bomb.yaml" and err.line == 17  # the last, largest alias line
    assert f"at most {MAX_NODES:,} are read" in err.message and "aliases" in err.message


def test_validate_reports_the_bomb_in_well_under_a_second_and_a_few_mb(tmp_path):
    (tmp_path / "bomb.yaml").write_text(BOMB)
    (tmp_path / "ok.yaml").write_text(good("fine"))
    code = ("import resource, sys, time; from controller.validate import run_validate; t = time.monotonic();"
            f"rc = run_validate([{str(tmp_path)!r}], sys.stdout, sys.stderr); "
            "print('SECONDS', time.monotonic() - t, 'MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); "
            "sys.exit(rc)")
    # Capped address space: an expanded bomb would die with MemoryError rather than pass.
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)))
    assert out.returncode == 1, out.stderr
    assert f"{tmp_path / 'bomb.yaml'}:17: aliases expand this document" in out.stderr
    assert f"ok  {tmp_path / 'ok.yaml'}:1  fine (m@v1)" in out.stdout  # the bad file hides nothing else
    figures = out.stdout.split("SECONDS")[1].split()
    print("bomb validate:", figures)  # the report quotes these; never asserted as timings


def test_deep_nesting_is_a_file_line_error_not_a_recursion_error(tmp_path):
    deep = HEAD + "  labels:\n    x: " + "[" * 5000 + "]" * 5000 + "\n"
    result = load_text(deep, "deep.yaml")
    [err] = result.errors
    assert err.line == 9 and f"nested more than {MAX_DEPTH} levels deep" in err.message
    block = HEAD + "  labels:\n" + "".join("  " * (i + 2) + f"k{i}:\n" for i in range(200))
    [err] = load_text(block, "block.yaml").errors
    assert "nested more than" in err.message and err.line > 9


def test_aliases_that_nest_deeper_than_the_cap_are_refused():
    # Each level is shallow, but chaining anchors stacks them: 40 x 3 levels once expanded.
    lines = ["  labels:", "    l0: &l0 [[[x]]]"] + [f"    l{i}: &l{i} [[[*l{i - 1}]]]" for i in range(1, 40)]
    [err] = load_text(HEAD + "\n".join(lines) + "\n", "chain.yaml").errors
    assert "levels deep" in err.message and err.line > 8


def test_a_recursive_alias_is_refused():
    [err] = load_text(HEAD + "  labels: &l {a: *l}\n", "rec.yaml").errors
    assert err.line == 8 and "contains it" in err.message


def test_file_over_the_size_cap_is_refused_before_parsing(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text(good("big") + "# " + "x" * MAX_FILE_BYTES + "\n")
    (tmp_path / "small.yaml").write_text(good("small"))
    result = load_paths([tmp_path])
    assert [d.name for d in result.deployments] == ["small"]
    [err] = result.errors
    assert (err.file, err.line) == (str(big), 0) and "larger than 1024 KiB" in err.message


def test_merge_keys_and_a_few_aliases_still_load():
    text = good("merged", extra="  env: *e\n  scaling:\n    <<: {maxReplicas: 2}\n    idleTimeout: 1m\n")
    text = text.replace("metadata:\n", "metadata:\n  labels: &e {A: '1'}\n")
    result = load_text(text, "m.yaml")
    assert result.errors == []
    assert result.deployments[0].labels == result.deployments[0].env == {"A": "1"}
    assert result.deployments[0].scaling.max_replicas == 2


def test_state_off_gets_the_boolean_hint():
    [err] = load_text(good("x", extra="  state: off\n"), "x.yaml").errors
    assert err.line == 9
    assert err.message.endswith("found false: YAML 1.1 reads off as a boolean, not text; write 'stopped'")


def test_an_empty_file_is_a_warning_not_an_error(tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing yet\n---\n")
    (tmp_path / "ok.yaml").write_text(good("ok"))
    result = load_paths([tmp_path])
    assert result.errors == [] and [d.name for d in result.deployments] == ["ok"]
    assert [str(w) for w in result.warnings] == [
        f"{tmp_path / 'empty.yaml'}: is empty (no YAML document in it); nothing is deployed from it: "
        "write a Deployment or delete the file"]


def test_newcomer_reusing_a_serving_name_is_the_duplicate_whichever_sorts_first(tmp_path):
    (tmp_path / "b-serving.yaml").write_text(good("web"))
    (tmp_path / "a-new.yaml").write_text(good("web", command="other --port ${PORT}"))
    plain = load_paths([tmp_path])
    assert [d.source_file for d in plain.deployments] == [str(tmp_path / "a-new.yaml")]  # no owner: first file
    owned = load_paths([tmp_path], owners={"web": str(tmp_path / "b-serving.yaml")})
    assert [d.source_file for d in owned.deployments] == [str(tmp_path / "b-serving.yaml")]
    assert [str(e) for e in owned.errors] == [
        f"{tmp_path / 'a-new.yaml'}:4: metadata.name 'web' is already used by {tmp_path / 'b-serving.yaml'}:4 "
        "(the file that serves it now); names must be unique across all files"]


def test_a_serving_file_with_errors_keeps_its_name_from_a_newcomer(tmp_path):
    (tmp_path / "b-serving.yaml").write_text(good("web", extra="  state: off\n"))
    (tmp_path / "a-new.yaml").write_text(good("web"))
    result = load_paths([tmp_path], owners={"web": str(tmp_path / "b-serving.yaml")})
    assert result.deployments == []
    assert any(e.file == str(tmp_path / "a-new.yaml") and "which has errors now" in e.message
               for e in result.errors)


def test_port_trap_warns_with_file_line_and_the_fix():
    text = good("trap", command="python3 serve.py", extra="  scaling: {maxReplicas: 3}\n")
    result = load_text(text, "t.yaml")
    assert result.warnings == []  # only the local driver has the trap: load_text does not check it
    from controller.loader import _Session
    session = _Session(False, local_gateway_port=8080)
    session.add_text(text, "t.yaml")
    warnings = session.finish().warnings
    assert [(w.line, "the gateway's own port" in w.message) for w in warnings] == [(8, True), (9, False)]
    assert "only one of maxReplicas 3 can run" in warnings[1].message
    assert all("use ${PORT} in spec.command" in w.message for w in warnings)


def test_validate_cli_prints_the_port_trap_from_the_stack_and_exits_0(tmp_path):
    (tmp_path / "Pulumi.yaml").write_text("name: t\nruntime: python\nstackConfigDir: stacks\n")
    (tmp_path / "stacks").mkdir()
    (tmp_path / "stacks" / "Pulumi.dev.yaml").write_text("config:\n  autodeploy:gatewayPort: 9311\n")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "t.yaml").write_text(good("t", command="python3 serve.py").replace("8080", "9311"))
    out = subprocess.run([AUTODEPLOY, "validate", "d"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert out.stderr.startswith("d/t.yaml:8: warning: spec.command does not use ${PORT}, so with the local "
                                 "driver the service listens on spec.port 9311, the gateway's own port")
    (tmp_path / "stacks" / "Pulumi.dev.yaml").write_text("config:\n  autodeploy:driver: docker\n")
    out = subprocess.run([AUTODEPLOY, "validate", "d"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stderr) == (0, "")  # containers each have their own port space


# --- serve: one bad file never stops it; a newcomer never takes a name over ----------------------

def test_serve_starts_with_bad_files_and_reports_every_one(serve, tmp_path):
    deep = HEAD.replace("bomb", "deep") + "  labels:\n    x: " + "[" * 3000 + "]" * 3000 + "\n"
    s = serve({"a-bomb.yaml": BOMB, "b-deep.yaml": deep, "c-big.yaml": "#" * (MAX_FILE_BYTES + 1),
               "hello.yaml": deployment_yaml("hello")})
    errors = s.status()["errors"]
    assert [e.split(":")[0].rsplit("/", 1)[-1] for e in errors] == ["a-bomb.yaml", "b-deep.yaml", "c-big.yaml"]
    assert s.get("/d/hello/whoami").status_code == 200


def test_serving_deployment_keeps_its_file_when_a_newcomer_reuses_its_name(serve):
    s = serve({"web.yaml": deployment_yaml("web")})
    first = s.get("/d/web/whoami")
    assert first.status_code == 200
    (s.deployments / "0-copy.yaml").write_text(deployment_yaml("web", idle="7m"))  # sorts first
    s.wait_for(lambda: s.status()["errors"], what="the duplicate reported")
    dep = s.status("web")
    assert dep["revision"]["file"] == str(s.deployments / "web.yaml") and dep["revision"]["number"] == 1
    assert dep["idle_timeout_s"] == 300
    [err] = s.status()["errors"]
    assert err.startswith(f"{s.deployments / '0-copy.yaml'}:4: metadata.name 'web' is already used by "
                          f"{s.deployments / 'web.yaml'}:4 (the file that serves it now)")
    again = s.get("/d/web/whoami")
    assert again.headers["Deploy-Route-Target"] == first.headers["Deploy-Route-Target"]


def test_api_action_with_a_non_object_json_body_is_a_coded_400(serve):
    s = serve({"hello.yaml": deployment_yaml("hello")})
    for body in (b"[1, 2]", b"3", b'"scale"', b"{not json"):
        r = s.post("/api/deployments/hello/scale", data=body, headers={"Content-Type": "application/json"})
        assert (r.status_code, r.json()["code"]) == (400, 1013), body
        assert "JSON object" in r.json()["msg"] or "not JSON" in r.json()["msg"]
    ok = s.post("/api/deployments/hello/scale", json={"replicas": 1})
    assert ok.status_code == 200


# --- autodeploy logs --------------------------------------------------------------------------

def _project(tmp_path: Path) -> Path:
    project = tmp_path / "proj"
    (project / "stacks").mkdir(parents=True)
    (project / "Pulumi.yaml").write_text("name: p\nruntime: python\nstackConfigDir: stacks\n")
    (project / "stacks" / "Pulumi.dev.yaml").write_text("config:\n  autodeploy:stateDir: var/state\n")
    logs = project / "var" / "state" / "logs"
    logs.mkdir(parents=True)
    (logs / "web-aaaaaaaa.log").write_text("web says hi\n")
    time.sleep(0.01)
    (logs / "web-api-bbbbbbbb.log").write_text("web-api says hi\n")  # newer: the old glob picked it
    return project


def test_logs_reads_the_stack_state_dir_from_any_folder_and_matches_names_exactly(tmp_path):
    project = _project(tmp_path)
    deep = project / "deployments" / "sub"
    deep.mkdir(parents=True)
    out = subprocess.run([AUTODEPLOY, "logs", "web"], cwd=deep, capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stdout) == (0, "web says hi\n")
    out = subprocess.run([AUTODEPLOY, "logs", "web-api", "--project-dir", str(project)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stdout) == (0, "web-api says hi\n")


def test_logs_never_reads_outside_the_state_dir(tmp_path):
    project = _project(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("q7-token-z9\n")
    logs = project / "var" / "state" / "logs"
    os.symlink(secret, logs / "web-cccccccc.log")
    (project / "var" / "state" / "x-dddddddd.log").write_text("k4-stray-w2\n")
    for args in (["web", "--instance", "cccccccc"], ["../x"], ["web", "--instance", "../../x"],
                 ["../state/x"], ["/etc/passwd"]):
        out = subprocess.run([AUTODEPLOY, "logs", *args], cwd=project, capture_output=True, text=True, timeout=30)
        assert out.returncode != 0 and "q7-token-z9" not in out.stdout and "k4-stray-w2" not in out.stdout, args
