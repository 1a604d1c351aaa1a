"""The Pulumi program under the SDK's own unit-test mocks (`pulumi.runtime.set_mocks`).

No Pulumi CLI or provider plugin exists here, so the engine is `FakeDockerEngine`: a
`pulumi.runtime.Mocks` that records every resource registration and answers with what
the Docker provider would (an id, a published host port). The program itself, the
loader, placement and NVML fallback are all the real code.
"""
from __future__ import annotations

import itertools
import json
import runpy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pulumi
import pynvml
import pytest

from controller.errors import NO_FREE_GPU, SPEC_INVALID, AutoDeployError
from controller.gpus import Gpu, Inventory, NvmlGpuSource
from controller.pulumi_program import (gateway_url, instance_endpoint, parse_replicas, plan_resources, program,
                                       split_slot_name, wanted_slots)
from controller.spec import Deployment, GpuSpec, Resources, Scaling
from fakes import FakeNvml

ROOT = Path(__file__).resolve().parent.parent
CONTAINER = "docker:index/container:Container"
NETWORK = "docker:index/network:Network"
IMAGE = "docker:index/image:Image"
H100 = "NVIDIA H100 80GB HBM3"
# What the Pulumi engine wraps a secret value in on the wire.
SECRET_SIG = "4dabf18193072939515e22adb298388d"


class FakeDockerEngine(pulumi.runtime.Mocks):
    """Stands in for the engine + Docker provider: records registrations, invents ids and
    host ports the way Docker publishes an unpinned port."""

    def __init__(self) -> None:
        self.resources: list[tuple[str, str, dict[str, Any]]] = []
        self._ports = itertools.count(32768)

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.resources.append((args.typ, args.name, dict(args.inputs)))
        state = dict(args.inputs)
        if args.typ == CONTAINER:
            state["ports"] = [dict(p, external=p.get("external") or next(self._ports))
                              for p in args.inputs.get("ports", [])]
        return f"{args.name}-id", state

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:
        return {}

    def of_type(self, typ: str) -> dict[str, dict[str, Any]]:
        return {name: inputs for t, name, inputs in self.resources if t == typ}


def doc(name: str, *, image: str | None = "example/model:1", gpu: str = "", replicas: str = "minReplicas: 1",
        state: str = "running", env: str = "", resources: str = "") -> str:
    lines = ["apiVersion: autodeploy/v1", "kind: Deployment", "metadata:", f"  name: {name}", "spec:",
             "  model: {id: m, version: v1}", "  command: python serve.py --port ${PORT}", "  port: 8080"]
    if image:
        lines.append(f"  image: {image}")
    if env:
        lines.append(f"  env: {env}")
    if gpu or resources:
        inner = ", ".join(x for x in (resources, f"gpu: {gpu}" if gpu else "") if x)
        lines.append(f"  resources: {{{inner}}}")
    lines += ["  scaling:", f"    {replicas}", "    maxReplicas: 8",
              "  loadBalancer:", "    healthCheck: {path: /health, intervalSeconds: 10, timeoutSeconds: 2}",
              f"  state: {state}"]
    return "\n".join(lines) + "\n"


def no_nvml() -> NvmlGpuSource:
    # NVML absent (as on this machine, but also on a GPU box running the tests): the
    # program must then place on the GPUs the stack config declares.
    return NvmlGpuSource(FakeNvml(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))


def h100s(n: int) -> str:
    return json.dumps([{"index": i, "name": H100, "uuid": f"GPU-{i}"} for i in range(n)])


@dataclass
class Run:
    engine: FakeDockerEngine
    result: Any
    outputs: dict[str, Any]

    def containers(self) -> dict[str, dict[str, Any]]:
        return {n: i for n, i in self.engine.of_type(CONTAINER).items() if n not in ("gateway", "haproxy")}


def secret_envs(box: dict[str, Any]) -> list[str]:
    """A container's env list, which the program hands the engine as a secret (it carries
    the hashed tokens and keys): wrapped in the engine's secret signature."""
    envs = box["envs"]
    assert isinstance(envs, dict) and envs.get(SECRET_SIG), "the env list must reach the engine as a secret"
    return list(envs["value"])


def run_program(tmp_path: Path, files: dict[str, str], config: dict[str, Any] | None = None,
                secrets: dict[str, str] | None = None) -> Run:
    """Run `program()` once in a fresh mocked runtime; returns what it registered and exported."""
    deployments = tmp_path / "deployments"
    deployments.mkdir(exist_ok=True)
    for old in deployments.glob("*.yaml"):
        old.unlink()
    for name, text in files.items():
        (deployments / name).write_text(text)
    engine = FakeDockerEngine()
    pulumi.runtime.set_mocks(engine, project="autodeploy", stack="dev", preview=False)
    values = {"autodeploy:deploymentsDir": str(deployments), "autodeploy:gpus": h100s(2)}
    for key, value in (config or {}).items():
        values[f"autodeploy:{key}"] = value if isinstance(value, str) else json.dumps(value)
    for key, value in (secrets or {}).items():
        values[f"autodeploy:{key}"] = value
    pulumi.runtime.set_all_config(values, [f"autodeploy:{k}" for k in (secrets or {})])
    seen: dict[str, Any] = {}

    @pulumi.runtime.test
    def body() -> pulumi.Output:
        seen["result"] = result = program(project_dir=tmp_path, nvml=no_nvml())
        names = list(result.outputs)
        return pulumi.Output.all(*result.outputs.values()).apply(
            lambda values: seen.update(outputs=dict(zip(names, values))))

    body()
    return Run(engine, seen["result"], seen["outputs"])


# --- the resource graph ------------------------------------------------------------------------

@pulumi.runtime.test
def test_each_replica_slot_is_one_container_on_the_stack_network(tmp_path: Path) -> pulumi.Output:
    (tmp_path / "deployments").mkdir()
    (tmp_path / "deployments" / "tts.yaml").write_text(
        doc("tts", gpu="{count: 1, type: H100}", replicas="minReplicas: 2", resources="cpu: 4, memoryGb: 16"))
    engine = FakeDockerEngine()
    pulumi.runtime.set_mocks(engine, project="autodeploy", stack="dev", preview=False)
    pulumi.runtime.set_all_config({"autodeploy:deploymentsDir": str(tmp_path / "deployments"),
                                   "autodeploy:gpus": h100s(2)})
    result = program(project_dir=tmp_path, nvml=no_nvml())

    def check(args: list[Any]) -> None:
        network_name, names = args
        assert network_name == "autodeploy-dev"
        assert names == ["autodeploy-tts-0", "autodeploy-tts-1"]
        c0 = engine.of_type(CONTAINER)["tts-0"]
        assert c0["image"] == "example/model:1"
        assert c0["command"] == ["sh", "-c", "python serve.py --port ${PORT}"]
        assert c0["cpus"] == "4" and c0["memory"] == 16 * 1024
        assert c0["ports"] == [{"internal": 8080, "ip": "127.0.0.1"}]
        assert {"label": "autodeploy.managed", "value": "true"} in c0["labels"]
        assert {"label": "autodeploy.deployment", "value": "tts"} in c0["labels"]
        assert {"label": "autodeploy.instance", "value": "tts-0"} in c0["labels"]
        assert {"label": "autodeploy.gpus", "value": "GPU-0"} in c0["labels"]
        assert not any(label["label"] == "autodeploy.revision" for label in c0["labels"])
        assert c0["init"] is True and c0["gpus"] == "device=GPU-0"
        assert "PORT=8080" in c0["envs"] and "AUTODEPLOY_INSTANCE_ID=tts-0" in c0["envs"]
        assert c0["healthcheck"]["interval"] == "10s" and c0["healthcheck"]["timeout"] == "2s"
        assert "http://127.0.0.1:8080/health" in c0["healthcheck"]["tests"][1]
        assert c0["networksAdvanced"] == [{"name": "autodeploy-dev", "aliases": ["tts-0"]}]
        assert c0["restart"] == "unless-stopped"
        assert set(engine.of_type(NETWORK)) == {"autodeploy"}

    return pulumi.Output.all(result.network.name,
                             pulumi.Output.all(*[c.name for c in result.containers.values()])).apply(check)


def test_the_gateway_image_is_built_locally_and_never_pushed(tmp_path: Path) -> None:
    run = run_program(tmp_path, {"a.yaml": doc("a")})
    image = run.engine.of_type(IMAGE)["gateway-image"]
    assert image["skipPush"] is True
    assert "registry" not in image
    assert image["build"]["context"] == str(tmp_path.resolve())
    assert image["build"]["dockerfile"] == str(tmp_path.resolve() / "gateway" / "Dockerfile")
    assert image["imageName"].startswith("autodeploy-gateway:")


def test_the_gateway_container_routes_to_instance_network_addresses(tmp_path: Path) -> None:
    run = run_program(tmp_path, {"a.yaml": doc("a", replicas="minReplicas: 2"),
                                 "b.yaml": doc("b", state="stopped")}, {"gatewayPort": "9090", "dataPlane": "python"})
    gateway = run.engine.of_type(CONTAINER)["gateway"]
    assert "haproxy" not in run.engine.of_type(CONTAINER)
    env = dict(e.split("=", 1) for e in secret_envs(gateway))
    routes = json.loads(env["AUTODEPLOY_ROUTES"])["deployments"]
    assert [i["address"] for i in routes["a"]["instances"]] == ["autodeploy-a-0:8080", "autodeploy-a-1:8080"]
    assert routes["b"] == {"state": "stopped", "algorithm": "round-robin", "stickySessions": False,
                           "healthCheckPath": "/health", "requestTimeout": 300.0, "access": "public",
                           "instances": []}
    assert gateway["ports"] == [{"internal": 8080, "external": 9090, "ip": "127.0.0.1"}]
    assert run.outputs["gateway_url"] == "http://127.0.0.1:9090"


def test_haproxy_container_carries_the_endpoints_with_the_gateway_as_its_activator(tmp_path: Path) -> None:
    import subprocess

    from gateway.haproxy_plane import find_haproxy
    run = run_program(tmp_path, {"a.yaml": doc("a", replicas="minReplicas: 2"),
                                 "b.yaml": doc("b", state="stopped")}, {"gatewayPort": "9090"})
    boxes = run.engine.of_type(CONTAINER)
    haproxy, gateway = boxes["haproxy"], boxes["gateway"]
    assert haproxy["ports"] == [{"internal": 8080, "external": 9090, "ip": "127.0.0.1"}]
    assert gateway.get("ports") in (None, [])  # reached only through HAProxy
    assert haproxy["image"] == gateway["image"]  # one image: the gateway's, with haproxy installed
    config = dict(e.split("=", 1) for e in secret_envs(haproxy))["HAPROXY_CONFIG"]
    assert "    server a-0 autodeploy-a-0:8080 weight 100" in config
    assert "    server a-1 autodeploy-a-1:8080 weight 100" in config
    assert "backend be_b" in config  # stopped: no server, so its requests go to the activator
    assert "    server activator autodeploy-gateway-dev:8080 resolvers docker" in config
    # the very file HAProxy 2.6 accepts (the container resolves names through Docker's DNS)
    (tmp_path / "h.cfg").write_text(config.replace("/tmp/haproxy.sock", str(tmp_path / "h.sock")))
    binary = find_haproxy()
    assert binary, "haproxy must be installed (apt-get install haproxy); CI installs it"
    res = subprocess.run([binary, "-c", "-f", str(tmp_path / "h.cfg")], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr


def test_gateway_container_false_leaves_the_gateway_to_the_controller(tmp_path: Path) -> None:
    run = run_program(tmp_path, {"a.yaml": doc("a")}, {"gatewayContainer": "false"})
    assert "gateway" not in run.engine.of_type(CONTAINER)
    assert run.engine.of_type(IMAGE) == {}
    assert set(run.containers()) == {"a-0"}


def test_main_py_runs_the_same_program(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / "__main__.py").read_text()
    assert "from controller.pulumi_program import program" in text
    (tmp_path / "deployments").mkdir()
    (tmp_path / "deployments" / "a.yaml").write_text(doc("a"))
    monkeypatch.chdir(tmp_path)  # Pulumi runs the program in the project directory
    engine = FakeDockerEngine()
    pulumi.runtime.set_mocks(engine, project="autodeploy", stack="dev", preview=False)
    # A GPU-free deployment: the inventory source (NVML or not) cannot change the graph.
    pulumi.runtime.set_all_config({"autodeploy:deploymentsDir": "deployments", "autodeploy:gatewayContainer": "false"})

    @pulumi.runtime.test
    def body() -> None:
        runpy.run_path(str(ROOT / "__main__.py"), run_name="__main__")

    body()
    assert set(engine.of_type(CONTAINER)) == {"a-0"}


# --- GPUs ----------------------------------------------------------------------------------------

def test_every_gpu_replica_is_pinned_to_its_own_gpu(tmp_path: Path) -> None:
    run = run_program(tmp_path, {"tts.yaml": doc("tts", gpu="{count: 1, type: H100}", replicas="minReplicas: 3")},
                      {"gpus": h100s(4)})
    flags = [c["gpus"] for c in run.containers().values()]
    assert sorted(flags) == ["device=GPU-0", "device=GPU-1", "device=GPU-2"]
    ids = [tuple(i["gpu_ids"]) for i in run.outputs["deployments"]["tts"]["instances"]]
    assert len(set(ids)) == 3 and all(len(i) == 1 for i in ids)
    assert run.outputs["pins"] == {"tts-0": ["GPU-0"], "tts-1": ["GPU-1"], "tts-2": ["GPU-2"]}


def test_declared_gpus_without_uuid_are_pinned_by_index(tmp_path: Path) -> None:
    gpus = [{"index": 0, "name": H100}, {"index": 1, "name": H100}]
    run = run_program(tmp_path, {"tts.yaml": doc("tts", gpu="{count: 2, type: H100}")}, {"gpus": gpus})
    assert run.containers()["tts-0"]["gpus"] == "device=0,1"
    assert run.outputs["deployments"]["tts"]["instances"][0]["gpu_ids"] == ["declared-0", "declared-1"]


def test_not_enough_gpus_fails_the_update_naming_the_deployment_and_why(tmp_path: Path) -> None:
    with pytest.raises(AutoDeployError) as info:
        run_program(tmp_path, {"big.yaml": doc("big", gpu="{count: 1, type: H100}", replicas="minReplicas: 3")})
    assert info.value.error is NO_FREE_GPU
    assert "deployment big slot big-2: needs 1 x H100, 0 free of 2 matching" in info.value.message
    assert "stack config" in info.value.message  # says which inventory it used


def test_controller_pins_are_kept(tmp_path: Path) -> None:
    run = run_program(tmp_path, {"tts.yaml": doc("tts", gpu="{count: 1, type: H100}", replicas="minReplicas: 2")},
                      {"gpus": h100s(4), "pins": {"tts-0": ["GPU-3"], "tts-1": ["GPU-1"]}})
    assert run.containers()["tts-0"]["gpus"] == "device=GPU-3"
    assert run.containers()["tts-1"]["gpus"] == "device=GPU-1"


# --- replicas -------------------------------------------------------------------------------------

def test_one_more_replica_adds_one_container_and_changes_no_other(tmp_path: Path) -> None:
    files = {"a.yaml": doc("a", gpu="{count: 1, type: H100}"), "b.yaml": doc("b", gpu="{count: 1, type: H100}")}
    before = run_program(tmp_path, files, {"gpus": h100s(4), "replicas": {"a": 1, "b": 1}}).containers()
    after = run_program(tmp_path, files, {"gpus": h100s(4), "replicas": {"a": 2, "b": 1}}).containers()
    assert set(after) - set(before) == {"a-1"}
    assert set(before) - set(after) == set()
    # Identical inputs: Pulumi neither updates nor replaces them (b-0 kept its GPU).
    for name in before:
        assert after[name] == before[name], name


def test_editing_scaling_limits_leaves_running_containers_untouched(tmp_path: Path) -> None:
    before = run_program(tmp_path, {"a.yaml": doc("a")}).containers()
    edited = doc("a").replace("maxReplicas: 8", "maxReplicas: 3")
    after = run_program(tmp_path, {"a.yaml": edited}).containers()
    assert after == before


def test_a_slot_list_runs_exactly_those_slots(tmp_path: Path) -> None:
    run = run_program(tmp_path, {"a.yaml": doc("a")}, {"replicas": {"a": [0, 2]}})
    assert set(run.containers()) == {"a-0", "a-2"}
    assert run.outputs["replicas"] == {"a": [0, 2]}


def test_a_deployment_missing_from_replicas_runs_min_replicas(tmp_path: Path) -> None:
    run = run_program(tmp_path, {"a.yaml": doc("a", replicas="minReplicas: 2"), "b.yaml": doc("b")},
                      {"replicas": {"b": 0}})
    assert set(run.containers()) == {"a-0", "a-1"}
    assert run.outputs["replicas"] == {"a": [0, 1], "b": []}


def test_a_stopped_deployment_has_no_containers(tmp_path: Path) -> None:
    run = run_program(tmp_path, {"a.yaml": doc("a", replicas="minReplicas: 2", state="stopped")},
                      {"replicas": {"a": 3}})
    assert run.containers() == {}
    assert run.outputs["deployments"] == {"a": {"instances": []}}


# --- outputs ----------------------------------------------------------------------------------------

def test_outputs_list_every_instance_with_address_and_gpus(tmp_path: Path) -> None:
    run = run_program(tmp_path, {"tts.yaml": doc("tts", gpu="{count: 1, type: H100}", replicas="minReplicas: 2"),
                                 "web.yaml": doc("web")})
    deployments = run.outputs["deployments"]
    assert set(deployments) == {"tts", "web"}
    tts = deployments["tts"]["instances"]
    assert [i["name"] for i in tts] == ["tts-0", "tts-1"]
    assert [i["gpu_ids"] for i in tts] == [["GPU-0"], ["GPU-1"]]
    assert all(i["address"].startswith("127.0.0.1:") and int(i["address"].rsplit(":", 1)[1]) >= 32768 for i in tts)
    assert tts[0]["container_id"] == "tts-0-id"
    assert deployments["web"]["instances"][0]["gpu_ids"] == []
    assert run.outputs["gateway_url"] == "http://127.0.0.1:8080"
    assert run.outputs["gpu_inventory"].startswith("stack config")


# --- secrets --------------------------------------------------------------------------------------

def test_secret_env_reaches_the_engine_marked_secret_and_nowhere_else(tmp_path: Path) -> None:
    run = run_program(tmp_path, {"a.yaml": doc("a", env="{LOG_LEVEL: info, HF_TOKEN: {secret: hfToken}}")},
                      secrets={"hfToken": "hf_s3cret"})
    envs = run.containers()["a-0"]["envs"]
    # The engine gets the whole env list wrapped as a secret: state and previews show [secret].
    assert envs[SECRET_SIG] and "HF_TOKEN=hf_s3cret" in envs["value"] and "LOG_LEVEL=info" in envs["value"]
    assert "hf_s3cret" not in json.dumps(run.outputs)
    assert "hf_s3cret" not in repr(run.result.plans)
    gateway_env = json.dumps(run.engine.of_type(CONTAINER)["gateway"])
    assert "hf_s3cret" not in gateway_env


@pulumi.runtime.test
def test_secret_env_output_is_secret(tmp_path: Path) -> pulumi.Output:
    (tmp_path / "deployments").mkdir()
    (tmp_path / "deployments" / "a.yaml").write_text(doc("a", env="{HF_TOKEN: {secret: hfToken}}"))
    pulumi.runtime.set_mocks(FakeDockerEngine(), project="autodeploy", stack="dev", preview=False)
    pulumi.runtime.set_all_config({"autodeploy:deploymentsDir": str(tmp_path / "deployments"),
                                   "autodeploy:hfToken": "hf_s3cret"}, ["autodeploy:hfToken"])
    result = program(project_dir=tmp_path, nvml=no_nvml())

    async def secret() -> bool:
        return await result.containers["a-0"].envs.is_secret()

    return pulumi.Output.from_input(secret()).apply(lambda is_secret: _assert(is_secret))


def _assert(value: bool) -> None:
    assert value


# --- spec errors ---------------------------------------------------------------------------------

def test_invalid_yaml_fails_the_update_listing_every_file_line_error(tmp_path: Path) -> None:
    files = {"a.yaml": doc("a", image=None), "b.yaml": doc("b").replace("port: 8080", "port: eighty")}
    with pytest.raises(AutoDeployError) as info:
        run_program(tmp_path, files)
    assert info.value.error is SPEC_INVALID
    message = info.value.message
    assert "nothing was changed" in message
    assert "a.yaml:" in message and "spec.image is required" in message
    assert "b.yaml:" in message


# --- pure pieces -----------------------------------------------------------------------------------

def _dep(name: str, gpus: int = 0, min_replicas: int = 0, state: str = "running") -> Deployment:
    return Deployment(name=name, model_id="m", model_version="v1", command="x", port=80, image="i:1",
                      resources=Resources(gpu=GpuSpec(gpus, "H100" if gpus else None)),
                      scaling=Scaling(min_replicas=min_replicas, max_replicas=8), state=state)


def test_replicas_config_takes_a_count_or_a_slot_list() -> None:
    assert parse_replicas({"a": 2, "b": [3, 0], "c": "1"}) == {"a": (0, 1), "b": (0, 3), "c": (0,)}
    assert parse_replicas('{"a": [1]}') == {"a": (1,)}
    for bad in ({"a": -1}, {"a": [0, 0]}, {"a": ["x"]}, ["a"], "{nope"):
        with pytest.raises(AutoDeployError) as info:
            parse_replicas(bad)
        assert info.value.error is SPEC_INVALID


def test_wanted_slots_default_to_min_replicas_and_stop_at_zero() -> None:
    deps = [_dep("a", min_replicas=2), _dep("b", min_replicas=1, state="stopped"), _dep("c")]
    assert wanted_slots(deps, {"c": [4]}) == {"a": (0, 1), "b": (), "c": (4,)}


def test_without_pins_a_new_slot_never_moves_another_deployments_gpu() -> None:
    inventory = Inventory([Gpu(i, f"GPU-{i}", H100, 81559) for i in range(4)], "test")
    deps = [_dep("a", gpus=1), _dep("b", gpus=1)]
    before = {p.slot_name: p.gpu_ids for p in plan_resources(deps, {"a": 1, "b": 1}, inventory)}
    after = {p.slot_name: p.gpu_ids for p in plan_resources(deps, {"a": 2, "b": 1}, inventory)}
    assert after["a-0"] == before["a-0"] and after["b-0"] == before["b-0"]
    assert after["a-1"] not in (before["a-0"], before["b-0"])


def test_slot_names_split_at_the_last_dash() -> None:
    assert split_slot_name("bert-sentiment-12") == ("bert-sentiment", 12)
    with pytest.raises(ValueError):
        split_slot_name("nodash")


def test_a_remote_docker_host_publishes_on_all_interfaces_and_is_dialled_by_name() -> None:
    assert instance_endpoint("unix:///var/run/docker.sock") == ("127.0.0.1", "127.0.0.1")
    assert instance_endpoint(None) == ("127.0.0.1", "127.0.0.1")
    assert instance_endpoint("tcp://gpu-node-1:2376") == ("0.0.0.0", "gpu-node-1")
    assert gateway_url("0.0.0.0", 8080, "ssh://ops@gpu-node-1") == "http://gpu-node-1:8080"
