"""Nodes: the return-of-a-node decision, per-node prices and ledger, the GPU probe's
output, the status rows, and the docker driver with an engine that does not answer."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from controller.drivers.base import Instance
from controller.errors import NODE_UNREACHABLE, AutoDeployError
from controller.gpus import Gpu
from controller.nodes import NodeBook, NodePrices, NodeState, nodes_status, parse_probe_output, read_nodes_file, \
    write_nodes_file
from controller.policy.nodes import Stale, Want, returning_containers
from controller.spec import GpuSpec
from controller.stack import NodeConfig, Prices, StackConfig, TlsPaths
from controller.store import Store


# --- policy: what a returning node still runs

def test_stale_containers_are_adopted_only_while_the_deployment_wants_more() -> None:
    stale = [Stale("a1", "llm", "r2", True), Stale("a2", "llm", "r2", True), Stale("b1", "web", "r1", True)]
    wants = {"llm": Want("r2", wanted=2, alive=1), "web": Want("r1", wanted=3, alive=3)}
    assert returning_containers(stale, wants) == (["a1"], ["a2", "b1"])


def test_stale_containers_of_an_old_revision_a_stopped_deployment_or_not_running_are_stopped() -> None:
    stale = [Stale("x", "llm", "old", True), Stale("y", "gone", "r1", True), Stale("z", "llm", "r2", False)]
    assert returning_containers(stale, {"llm": Want("r2", wanted=5, alive=0)}) == ([], ["y", "x", "z"])  # by deployment, then id


# --- prices and the ledger

def test_node_prices_fall_back_to_the_stack_prices() -> None:
    stack = StackConfig(name="dev", prices=Prices(cpu=0.1, gpu={"H100": 2.0}),
                        nodes=[NodeConfig("cheap", "ssh://a", "a", prices=Prices(cpu=0.01, gpu={"H100": 1.0})),
                               NodeConfig("plain", "ssh://b", "b")])
    prices = NodePrices(stack)
    h100 = GpuSpec(1, "H100")
    assert prices.per_hour(h100, "cheap") == pytest.approx(1.01)
    assert prices.per_hour(h100, "plain") == pytest.approx(2.1)
    assert prices.per_hour(h100) == pytest.approx(2.1)


def test_the_ledger_records_the_node_that_served(tmp_path: Path) -> None:
    store = Store(tmp_path / "autodeploy.db")
    store.put_instance(Instance("i1", "llm", "r", "10.0.0.2", 30000, started_at=100.0, node="gpu-2"), "docker",
                       "ready", 3.6)
    store.put_instance(Instance("i2", "llm", "r", "127.0.0.1", 30001, started_at=100.0), "local", "ready", 0.36)
    assert [s.instance.node for s in store.instances()] == ["gpu-2", None]
    store.remove_instance("i1", 200.0)
    store.remove_instance("i2", 200.0)
    assert store.ledger_by_node() == {("llm", "gpu-2"): (100.0, pytest.approx(0.1)),
                                      ("llm", None): (100.0, pytest.approx(0.01))}
    store.close()


def test_a_database_from_before_nodes_gets_the_node_columns(tmp_path: Path) -> None:
    path = tmp_path / "autodeploy.db"
    with sqlite3.connect(path) as db:  # the schema as first shipped, with one row
        db.execute("CREATE TABLE instances (id TEXT PRIMARY KEY, deployment TEXT NOT NULL, revision TEXT NOT NULL,"
                   " driver TEXT NOT NULL, host TEXT NOT NULL, port INTEGER NOT NULL, pid INTEGER, pid_create_time"
                   " REAL, container_id TEXT, gpu_ids TEXT NOT NULL DEFAULT '[]', log_path TEXT, started_at REAL"
                   " NOT NULL, ready_at REAL, phase TEXT NOT NULL, price_per_hour REAL NOT NULL DEFAULT 0)")
        db.execute("INSERT INTO instances VALUES ('old', 'd', 'r', 'docker', '127.0.0.1', 1, NULL, NULL, 'c', '[]',"
                   " NULL, 1.0, NULL, 'ready', 0.5)")
    store = Store(path)
    assert [(s.instance.id, s.instance.node) for s in store.instances()] == [("old", None)]
    store.remove_instance("old", 3.0)
    assert store.ledger_by_node() == {("d", None): (2.0, pytest.approx(2.0 * 0.5 / 3600))}
    store.close()


# --- inventory and status

def test_probe_output_of_nvidia_smi_becomes_gpus() -> None:
    out = ("0, GPU-aaaa, NVIDIA H100 80GB HBM3, 81559\n1, GPU-bbbb, NVIDIA H100 80GB HBM3, 81559\n"
           "No devices were found\n")
    assert parse_probe_output(out) == [Gpu(0, "GPU-aaaa", "NVIDIA H100 80GB HBM3", 81559),
                                       Gpu(1, "GPU-bbbb", "NVIDIA H100 80GB HBM3", 81559)]


def test_node_status_counts_gpus_used_and_lists_instances() -> None:
    gpus = (Gpu(0, "declared-0", "H100", 0), Gpu(1, "declared-1", "H100", 0))
    book = NodeBook([NodeState("a", "10.0.0.1", "ssh://a", {"zone": "eu"}, gpus, "stack config"),
                     NodeState("b", "10.0.0.2", "ssh://b")])
    assert book.mark("b", False, "ping: refused", now=5.0) is True
    assert book.mark("b", False, "ping: refused", now=6.0) is False
    [a, b] = nodes_status(book, {"i1": ("a", "llm", ["declared-1"]), "i2": ("a", "web", [])})
    assert (a["reachable"], a["gpus"]["used"], a["gpus"]["free"], a["labels"]) == (True, 1, 1, {"zone": "eu"})
    assert [i["id"] for i in a["instances"]] == ["i1", "i2"]
    assert [g["used"] for g in a["gpus"]["items"]] == [False, True]
    assert (b["reachable"], b["error"], b["since"], b["instances"]) == (False, "ping: refused", 5.0, [])
    assert book.mark("b", True, "", now=7.0) and book.get("b").generation == 1


def test_the_nodes_file_round_trips_for_the_logs_command(tmp_path: Path) -> None:
    nodes = [NodeConfig("a", "tcp://a:2376", "a", tls=TlsPaths("ca.pem", "cert.pem", "key.pem")),
             NodeConfig("local", None, "127.0.0.1")]
    write_nodes_file(tmp_path, nodes)
    assert read_nodes_file(tmp_path) == nodes


# --- the docker driver with a node whose engine does not answer (real local engine)

@pytest.mark.docker
def test_a_node_that_does_not_answer_is_marked_and_never_blocks_calls(tmp_path: Path) -> None:
    from docker_images import docker_client_or_skip
    docker_client_or_skip().close()
    from controller.drivers.docker import DockerDriver
    events: list[tuple[str, str, str]] = []
    driver = DockerDriver(nodes=[NodeConfig("here", "unix:///var/run/docker.sock", "127.0.0.1"),
                                 NodeConfig("away", f"unix://{tmp_path}/none.sock", "127.0.0.9",
                                            labels={"zone": "x"})],
                          on_event=lambda *e: events.append(e), ping_interval=0.2)
    try:
        away = driver.nodes.get("away")
        assert not away.reachable and "no Docker Engine answers" in away.error
        assert driver.nodes.get("here").reachable
        assert events and events[0][:2] == ("away", "unreachable")
        ghost = Instance("gggggggg", "d", "r", "127.0.0.9", 1, started_at=0.0, container_id="c", node="away")
        assert driver.poll(ghost) is None  # the node watch takes it out, not a crash
        driver.stop(ghost, timeout=1)       # returns at once: reconciled when the node returns
        assert driver.adopt(ghost) is False and driver.stats(ghost) == {}
        assert [i for i in driver.discover() if i.node == "away"] == []
        from controller.spec import Deployment
        dep = Deployment(name="d", model_id="m", model_version="v", command="true", port=80, image="x:1")
        with pytest.raises(AutoDeployError) as err:
            driver.start(dep, "hhhhhhhh", [], node="away")
        assert err.value.error is NODE_UNREACHABLE and err.value.to_json()["code"] == 1041
    finally:
        driver.close()


def test_no_engine_answering_at_all_is_error_1015_naming_every_node(tmp_path: Path) -> None:
    from controller.drivers.docker import DockerDriver
    from controller.errors import DRIVER_FAILED
    with pytest.raises(AutoDeployError) as err:
        DockerDriver(nodes=[NodeConfig("a", f"unix://{tmp_path}/a.sock", "127.0.0.1"),
                            NodeConfig("b", f"unix://{tmp_path}/b.sock", "127.0.0.2")])
    assert err.value.error is DRIVER_FAILED
    assert "node a:" in err.value.message and "node b:" in err.value.message


@pytest.mark.docker
def test_gpu_probe_says_why_it_found_no_gpus(tmp_path: Path) -> None:
    from docker_images import busybox_image, docker_client_or_skip
    client = docker_client_or_skip()
    image = busybox_image(client)
    client.close()
    from controller.drivers.docker import DockerDriver
    driver = DockerDriver(nodes=[
        NodeConfig("absent", "unix:///var/run/docker.sock", "127.0.0.1", gpu_probe_image="autodeploy-test/no-probe:1"),
    ])
    try:
        state = driver.nodes.get("absent")
        assert (state.gpus, state.gpu_source) == ((), "none")
        assert "probe image 'autodeploy-test/no-probe:1' is not on node absent" in state.gpu_detail
    finally:
        driver.close()
    # An image that is there but has no nvidia-smi (and an engine without the NVIDIA
    # runtime): the probe runs and its failure is the detail, never a crash.
    driver = DockerDriver(nodes=[NodeConfig("plain", "unix:///var/run/docker.sock", "127.0.0.1",
                                            gpu_probe_image=image)])
    try:
        state = driver.nodes.get("plain")
        assert state.gpus == () and state.gpu_detail
        assert state.gpu_detail.startswith(f"probing GPUs with {image} failed") or \
            state.gpu_detail == "nvidia-smi listed no GPU"
        assert not driver.client.containers.list(all=True, filters={"name": "autodeploy-gpu-probe-plain"})
    finally:
        driver.close()
