"""TLS terminated by HAProxy with the certificate named in the stack config
(`autodeploy:tlsCertificate`): a real serve on the haproxy data plane, a self-signed
certificate made with openssl, real HTTPS clients."""
from __future__ import annotations

import shutil
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import requests

from conftest import PY, ROOT, deployment_yaml, free_port

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None, reason="HAProxy is not installed")
CLI = str(Path(PY).parent / "autodeploy")


def self_signed(folder: Path) -> Path:
    key, crt, pem = folder / "key.pem", folder / "crt.pem", folder / "gateway.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-keyout", str(key), "-out", str(crt)], check=True, capture_output=True,
                   timeout=60)
    pem.write_text(crt.read_text() + key.read_text())
    return pem


def test_haproxy_terminates_tls_with_the_stack_certificate(tmp_path):
    project = tmp_path / "project"
    (project / "stacks").mkdir(parents=True)
    pem = self_signed(project)
    (project / "stacks" / "Pulumi.dev.yaml").write_text(
        "config:\n  autodeploy:driver: local\n  autodeploy:dataPlane: haproxy\n"
        f"  autodeploy:tlsCertificate: {pem.name}\n")
    deployments = tmp_path / "deployments"
    deployments.mkdir()
    (deployments / "hello.yaml").write_text(deployment_yaml("hello"))
    port, state = free_port(), tmp_path / "state"
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([CLI, "serve", "--project-dir", str(project), "--deployments", str(deployments),
                             "--state-dir", str(state), "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            cwd=ROOT)
    url = f"https://127.0.0.1:{port}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the certificate is self-signed: verify=False below
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                try:
                    if requests.get(url + "/healthz", verify=False, timeout=2).status_code == 200:
                        break
                except requests.RequestException:
                    time.sleep(0.1)
            token = (state / "admin.token").read_text().strip()
            auth = {"Authorization": f"Bearer {token}"}
            assert requests.get(url + "/api/deployments", headers=auth, verify=False, timeout=30).status_code == 200
            # The certificate served is the one in the stack config.
            served = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}"], input="",
                                    capture_output=True, text=True, timeout=30).stdout
            assert "CN = 127.0.0.1" in served or "CN=127.0.0.1" in served
            # Cold (the activator) and warm (HAProxy's backend): the instance is told it was https.
            cold = requests.get(url + "/d/hello/echo", verify=False, timeout=60)
            assert cold.status_code == 200 and cold.json()["headers"]["x-forwarded-proto"] == "https"
            deadline = time.monotonic() + 30
            while "gunicorn" in (warm := requests.get(url + "/d/hello/echo", verify=False, timeout=30)
                                 ).headers.get("Server", ""):
                assert time.monotonic() < deadline, "no warm path"
                time.sleep(0.1)
            assert warm.json()["headers"]["x-forwarded-proto"] == "https"
            # A same-origin POST from a browser page on https:// passes the Origin check.
            ok = requests.post(url + "/api/deployments/hello/stop", json={}, verify=False, timeout=30,
                               headers={**auth, "Origin": url})
            assert ok.status_code == 200, ok.text
        # Plain HTTP on the TLS port gets nothing.
        with pytest.raises(requests.RequestException):
            requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def test_python_data_plane_refuses_a_tls_certificate(tmp_path):
    project = tmp_path / "project"
    (project / "stacks").mkdir(parents=True)
    (project / "stacks" / "Pulumi.dev.yaml").write_text(
        "config:\n  autodeploy:driver: local\n  autodeploy:tlsCertificate: gateway.pem\n")
    out = subprocess.run([CLI, "serve", "--project-dir", str(project), "--deployments", str(tmp_path),
                          "--state-dir", str(tmp_path / "st"), "--port", str(free_port()), "--data-plane", "python"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "tlsCertificate is served by HAProxy" in out.stderr
