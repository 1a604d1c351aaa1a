"""The stack config: the shipped stack files load, prices add up, bad values are named."""
from __future__ import annotations

from pathlib import Path

import pytest

from controller.errors import SPEC_INVALID, AutoDeployError
from controller.spec import GpuSpec
from controller.stack import DeclaredGpu, Prices, load_stack

REPO = Path(__file__).resolve().parent.parent


def write_stack(tmp_path: Path, body: str, stack: str = "dev") -> Path:
    (tmp_path / "stacks").mkdir(exist_ok=True)
    (tmp_path / "stacks" / f"Pulumi.{stack}.yaml").write_text(body)
    return tmp_path


def load_error(tmp_path: Path, body: str) -> str:
    write_stack(tmp_path, body)
    with pytest.raises(AutoDeployError) as info:
        load_stack(tmp_path, "dev")
    assert info.value.error is SPEC_INVALID
    return info.value.detail


# --- the shipped files

def test_dev_stack_runs_locally_with_one_declared_h100() -> None:
    dev = load_stack(REPO, "dev")
    assert dev.name == "dev"
    assert dev.source == "stacks/Pulumi.dev.yaml"
    assert dev.driver == "local"
    assert dev.deployments_dir == "deployments"
    assert dev.replicas == {}
    assert dev.gpus == [DeclaredGpu(index=0, name="NVIDIA H100 80GB HBM3", memory_mb=81559)]
    assert dev.docker_host == "unix:///var/run/docker.sock"
    assert (dev.gateway_host, dev.gateway_port) == ("127.0.0.1", 8080)


def test_prod_stack_uses_pulumi_on_eight_h100s() -> None:
    prod = load_stack(REPO, "prod")
    assert prod.driver == "pulumi"
    assert [g.index for g in prod.gpus] == list(range(8))
    assert {g.name for g in prod.gpus} == {"NVIDIA H100 80GB HBM3"}
    assert all(n >= 0 for n in prod.replicas.values())


def test_stack_files_live_where_pulumi_yaml_says() -> None:
    assert "stackConfigDir: stacks" in (REPO / "Pulumi.yaml").read_text()


def test_shipped_prices_match_the_documented_rates() -> None:
    prices = load_stack(REPO, "dev").prices
    assert prices.cpu == 0.05
    assert prices.gpu["H100"] == 2.49
    assert prices.gpu["A100"] == 1.60
    assert prices.gpu["T4"] == 0.35


def test_fully_qualified_stack_name_reads_the_short_file() -> None:
    assert load_stack(REPO, "acme/autodeploy/dev").source == "stacks/Pulumi.dev.yaml"


# --- prices

PRICES = Prices(cpu=0.05, gpu={"H100": 2.49, "A100": 1.60, "A100 80GB": 1.90, "T4": 0.35}, default_gpu=3.0)


def test_cpu_only_instance_costs_the_cpu_price() -> None:
    assert PRICES.per_hour(GpuSpec(0, None)) == pytest.approx(0.05)


def test_gpu_price_is_multiplied_by_count_and_added_to_cpu() -> None:
    assert PRICES.per_hour(GpuSpec(2, "H100")) == pytest.approx(0.05 + 2 * 2.49)


def test_gpu_price_key_matches_like_placement() -> None:
    assert PRICES.per_hour(GpuSpec(1, "NVIDIA H100 80GB HBM3")) == pytest.approx(0.05 + 2.49)
    assert PRICES.per_hour(GpuSpec(1, "NVIDIA T4")) == pytest.approx(0.05 + 0.35)


def test_most_specific_price_key_wins() -> None:
    assert PRICES.per_hour(GpuSpec(1, "NVIDIA A100-SXM4-80GB")) == pytest.approx(0.05 + 1.90)
    assert PRICES.per_hour(GpuSpec(1, "A100")) == pytest.approx(0.05 + 1.60)


def test_unknown_or_untyped_gpu_costs_the_default_gpu_price() -> None:
    assert PRICES.per_hour(GpuSpec(1, "V100")) == pytest.approx(0.05 + 3.0)
    assert PRICES.per_hour(GpuSpec(2, None)) == pytest.approx(0.05 + 6.0)


def test_unknown_gpu_without_default_price_is_a_coded_error() -> None:
    prices = Prices(cpu=0.05, gpu={"H100": 2.49}, source="stacks/Pulumi.dev.yaml")
    with pytest.raises(AutoDeployError) as info:
        prices.per_hour(GpuSpec(1, "V100"))
    assert info.value.error is SPEC_INVALID
    assert "stacks/Pulumi.dev.yaml" in info.value.detail and "defaultGpu" in info.value.detail


# --- defaults and accepted spellings

def test_empty_config_gives_the_defaults(tmp_path: Path) -> None:
    write_stack(tmp_path, "config: {}\n")
    cfg = load_stack(tmp_path, "dev")
    assert (cfg.driver, cfg.deployments_dir, cfg.replicas, cfg.gpus) == ("local", "deployments", {}, [])
    assert (cfg.gateway_host, cfg.gateway_port, cfg.docker_host) == ("127.0.0.1", 8080, None)
    assert cfg.prices.per_hour(GpuSpec(0)) == 0.0


def test_values_set_by_pulumi_config_set_as_strings_are_read(tmp_path: Path) -> None:
    write_stack(tmp_path, """config:
  autodeploy:gatewayPort: "9090"
  autodeploy:replicas: '{"breezyvoice": 2, "llm": 0}'
  autodeploy:gpus: '[{"index": 0, "name": "Tesla T4", "uuid": "GPU-abc"}]'
""")
    cfg = load_stack(tmp_path, "dev")
    assert cfg.gateway_port == 9090
    assert cfg.replicas == {"breezyvoice": 2, "llm": 0}
    assert cfg.gpus == [DeclaredGpu(index=0, name="Tesla T4", uuid="GPU-abc")]


def test_key_without_namespace_belongs_to_the_project(tmp_path: Path) -> None:
    write_stack(tmp_path, "config:\n  driver: docker\n")
    assert load_stack(tmp_path, "dev").driver == "docker"


def test_other_namespaces_and_secrets_are_kept_verbatim(tmp_path: Path) -> None:
    write_stack(tmp_path, """config:
  docker:host: unix:///var/run/docker.sock
  autodeploy:apiKey:
    secure: v1:abc
""")
    assert load_stack(tmp_path, "dev").extra == {"docker:host": "unix:///var/run/docker.sock",
                                                  "autodeploy:apiKey": {"secure": "v1:abc"}}


def test_pulumi_yaml_stack_config_dir_is_honoured(tmp_path: Path) -> None:
    (tmp_path / "Pulumi.yaml").write_text("name: x\nruntime: python\nstackConfigDir: conf\n")
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "Pulumi.dev.yaml").write_text("config:\n  autodeploy:gatewayPort: 7000\n")
    cfg = load_stack(tmp_path, "dev")
    assert (cfg.source, cfg.gateway_port) == ("conf/Pulumi.dev.yaml", 7000)


# --- errors: coded, naming the file, line and key

def test_missing_stack_file_names_the_file_and_the_stacks_there(tmp_path: Path) -> None:
    write_stack(tmp_path, "config: {}\n", stack="prod")
    with pytest.raises(AutoDeployError) as info:
        load_stack(tmp_path, "staging")
    assert info.value.error is SPEC_INVALID
    assert info.value.detail.startswith("stacks/Pulumi.staging.yaml: stack file not found")
    assert "stacks here: prod" in info.value.detail


def test_stack_name_with_a_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AutoDeployError, match="may hold only"):
        load_stack(tmp_path, "..\\evil")


def test_bad_port_names_file_line_and_key(tmp_path: Path) -> None:
    detail = load_error(tmp_path, "config:\n  autodeploy:driver: local\n  autodeploy:gatewayPort: abc\n")
    assert detail == "stacks/Pulumi.dev.yaml:3: autodeploy:gatewayPort: value must be an integer, got 'abc'"


def test_port_out_of_range_is_refused(tmp_path: Path) -> None:
    detail = load_error(tmp_path, "config:\n  autodeploy:gatewayPort: 70000\n")
    assert "autodeploy:gatewayPort" in detail and "1-65535" in detail


def test_unknown_driver_lists_the_drivers(tmp_path: Path) -> None:
    detail = load_error(tmp_path, "config:\n  autodeploy:driver: k8s\n")
    assert detail == "stacks/Pulumi.dev.yaml:2: autodeploy:driver: must be one of local, docker, pulumi, got 'k8s'"


def test_negative_replicas_are_refused(tmp_path: Path) -> None:
    detail = load_error(tmp_path, "config:\n  autodeploy:replicas: {tts: -1}\n")
    assert "autodeploy:replicas" in detail and "'tts'" in detail


def test_replicas_as_bad_json_says_so(tmp_path: Path) -> None:
    detail = load_error(tmp_path, "config:\n  autodeploy:replicas: '{tts: 1'\n")
    assert "autodeploy:replicas" in detail and "not valid JSON" in detail


def test_gpu_without_name_is_refused(tmp_path: Path) -> None:
    detail = load_error(tmp_path, "config:\n  autodeploy:gpus:\n    - {index: 0}\n")
    assert detail == "stacks/Pulumi.dev.yaml:2: autodeploy:gpus: item 0 needs `name`"


def test_gpu_with_unknown_key_is_refused(tmp_path: Path) -> None:
    detail = load_error(tmp_path, "config:\n  autodeploy:gpus:\n    - {index: 0, name: T4, memory: 1}\n")
    assert "autodeploy:gpus" in detail and "unknown key(s) memory" in detail


def test_repeated_gpu_index_is_refused(tmp_path: Path) -> None:
    detail = load_error(tmp_path, "config:\n  autodeploy:gpus:\n    - {index: 0, name: T4}\n"
                                  "    - {index: 0, name: T4}\n")
    assert "autodeploy:gpus" in detail and "repeated: 0" in detail


def test_negative_price_is_refused(tmp_path: Path) -> None:
    detail = load_error(tmp_path, "config:\n  autodeploy:prices: {cpu: 0.05, gpu: {H100: -1}}\n")
    assert "autodeploy:prices" in detail and "gpu.H100 must be 0 or more" in detail


def test_docker_host_without_scheme_is_refused(tmp_path: Path) -> None:
    detail = load_error(tmp_path, "config:\n  autodeploy:dockerHost: /var/run/docker.sock\n")
    assert "autodeploy:dockerHost" in detail and "unix:///var/run/docker.sock" in detail


def test_misspelt_key_suggests_the_right_one(tmp_path: Path) -> None:
    detail = load_error(tmp_path, "config:\n  autodeploy:gatewayport: 9000\n")
    assert detail == ("stacks/Pulumi.dev.yaml:2: unknown key autodeploy:gatewayport; "
                      "did you mean autodeploy:gatewayPort?")


def test_secret_for_a_controller_key_is_refused(tmp_path: Path) -> None:
    detail = load_error(tmp_path, "config:\n  autodeploy:dockerHost:\n    secure: v1:xyz\n")
    assert "autodeploy:dockerHost" in detail and "Pulumi secret" in detail


def test_duplicate_key_is_refused_with_its_line(tmp_path: Path) -> None:
    detail = load_error(tmp_path, "config:\n  autodeploy:gatewayPort: 1\n  autodeploy:gatewayPort: 2\n")
    assert detail.startswith("stacks/Pulumi.dev.yaml:3: not valid YAML: duplicate key")


def test_broken_yaml_names_the_line(tmp_path: Path) -> None:
    detail = load_error(tmp_path, "config:\n  autodeploy:driver: [local\n")
    assert detail.startswith("stacks/Pulumi.dev.yaml:") and "not valid YAML" in detail


def test_config_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    detail = load_error(tmp_path, "config: [1, 2]\n")
    assert detail.startswith("stacks/Pulumi.dev.yaml: `config:` must be a mapping")


def test_yaml_anchors_and_merge_keys_are_read(tmp_path: Path) -> None:
    write_stack(tmp_path, "base: &rates {cpu: 0.1}\nconfig:\n  autodeploy:prices:\n    <<: *rates\n"
                          "    defaultGpu: 1\n")
    assert load_stack(tmp_path, "dev").prices.per_hour(GpuSpec(1, "H100")) == pytest.approx(1.1)


def test_replicas_accept_the_slot_list_the_pulumi_driver_writes(tmp_path):
    from controller.stack import load_stack
    (tmp_path / "stacks").mkdir()
    (tmp_path / "stacks" / "Pulumi.x.yaml").write_text(
        'config:\n  autodeploy:replicas: \'{"hello": [0, 2], "tts": 3}\'\n')
    assert load_stack(tmp_path, "x").replicas == {"hello": (0, 2), "tts": 3}


def test_git_flags_override_the_stack_config_key_by_key_and_keep_its_token_for_its_own_repo() -> None:
    from controller.stack import GitStackConfig
    stack = GitStackConfig(repo="https://git.example.com/a.git", branch="prod", path="deploy", interval="10s",
                           credential="autodeploy:gitToken", username="deployer")
    assert stack.overridden(branch="main") == GitStackConfig(
        repo="https://git.example.com/a.git", branch="main", path="deploy", interval="10s",
        credential="autodeploy:gitToken", username="deployer")
    assert stack.overridden(repo="https://git.example.com/a.git", interval="1s").credential == "autodeploy:gitToken"
    # another repository on the command line: its own branch/path defaults from the stack, never the token
    other = stack.overridden(repo="https://elsewhere.example.com/b.git")
    assert (other.repo, other.branch, other.path, other.credential, other.username) == (
        "https://elsewhere.example.com/b.git", "prod", "deploy", None, None)
