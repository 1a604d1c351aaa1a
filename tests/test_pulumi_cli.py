"""The pulumi driver for real: Automation API -> pulumi CLI -> Docker provider -> containers.

Needs the pulumi CLI (with the docker provider plugin) on PATH and a Docker Engine. No
package registry here ships the CLI, so on this machine these tests skip and say so;
the program and the driver are covered without it by test_pulumi_program.py (SDK mocks)
and test_driver_pulumi.py (FakeStack).
"""
from __future__ import annotations

import shutil
import textwrap
from pathlib import Path
from typing import Iterator

import pytest
import requests

from controller.drivers.pulumi import PulumiDriver, automation_stack
from controller.spec import Deployment
from docker_images import HTTPD_COMMAND, busybox_image, docker_client_or_skip

ROOT = Path(__file__).resolve().parent.parent
STACK = "itest"
NAME = "pulumi-itest"

pytestmark = [
    pytest.mark.pulumi_cli,
    pytest.mark.docker,
    pytest.mark.skipif(shutil.which("pulumi") is None,
                       reason="needs the pulumi CLI on PATH (not installable on this machine)"),
]


def deployment_yaml(image: str) -> str:
    return textwrap.dedent(f"""\
        apiVersion: autodeploy/v1
        kind: Deployment
        metadata: {{name: {NAME}}}
        spec:
          model: {{id: busybox, version: v1}}
          image: {image}
          command: '{HTTPD_COMMAND}'
          port: 8080
          scaling: {{minReplicas: 0, maxReplicas: 5}}
          loadBalancer:
            healthCheck: {{path: /health, intervalSeconds: 5, timeoutSeconds: 2}}
        """)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A copy of the Pulumi project with its own stack file and a local file backend."""
    client = docker_client_or_skip()
    image = busybox_image(client)
    (tmp_path / "deployments").mkdir()
    (tmp_path / "deployments" / "web.yaml").write_text(deployment_yaml(image))
    (tmp_path / "stacks").mkdir()
    (tmp_path / "stacks" / f"Pulumi.{STACK}.yaml").write_text(textwrap.dedent("""\
        config:
          autodeploy:deploymentsDir: deployments
          autodeploy:gatewayContainer: "false"
        """))
    (tmp_path / "Pulumi.yaml").write_text(textwrap.dedent(f"""\
        name: autodeploy
        runtime:
          name: python
          options:
            virtualenv: {ROOT / '.venv'}
        stackConfigDir: stacks
        """))
    shutil.copy(ROOT / "__main__.py", tmp_path / "__main__.py")
    (tmp_path / "state").mkdir()
    monkeypatch.setenv("PULUMI_BACKEND_URL", f"file://{tmp_path / 'state'}")
    monkeypatch.setenv("PULUMI_CONFIG_PASSPHRASE", "itest")
    monkeypatch.setenv("PULUMI_SKIP_UPDATE_CHECK", "true")
    yield tmp_path
    stack = automation_stack(STACK, tmp_path)
    stack.destroy()
    stack.workspace.remove_stack(STACK)


def load(project: Path) -> Deployment:
    from controller.loader import load_paths
    result = load_paths([project / "deployments"], require_image=True)
    assert result.ok, result.errors
    return result.deployments[0]


def test_up_starts_pinned_slots_and_stop_removes_exactly_one_container(project: Path) -> None:
    client = docker_client_or_skip()
    driver = PulumiDriver(project, STACK, outputs_max_age_s=None)
    try:
        spec = load(project)
        instances = [driver.start(spec, iid, []) for iid in ("aaa", "bbb", "ccc")]
        for inst in instances:
            assert requests.get(f"http://{inst.host}:{inst.port}/health", timeout=10).status_code == 200

        def running() -> set[str]:
            return {c.name for c in client.containers.list(filters={"label": f"autodeploy.deployment={NAME}"})}

        assert running() == {f"autodeploy-{NAME}-0", f"autodeploy-{NAME}-1", f"autodeploy-{NAME}-2"}
        driver.stop(instances[1], 10.0)
        assert running() == {f"autodeploy-{NAME}-0", f"autodeploy-{NAME}-2"}
        assert driver.poll(instances[0]) is None and driver.poll(instances[1]) is not None
    finally:
        driver.close()


def test_a_human_up_with_the_synced_config_changes_nothing(project: Path) -> None:
    driver = PulumiDriver(project, STACK, outputs_max_age_s=None)
    try:
        spec = load(project)
        inst = driver.start(spec, "aaa", [])
    finally:
        driver.close()
    # What `pulumi up --stack itest` does in the same checkout: the stack file now holds
    # the controller's replicas, so the update has nothing to do.
    stack = automation_stack(STACK, project)
    result = stack.up(expect_no_changes=True)
    assert result.summary.result == "succeeded"
    outputs = stack.outputs()["deployments"].value[NAME]["instances"]
    assert [i["container_id"] for i in outputs] == [inst.container_id]
