"""A `pulumi up` stack enforces the same access control as `autodeploy serve`: API tokens
and endpoint keys come from the stack's secret config, reach the gateway (and HAProxy)
hashed and as secrets, and the static gateway run for real with that environment refuses
what serve refuses."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from conftest import ECHO_MODEL, PY, free_port
from controller.auth import digest
from controller.errors import AutoDeployError
from controller.pulumi_program import auth_env
from test_pulumi_program import CONTAINER, doc, run_program, secret_envs

ADMIN = "adt_pulumi-admin-token-0123456789"
KEY = "adk_pulumi-endpoint-key-0123456789"
SECRETS = {"apiTokens": f"ops:admin:{ADMIN}", "endpointKeys": f"a:{KEY}:0"}


def private_doc(name: str) -> str:
    return doc(name) + "  access: private\n"


def test_tokens_and_keys_reach_the_containers_hashed_and_secret(tmp_path: Path) -> None:
    from gateway.haproxy_plane import find_haproxy
    run = run_program(tmp_path, {"a.yaml": private_doc("a")}, {"gatewayPort": "9090"}, secrets=SECRETS)
    boxes = run.engine.of_type(CONTAINER)
    gateway = dict(e.split("=", 1) for e in secret_envs(boxes["gateway"]))
    assert gateway["AUTODEPLOY_API_TOKENS"] == f"ops:admin:{digest(ADMIN)}"
    assert gateway["AUTODEPLOY_ENDPOINT_KEYS"] == f"a:{digest(KEY)}:0"
    haproxy = dict(e.split("=", 1) for e in secret_envs(boxes["haproxy"]))
    assert haproxy["HAPROXY_KEYS"] == f"a:{digest(KEY)} 0\n"
    config = haproxy["HAPROXY_CONFIG"]
    assert "map(/tmp/keys.map)" in config and "acl private_dep var(txn.kdep) -m str a" in config
    everything = json.dumps(run.engine.resources, default=str) + json.dumps(run.outputs, default=str)
    assert ADMIN not in everything and KEY not in everything  # only hashes, and only inside secrets
    # the config HAProxy 2.6 gets, with the keys map the container writes, is valid
    (tmp_path / "keys.map").write_text(haproxy["HAPROXY_KEYS"])
    (tmp_path / "h.cfg").write_text(config.replace("/tmp/haproxy.sock", str(tmp_path / "h.sock"))
                                    .replace("/tmp/keys.map", str(tmp_path / "keys.map")))
    binary = find_haproxy()
    assert binary, "haproxy must be installed (apt-get install haproxy); CI installs it"
    res = subprocess.run([binary, "-c", "-f", str(tmp_path / "h.cfg")], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr


def test_malformed_auth_config_is_a_coded_error_that_never_echoes_the_secret() -> None:
    for tokens, keys in ((f"ops:root:{ADMIN}", ""), ("ops:admin:short", ""), ("", f"a:{KEY}:yes")):
        with pytest.raises(AutoDeployError) as err:
            auth_env(tokens, keys)
        assert err.value.error.code == 1014 and ADMIN not in err.value.message and KEY not in err.value.message
    assert auth_env(None, None) == {"AUTODEPLOY_API_TOKENS": "", "AUTODEPLOY_ENDPOINT_KEYS": ""}


def test_the_static_gateway_with_the_programs_env_refuses_what_serve_refuses(tmp_path: Path) -> None:
    run = run_program(tmp_path, {"a.yaml": private_doc("a"), "pub.yaml": doc("pub")}, {"dataPlane": "python"},
                      secrets=SECRETS)
    env = dict(e.split("=", 1) for e in secret_envs(run.engine.of_type(CONTAINER)["gateway"]))
    model_port = free_port()
    model = subprocess.Popen([PY, str(ECHO_MODEL), "--port", str(model_port)], stdout=subprocess.DEVNULL,
                             env=dict(os.environ, AUTODEPLOY_INSTANCE_ID="a-0"))
    routes = json.loads(env["AUTODEPLOY_ROUTES"])
    for dep in routes["deployments"].values():  # the stack network's names, here one local model
        for inst in dep["instances"]:
            inst["address"] = f"127.0.0.1:{model_port}"
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "autodeploy"), "gateway-static", "--bind",
                             f"127.0.0.1:{port}"],
                            env=dict(os.environ, AUTODEPLOY_ROUTES=json.dumps(routes),
                                     AUTODEPLOY_API_TOKENS=env["AUTODEPLOY_API_TOKENS"],
                                     AUTODEPLOY_ENDPOINT_KEYS=env["AUTODEPLOY_ENDPOINT_KEYS"]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(url + "/d/pub/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.05)
        bare = requests.get(url + "/d/a/health", timeout=10)
        assert (bare.status_code, bare.json()["code"]) == (401, 1035)
        wrong = requests.get(url + "/d/a/health", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
        assert (wrong.status_code, wrong.json()["code"]) == (401, 1035)
        keyed = requests.get(url + "/d/a/health", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
        assert keyed.status_code == 200
        write = requests.post(url + "/api/deployments/a/scale", json={"replicas": 2}, timeout=10)
        assert (write.status_code, write.json()["code"]) == (401, 1030)
        read = requests.get(url + "/api/deployments", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
        assert read.status_code == 200 and {d["name"] for d in read.json()["deployments"]} == {"a", "pub"}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        model.terminate()
        model.wait()
