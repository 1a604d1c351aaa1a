"""`autodeploy gateway-static`: the Pulumi stack's gateway container, run here as a process
in front of real echo models, with the routes the Pulumi program writes."""
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
from gateway.static import StaticControlPlane

RULE = "Deploy-Route-Rule"
VIEWER = "adt_static-gateway-test-viewer-token"


@pytest.fixture
def gateway(tmp_path):
    ports = [free_port(), free_port()]
    models = [subprocess.Popen([PY, str(ECHO_MODEL), "--port", str(p)], stdout=subprocess.DEVNULL,
                               env=dict(os.environ, AUTODEPLOY_INSTANCE_ID=f"tts-{i}")) for i, p in enumerate(ports)]
    routes = {"version": 1, "deployments": {
        "tts": {"state": "running", "algorithm": "round-robin", "stickySessions": False, "healthCheckPath": "/health",
                "instances": [{"id": f"tts-{i}", "address": f"127.0.0.1:{p}"} for i, p in enumerate(ports)]},
        "paused": {"state": "stopped", "algorithm": "round-robin", "stickySessions": False, "healthCheckPath": None,
                   "instances": []}}}
    port = free_port()
    env = dict(os.environ, AUTODEPLOY_ROUTES=json.dumps(routes), AUTODEPLOY_API_TOKENS=f"ci:viewer:{digest(VIEWER)}")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "autodeploy"), "gateway-static", "--bind",
                             f"127.0.0.1:{port}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/d/tts/health", timeout=1).status_code == 200:
                break
        except requests.RequestException:
            time.sleep(0.05)
    yield url
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    for m in models:
        m.terminate()
        m.wait()


def test_static_gateway_routes_round_robin_to_the_stack_instances(gateway):
    seen = [requests.get(gateway + "/d/tts/whoami", timeout=10) for _ in range(4)]
    assert all(r.status_code == 200 for r in seen)
    targets = [r.headers["Deploy-Route-Target"] for r in seen]
    assert set(targets) == {"tts-0", "tts-1"}
    assert all(r.json()["instance"] == r.headers["Deploy-Route-Target"] for r in seen)
    pinned = requests.get(gateway + "/d/tts/whoami", headers={RULE: "tts-1"}, timeout=10)
    assert pinned.json()["instance"] == "tts-1"


def test_static_gateway_answers_the_seed_codes_for_what_it_cannot_do(gateway):
    out = requests.get(gateway + "/d/tts/", headers={RULE: "scale-out"}, timeout=10)
    assert (out.status_code, out.json()["code"]) == (429, 1007) and "autodeploy:replicas" in out.json()["msg"]
    assert requests.get(gateway + "/d/tts/", headers={RULE: "nope"}, timeout=10).json()["code"] == 1006
    assert requests.get(gateway + "/d/paused/", timeout=10).json()["code"] == 1002
    assert requests.get(gateway + "/d/ghost/", timeout=10).json()["code"] == 1001
    assert requests.get(gateway + "/api/deployments", timeout=10).json()["code"] == 1030
    status = requests.get(gateway + "/api/deployments", headers={"Authorization": f"Bearer {VIEWER}"},
                          timeout=10).json()
    assert [(d["name"], d["status"]) for d in status["deployments"]] == [("paused", "Stopped"), ("tts", "Running")]


def test_bad_routes_are_refused_with_a_coded_error():
    with pytest.raises(AutoDeployError) as err:
        StaticControlPlane({"version": 2})
    assert err.value.error.code == 1014


def test_a_private_deployment_on_the_static_gateway_needs_a_key_from_its_environment():
    from controller.auth import endpoint_check
    routes = {"version": 1, "deployments": {"p": {"state": "running", "access": "private", "instances": []},
                                             "q": {"state": "running", "access": "private", "instances": []}}}
    snap = StaticControlPlane(routes, keys=f"p:{digest('k1')}:0").snapshot.deployments
    assert endpoint_check(snap["p"].access, snap["p"].keys, "Bearer k1", None) is None
    assert endpoint_check(snap["q"].access, snap["q"].keys, "Bearer k1", None).error.code == 1035
    assert endpoint_check(snap["p"].access, snap["p"].keys, "Bearer k1", "scale-out").error.code == 1036
    with pytest.raises(AutoDeployError):
        StaticControlPlane(routes, keys="p:short:0")
