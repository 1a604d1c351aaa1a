"""`autodeploy:nodes`: several Docker hosts in one stack file; bad values are coded 1014
with the file, line and key, like every other stack key."""
from __future__ import annotations

from pathlib import Path

import pytest

from controller.errors import SPEC_INVALID, AutoDeployError
from controller.stack import DeclaredGpu, NodeConfig, TlsPaths, effective_nodes, load_stack, prices_for
from controller.spec import GpuSpec

TWO_NODES = """\
config:
  autodeploy:driver: docker
  autodeploy:prices: {cpu: 0.05, gpu: {H100: 2.49}}
  autodeploy:nodes:
    - name: gpu-1
      dockerHost: unix:///var/run/docker.sock
      labels: {zone: eu, tier: premium}
      gpus: [{index: 0, name: NVIDIA H100 80GB HBM3}, {index: 1, name: NVIDIA H100 80GB HBM3}]
    - name: gpu-2
      dockerHost: ssh://deploy@gpu-2.internal
      gpus: {probeImage: "nvidia/cuda:12.4.1-base-ubuntu22.04"}
      prices: {cpu: 0.02, gpu: {H100: 1.99}}
    - name: gpu-3
      dockerHost: tcp://10.0.0.3:2376
      address: 10.0.1.3
      tls: {caCert: /etc/autodeploy/gpu-3/ca.pem, cert: /etc/autodeploy/gpu-3/cert.pem, key: /etc/autodeploy/gpu-3/key.pem}
"""


def write_stack(tmp_path: Path, body: str) -> Path:
    (tmp_path / "stacks").mkdir(exist_ok=True)
    (tmp_path / "stacks" / "Pulumi.dev.yaml").write_text(body)
    return tmp_path


def load_error(tmp_path: Path, body: str) -> str:
    write_stack(tmp_path, body)
    with pytest.raises(AutoDeployError) as info:
        load_stack(tmp_path, "dev")
    assert info.value.error is SPEC_INVALID
    return info.value.detail


def test_nodes_are_read_with_hosts_addresses_labels_gpus_tls_and_prices(tmp_path: Path) -> None:
    stack = load_stack(write_stack(tmp_path, TWO_NODES), "dev")
    one, two, three = stack.nodes
    assert (one.name, one.docker_host, one.address, one.labels) == \
        ("gpu-1", "unix:///var/run/docker.sock", "127.0.0.1", {"zone": "eu", "tier": "premium"})
    assert one.gpus == [DeclaredGpu(0, "NVIDIA H100 80GB HBM3"), DeclaredGpu(1, "NVIDIA H100 80GB HBM3")]
    assert (two.address, two.gpus, two.gpu_probe_image) == ("gpu-2.internal", [], "nvidia/cuda:12.4.1-base-ubuntu22.04")
    assert three.address == "10.0.1.3"
    assert three.tls == TlsPaths("/etc/autodeploy/gpu-3/ca.pem", "/etc/autodeploy/gpu-3/cert.pem",
                                 "/etc/autodeploy/gpu-3/key.pem")
    assert effective_nodes(stack) == stack.nodes


def test_per_node_prices_override_the_stack_prices(tmp_path: Path) -> None:
    stack = load_stack(write_stack(tmp_path, TWO_NODES), "dev")
    h100 = GpuSpec(count=1, type="H100")
    assert prices_for(stack, "gpu-1").per_hour(h100) == pytest.approx(0.05 + 2.49)
    assert prices_for(stack, "gpu-2").per_hour(h100) == pytest.approx(0.02 + 1.99)
    assert prices_for(stack, None).per_hour(h100) == pytest.approx(0.05 + 2.49)


def test_docker_host_alone_is_the_one_node_shorthand(tmp_path: Path) -> None:
    stack = load_stack(write_stack(tmp_path, "config:\n  autodeploy:dockerHost: ssh://me@box\n"
                                             "  autodeploy:gpus: [{index: 0, name: T4}]\n"), "dev")
    assert effective_nodes(stack) == [NodeConfig(name="local", docker_host="ssh://me@box", address="box",
                                                 gpus=[DeclaredGpu(0, "T4")])]
    bare = load_stack(write_stack(tmp_path, "config: {}\n"), "dev")
    assert effective_nodes(bare) == [NodeConfig(name="local", docker_host=None, address="127.0.0.1")]


@pytest.mark.parametrize("nodes, expected", [
    ("[{dockerHost: 'unix:///x.sock'}]", "item 0 needs `name`"),
    ("[{name: a}]", "node 'a' needs `dockerHost`"),
    ("[{name: A_1, dockerHost: 'unix:///x.sock'}]", "must be a DNS label"),
    ("[{name: a, dockerHost: 'docker.sock'}]", "dockerHost must start with unix://, ssh://, tcp://"),
    ("[{name: a, dockerHost: 'tcp://h:2375'}]", "tcp:// without tls"),
    ("[{name: a, dockerHost: 'ssh://h', tls: {caCert: c, cert: c, key: k}}]", "tls is for tcp:// engines"),
    ("[{name: a, dockerHost: 'tcp://h:2376', tls: {caCert: c}}]", "tls needs `cert`"),
    ("[{name: a, dockerHost: 'unix:///x.sock', labels: {gpu: true}}]", "quote values"),
    ("[{name: a, dockerHost: 'unix:///x.sock', gpus: [{index: 0}]}]", "node 'a' gpus: item 0 needs `name`"),
    ("[{name: a, dockerHost: 'unix:///x.sock', gpus: {image: x}}]", "unknown key(s) image"),
    ("[{name: a, dockerHost: 'unix:///x.sock', prices: {cpu: -1}}]", "node 'a' prices: cpu must be 0 or more"),
    ("[{name: a, dockerHost: 'unix:///x.sock', zone: eu}]", "unknown key(s) zone"),
    ("[{name: a, dockerHost: 'unix:///x.sock'}, {name: a, dockerHost: 'unix:///y.sock'}]", "repeated: a"),
    ("[{name: a, dockerHost: 'unix:///x.sock'}, {name: b, dockerHost: 'unix:///x.sock'}]", "same engine"),
    ("{name: a}", "must be a list of nodes"),
])
def test_bad_node_is_error_1014_with_file_line_and_key(tmp_path: Path, nodes: str, expected: str) -> None:
    detail = load_error(tmp_path, f"config:\n  autodeploy:driver: docker\n  autodeploy:nodes: {nodes}\n")
    assert detail.startswith("stacks/Pulumi.dev.yaml:3: autodeploy:nodes: ")
    assert expected in detail


def test_nodes_and_the_docker_host_shorthand_together_are_refused(tmp_path: Path) -> None:
    detail = load_error(tmp_path, "config:\n  autodeploy:dockerHost: unix:///x.sock\n"
                                  "  autodeploy:nodes: [{name: a, dockerHost: 'unix:///y.sock'}]\n")
    assert detail.startswith("stacks/Pulumi.dev.yaml:2: autodeploy:dockerHost is the one-node shorthand")


def test_nodes_set_by_pulumi_config_as_json_text_are_read(tmp_path: Path) -> None:
    stack = load_stack(write_stack(tmp_path, "config:\n  autodeploy:nodes: "
                                             "'[{\"name\": \"a\", \"dockerHost\": \"ssh://u@a\"}]'\n"), "dev")
    assert [(n.name, n.address) for n in stack.nodes] == [("a", "a")]


# --- spec.placement.nodeSelector

def _doc(placement: str) -> str:
    return ("apiVersion: autodeploy/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n"
            "  model: {id: m, version: v1}\n  command: run\n  port: 8080\n" + placement)


def test_node_selector_is_read_into_the_spec() -> None:
    from controller.loader import load_text
    result = load_text(_doc("  placement: {nodeSelector: {zone: eu, tier: premium}}\n"), "web.yaml")
    assert result.ok and result.deployments[0].node_selector == {"zone": "eu", "tier": "premium"}
    plain = load_text(_doc(""), "web.yaml").deployments[0]
    assert plain.node_selector == {}


def test_node_selector_value_that_is_not_text_is_an_error_with_its_line() -> None:
    from controller.loader import load_text
    result = load_text(_doc("  placement:\n    nodeSelector: {gpu: true}\n"), "web.yaml")
    assert not result.ok
    assert any(e.line == 9 and "nodeSelector" in str(e) for e in result.errors), [str(e) for e in result.errors]
