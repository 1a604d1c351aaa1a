"""The stack config: Pulumi's stack file `stacks/Pulumi.<stack>.yaml`, read as plain data.

One file says how a whole installation runs (driver, GPUs, gateway, prices), and the
Pulumi program reads the very same file, so `pulumi config set autodeploy:gatewayPort
9090` and the controller always agree. Keys live under `config:` and are namespaced
`autodeploy:<key>`; a key without a namespace belongs to the project, exactly as Pulumi
reads it. `pulumi config set` stores scalars as strings, so numbers given as strings
and maps given as JSON strings are accepted too.
"""
from __future__ import annotations

import difflib
import ipaddress
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable
from urllib.parse import urlparse

import yaml

from controller.errors import SPEC_INVALID, AutoDeployError
from controller.policy.placement import gpu_type_matches, match_specificity
from controller.spec import GpuSpec

NAMESPACE = "autodeploy"
DRIVERS = ("local", "docker", "pulumi")
# Where stack files live when the project has no Pulumi.yaml to say so.
DEFAULT_STACK_DIR = "stacks"
_STACK_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_DOCKER_SCHEMES = ("unix://", "tcp://", "ssh://", "http://", "https://", "npipe://")


@dataclass(frozen=True)
class DeclaredGpu:
    """A GPU written into the stack config, used where NVML cannot list the real ones."""
    index: int
    name: str
    uuid: str | None = None
    memory_mb: int | None = None


@dataclass
class Prices:
    """USD per instance-hour. An instance costs `cpu` (the flat price of any instance)
    plus `gpu.count` times the price of its GPU type.

    The GPU type is looked up with the placement matcher, so the key "H100" prices a
    request for "H100" or "NVIDIA H100 80GB HBM3"; when several keys match, the one
    naming more words wins ("A100 80GB" over "A100"), then the alphabetically first.
    A type no key matches, or no type at all, costs `default_gpu`.
    """
    cpu: float = 0.0
    gpu: dict[str, float] = field(default_factory=dict)
    default_gpu: float | None = None
    source: str = ""  # the stack file, named in errors

    def gpu_price(self, gpu_type: str | None) -> float:
        if gpu_type:
            matches = [k for k in self.gpu if gpu_type_matches(k, gpu_type)]
            if matches:
                best = min(matches, key=lambda k: (-match_specificity(k), k))
                return self.gpu[best]
        if self.default_gpu is None:
            # A silent 0 would make every unknown GPU free in the cost ledger.
            raise AutoDeployError(
                SPEC_INVALID,
                f"{self.source or 'stack config'}: {NAMESPACE}:prices has no price for GPU type "
                f"{gpu_type or '(any)'!r}; add it under `gpu:` or set `defaultGpu:`")
        return self.default_gpu

    def per_hour(self, gpu: GpuSpec, node: str | None = None) -> float:
        """`node` is accepted so one price table can stand where per-node prices
        (controller.nodes.NodePrices) are expected; these prices are the same on every node."""
        if gpu.count <= 0:
            return self.cpu
        return self.cpu + gpu.count * self.gpu_price(gpu.type)


@dataclass(frozen=True)
class TlsPaths:
    """Client TLS for a tcp:// engine (files on the controller's machine), as
    `docker --tlsverify --tlscacert CA --tlscert CERT --tlskey KEY` takes them."""
    ca_cert: str
    cert: str
    key: str


@dataclass
class NodeConfig:
    """One Docker host of `autodeploy:nodes`."""
    name: str
    docker_host: str | None  # None: the engine default (DOCKER_HOST, else the local socket)
    address: str             # where its published instance ports are reached
    labels: dict[str, str] = field(default_factory=dict)
    gpus: list[DeclaredGpu] = field(default_factory=list)
    # An image to run with `--gpus all` to list the node's GPUs (nvidia-smi); None: use `gpus`.
    gpu_probe_image: str | None = None
    tls: TlsPaths | None = None
    prices: Prices | None = None  # None: the stack's autodeploy:prices


@dataclass(frozen=True)
class GitStackConfig:
    """`autodeploy:git`: serve follows this branch instead of reading `deploymentsDir`."""
    repo: str
    branch: str = "main"
    path: str = "deployments"
    interval: str = "30s"
    # A config key (e.g. autodeploy:gitToken) holding a Pulumi secret: the password or token
    # for an https remote. Only the key is read here; serve decrypts it with the Pulumi CLI.
    credential: str | None = None
    username: str | None = None

    def overridden(self, repo: str | None = None, branch: str | None = None, path: str | None = None,
                   interval: str | None = None) -> "GitStackConfig":
        """The command line's `--git-*` flags over this config, key by key. The credential and
        username stay only while the repository is this one: a token kept for one remote is
        never sent to another named on the command line."""
        same_repo = not repo or repo == self.repo
        return GitStackConfig(repo=repo or self.repo, branch=branch or self.branch, path=path or self.path,
                              interval=interval or self.interval,
                              credential=self.credential if same_repo else None,
                              username=self.username if same_repo else None)


@dataclass
class StackConfig:
    name: str
    source: str = ""  # e.g. "stacks/Pulumi.dev.yaml", relative to the project
    driver: str = "local"
    deployments_dir: str = "deployments"
    state_dir: str = ".state"  # SQLite, logs, sockets; relative to the project (serve, logs)
    replicas: dict[str, int | tuple[int, ...]] = field(default_factory=dict)
    gpus: list[DeclaredGpu] = field(default_factory=list)
    docker_host: str | None = None
    gateway_port: int = 8080
    gateway_host: str = "127.0.0.1"
    # Peers whose X-Forwarded-For the gateway believes (ip-hash); `serve --trusted-proxy` overrides.
    trusted_proxies: list[str] = field(default_factory=list)
    # haproxy | python; None: haproxy when haproxy >= 2.6 is on PATH (gateway/haproxy_plane.py).
    data_plane: str | None = None
    # Names clients reach the gateway by (besides its bind address): the API checks Host and Origin.
    gateway_hosts: list[str] = field(default_factory=list)
    # PEM file (certificate chain and private key) HAProxy terminates TLS with; relative to the project.
    tls_certificate: str | None = None
    prices: Prices = field(default_factory=Prices)
    # autodeploy:nodes; empty: one node from dockerHost and gpus (see `effective_nodes`).
    nodes: list[NodeConfig] = field(default_factory=list)
    git: GitStackConfig | None = None
    # Every other config key, verbatim (other namespaces, secrets as {"secure": ...}),
    # for the Pulumi program; nothing here is decrypted.
    extra: dict[str, Any] = field(default_factory=dict)


class _Invalid(Exception):
    """A bad value; `load_stack` adds the file, line and key."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: PyYAML would keep the last one silently."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Hashable, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *anchor` is flattened by construct_mapping itself
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, Hashable):
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key]})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _parse_yaml(text: str, rel: str) -> tuple[Any, yaml.Node | None]:
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{rel}:{mark.line + 1}" if mark is not None else rel
        problem = getattr(exc, "problem", None) or str(exc)
        raise AutoDeployError(SPEC_INVALID, f"{where}: not valid YAML: {problem}") from exc
    finally:
        loader.dispose()
    return data, node


def _config_key_lines(root: yaml.Node | None) -> dict[str, int]:
    """Line of each key under `config:`, so errors can point at it."""
    if not isinstance(root, yaml.MappingNode):
        return {}
    for key_node, value_node in root.value:
        if key_node.value == "config" and isinstance(value_node, yaml.MappingNode):
            return {str(k.value): k.start_mark.line + 1 for k, _ in value_node.value}
    return {}


# --- value checks: each takes the raw value and returns the typed one or raises _Invalid.

def _secure_check(value: Any) -> None:
    if isinstance(value, dict) and set(value) == {"secure"}:
        raise _Invalid("is a Pulumi secret, but the controller reads stack config without "
                       "decrypting it; set it in plain text")


def _as_int(value: Any, what: str, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"{what} must be an integer, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = f"{minimum}-{maximum}" if maximum is not None else f">= {minimum}"
        raise _Invalid(f"{what} must be {bounds}, got {value}")
    return value


def _as_price(value: Any, what: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _Invalid(f"{what} must be a number (USD per hour), got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise _Invalid(f"{what} must be a number (USD per hour), got {value!r}")
    if value < 0:
        raise _Invalid(f"{what} must be 0 or more, got {value}")
    return float(value)


def _as_text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid(f"{what} must be a non-empty string, got {value!r}")
    return value


def _structured(value: Any, what: str) -> Any:
    # `pulumi config set autodeploy:replicas '{"a": 2}'` stores a JSON string.
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise _Invalid(f"{what} is a string but not valid JSON ({exc.msg}); "
                           f"write it as a YAML mapping or JSON") from None
    return value


def _check_keys(item: dict[str, Any], allowed: tuple[str, ...], what: str) -> None:
    unknown = sorted(str(k) for k in item if k not in allowed)
    if unknown:
        raise _Invalid(f"{what} has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")


def _driver(value: Any) -> str:
    if value not in DRIVERS:
        raise _Invalid(f"must be one of {', '.join(DRIVERS)}, got {value!r}")
    return value


def _data_plane(value: Any) -> str:
    if value not in ("haproxy", "python"):
        raise _Invalid(f"must be haproxy or python, got {value!r}")
    return str(value)


def _replicas(value: Any) -> dict[str, int | tuple[int, ...]]:
    """A count per deployment, or the exact slot numbers the pulumi driver keeps
    (`{"hello": [0, 2]}` after the instance in slot 1 was stopped)."""
    value = _structured(value, "value")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Invalid(f"must map deployment name to replica count, got {value!r}")
    out: dict[str, int | tuple[int, ...]] = {}
    for name, n in value.items():
        key = _as_text(name, "deployment name")
        if isinstance(n, list):
            slots = tuple(_as_int(x, f"slot of {name!r}", minimum=0) for x in n)
            if len(set(slots)) != len(slots):
                raise _Invalid(f"slots of {name!r} repeat a number: {n!r}")
            out[key] = slots
        else:
            out[key] = _as_int(n, f"replicas of {name!r}", minimum=0)
    return out


def _gpus(value: Any) -> list[DeclaredGpu]:
    value = _structured(value, "value")
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Invalid(f"must be a list of {{index, name, uuid?, memoryMb?}}, got {value!r}")
    out: list[DeclaredGpu] = []
    for pos, item in enumerate(value):
        what = f"item {pos}"
        if not isinstance(item, dict):
            raise _Invalid(f"{what} must be a mapping {{index, name, uuid?, memoryMb?}}, got {item!r}")
        _check_keys(item, ("index", "name", "uuid", "memoryMb"), what)
        for required in ("index", "name"):
            if required not in item:
                raise _Invalid(f"{what} needs `{required}`")
        uuid = item.get("uuid")
        memory = item.get("memoryMb")
        out.append(DeclaredGpu(
            index=_as_int(item["index"], f"{what} index", minimum=0),
            name=_as_text(item["name"], f"{what} name"),
            uuid=None if uuid is None else _as_text(uuid, f"{what} uuid"),
            memory_mb=None if memory is None else _as_int(memory, f"{what} memoryMb", minimum=1)))
    for attr in ("index", "uuid"):
        values = [getattr(g, attr) for g in out if getattr(g, attr) is not None]
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            raise _Invalid(f"each GPU needs its own {attr}; repeated: {', '.join(repeated)}")
    return out


def _docker_host(value: Any) -> str | None:
    if value is None:
        return None
    value = _as_text(value, "value")
    if not value.startswith(_DOCKER_SCHEMES):
        raise _Invalid(f"must be a Docker Engine address such as unix:///var/run/docker.sock "
                       f"(schemes: {', '.join(_DOCKER_SCHEMES)}), got {value!r}")
    return value


def _port(value: Any) -> int:
    return _as_int(value, "value", minimum=1, maximum=65535)


def _prices(value: Any) -> Prices:
    value = _structured(value, "value")
    if value is None:
        return Prices()
    if not isinstance(value, dict):
        raise _Invalid(f"must be a mapping {{cpu, gpu, defaultGpu}}, got {value!r}")
    _check_keys(value, ("cpu", "gpu", "defaultGpu"), "value")
    gpu = value.get("gpu") or {}
    if not isinstance(gpu, dict):
        raise _Invalid(f"gpu must map GPU type to USD per GPU-hour, got {gpu!r}")
    default = value.get("defaultGpu")
    return Prices(
        cpu=_as_price(value.get("cpu", 0), "cpu"),
        gpu={_as_text(k, "GPU type"): _as_price(v, f"gpu.{k}") for k, v in gpu.items()},
        default_gpu=None if default is None else _as_price(default, "defaultGpu"))


def _trusted_proxies(value: Any) -> list[str]:
    if isinstance(value, str):  # `pulumi config set` stores text: a JSON list or "a, b"
        value = _structured(value, "value") if value.lstrip().startswith("[") else \
            [v for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        raise _Invalid(f"must be a list of IP addresses or CIDRs, got {value!r}")
    out = []
    for item in value:
        try:
            out.append(str(ipaddress.ip_network(str(item).strip(), strict=False)))
        except ValueError as exc:
            raise _Invalid(f"{item!r} is not an IP address or CIDR ({exc})") from None
    return out


_NODE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_LABEL_KEY = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?$")
_NODE_KEYS = ("name", "dockerHost", "address", "labels", "gpus", "tls", "prices")
_NODE_SCHEMES = ("unix://", "ssh://", "tcp://")
LOCAL_ADDRESS = "127.0.0.1"


def default_address(docker_host: str | None) -> str:
    """Where a node's published ports are reached when `address` is not given: loopback
    for a local engine, else the host named in its URL."""
    if not docker_host or docker_host.startswith(("unix://", "npipe://")):
        return LOCAL_ADDRESS
    host = urlparse(docker_host).hostname
    if not host:
        raise _Invalid(f"dockerHost {docker_host!r} names no host")
    return host


def _node(item: Any, pos: int) -> NodeConfig:
    what = f"item {pos}"
    if not isinstance(item, dict):
        raise _Invalid(f"{what} must be a mapping {{name, dockerHost, address?, labels?, gpus?, tls?, prices?}}, "
                       f"got {item!r}")
    if "name" in item:
        what = f"node {item['name']!r}"
    _check_keys(item, _NODE_KEYS, what)
    for required in ("name", "dockerHost"):
        if required not in item:
            raise _Invalid(f"{what} needs `{required}`")
    name = _as_text(item["name"], f"{what} name")
    if not _NODE_NAME.fullmatch(name):
        raise _Invalid(f"{what} name must be a DNS label (a-z, 0-9, '-', at most 63), got {name!r}")
    host = _as_text(item["dockerHost"], f"{what} dockerHost")
    if not host.startswith(_NODE_SCHEMES):
        raise _Invalid(f"{what} dockerHost must start with {', '.join(_NODE_SCHEMES)} "
                       f"(e.g. ssh://admin@gpu-2 or tcp://gpu-2:2376), got {host!r}")
    tls = None
    raw_tls = item.get("tls")
    if raw_tls is not None:
        if not isinstance(raw_tls, dict):
            raise _Invalid(f"{what} tls must be a mapping {{caCert, cert, key}} of file paths, got {raw_tls!r}")
        _check_keys(raw_tls, ("caCert", "cert", "key"), f"{what} tls")
        for required in ("caCert", "cert", "key"):
            if required not in raw_tls:
                raise _Invalid(f"{what} tls needs `{required}` (a file path)")
        tls = TlsPaths(*(_as_text(raw_tls[k], f"{what} tls.{k}") for k in ("caCert", "cert", "key")))
        if not host.startswith("tcp://"):
            raise _Invalid(f"{what} tls is for tcp:// engines; {host!r} is not one")
    elif host.startswith("tcp://"):
        # An engine API without TLS is root on that machine for anyone who can reach it.
        raise _Invalid(f"{what} dockerHost {host!r} is tcp:// without tls; add tls: {{caCert, cert, key}} "
                       "(the engine's --tlsverify files) or use ssh://")
    address = item.get("address")
    labels = item.get("labels") or {}
    if not isinstance(labels, dict):
        raise _Invalid(f"{what} labels must map text to text, got {labels!r}")
    for k, v in labels.items():
        if not isinstance(k, str) or not _LABEL_KEY.fullmatch(k) or not isinstance(v, str):
            raise _Invalid(f"{what} label {k!r}: {v!r} must be text: text (keys: letters, digits, '-_./'); "
                           "quote values such as 'true' or '1'")
    gpus: list[DeclaredGpu] = []
    probe = None
    raw_gpus = item.get("gpus")
    if isinstance(raw_gpus, dict):
        _check_keys(raw_gpus, ("probeImage",), f"{what} gpus")
        if "probeImage" not in raw_gpus:
            raise _Invalid(f"{what} gpus needs `probeImage` (or a list of {{index, name}})")
        probe = _as_text(raw_gpus["probeImage"], f"{what} gpus.probeImage")
    elif raw_gpus is not None:
        try:
            gpus = _gpus(raw_gpus)
        except _Invalid as exc:
            raise _Invalid(f"{what} gpus: {exc}") from None
    try:
        prices = None if item.get("prices") is None else _prices(item["prices"])
    except _Invalid as exc:
        raise _Invalid(f"{what} prices: {exc}") from None
    return NodeConfig(name=name, docker_host=host,
                      address=default_address(host) if address is None else _as_text(address, f"{what} address"),
                      labels=dict(labels), gpus=gpus, gpu_probe_image=probe, tls=tls, prices=prices)


def _nodes(value: Any) -> list[NodeConfig]:
    value = _structured(value, "value")
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Invalid(f"must be a list of nodes {{name, dockerHost, address?, labels?, gpus?, tls?, prices?}}, "
                       f"got {value!r}")
    out = [_node(item, pos) for pos, item in enumerate(value)]
    names = [n.name for n in out]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise _Invalid(f"each node needs its own name; repeated: {', '.join(repeated)}")
    hosts = [n.docker_host for n in out]
    same = sorted({h for h in hosts if hosts.count(h) > 1 and h})
    if same:
        raise _Invalid(f"two nodes name the same engine {same[0]!r}: its containers would be counted twice")
    return out


def effective_nodes(stack: StackConfig) -> list[NodeConfig]:
    """`autodeploy:nodes`, or the one-node shorthand: `dockerHost` and `gpus`."""
    if stack.nodes:
        return list(stack.nodes)
    return [NodeConfig(name="local", docker_host=stack.docker_host, address=_shorthand_address(stack),
                       gpus=list(stack.gpus))]


def _shorthand_address(stack: StackConfig) -> str:
    try:
        return default_address(stack.docker_host)
    except _Invalid as exc:
        raise AutoDeployError(SPEC_INVALID, f"{stack.source}: {NAMESPACE}:dockerHost: {exc}") from None


def prices_for(stack: StackConfig, node: str | None) -> Prices:
    """The node's own prices when it has them, else the stack's."""
    for n in stack.nodes:
        if n.name == node and n.prices is not None:
            return n.prices
    return stack.prices


def _git(value: Any) -> GitStackConfig | None:
    from controller.sources.git import check_options  # the same checks as `serve --git-repo`
    value = _structured(value, "value")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _Invalid(f"must be a mapping {{repo, branch, path, interval, credential, username}}, got {value!r}")
    _check_keys(value, ("repo", "branch", "path", "interval", "credential", "username"), "value")
    if "repo" not in value:
        raise _Invalid("needs `repo` (the repository URL)")
    texts = {k: (str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and k == "interval"
                 else _as_text(v, k)) for k, v in value.items()}
    credential = texts.get("credential")
    if credential is not None and (":" not in credential or credential.startswith(":")):
        raise _Invalid(f"credential must name a config key holding a secret, such as {NAMESPACE}:gitToken "
                       f"(set it with `pulumi config set --secret {NAMESPACE}:gitToken TOKEN`), got {credential!r}")
    cfg = GitStackConfig(repo=texts["repo"], branch=texts.get("branch", "main"),
                         path=texts.get("path", "deployments"), interval=texts.get("interval", "30s"),
                         credential=credential, username=texts.get("username"))
    try:
        check_options(cfg.repo, cfg.branch, cfg.path, cfg.interval)
    except AutoDeployError as exc:
        raise _Invalid(exc.detail) from None
    return cfg


def _host_names(value: Any) -> list[str]:
    if isinstance(value, str):  # `pulumi config set` stores text: a JSON list or "a, b"
        value = _structured(value, "value") if value.lstrip().startswith("[") else \
            [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise _Invalid(f"must be a list of host names (optionally host:port), got {value!r}")
    bad = [v for v in value if any(c in v for c in "/@ ,")]
    if bad:
        raise _Invalid(f"{bad[0]!r} is not a host name or host:port (no scheme or path)")
    return [v.strip() for v in value]


# Config key -> (StackConfig field, check).
_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "driver": ("driver", _driver),
    "deploymentsDir": ("deployments_dir", lambda v: _as_text(v, "value")),
    "stateDir": ("state_dir", lambda v: _as_text(v, "value")),
    "replicas": ("replicas", _replicas),
    "gpus": ("gpus", _gpus),
    "dockerHost": ("docker_host", _docker_host),
    "gatewayPort": ("gateway_port", _port),
    "gatewayHost": ("gateway_host", lambda v: _as_text(v, "value")),
    "prices": ("prices", _prices),
    "trustedProxies": ("trusted_proxies", _trusted_proxies),
    "nodes": ("nodes", _nodes),
    "git": ("git", _git),
    "dataPlane": ("data_plane", _data_plane),
    "gatewayHosts": ("gateway_hosts", _host_names),
    "tlsCertificate": ("tls_certificate", lambda v: _as_text(v, "value")),
}


def stack_dir(project_dir: Path) -> str:
    """The project's stackConfigDir, relative to it (Pulumi's own default is the project)."""
    pulumi_yaml = project_dir / "Pulumi.yaml"
    if not pulumi_yaml.is_file():
        return DEFAULT_STACK_DIR
    data, _ = _parse_yaml(pulumi_yaml.read_text(encoding="utf-8"), "Pulumi.yaml")
    if not isinstance(data, dict):
        raise AutoDeployError(SPEC_INVALID, "Pulumi.yaml: must be a mapping with `name:` and `runtime:`")
    configured = data.get("stackConfigDir", ".")
    if not isinstance(configured, str) or not configured.strip():
        raise AutoDeployError(SPEC_INVALID, f"Pulumi.yaml: stackConfigDir must be a path, got {configured!r}")
    return configured.rstrip("/") or "."


def available_stacks(project_dir: Path) -> list[str]:
    folder = project_dir / stack_dir(project_dir)
    return sorted(p.name[len("Pulumi."):-len(".yaml")] for p in folder.glob("Pulumi.*.yaml"))


def load_stack(project_dir: Path, stack: str) -> StackConfig:
    """Read and check `<stackConfigDir>/Pulumi.<stack>.yaml`.

    Raises AutoDeployError(SPEC_INVALID) naming the file, line and key of what is wrong.
    """
    # Pulumi accepts "org/project/stack"; the file is named for the last part only.
    short = stack.rsplit("/", 1)[-1]
    folder = stack_dir(project_dir)
    rel = f"{folder}/Pulumi.{short}.yaml" if folder != "." else f"Pulumi.{short}.yaml"
    if not _STACK_NAME.fullmatch(short):
        raise AutoDeployError(SPEC_INVALID, f"{rel}: stack name {stack!r} may hold only letters, "
                                            f"digits, '-', '_' and '.'")
    path = project_dir / rel
    if not path.is_file():
        known = ", ".join(available_stacks(project_dir)) or "none"
        raise AutoDeployError(SPEC_INVALID, f"{rel}: stack file not found (stacks here: {known}); "
                                            f"create it or choose another stack")
    data, root = _parse_yaml(path.read_text(encoding="utf-8"), rel)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise AutoDeployError(SPEC_INVALID, f"{rel}: must be a mapping with a `config:` mapping")
    config = data.get("config") or {}
    if not isinstance(config, dict):
        raise AutoDeployError(SPEC_INVALID, f"{rel}: `config:` must be a mapping of "
                                            f"{NAMESPACE}:<key> to values")
    lines = _config_key_lines(root)
    result = StackConfig(name=short, source=rel)
    for raw_key, value in config.items():
        key = str(raw_key)
        full = key if ":" in key else f"{NAMESPACE}:{key}"
        where = f"{rel}:{lines[key]}" if key in lines else rel
        namespace, _, name = full.partition(":")
        if namespace != NAMESPACE:
            result.extra[full] = value
            continue
        if name not in _KEYS:
            close = [k for k in _KEYS if k.lower() == name.lower()]
            close += difflib.get_close_matches(name, list(_KEYS), n=1, cutoff=0.75)
            if close:
                raise AutoDeployError(SPEC_INVALID, f"{where}: unknown key {full}; did you mean "
                                                    f"{NAMESPACE}:{close[0]}?")
            result.extra[full] = value
            continue
        attr, check = _KEYS[name]
        try:
            _secure_check(value)
            setattr(result, attr, check(value))
        except _Invalid as exc:
            raise AutoDeployError(SPEC_INVALID, f"{where}: {full}: {exc}") from None
    result.prices.source = rel
    for node in result.nodes:
        if node.prices is not None:
            node.prices.source = f"{rel} node {node.name}"
    if result.nodes and result.docker_host:
        line = lines.get(f"{NAMESPACE}:dockerHost") or lines.get("dockerHost")
        where = f"{rel}:{line}" if line else rel
        raise AutoDeployError(SPEC_INVALID, f"{where}: {NAMESPACE}:dockerHost is the one-node shorthand; with "
                                            f"{NAMESPACE}:nodes give each node its own dockerHost instead")
    return result


def find_project_dir(start: Path) -> Path:
    """The nearest folder at or above `start` holding Pulumi.yaml (`start` itself if none),
    so that commands such as `autodeploy logs` work from any folder of the project."""
    start = start.resolve()
    for folder in (start, *start.parents):
        if (folder / "Pulumi.yaml").is_file():
            return folder
    return start


def state_dir_of(project_dir: Path, stack: str) -> Path:
    """`autodeploy:stateDir` of the stack (default .state), relative to the project; the
    default when the project has no such stack file."""
    try:
        configured = load_stack(project_dir, stack).state_dir
    except AutoDeployError:
        if (project_dir / stack_dir(project_dir) / f"Pulumi.{stack.rsplit('/', 1)[-1]}.yaml").exists():
            raise  # a stack file with errors: say so rather than guess
        configured = StackConfig(name=stack).state_dir
    return (project_dir / configured).resolve()
