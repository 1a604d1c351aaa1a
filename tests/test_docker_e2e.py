"""The docker driver behind the real controller and gateway, on a real Docker Engine.
Images are built locally from busybox-static; nothing is pulled."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import docker
import pytest

from docker_images import HTTPD_COMMAND, busybox_image, docker_client_or_skip

pytestmark = pytest.mark.docker
TARGET = "Deploy-Route-Target"


def docker_yaml(name: str, image: str, command: str = HTTPD_COMMAND, extra: str = "", health: bool = True) -> str:
    text = (f"apiVersion: autodeploy/v1\nkind: Deployment\nmetadata: {{name: {name}}}\nspec:\n"
            f"  model: {{id: busybox, version: v1}}\n  image: {image}\n  command: '{command}'\n  port: 8080\n"
            f"  resources: {{cpu: 0.5, memoryGb: 0.25}}\n"
            f"  scaling: {{minReplicas: 0, maxReplicas: 2, idleTimeout: 5m}}\n")
    if health:
        text += "  loadBalancer: {healthCheck: {path: /health, intervalSeconds: 10, timeoutSeconds: 2}}\n"
    return text + extra


@pytest.fixture
def client():
    c = docker_client_or_skip()
    yield c
    c.close()


def ours(client: docker.DockerClient, deployment: str) -> list:
    for _ in range(5):
        try:
            return client.containers.list(all=True, filters={"label": f"autodeploy.deployment={deployment}"})
        except docker.errors.NotFound:  # one was removed between the listing and its inspect: list again
            time.sleep(0.05)
    return client.containers.list(all=True, filters={"label": f"autodeploy.deployment={deployment}"})


@pytest.fixture
def cleanup(client):
    names: list[str] = []
    yield names
    for name in names:
        for c in ours(client, name):
            c.remove(force=True)


def test_cold_start_routing_and_limits_on_a_real_container(serve, client, cleanup):
    image = busybox_image(client)
    cleanup.append("dbox")
    s = serve({"dbox.yaml": docker_yaml("dbox", image)}, "--driver", "docker")
    r = s.get("/d/dbox/index.html")
    assert r.status_code == 200 and r.headers[TARGET]
    iid = r.headers[TARGET]
    second = s.get("/d/dbox/index.html", headers={"Deploy-Route-Rule": "scale-out"})
    assert second.status_code == 200 and second.headers[TARGET] != iid
    assert s.get("/d/dbox/", headers={"Deploy-Route-Rule": "scale-out"}).json()["code"] == 1007
    assert s.get("/d/dbox/index.html", headers={"Deploy-Route-Rule": iid}).headers[TARGET] == iid
    containers = {c.labels["autodeploy.instance"]: c for c in ours(client, "dbox")}
    assert set(containers) == {iid, second.headers[TARGET]}
    attrs = containers[iid].attrs
    assert attrs["HostConfig"]["NanoCpus"] == 500_000_000
    assert attrs["HostConfig"]["Memory"] == 256 * 1024 * 1024
    assert attrs["Name"] == f"/autodeploy-dbox-{iid}"
    inst = {i["id"]: i for i in s.instances("dbox")}
    assert inst[iid]["container_id"] == containers[iid].id


def test_missing_image_answers_1010_with_how_to_build_it(serve, client):
    s = serve({"ghost.yaml": docker_yaml("ghost", "autodeploy-test/not-built:1")}, "--driver", "docker")
    r = s.get("/d/ghost/")
    assert r.status_code == 502
    body = r.json()
    assert body["code"] == 1010
    assert "docker build -t autodeploy-test/not-built:1" in body["msg"] and "never pulls" in body["msg"]
    assert "never pulls" in (s.status("ghost")["last_error"] or "")
    assert not [i for i in client.images.list() if "autodeploy-test/not-built:1" in i.tags]


def test_container_that_exits_fails_held_requests_with_exit_code_and_logs(serve, client, cleanup):
    image = busybox_image(client)
    cleanup.append("dcrash")
    s = serve({"dcrash.yaml": docker_yaml("dcrash", image, "echo no weights here; exit 4")}, "--driver", "docker")
    r = s.get("/d/dcrash/")
    assert (r.status_code, r.json()["code"]) == (502, 1003)
    assert "exited with code 4" in r.json()["msg"] and "no weights here" not in r.json()["msg"]
    assert "no weights here" in s.status("dcrash")["last_error"]  # the log tail: authenticated API only
    s.wait_for(lambda: not ours(client, "dcrash"), what="crashed container removed")
    assert "failed" in [e["kind"] for e in s.status("dcrash")["events"]]


def test_restart_adopts_containers_and_reports_unknown_ones(serve, client, cleanup):
    image = busybox_image(client)
    cleanup += ["dadopt", "stray"]
    files = {"dadopt.yaml": docker_yaml("dadopt", image)}
    s = serve(files, "--driver", "docker")
    iid = s.get("/d/dadopt/index.html").headers[TARGET]
    container_id = ours(client, "dadopt")[0].id
    s.terminate(signal.SIGKILL)
    stray = client.containers.create(image, ["sleep", "60"], name=f"stray-{iid}",
                                     labels={"autodeploy.managed": "true", "autodeploy.deployment": "stray",
                                             "autodeploy.instance": "strayxyz", "autodeploy.revision": "x",
                                             "autodeploy.port": "8080"})
    stray.start()
    s2 = serve(files, "--driver", "docker", state_dir=s.state_dir)
    assert [(i["id"], i["container_id"]) for i in s2.instances("dadopt")] == [(iid, container_id)]
    assert s2.get("/d/dadopt/index.html").headers[TARGET] == iid
    assert len(ours(client, "dadopt")) == 1
    assert "adopted" in [e["kind"] for e in s2.status("dadopt")["events"]]
    stray.reload()
    assert stray.status == "running"  # reported, never killed silently
    assert s2.terminate() == 0
    assert ours(client, "dadopt") == []
    log = s2.log()
    assert "strayxyz" in log and "not adopted" in log


def test_sigterm_removes_every_container_it_started(serve, client, cleanup):
    image = busybox_image(client)
    cleanup.append("dstop")
    s = serve({"dstop.yaml": docker_yaml("dstop", image)}, "--driver", "docker")
    s.get("/d/dstop/index.html")
    s.get("/d/dstop/index.html", headers={"Deploy-Route-Rule": "scale-out"})
    assert len(ours(client, "dstop")) == 2
    assert s.terminate() == 0
    assert ours(client, "dstop") == []


def test_logs_command_reads_container_output(serve, client, cleanup):
    image = busybox_image(client)
    cleanup.append("dlogs")
    s = serve({"dlogs.yaml": docker_yaml("dlogs", image, "echo hello from the container; " + HTTPD_COMMAND)},
              "--driver", "docker")
    s.get("/d/dlogs/index.html")
    out = subprocess.run([str(Path(sys.executable).parent / "autodeploy"), "logs", "dlogs", "--state-dir",
                          str(s.state_dir)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "hello from the container" in out.stdout
