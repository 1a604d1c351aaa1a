"""The Pulumi program with `autodeploy:nodes`: one docker.Provider per node, each container
created with the provider of the node it was placed on, stable names and nodes when a
replica is added on another node. Under `pulumi.runtime.set_mocks` (no Pulumi CLI here)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pulumi
import pytest

from controller.errors import SPEC_INVALID, AutoDeployError
from controller.gpus import Gpu
from controller.policy.placement import NodePlacement, NodeView, place_slots_on_nodes
from controller.spec import GpuSpec
from test_pulumi_program import CONTAINER, NETWORK, FakeDockerEngine, doc, no_nvml, secret_envs

from controller.pulumi_program import program

PROVIDER = "pulumi:providers:docker"
H100 = "NVIDIA H100 80GB HBM3"
NODES = [
    {"name": "gpu-1", "dockerHost": "ssh://deploy@gpu-1", "address": "10.0.0.1", "labels": {"zone": "eu"},
     "gpus": [{"index": 0, "name": H100}, {"index": 1, "name": H100}]},
    {"name": "gpu-2", "dockerHost": "ssh://deploy@gpu-2", "address": "10.0.0.2", "labels": {"zone": "us"},
     "gpus": [{"index": 0, "name": H100}]},
]


class FakeEngineWithProviders(FakeDockerEngine):
    """Also records which provider each resource was registered with."""

    def __init__(self) -> None:
        super().__init__()
        self.provider_of: dict[str, str] = {}

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.provider_of[args.name] = args.provider or ""
        return super().new_resource(args)


def run(tmp_path: Path, files: dict[str, str], config: dict[str, Any]) -> tuple[FakeEngineWithProviders, Any, dict]:
    deployments = tmp_path / "deployments"
    deployments.mkdir(exist_ok=True)
    for old in deployments.glob("*.yaml"):
        old.unlink()
    for name, text in files.items():
        (deployments / name).write_text(text)
    engine = FakeEngineWithProviders()
    pulumi.runtime.set_mocks(engine, project="autodeploy", stack="dev", preview=False)
    values = {"autodeploy:deploymentsDir": str(deployments), "autodeploy:nodes": json.dumps(NODES)}
    values.update({f"autodeploy:{k}": v if isinstance(v, str) else json.dumps(v) for k, v in config.items()})
    pulumi.runtime.set_all_config(values)
    seen: dict[str, Any] = {}

    @pulumi.runtime.test
    def body() -> pulumi.Output:
        seen["result"] = result = program(project_dir=tmp_path, nvml=no_nvml())
        names = list(result.outputs)
        return pulumi.Output.all(*result.outputs.values()).apply(lambda v: seen.update(outputs=dict(zip(names, v))))

    body()
    return engine, seen["result"], seen["outputs"]


def containers(engine: FakeDockerEngine) -> dict[str, dict[str, Any]]:
    return {n: i for n, i in engine.of_type(CONTAINER).items() if n != "gateway"}


def test_one_provider_per_node_and_each_container_uses_its_nodes(tmp_path: Path) -> None:
    files = {"tts.yaml": doc("tts", gpu="{count: 1, type: H100}", replicas="minReplicas: 3"),
             "web.yaml": doc("web", replicas="minReplicas: 2")}
    engine, result, outputs = run(tmp_path, files, {"gatewayContainer": "false"})
    providers = engine.of_type(PROVIDER)
    assert {n: p["host"] for n, p in providers.items()} == {"docker-gpu-1": "ssh://deploy@gpu-1",
                                                            "docker-gpu-2": "ssh://deploy@gpu-2"}
    assert set(engine.of_type(NETWORK)) == {"autodeploy-gpu-1", "autodeploy-gpu-2"}
    placements = outputs["placements"]
    # Spread: web over both nodes; tts over the three H100s (two on gpu-1, one on gpu-2).
    assert sorted(placements[f"web-{i}"] for i in range(2)) == ["gpu-1", "gpu-2"]
    assert sorted(placements[f"tts-{i}"] for i in range(3)) == ["gpu-1", "gpu-1", "gpu-2"]
    for slot, inputs in containers(engine).items():
        node = placements[slot]
        assert f"::docker-{node}::" in engine.provider_of[slot]
        assert inputs["networksAdvanced"][0]["name"] == "autodeploy-dev"
        assert inputs["ports"][0]["ip"] == {"gpu-1": "10.0.0.1", "gpu-2": "10.0.0.2"}[node]
    devices = sorted((placements[s], c["gpus"]) for s, c in containers(engine).items() if s.startswith("tts"))
    assert devices == [("gpu-1", "device=0"), ("gpu-1", "device=1"), ("gpu-2", "device=0")]
    addresses = {i["name"]: i["address"].split(":")[0] for d in outputs["deployments"].values() for i in d["instances"]}
    assert addresses == {s: {"gpu-1": "10.0.0.1", "gpu-2": "10.0.0.2"}[n] for s, n in placements.items()}


def test_a_replica_added_on_another_node_changes_no_existing_container(tmp_path: Path) -> None:
    files = {"a.yaml": doc("a"), "b.yaml": doc("b")}
    _, _, first = run(tmp_path, files, {"replicas": {"a": 1, "b": 2}, "gatewayContainer": "false"})
    engine_before, _, _ = run(tmp_path, files, {"replicas": {"a": 1, "b": 2}, "placements": first["placements"],
                                                "gatewayContainer": "false"})
    engine_after, _, second = run(tmp_path, files, {"replicas": {"a": 2, "b": 2}, "placements": first["placements"],
                                                    "gatewayContainer": "false"})
    before, after = containers(engine_before), containers(engine_after)
    assert set(after) - set(before) == {"a-1"}
    assert second["placements"]["a-1"] != second["placements"]["a-0"]  # spread: the other node
    for name in before:  # same resource name, same inputs, same provider: nothing replaced
        assert after[name] == before[name] and engine_after.provider_of[name] == engine_before.provider_of[name]
    assert {k: v for k, v in second["placements"].items() if k != "a-1"} == first["placements"]


def test_the_gateway_container_dials_instances_at_their_nodes_published_ports(tmp_path: Path) -> None:
    engine, _, outputs = run(tmp_path, {"web.yaml": doc("web", replicas="minReplicas: 2")}, {})
    envs = secret_envs(engine.of_type(CONTAINER)["gateway"])  # secret: it carries the hashed tokens
    routes = json.loads(next(e for e in envs if e.startswith("AUTODEPLOY_ROUTES="))[len("AUTODEPLOY_ROUTES="):])
    got = sorted(i["address"] for i in routes["deployments"]["web"]["instances"])
    assert got == sorted(i["address"] for i in outputs["deployments"]["web"]["instances"])
    assert sorted(a.split(":")[0] for a in got) == ["10.0.0.1", "10.0.0.2"]


def test_node_selector_keeps_a_deployment_on_matching_nodes(tmp_path: Path) -> None:
    files = {"eu.yaml": doc("eu", replicas="minReplicas: 3").replace(
        "  state: running", "  placement: {nodeSelector: {zone: eu}}\n  state: running")}
    _, _, outputs = run(tmp_path, files, {"gatewayContainer": "false"})
    assert set(outputs["placements"].values()) == {"gpu-1"}


def test_bad_nodes_config_fails_the_update_with_1014(tmp_path: Path) -> None:
    with pytest.raises(AutoDeployError) as err:
        run(tmp_path, {"web.yaml": doc("web")}, {"nodes": [{"name": "x", "dockerHost": "tcp://x:2375"}]})
    assert err.value.error is SPEC_INVALID and "tcp:// without tls" in err.value.message


def test_tls_material_is_read_from_the_files_and_the_key_kept_secret(tmp_path: Path) -> None:
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text(f"-----{name}-----")
    tls = {"caCert": str(tmp_path / "ca.pem"), "cert": str(tmp_path / "cert.pem"), "key": str(tmp_path / "key.pem")}
    engine, _, _ = run(tmp_path, {"web.yaml": doc("web")},
                       {"nodes": [{"name": "t", "dockerHost": "tcp://t:2376", "tls": tls}], "gatewayContainer": "false"})
    provider = engine.of_type(PROVIDER)["docker-t"]
    assert provider["caMaterial"] == "-----ca.pem-----" and provider["certMaterial"] == "-----cert.pem-----"
    assert provider["keyMaterial"] != "-----key.pem-----"  # wrapped as a secret on the wire


def test_slots_keep_their_node_and_pins_while_they_fit() -> None:
    nodes = [NodeView("a", (Gpu(0, "A0", H100, 0), Gpu(1, "A1", H100, 0))), NodeView("b", (Gpu(0, "B0", H100, 0),))]
    one = GpuSpec(1, "H100")
    requests = [("m-0", "m", one, {}), ("m-1", "m", one, {})]
    first = place_slots_on_nodes(nodes, requests)
    # Packing fills b's lone GPU first; spread then sends m-1 to a.
    assert first == {"m-0": NodePlacement("b", ("B0",)), "m-1": NodePlacement("a", ("A0",))}
    pins, placements = {"m-0": ["B0"], "m-1": ["A0"]}, {"m-0": "b", "m-1": "a"}
    kept = place_slots_on_nodes(nodes, [*requests, ("m-2", "m", one, {})], pins, placements)
    assert kept == {**first, "m-2": NodePlacement("a", ("A1",))}
    gone = place_slots_on_nodes([nodes[0]], requests, pins, placements)  # node b removed from the stack
    assert gone == {"m-0": NodePlacement("a", ("A1",)), "m-1": NodePlacement("a", ("A0",))}
