"""The YAML contract: schema, loader errors (with exact lines), conversion, examples."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from controller.loader import (SCHEMA_PATH, LoadResult, SpecError, load_paths, load_schema, load_text,
                               parse_duration)
from controller.spec import (Autoscaling, Deployment, GpuSpec, HealthCheck, LoadBalancer, Resources,
                             Rollout, Scaling)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "deployments").glob("*.yaml"))

# Lines 1-8; tests append spec keys from line 9 on, or replace a line.
BASE = """\
apiVersion: autodeploy/v1
kind: Deployment
metadata:
  name: demo
spec:
  model: {id: demo, version: v1}
  command: python3 serve.py
  port: 8080
"""


def doc(extra: str = "", replace: tuple[str, str] | None = None) -> str:
    text = BASE + extra
    if replace:
        assert replace[0] in text
        text = text.replace(replace[0], replace[1])
    return text


def errors_of(text: str, require_image: bool = False) -> list[tuple[int, str]]:
    result = load_text(text, "d.yaml", require_image=require_image)
    return [(e.line, e.message) for e in result.errors]


def one_error(text: str, require_image: bool = False) -> tuple[int, str]:
    errors = errors_of(text, require_image)
    assert len(errors) == 1, errors
    return errors[0]


def load_one(text: str) -> Deployment:
    result = load_text(text, "d.yaml")
    assert result.ok, [str(e) for e in result.errors]
    (deployment,) = result.deployments
    return deployment


# --- the schema itself ---------------------------------------------------------------------

def _walk_properties(node: dict[str, Any], where: str = ""):
    """Yield (dotted path, property schema, parent object schema) for every field."""
    defs = load_schema()["$defs"]
    for key, sub in node.get("properties", {}).items():
        path = f"{where}.{key}" if where else key
        yield path, sub, node
        resolved = {**defs[sub["$ref"].split("/")[-1]], **sub} if "$ref" in sub else sub
        yield from _walk_properties(resolved, path)


def test_schema_is_valid_json_schema_2020_12():
    schema = load_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)


def test_every_schema_field_has_a_description_and_optional_fields_a_default():
    for path, sub, parent in _walk_properties(load_schema()):
        assert sub.get("description"), f"{path} has no description"
        required = path.split(".")[-1] in parent.get("required", [])
        if not required and path != "spec.loadBalancer.healthCheck":  # absent = no HTTP check
            assert "default" in sub, f"{path} has no default"


def test_every_schema_object_forbids_unknown_keys():
    objects = [("(root)", load_schema())] + [(p, s) for p, s, _ in _walk_properties(load_schema())
                                            if s.get("type") == "object"]
    for path, sub in objects:
        if "properties" in sub:
            assert sub.get("additionalProperties") is False, f"{path} allows unknown keys"


def _document_of_schema_defaults() -> dict[str, Any]:
    """BASE with every defaulted field written out with its schema default."""
    data = yaml.safe_load(BASE)

    def fill(schema_node: dict[str, Any], target: dict[str, Any]) -> None:
        for key, sub in schema_node.get("properties", {}).items():
            if "properties" in sub:
                if "default" in sub or key in schema_node.get("required", []) or key in target:
                    fill(sub, target.setdefault(key, {}))
            elif "default" in sub and key not in target:
                target[key] = sub["default"]

    # healthCheck has no default (absent = no HTTP check); written, only `path` is required.
    data["spec"]["loadBalancer"] = {"healthCheck": {"path": "/h"}}
    fill(load_schema(), data)
    return data


def test_schema_defaults_equal_the_dataclass_defaults():
    minimal = load_one(BASE)
    explicit_data = _document_of_schema_defaults()
    assert explicit_data["spec"]["scaling"]["autoscaling"]["panicThreshold"] == 2.0  # filled in
    assert explicit_data["spec"]["loadBalancer"]["healthCheck"]["failureThreshold"] == 3
    explicit = load_one(yaml.safe_dump(explicit_data, sort_keys=False))
    assert explicit.load_balancer.health_check == HealthCheck("/h")
    minimal_with_check = load_one(doc("  loadBalancer: {healthCheck: {path: /h}}\n"))
    assert explicit == minimal_with_check
    assert dataclasses.replace(minimal_with_check, load_balancer=LoadBalancer()) == minimal
    # ...and the minimal document leaves every optional dataclass field at its default.
    assert minimal.scaling == Scaling()
    assert minimal.resources == Resources()
    assert minimal.load_balancer == LoadBalancer()
    assert minimal.rollout == Rollout()
    assert (minimal.environment, minimal.state, minimal.image, minimal.start_timeout_s) == (
        "development", "running", None, 300.0)


def test_schema_file_is_the_one_in_schemas_dir():
    assert SCHEMA_PATH == REPO / "schemas" / "deployment.schema.json"


# --- durations -----------------------------------------------------------------------------

@pytest.mark.parametrize("text,seconds", [
    ("500ms", 0.5), ("30s", 30), ("10m", 600), ("1h", 3600), ("1h30m", 5400), ("2m30s", 150),
    ("1.5h", 5400), ("45", 45), (45, 45), (2.5, 2.5), ("0", 0), ("1h0m1s500ms", 3601.5),
])
def test_parse_duration_accepts_units_and_plain_seconds(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10 minutes", "5d", "m", "-5s", "1h 30m", "10M", True, -3, "1.s"])
def test_parse_duration_rejects_what_the_schema_rejects(text):
    with pytest.raises(ValueError):
        parse_duration(text)
    if isinstance(text, str):
        assert not re.fullmatch(load_schema()["$defs"]["duration"]["pattern"], text)


def test_schema_duration_pattern_accepts_what_parse_duration_accepts():
    pattern = load_schema()["$defs"]["duration"]["pattern"]
    for text in ["500ms", "30s", "10m", "1h", "1h30m", "45", "1.5h"]:
        assert re.search(pattern, text), text


# --- conversion ----------------------------------------------------------------------------

FULL = """\
apiVersion: autodeploy/v1
kind: Deployment
metadata:
  name: full
  description: every field
  environment: staging
  labels: {team: ml, tier/x: a.b}
spec:
  model: {id: m-1, version: "2.1"}
  image: example/full:v2
  command: python api.py --port ${PORT}
  port: 9000
  env:
    LOG_LEVEL: debug
    API_KEY: {secret: apiKey}
  resources: {cpu: 4, memoryGb: 16, gpu: {count: 2, type: NVIDIA T4}, storageGb: 200, bandwidthMbps: 1000}
  scaling:
    minReplicas: 1
    maxReplicas: 4
    idleTimeout: 1h30m
    startTimeout: 90
    autoscaling:
      enabled: true
      targetConcurrency: 4
      targetCpuUtilization: 70
      targetMemoryUtilization: 80
      targetGpuUtilization: 90
      stableWindow: 2m
      panicWindow: 500ms
      panicThreshold: 3
      scaleDownDelay: 1m
  loadBalancer:
    algorithm: ip-hash
    stickySessions: true
    healthCheck: {path: /healthz, intervalSeconds: 15, timeoutSeconds: 2, failureThreshold: 5}
  rollout:
    strategy: canary
    maxSurge: 1
    maxUnavailable: "0%"
    steps: [5, 25, 100]
    stepPause: 1m
    keepOldFor: 10m
  state: stopped
"""


def test_every_field_converts_to_the_dataclass():
    d = load_one(FULL)
    assert d == Deployment(
        name="full", model_id="m-1", model_version="2.1", command="python api.py --port ${PORT}",
        port=9000, description="every field", environment="staging", image="example/full:v2",
        env={"LOG_LEVEL": "debug"}, secret_env={"API_KEY": "apiKey"},
        labels={"team": "ml", "tier/x": "a.b"},
        resources=Resources(cpu=4.0, memory_gb=16.0, gpu=GpuSpec(2, "NVIDIA T4"), storage_gb=200.0,
                            bandwidth_mbps=1000.0),
        scaling=Scaling(min_replicas=1, max_replicas=4, idle_timeout_s=5400.0, autoscaling=Autoscaling(
            enabled=True, target_concurrency=4.0, target_cpu_utilization=70.0,
            target_memory_utilization=80.0, target_gpu_utilization=90.0, stable_window_s=120.0,
            panic_window_s=0.5, panic_threshold=3.0, scale_down_delay_s=60.0)),
        load_balancer=LoadBalancer("ip-hash", True, HealthCheck("/healthz", 15.0, 2.0, 5)),
        rollout=Rollout("canary", "1", "0%", (5, 25, 100), 60.0, 600.0),
        state="stopped", start_timeout_s=90.0, source_file="d.yaml", source_line=1,
    )
    assert d.raw == yaml.safe_load(FULL)


def test_secret_env_values_never_reach_env_or_the_template_hash_inputs():
    d = load_one(doc("  env: {API_KEY: {secret: apiKey}, MODE: fast}\n"))
    assert d.env == {"MODE": "fast"}
    assert d.secret_env == {"API_KEY": "apiKey"}
    other = load_one(doc("  env: {API_KEY: {secret: otherKey}, MODE: fast}\n"))
    assert d.template_hash != other.template_hash  # a new config key means new instances


def test_equal_documents_give_equal_revisions():
    assert load_one(BASE).revision == load_one(BASE + "\n# a comment\n").revision
    assert load_one(BASE).revision != load_one(doc("  state: stopped\n")).revision


def test_yaml_merge_keys_are_followed():
    text = doc("  scaling: &s {maxReplicas: 4}\n  loadBalancer:\n    <<: {algorithm: ip-hash}\n")
    assert load_one(text).load_balancer.algorithm == "ip-hash"


# --- errors, each at its exact line ----------------------------------------------------------

@pytest.mark.parametrize("text,line,fragments", [
    pytest.param(doc(replace=("autodeploy/v1", "apps/v1")), 1,
                 ["apiVersion must be autodeploy/v1", "'apps/v1'"], id="apiVersion"),
    pytest.param(doc(replace=("kind: Deployment", "kind: Service")), 2,
                 ["kind must be Deployment", "'Service'"], id="kind"),
    pytest.param(doc(replace=("name: demo", "name: My_Model")), 4,
                 ["not a DNS label", "e.g. 'my-model'"], id="name-not-dns"),
    pytest.param(doc(replace=("name: demo", "name: " + "a" * 64)), 4,
                 ["64 characters long", "at most 63"], id="name-too-long"),
    pytest.param(doc(replace=("name: demo", "name: -demo")), 4, ["not a DNS label"], id="name-leading-dash"),
    pytest.param(doc(replace=("  name: demo\n", "  description: x\n")), 3,
                 ["metadata is missing the required key 'name'"], id="missing-name"),
    pytest.param(doc(replace=("  command: python3 serve.py\n", "")), 5,
                 ["spec is missing the required key 'command'", "start command"], id="missing-command"),
    pytest.param(doc(replace=("  port: 8080\n", "")), 5,
                 ["spec is missing the required key 'port'"], id="missing-port"),
    pytest.param(doc(replace=("{id: demo, version: v1}", "{id: demo}")), 6,
                 ["spec.model is missing the required key 'version'"], id="missing-version"),
    pytest.param(doc(replace=("version: v1", "version: 2.1")), 6,
                 ['spec.model.version must be text; put it in quotes: "2.1"'], id="version-number"),
    pytest.param(doc(replace=("python3 serve.py", '"   "')), 7, ["spec.command is blank"], id="command-blank"),
    pytest.param(doc(replace=("python3 serve.py", "")), 7, ["spec.command has no value"], id="command-empty"),
    pytest.param(doc(replace=("8080", "0")), 8, ["spec.port must be at least 1"], id="port-zero"),
    pytest.param(doc(replace=("8080", "70000")), 8, ["spec.port must be at most 65535"], id="port-high"),
    pytest.param(doc(replace=("8080", '"8080"')), 8, ["spec.port must be a whole number", "'8080'"],
                 id="port-text"),
    pytest.param(doc("  env:\n    LOG: info\n    1BAD: x\n"), 11,
                 ["env name '1BAD' is not a valid environment variable name"], id="env-name"),
    pytest.param(doc("  env:\n    WORKERS: 4\n"), 10, ['env WORKERS must be text', 'quotes: "4"'], id="env-number"),
    pytest.param(doc("  env:\n    DEBUG: yes\n"), 10, ['quotes: "yes"'], id="env-yaml-bool"),
    pytest.param(doc("  env:\n    KEY: {secrt: k}\n"), 10, ["{secret: CONFIG_KEY}", "remove secrt"],
                 id="env-secret-typo"),
    pytest.param(doc("  env:\n"), 9, ["spec.env has no value", "remove the line"], id="env-null"),
    pytest.param(doc("  scaling:\n    maxReplica: 3\n"), 10,
                 ["unknown key 'maxReplica' in spec.scaling; did you mean 'maxReplicas'?"], id="did-you-mean"),
    pytest.param(doc("  scaling:\n    min_replicas: 1\n"), 10,
                 ["did you mean 'minReplicas'?"], id="snake-case"),
    pytest.param(doc("  maxReplicas: 3\n"), 9,
                 ["unknown key 'maxReplicas' in spec", "belongs under spec.scaling"], id="wrong-place"),
    pytest.param(doc("  frobnicate: 3\n"), 9, ["unknown key 'frobnicate' in spec", "allowed keys here: model"],
                 id="unknown-key"),
    pytest.param(doc("  loadBalancer: {algorithm: least-connection}\n"), 9,
                 ["must be one of round-robin, least-connections, ip-hash", "did you mean 'least-connections'?"],
                 id="enum"),
    pytest.param(doc(replace=("  name: demo\n", "  name: demo\n  environment: Production\n")), 5,
                 ["did you mean 'production'?"], id="enum-case"),
    pytest.param(doc("  scaling:\n    idleTimeout: 10 minutes\n"), 10,
                 ["'10 minutes' is not a duration", "1h30m"], id="duration"),
    pytest.param(doc("  scaling:\n    maxReplicas: 2\n    minReplicas: 3\n"), 11,
                 ["minReplicas (3) is more than maxReplicas (2)"], id="min-over-max"),
    pytest.param(doc("  scaling:\n    minReplicas: 2\n"), 10,
                 ["minReplicas (2) is more than maxReplicas (1, the default)"], id="min-over-default-max"),
    pytest.param(doc("  scaling:\n    maxReplicas: 0\n"), 10,
                 ["maxReplicas must be at least 1", "spec.state: stopped"], id="max-zero"),
    pytest.param(doc("  scaling:\n    startTimeout: 0s\n"), 10, ["startTimeout is 0"], id="start-timeout-zero"),
    pytest.param(doc("  resources:\n    gpu: {type: H100}\n"), 10,
                 ["gpu.type is H100 but gpu.count is 0"], id="gpu-type-without-count"),
    pytest.param(doc("  resources:\n    cpu: 0\n"), 10, ["spec.resources.cpu must be more than 0"], id="cpu-zero"),
    pytest.param(doc("  loadBalancer:\n    healthCheck:\n      path: /h\n      intervalSeconds: 5\n"
                     "      timeoutSeconds: 5\n"), 13,
                 ["timeoutSeconds (5) must be less than intervalSeconds (5)"], id="health-timeout"),
    pytest.param(doc("  loadBalancer:\n    healthCheck: {path: /h, intervalSeconds: 3}\n"), 10,
                 ["timeoutSeconds (5) must be less than intervalSeconds (3)"], id="health-default-timeout"),
    pytest.param(doc("  loadBalancer:\n    healthCheck: {path: health}\n"), 10,
                 ["must start with '/'"], id="health-path"),
    pytest.param(doc("  loadBalancer:\n    healthCheck: {intervalSeconds: 10}\n"), 10,
                 ["healthCheck is missing the required key 'path'"], id="health-no-path"),
    pytest.param(doc("  rollout:\n    strategy: canary\n    steps:\n      - 10\n      - 50\n      - 50\n      - 100\n"),
                 14, ["must increase strictly: 50 comes after 50"], id="canary-not-increasing"),
    pytest.param(doc("  rollout:\n    steps:\n      - 10\n      - 50\n"), 12,
                 ["must end at 100", "ends at 50"], id="canary-not-ending-at-100"),
    pytest.param(doc("  rollout:\n    steps: [10, 150]\n"), 10, ["steps[1] must be at most 100"], id="canary-over-100"),
    pytest.param(doc("  rollout:\n    steps: []\n"), 10, ["empty list"], id="canary-empty"),
    pytest.param(doc("  rollout:\n    maxSurge: 0\n    maxUnavailable: 0%\n"), 11,
                 ["maxSurge and maxUnavailable are both 0"], id="rolling-stuck"),
    pytest.param(doc("  rollout:\n    maxSurge: 150%\n"), 10, ["percentage from 0% to 100%"], id="surge-percent"),
    pytest.param(doc("  scaling:\n    autoscaling:\n      targetConcurrency: 0\n"), 11,
                 ["targetConcurrency must be more than 0"], id="concurrency-zero"),
    pytest.param(doc("  scaling:\n    autoscaling:\n      enabled: true\n"), 11,
                 ["autoscaling is enabled but has no target"], id="autoscaling-no-target"),
    pytest.param(doc("  scaling:\n    autoscaling: {targetCpuUtilization: 120}\n"), 10,
                 ["targetCpuUtilization must be at most 100"], id="cpu-target-over-100"),
    pytest.param(doc("  scaling:\n    autoscaling: {panicWindow: 2m}\n"), 10,
                 ["panicWindow (120s) must be shorter than stableWindow (60s)"], id="panic-window"),
    pytest.param(doc("  scaling:\n    autoscaling: {panicThreshold: 1}\n"), 10,
                 ["panicThreshold must be more than 1"], id="panic-threshold"),
    pytest.param(doc("  tunnelTimeout: 0s\n"), 9, ["tunnelTimeout and spec.tunnelIdleTimeout must be more than 0"],
                 id="tunnel-timeout-zero"),
    pytest.param(doc("  tunnelTimeout: 10m\n  tunnelIdleTimeout: 1h\n"), 10,
                 ["tunnelIdleTimeout (3600s) is longer than spec.tunnelTimeout (600s)"], id="tunnel-idle-too-long"),
    pytest.param(doc("  state: paused\n"), 9, ["must be one of running, stopped"], id="state"),
    pytest.param(doc("  scaling: 5\n"), 9, ["spec.scaling must be a mapping"], id="section-not-mapping"),
    pytest.param(doc(replace=("  name: demo\n", "  name: demo\n  labels: {'bad key': x}\n")), 5,
                 ["metadata.labels key 'bad key' is not valid"], id="label-key"),
    pytest.param(doc("  port: 9090\n"), 9,
                 ["key 'port' appears twice in the same mapping (first on line 8)"], id="duplicate-key"),
    pytest.param("- just\n- a list\n", 1, ["must be a mapping with apiVersion, kind, metadata and spec"],
                 id="not-a-mapping"),
    pytest.param(doc("  scaling:\n  maxReplicas: 2\n   minReplicas: 1\n"), 11, ["YAML syntax error"],
                 id="yaml-syntax"),
    pytest.param(doc("  scaling:\n\tmaxReplicas: 2\n"), 10, ["YAML syntax error", "tab"], id="yaml-tab"),
])
def test_error_is_reported_once_at_the_offending_line(text, line, fragments):
    got_line, message = one_error(text)
    for fragment in fragments:
        assert fragment in message, message
    assert got_line == line, message


def test_missing_required_sections_are_reported_at_the_document_start():
    errors = errors_of("# header\n\napiVersion: autodeploy/v1\nkind: Deployment\n")
    assert errors == [
        (3, "the document is missing the required key 'metadata'; add `metadata:` with at least `name:`"),
        (3, "the document is missing the required key 'spec'; add `spec:` with at least model, command and port"),
    ]


def test_missing_image_is_an_error_only_when_the_driver_needs_one():
    gpu_without_image = doc("  resources: {gpu: {count: 1}}\n")
    assert errors_of(gpu_without_image) == []  # the local driver runs the command as is
    line, message = one_error(gpu_without_image, require_image=True)
    assert line == 5 and "spec.image is required by the docker and pulumi drivers" in message
    assert errors_of(doc("  image: x:1\n"), require_image=True) == []


def test_every_error_in_a_document_is_reported_at_once():
    text = doc("  scaling:\n    maxReplica: 3\n    idleTimeout: soon\n  state: paused\n",
               replace=("8080", "0"))
    assert [line for line, _ in errors_of(text)] == [8, 10, 11, 12]


def test_invalid_document_yields_no_deployment_but_its_valid_neighbours_do():
    text = BASE + "---\n" + doc(replace=("name: demo", "name: other")).replace("8080", "0")
    result = load_text(text, "d.yaml")
    assert [d.name for d in result.deployments] == ["demo"]
    assert [str(e) for e in result.errors] == ["d.yaml:17: spec.port must be at least 1; found 0"]


def test_spec_error_prints_as_file_colon_line():
    assert str(SpecError("a.yaml", 3, "fix it")) == "a.yaml:3: fix it"
    assert str(SpecError("a.yaml", 0, "cannot be read")) == "a.yaml: cannot be read"


# --- multi-document files, directories and name clashes ------------------------------------

def test_several_documents_per_file_with_empty_ones_ignored():
    other = BASE.replace("name: demo", "name: other")
    text = "---\n" + BASE + "---\n---\n# only a comment\n---\n" + other + "---\n"
    result = load_text(text, "multi.yaml")
    assert result.ok, result.errors
    assert [(d.name, d.source_line) for d in result.deployments] == [("demo", 2), ("other", 14)]


def test_errors_in_later_documents_have_file_lines_not_document_lines():
    text = BASE + "---\n" + BASE.replace("name: demo", "name: two").replace("8080", "x")
    assert errors_of(text) == [(17, "spec.port must be a whole number, not 'x'")]


def test_syntax_error_in_a_later_document_keeps_the_earlier_ones():
    text = BASE + "---\nkey: [unclosed\n"
    result = load_text(text, "d.yaml")
    assert [d.name for d in result.deployments] == ["demo"]
    assert [e.line for e in result.errors] == [11]


def test_duplicate_names_across_files_point_at_the_first(tmp_path):
    (tmp_path / "a.yaml").write_text(BASE)
    (tmp_path / "b.yaml").write_text("# same name again\n" + BASE)
    result = load_paths([tmp_path])
    assert [d.source_file for d in result.deployments] == [str(tmp_path / "a.yaml")]
    assert [str(e) for e in result.errors] == [
        f"{tmp_path / 'b.yaml'}:5: metadata.name 'demo' is already used by {tmp_path / 'a.yaml'}:4; "
        "names must be unique across all files"]


def test_duplicate_names_within_one_file_are_reported():
    errors = errors_of(BASE + "---\n" + BASE)
    assert errors == [(13, "metadata.name 'demo' is already used by d.yaml:4; names must be unique across all files")]


def test_all_errors_across_all_files_are_reported_in_one_load(tmp_path):
    (tmp_path / "1-bad.yaml").write_text(doc("  scaling: {maxReplica: 2}\n", replace=("8080", "0")))
    (tmp_path / "2-good.yml").write_text(BASE.replace("name: demo", "name: good"))
    (tmp_path / "3-bad.yaml").write_text(BASE.replace("name: demo", "name: Bad"))
    (tmp_path / "4-broken.yaml").write_text("a: [\n")
    result = load_paths([tmp_path])
    assert [(Path(e.file).name, e.line) for e in result.errors] == [
        ("1-bad.yaml", 8), ("1-bad.yaml", 9), ("3-bad.yaml", 4), ("4-broken.yaml", 2)]
    assert [d.name for d in result.deployments] == ["good"]
    assert not result.ok


def test_directories_load_yaml_and_yml_sorted_and_not_recursively(tmp_path):
    (tmp_path / "b.yml").write_text(BASE.replace("name: demo", "name: b"))
    (tmp_path / "a.yaml").write_text(BASE.replace("name: demo", "name: a"))
    (tmp_path / "notes.txt").write_text("not yaml: [")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.yaml").write_text(BASE.replace("name: demo", "name: c"))
    result = load_paths([tmp_path])
    assert result.ok
    assert [d.name for d in result.deployments] == ["a", "b"]
    assert result.files == [str(tmp_path / "a.yaml"), str(tmp_path / "b.yml")]


def test_a_file_named_twice_is_read_once(tmp_path):
    (tmp_path / "a.yaml").write_text(BASE)
    result = load_paths([tmp_path, tmp_path / "a.yaml"])
    assert result.ok and len(result.deployments) == 1


def test_missing_and_non_utf8_files_are_file_level_errors(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes("description: caf\xe9\n".encode("latin-1"))
    result = load_paths([tmp_path / "nope.yaml", tmp_path / "latin1.yaml"])
    assert [(Path(e.file).name, e.line) for e in result.errors] == [("nope.yaml", 0), ("latin1.yaml", 0)]
    assert "No such file" in result.errors[0].message
    assert "not UTF-8" in result.errors[1].message


# --- the shipped examples -------------------------------------------------------------------

def test_examples_exist():
    assert {p.name for p in EXAMPLES} >= {"hello.yaml", "breezyvoice.yaml", "bert-sentiment.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_validates(path):
    result = load_paths([path])
    assert result.ok, [str(e) for e in result.errors]
    assert result.deployments


def test_examples_validate_together_with_unique_names():
    result: LoadResult = load_paths([REPO / "deployments"])
    assert result.ok, [str(e) for e in result.errors]


def test_only_hello_runs_on_a_laptop_the_gpu_examples_ship_stopped():
    by_name = {d.name: d for d in load_paths([REPO / "deployments"]).deployments}
    assert by_name["hello"].state == "running"
    assert by_name["hello"].resources.gpu.count == 0
    for name in ("breezyvoice", "bert-sentiment"):
        assert by_name[name].state == "stopped"
        assert by_name[name].resources.gpu.count > 0


def test_gpu_examples_validate_for_the_docker_and_pulumi_drivers():
    assert load_paths([REPO / "deployments"], require_image=True).ok


def test_examples_say_what_the_seed_guides_say():
    by_name = {d.name: d for d in load_paths([REPO / "deployments"]).deployments}
    hello, breezy, bert = by_name["hello"], by_name["breezyvoice"], by_name["bert-sentiment"]
    assert (hello.port, hello.scaling.min_replicas, hello.scaling.max_replicas,
            hello.scaling.idle_timeout_s) == (8080, 0, 3, 120.0)
    assert hello.load_balancer.health_check == HealthCheck("/health", interval_s=10.0)
    assert (breezy.command, breezy.port, breezy.image) == (
        "cd /BreezyVoice && python api.py", 8080, "example/breezyvoice:v1.2.0")
    assert (breezy.resources.gpu, breezy.scaling.idle_timeout_s, breezy.scaling.max_replicas,
            breezy.environment) == (GpuSpec(1, "H100"), 600.0, 5, "production")
    assert (bert.model_id, bert.model_version, bert.environment) == ("model-001", "v2.1.0", "production")
    assert bert.resources == Resources(4.0, 16.0, GpuSpec(2, "A100"), 200.0, 1000.0)
    assert (bert.scaling.min_replicas, bert.scaling.max_replicas) == (2, 10)
    auto = bert.scaling.autoscaling
    assert (auto.enabled, auto.target_cpu_utilization, auto.target_memory_utilization,
            auto.target_gpu_utilization) == (True, 70.0, 80.0, 80.0)
    assert bert.load_balancer == LoadBalancer("least-connections", True, HealthCheck("/health", 30.0))
    assert bert.rollout.strategy == "blue-green"


def test_loaded_deployments_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_one(BASE).port = 1  # type: ignore[misc]


def test_the_schema_defaults_are_the_only_defaults_spec_dataclasses_agree():
    """A document that writes only what is required loads to the same Deployment as the
    dataclasses' own defaults: the schema's `default` values are the one source, and the
    Python defaults (for code that builds specs directly) cannot drift from them."""
    text = ("apiVersion: autodeploy/v1\nkind: Deployment\nmetadata: {name: bare}\n"
            "spec:\n  model: {id: m, version: v1}\n  command: serve\n  port: 8080\n"
            "  loadBalancer: {healthCheck: {path: /h}}\n  alerts: [{metric: errorRate, above: 5}]\n")
    result = load_text(text, "bare.yaml")
    assert not result.errors, result.errors
    loaded = result.deployments[0]
    from controller.spec import AlertRule
    bare = Deployment(name="bare", model_id="m", model_version="v1", command="serve", port=8080,
                      load_balancer=LoadBalancer(health_check=HealthCheck(path="/h")),
                      alerts=(AlertRule(metric="errorRate", above=5.0, line=loaded.alerts[0].line),),
                      source_file="bare.yaml", source_line=loaded.source_line)
    assert loaded == bare


def test_with_defaults_fills_unwritten_keys_and_leaves_the_document_alone():
    from controller.loader import schema_default, with_defaults
    doc = {"spec": {"scaling": {"maxReplicas": 4}, "alerts": [{"metric": "errorRate", "above": 1}]}}
    full = with_defaults(doc)
    assert full["spec"]["scaling"]["maxReplicas"] == 4 and full["spec"]["scaling"]["minReplicas"] == 0
    assert full["spec"]["scaling"]["autoscaling"]["stableWindow"] == "60s"
    assert full["spec"]["alerts"][0]["for"] == "1m"
    assert "healthCheck" not in full["spec"]["loadBalancer"]  # optional, no default: stays absent
    assert doc == {"spec": {"scaling": {"maxReplicas": 4}, "alerts": [{"metric": "errorRate", "above": 1}]}}
    assert schema_default(("spec", "alerts", 3, "for")) == "1m"
