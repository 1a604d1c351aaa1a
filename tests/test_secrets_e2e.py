"""Secrets end to end: `{secret: KEY}` reaches the instance's environment and nothing else.

A real `autodeploy serve` with a secret in its environment; afterwards the secret's value
is looked for in every API answer, serve's log and every file of the state dir."""
from __future__ import annotations

import json
import secrets as pysecrets
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from conftest import PY, ROOT, deployment_yaml
from controller.loader import load_text
from controller.secrets import Redactor, SecretSource, env_name, instance_env, missing_secrets

ENV_MODEL = '''
import json, os
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        body = json.dumps(dict(os.environ)).encode() if self.path == "/env" else b"ok"
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
'''


def with_env(name: str, command: str, env: str) -> str:
    return deployment_yaml(name, command, extra_spec=env)


def test_a_secret_reaches_only_the_instance_environment(serve, tmp_path, monkeypatch):
    value = "s3cr3t-" + pysecrets.token_hex(12)
    monkeypatch.setenv(env_name("hf:token"), value)           # AUTODEPLOY_SECRET_HF_TOKEN
    monkeypatch.setenv("I12_SERVE_ONLY", "serve-private")      # serve's own variable: not for instances
    script = tmp_path / "env_model.py"
    script.write_text(ENV_MODEL)
    env = "env:\n  PLAIN: visible\n  HF_TOKEN: {secret: 'hf:token'}\n"
    leaky = "echo leaked=$HF_TOKEN on ${PORT}; exit 3"  # a model that prints its secret and dies
    s = serve({"sec.yaml": with_env("sec", f"{PY} {script} ${{PORT}}", env),
               "leaky.yaml": with_env("leaky", leaky, env)})
    got = s.get("/d/sec/env").json()
    assert got["HF_TOKEN"] == value and got["PLAIN"] == "visible"
    assert got["AUTODEPLOY_DEPLOYMENT"] == "sec" and got["PORT"] and got["PATH"]
    # A clean environment: nothing of serve's but PATH, HOME, LANG, TZ.
    assert "I12_SERVE_ONLY" not in got and "AUTODEPLOY_TOKEN" not in got
    assert not [k for k in got if k.startswith("AUTODEPLOY_SECRET_")]
    assert set(got) <= {"PATH", "HOME", "LANG", "TZ", "PLAIN", "HF_TOKEN", "PORT", "PYTHONUNBUFFERED",
                        "AUTODEPLOY_INSTANCE_ID", "AUTODEPLOY_DEPLOYMENT", "AUTODEPLOY_REVISION", "AUTODEPLOY_STATE_DIR",
                        "CUDA_VISIBLE_DEVICES", "PWD", "SHLVL", "_"}, sorted(got)  # the last three: /bin/sh's own
    # The crashing one: its client gets 1003 without the log tail; the events keep the tail, masked.
    crash = s.get("/d/leaky/")
    assert (crash.status_code, crash.json()["code"]) == (502, 1003), crash.text
    assert "leaked" not in crash.text and value not in crash.text
    s.wait_for(lambda: any("leaked=[secret]" in e["message"] for e in s.status("leaky")["events"]),
               what="the crash event with its masked log tail")

    # An edit of spec.env: the history names the variable, never its values.
    (s.deployments / "sec.yaml").write_text(with_env("sec", f"{PY} {script} ${{PORT}}",
                                                     env.replace("visible", "visible2")))
    s.wait_for(lambda: len(s.get("/api/deployments/sec/history").json()["revisions"]) == 2, what="revision 2")
    changes = s.get("/api/deployments/sec/history").json()["revisions"][1]["changes"]
    assert changes == ["spec.env.PLAIN: changed (spec.env values are not shown)"], changes
    answers = [s.get(p) for p in ("/api/deployments", "/api/deployments/sec", "/api/deployments/leaky",
                                  "/api/deployments/sec/history", "/api/deployments/sec/rollout",
                                  "/api/deployments/sec/drift", "/api/drift", "/metrics", "/api/tokens",
                                  "/api/keys")]
    answers.append(s.post("/api/deployments/sec/scale", json={"replicas": 1}))
    answers.append(s.get("/d/leaky/whoami"))
    for r in answers:
        assert value not in r.text, r.url
    # What the CLI prints from those answers: tables, diffs and JSON.
    cli = str(Path(PY).parent / "autodeploy")
    env = {"PATH": "/usr/bin:/bin", "AUTODEPLOY_TOKEN": s.token}
    for args in (["status"], ["status", "sec"], ["history", "sec"], ["diff"], ["diff", "sec"], ["describe", "sec"],
                 ["describe", "leaky"], ["events"], ["rollout", "status", "sec"], ["status", "-o", "json"]):
        out = subprocess.run([cli, *args, "--url", s.url], capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 0, (args, out.stderr)
        assert value not in out.stdout + out.stderr, args
    assert s.terminate() == 0
    assert value not in s.log()
    found = []
    for path in s.state_dir.rglob("*"):
        if path.is_file() and value.encode() in path.read_bytes():
            found.append(path.relative_to(s.state_dir))
    # Only the log file of the instance that printed it (its own output) holds it.
    assert all(str(p).startswith("logs/leaky-") for p in found), found


def test_a_missing_secret_is_a_file_line_error_in_validate_and_serve(serve, tmp_path):
    text = with_env("nosec", None, "env:\n  A: b\n  API_KEY: {secret: apiKey}\n")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "nosec.yaml").write_text(text)
    out = subprocess.run([str(Path(sys.executable).parent / "autodeploy"), "validate", str(tmp_path / "d")],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    line = text.splitlines().index("    API_KEY: {secret: apiKey}") + 1
    assert out.returncode == 1
    assert f"{tmp_path / 'd' / 'nosec.yaml'}:{line}: env API_KEY: secret apiKey not found: set " \
           "AUTODEPLOY_SECRET_APIKEY in serve's environment" in out.stderr
    s = serve({"nosec.yaml": text})
    [err] = s.status()["errors"]
    assert err.startswith(f"{s.deployments / 'nosec.yaml'}:{line}: env API_KEY: secret apiKey not found")
    assert s.get("/d/nosec/").json()["code"] == 1001  # never started with an empty value


# ---------------------------------------------------------------------- in process
def _dep(env: str):
    result = load_text(deployment_yaml("d", extra_spec=env), "d.yaml")
    assert result.ok, result.errors
    return result.deployments[0]


def test_lookup_order_env_then_stack_plain_then_pulumi_secret():
    dep = _dep("env:\n  A: {secret: a}\n  B: {secret: 'other:b'}\n  C: {secret: c}\n")
    config = {"autodeploy:a": "from-stack", "other:b": {"secure": "v1:abc"}, "autodeploy:c": "stack-c"}
    src = SecretSource({"AUTODEPLOY_SECRET_C": "from-env"}, config, "stacks/Pulumi.dev.yaml")
    assert src.lookup("a").value == "from-stack" and src.lookup("c").value == "from-env"
    assert src.lookup("other:b").encrypted and src.lookup("other:b").value is None
    # The Pulumi program decrypts its own secrets; local and docker instances cannot use them.
    assert missing_secrets([dep], src, usable_encrypted=True) == []
    [err] = missing_secrets([dep], src, usable_encrypted=False)
    assert err.line == dep.secret_lines["B"] and "AUTODEPLOY_SECRET_OTHER_B" in err.message
    with pytest.raises(Exception) as exc:
        src.resolve(dep)
    assert "OTHER_B" in str(exc.value)
    both = SecretSource({"AUTODEPLOY_SECRET_OTHER_B": "x"}, config)
    assert both.resolve(dep) == {"A": "from-stack", "B": "x", "C": "stack-c"}
    # An empty value is no value.
    assert SecretSource({"AUTODEPLOY_SECRET_A": ""}, {}).lookup("a").found is False


def test_instance_env_keeps_only_what_belongs():
    dep = _dep("env:\n  X: '1'\n")
    env = instance_env(dep, {"S": "v"}, {"PORT": "9"},
                       environ={"PATH": "/bin", "HOME": "/h", "SSH_AUTH_SOCK": "/x", "AUTODEPLOY_TOKEN": "t",
                                "AWS_SECRET_ACCESS_KEY": "k"})
    assert env == {"PATH": "/bin", "HOME": "/h", "X": "1", "S": "v", "PORT": "9"}


def test_redactor_masks_values():
    r = Redactor()
    r.set_values(["abcdef", "xy"])  # too short to mask safely
    assert r("token abcdef and xy") == "token [secret] and xy"
    r.set_values(["123456"])
    assert r.json_text('{"a": 1234567, "b": "x123456"}') == '{"a": 1234567, "b": "x[secret]"}'  # JSON stays JSON


def test_endpoint_error_bodies_carry_no_log_tail():
    from controller.errors import INSTANCE_START_FAILED, AutoDeployError
    from gateway.app import public_error
    exc = AutoDeployError(INSTANCE_START_FAILED, "instance ab exited with code 3 before it was ready",
                          private_detail="last log lines:\nTOKEN=hunter2")
    shown = public_error(exc, "m")
    assert "hunter2" not in shown.message and "autodeploy logs m" in shown.message
    assert shown.private_detail is None and "hunter2" not in json.dumps(shown.to_json(private=True))
    assert "hunter2" in exc.operator_message and "hunter2" not in exc.message
    assert requests.codes.bad_gateway == shown.error.http_status


def test_a_docker_instance_gets_its_secret_and_serve_does_not_show_it(serve, monkeypatch):
    from docker_images import busybox_image, docker_client_or_skip
    client = docker_client_or_skip()
    value = "dk-" + pysecrets.token_hex(12)
    monkeypatch.setenv("AUTODEPLOY_SECRET_DBTOKEN", value)
    image = busybox_image(client)
    text = (f"apiVersion: autodeploy/v1\nkind: Deployment\nmetadata: {{name: dsec12}}\nspec:\n"
            f"  model: {{id: busybox, version: v1}}\n  image: {image}\n"
            "  command: 'httpd -f -p ${PORT} -h /www'\n  port: 8080\n"
            "  env: {DB_TOKEN: {secret: dbToken}}\n"
            "  loadBalancer: {healthCheck: {path: /health, intervalSeconds: 10, timeoutSeconds: 2}}\n")
    s = serve({"dsec12.yaml": text}, "--driver", "docker")
    try:
        assert s.get("/d/dsec12/health").status_code == 200
        [container] = client.containers.list(filters={"label": "autodeploy.deployment=dsec12"})
        assert f"DB_TOKEN={value}" in container.attrs["Config"]["Env"]  # the instance's environment
        assert value not in s.get("/api/deployments/dsec12").text and value not in s.get("/metrics").text
        assert not [e for e in container.attrs["Config"]["Env"] if e.startswith("AUTODEPLOY_SECRET_")]
    finally:
        s.terminate()
        for c in client.containers.list(all=True, filters={"label": "autodeploy.deployment=dsec12"}):
            c.remove(force=True)
        client.close()
