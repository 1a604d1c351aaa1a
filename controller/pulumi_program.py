"""The Pulumi program: Deployment YAML + stack config -> Docker containers, pinned to GPUs.

`pulumi up` (through the root `__main__.py`) and the Automation API driver
(`controller.drivers.pulumi`) run this same `program()`, so a human update and a
controller update can only differ in the stack config they carry.

Almost everything is decided by pure functions over plain data (`plan_resources`,
`gateway_routes`, ...); `program()` only reads config, calls them and declares the
resources, which keeps the logic testable without the Pulumi engine.

Stack config read (namespace `autodeploy`):
* `deploymentsDir`   folder of Deployment YAML, relative to the project (default `deployments`)
* `replicas`         deployment -> replica count (`2`: slots 0 and 1) or slot list (`[0, 2]`:
                     exactly those slots, so stopping slot 1 removes exactly that container);
                     a deployment left out runs `minReplicas` replicas
* `pins`             slot (`<dep>-<n>`) -> GPU uuids it keeps while they still fit; the
                     controller writes it so its placement and ours agree
* `gpus`             GPUs to place on when NVML does not answer (as in `controller.stack`)
* `gatewayPort`, `gatewayHost`, `dockerHost`
* `gatewayContainer` `true` (default): run the static gateway container; `false`: the
                     controller's own gateway (`autodeploy serve`) serves the endpoints
* `apiTokens`        secret, `name:role:TOKEN,...`: the gateway container's API tokens
                     (hashed into AUTODEPLOY_API_TOKENS); without it the API answers 401
* `endpointKeys`     secret, `deployment:KEY:1|0,...` (1: may scale out): keys of private
                     deployments (hashed, for the gateway and HAProxy); without, 1035
* `dataPlane`        `haproxy` (default): an HAProxy container (the same generated config
                     as `serve --data-plane haproxy`, gateway/haproxy_config.py) carries the
                     endpoints and the static gateway container is its activator; `python`:
                     the static gateway container carries everything
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlparse

from controller.drivers.docker import bind_address
from controller.errors import NO_FREE_GPU, SPEC_INVALID, AutoDeployError
from controller.inventory import Gpu, Inventory
from controller.policy.placement import (NodePlacement, NodeView, NoPlacement, Placement, place_many,
                                         place_slots_on_nodes)
from controller.spec import Deployment

NAMESPACE = "autodeploy"
LABEL_PREFIX = "autodeploy."
GATEWAY_REPOSITORY = "autodeploy-gateway"
GATEWAY_DOCKERFILE = "gateway/Dockerfile"
# The port `autodeploy gateway-static` listens on inside its container.
GATEWAY_INTERNAL_PORT = 8080
# `controller.gpus` names a stack-config GPU without a uuid "declared-<index>"; Docker
# knows no such device, so those are pinned by index instead.
_DECLARED_UUID_PREFIX = "declared-"
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")
# Seconds a removed container gets between SIGTERM and SIGKILL (the controller's own
# default stop timeout; a model finishing its in-flight requests needs about that).
DESTROY_GRACE_S = 10


# --- plain data -------------------------------------------------------------------------

@dataclass(frozen=True)
class HealthcheckPlan:
    tests: tuple[str, ...]
    interval: str
    timeout: str
    retries: int


@dataclass(frozen=True)
class ContainerPlan:
    """One replica slot of one deployment: everything its container is made from."""
    deployment: str
    slot: int
    image: str
    command: tuple[str, ...]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    # env name -> (config namespace, key): resolved with Config.require_secret only
    # inside the program, so secret values never enter a plan, a log or an output.
    secret_env: dict[str, tuple[str, str]] = field(default_factory=dict)
    cpus: str | None = None
    memory_mb: int | None = None
    gpu_ids: tuple[str, ...] = ()        # GPU uuids, as the controller and outputs name them
    gpu_devices: tuple[str, ...] = ()    # what Docker's `--gpus device=` gets
    labels: dict[str, str] = field(default_factory=dict)
    healthcheck: HealthcheckPlan | None = None
    node: str | None = None              # with autodeploy:nodes: the Docker host it runs on

    @property
    def slot_name(self) -> str:
        return slot_name(self.deployment, self.slot)

    @property
    def resource_name(self) -> str:
        # Stable per slot: N -> N+1 replicas adds one resource and replaces none.
        return self.slot_name

    @property
    def container_name(self) -> str:
        return f"autodeploy-{self.slot_name}"

    @property
    def network_address(self) -> str:
        """host:port on the stack's Docker network (what the gateway container dials)."""
        return f"{self.container_name}:{self.port}"

    @property
    def gpus_flag(self) -> str | None:
        return f"device={','.join(self.gpu_devices)}" if self.gpu_devices else None


@dataclass(frozen=True)
class ProgramConfig:
    deployments_dir: str = "deployments"
    replicas: dict[str, tuple[int, ...]] = field(default_factory=dict)
    pins: dict[str, tuple[str, ...]] = field(default_factory=dict)
    gpus: tuple[Any, ...] = ()           # controller.stack.DeclaredGpu items
    gateway_port: int = 8080
    gateway_host: str = "127.0.0.1"
    docker_host: str | None = None
    gateway_container: bool = True
    nodes: tuple[Any, ...] = ()          # controller.stack.NodeConfig items (autodeploy:nodes)
    placements: dict[str, str] = field(default_factory=dict)  # slot -> node it keeps
    data_plane: str = "haproxy"          # haproxy | python (autodeploy:dataPlane)


# --- pure decisions ---------------------------------------------------------------------

def slot_name(deployment: str, slot: int) -> str:
    return f"{deployment}-{slot}"


def split_slot_name(name: str) -> tuple[str, int]:
    """`"bert-sentiment-2"` -> `("bert-sentiment", 2)`; names may hold dashes, slots may not."""
    deployment, _, number = name.rpartition("-")
    if not deployment or not number.isdigit():
        raise ValueError(f"not a slot name <deployment>-<n>: {name!r}")
    return deployment, int(number)


def _as_slot(value: Any, what: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise AutoDeployError(SPEC_INVALID, f"{NAMESPACE}:replicas: {what} must be an integer 0 or more, "
                                            f"got {value!r}")
    return value


def _json_config(raw: Any, key: str) -> Any:
    """A structured config value, which `pulumi config set` may have stored as a JSON string."""
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise AutoDeployError(SPEC_INVALID, f"{NAMESPACE}:{key} is not valid JSON ({exc.msg})") from None


def parse_replicas(raw: Any) -> dict[str, tuple[int, ...]]:
    """The `replicas` config in either form -> deployment -> sorted slot numbers.

    `{"a": 2}` means slots (0, 1); `{"a": [0, 2]}` means exactly slots 0 and 2. The list
    form is what the pulumi driver writes, so that stopping a middle instance removes
    that container and leaves the others (and their GPUs) alone.
    """
    raw = _json_config(raw, "replicas")
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise AutoDeployError(SPEC_INVALID, f"{NAMESPACE}:replicas must map deployment name to a count "
                                            f"or a list of slot numbers, got {raw!r}")
    out: dict[str, tuple[int, ...]] = {}
    for name, value in raw.items():
        if isinstance(value, (list, tuple)):
            slots = [_as_slot(v, f"a slot of {name!r}") for v in value]
            if len(set(slots)) != len(slots):
                raise AutoDeployError(SPEC_INVALID, f"{NAMESPACE}:replicas: slots of {name!r} repeat: {value!r}")
            out[str(name)] = tuple(sorted(slots))
        else:
            out[str(name)] = tuple(range(_as_slot(value, f"the replica count of {name!r}")))
    return out


def parse_pins(raw: Any) -> dict[str, tuple[str, ...]]:
    raw = _json_config(raw, "pins")
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or not all(isinstance(v, (list, tuple)) for v in raw.values()):
        raise AutoDeployError(SPEC_INVALID, f"{NAMESPACE}:pins must map slot (<deployment>-<n>) to a list "
                                            f"of GPU uuids, got {raw!r}")
    return {str(k): tuple(str(u) for u in v) for k, v in raw.items()}


def wanted_slots(deployments: Sequence[Deployment],
                 replicas: Mapping[str, int | Sequence[int]]) -> dict[str, tuple[int, ...]]:
    """Slots per deployment: the replicas entry, else minReplicas; none when stopped.

    maxReplicas is not enforced here on purpose: it bounds the controller's autoscaling,
    and a rollout's surge may briefly exceed it; an explicit replica count is explicit.
    """
    parsed = parse_replicas(dict(replicas))
    out: dict[str, tuple[int, ...]] = {}
    for dep in sorted(deployments, key=lambda d: d.name):
        if dep.state == "stopped":
            out[dep.name] = ()
        elif dep.name in parsed:
            out[dep.name] = parsed[dep.name]
        else:
            out[dep.name] = tuple(range(dep.scaling.min_replicas))
    return out


def docker_device_id(gpu: Gpu) -> str:
    return str(gpu.index) if gpu.uuid.startswith(_DECLARED_UUID_PREFIX) else gpu.uuid


def healthcheck_plan(dep: Deployment) -> HealthcheckPlan | None:
    check = dep.load_balancer.health_check
    if check is None:
        return None
    url = shlex.quote(f"http://127.0.0.1:{dep.port}{check.path}")
    # Model images rarely carry the same HTTP client; try the usual ones in turn.
    probe = (f"curl -fsS -o /dev/null {url} || wget -q -O /dev/null {url} || "
             f"python3 -c 'import sys,urllib.request; urllib.request.urlopen(sys.argv[1], timeout={check.timeout_s:g})' "
             f"{url}")
    return HealthcheckPlan(tests=("CMD-SHELL", probe), interval=f"{check.interval_s:g}s",
                           timeout=f"{check.timeout_s:g}s", retries=check.failure_threshold)


def split_config_key(key: str) -> tuple[str, str]:
    """`"hfToken"` -> `("autodeploy", "hfToken")`; `"other:key"` keeps its namespace."""
    namespace, sep, name = key.partition(":")
    return (namespace, name) if sep else (NAMESPACE, key)


def container_labels(dep: Deployment, slot: int, gpu_ids: Sequence[str]) -> dict[str, str]:
    # The docker driver's keys, so `docker ps --filter label=autodeploy.managed=true` lists
    # every instance, plus `autodeploy.template`. No `autodeploy.revision`: the revision
    # changes with any edit (maxReplicas, a description) and, Docker labels being fixed at
    # creation, every label change makes Pulumi replace the container. The template hash
    # changes exactly when the container must be replaced anyway.
    return {
        f"{LABEL_PREFIX}managed": "true",
        f"{LABEL_PREFIX}deployment": dep.name,
        f"{LABEL_PREFIX}instance": slot_name(dep.name, slot),
        f"{LABEL_PREFIX}template": dep.template_hash,
        f"{LABEL_PREFIX}gpus": ",".join(gpu_ids),
        f"{LABEL_PREFIX}port": str(dep.port),
    }


def _placement_order(slots: Mapping[str, Sequence[int]]) -> list[tuple[str, int]]:
    # Slot number first, then name: without pins, a deployment's new highest slot is
    # placed after the other deployments' lower slots, so it usually moves nothing.
    # Exact stability comes from `pins` (the last update's `pins` output fed back).
    return sorted(((name, n) for name, ns in slots.items() for n in ns), key=lambda s: (s[1], s[0]))


def plan_resources(deployments: Sequence[Deployment], replicas: Mapping[str, int | Sequence[int]],
                   inventory: Inventory, pins: Mapping[str, Sequence[str]] | None = None,
                   nodes: Sequence[NodeView] | None = None,
                   placements: Mapping[str, str] | None = None) -> list[ContainerPlan]:
    """One plan per wanted slot, each GPU slot on its own GPUs (and, with `nodes`, on the
    node `place_slots_on_nodes` picks; `inventory` is then unused: each node has its own).

    Raises AutoDeployError(NO_FREE_GPU) naming every slot that cannot be placed and why,
    and AutoDeployError(SPEC_INVALID) for a deployment without an image.
    """
    by_name = {d.name: d for d in deployments}
    slots = wanted_slots(deployments, replicas)
    order = _placement_order(slots)
    requests = [(slot_name(name, n), by_name[name].resources.gpu) for name, n in order]
    wanted_keys = {key for key, _ in requests}
    # Pins of slots not planned any more must not hold GPUs (place_many would treat
    # them as other holders).
    previous = {k: list(v) for k, v in (pins or {}).items() if k in wanted_keys}
    node_of: dict[str, str] = {}
    if nodes:
        on_nodes = place_slots_on_nodes(nodes, [(slot_name(name, n), name, by_name[name].resources.gpu,
                                                 by_name[name].node_selector) for name, n in order],
                                        previous, placements)
        placed: Mapping[str, Placement | NoPlacement] = {
            k: v if isinstance(v, NoPlacement) else Placement(v.gpu_ids) for k, v in on_nodes.items()}
        node_of = {k: v.node for k, v in on_nodes.items() if isinstance(v, NodePlacement)}
        gpu_by_uuid = {(n.name, g.uuid): g for n in nodes for g in n.gpus}
    else:
        placed = place_many(inventory.gpus, previous, requests)
        gpu_by_uuid = {(None, g.uuid): g for g in inventory.gpus}
    failures = [f"deployment {key.rpartition('-')[0]} slot {key}: {result.reason}"
                for key, result in placed.items() if isinstance(result, NoPlacement)]
    if failures:
        source = "each node's gpus in autodeploy:nodes" if nodes else inventory.source
        raise AutoDeployError(NO_FREE_GPU, f"not enough GPUs (inventory from {source}): " + "; ".join(failures))
    plans: list[ContainerPlan] = []
    for name, n in sorted(order):
        dep = by_name[name]
        if not dep.image:
            raise AutoDeployError(SPEC_INVALID, f"{dep.source_file}:{dep.source_line}: deployment {name} has no "
                                                f"spec.image; the pulumi driver runs images only")
        result = placed[slot_name(name, n)]
        assert not isinstance(result, NoPlacement)  # failures raised above
        env = dict(dep.env)
        env.update({"PORT": str(dep.port), "AUTODEPLOY_DEPLOYMENT": name,
                    "AUTODEPLOY_INSTANCE_ID": slot_name(name, n)})
        plans.append(ContainerPlan(
            deployment=name, slot=n, image=dep.image,
            # sh -c: spec.command is a shell line (`cd /app && python api.py`).
            command=("sh", "-c", dep.command), port=dep.port, env=env,
            secret_env={k: split_config_key(v) for k, v in dep.secret_env.items()},
            cpus=None if dep.resources.cpu is None else f"{dep.resources.cpu:g}",
            memory_mb=None if dep.resources.memory_gb is None else int(dep.resources.memory_gb * 1024),
            gpu_ids=tuple(result.gpu_ids),
            gpu_devices=tuple(docker_device_id(gpu_by_uuid[(node_of.get(slot_name(name, n)), u)])
                              for u in result.gpu_ids),
            labels=container_labels(dep, n, result.gpu_ids), healthcheck=healthcheck_plan(dep),
            node=node_of.get(slot_name(name, n))))
    return plans


def applied_replicas(deployments: Sequence[Deployment], plans: Sequence[ContainerPlan]) -> dict[str, list[int]]:
    """The `replicas` output: exactly the slots that run, in the list form config takes."""
    out: dict[str, list[int]] = {d.name: [] for d in deployments}
    for plan in plans:
        out[plan.deployment].append(plan.slot)
    return {k: sorted(v) for k, v in sorted(out.items())}


def applied_pins(plans: Sequence[ContainerPlan]) -> dict[str, list[str]]:
    return {p.slot_name: list(p.gpu_ids) for p in plans if p.gpu_ids}


def applied_placements(plans: Sequence[ContainerPlan]) -> dict[str, str]:
    """The `placements` output (slot -> node); fed back as config, no slot ever moves."""
    return {p.slot_name: p.node for p in plans if p.node}


def node_views(nodes: Sequence[Any]) -> list[NodeView]:
    """autodeploy:nodes -> what placement reads. The program sees only declared GPUs: a
    node that relies on `gpus: {probeImage}` is probed by the controller, not here."""
    from controller.nodes import declared_gpus as node_gpus
    return [NodeView(n.name, tuple(node_gpus(n)), dict(n.labels)) for n in nodes]


def gateway_routes(deployments: Sequence[Deployment], plans: Sequence[ContainerPlan],
                   addresses: Mapping[str, str] | None = None) -> dict[str, Any]:
    """AUTODEPLOY_ROUTES for `autodeploy gateway-static`: per deployment, its balancing
    rules and the network addresses of its instances (empty for a stopped one, so the
    gateway can answer "stopped" instead of "not found"). `addresses` (slot -> host:port)
    replaces the network address: with several nodes the gateway dials published ports."""
    addresses = addresses or {}
    routes: dict[str, Any] = {}
    for dep in sorted(deployments, key=lambda d: d.name):
        check = dep.load_balancer.health_check
        routes[dep.name] = {
            "state": dep.state,
            "algorithm": dep.load_balancer.algorithm,
            "stickySessions": dep.load_balancer.sticky_sessions,
            "healthCheckPath": check.path if check else None,
            "requestTimeout": dep.request_timeout_s,
            "access": dep.access,  # private: the static gateway checks AUTODEPLOY_ENDPOINT_KEYS
            "instances": [{"id": p.slot_name, "address": addresses.get(p.slot_name, p.network_address)}
                          for p in plans if p.deployment == dep.name],
        }
    return {"version": 1, "deployments": routes}


def auth_env(api_tokens: str | None, endpoint_keys: str | None) -> dict[str, str]:
    """The static gateway's access control from the stack's secrets, hashed as `serve`
    stores them: `autodeploy:apiTokens` (`name:role:TOKEN`, comma-separated) becomes
    AUTODEPLOY_API_TOKENS (`name:role:sha256`), `autodeploy:endpointKeys`
    (`deployment:KEY:1|0`, 1 = may scale out) AUTODEPLOY_ENDPOINT_KEYS
    (`deployment:sha256:1|0`). A malformed item is a coded error (1014) naming the key,
    never its value. Without tokens the API answers 401, without keys a private
    deployment 1035: the gateway fails closed."""
    from controller.auth import digest
    tokens, keys = [], []
    for i, item in enumerate(t.strip() for t in (api_tokens or "").split(",") if t.strip()):
        parts = item.split(":")
        if len(parts) != 3 or parts[1] not in ("viewer", "operator", "admin") or not parts[0] or len(parts[2]) < 16:
            raise AutoDeployError(SPEC_INVALID, f"{NAMESPACE}:apiTokens item {i + 1} must be name:role:TOKEN with "
                                                "role viewer, operator or admin and a token of 16+ characters")
        tokens.append(f"{parts[0]}:{parts[1]}:{digest(parts[2])}")
    for i, item in enumerate(k.strip() for k in (endpoint_keys or "").split(",") if k.strip()):
        parts = item.split(":")
        if len(parts) != 3 or parts[2] not in ("0", "1") or not parts[0] or len(parts[1]) < 16:
            raise AutoDeployError(SPEC_INVALID, f"{NAMESPACE}:endpointKeys item {i + 1} must be "
                                                "deployment:KEY:1|0 (1: may scale out) with a key of 16+ characters")
        keys.append(f"{parts[0]}:{digest(parts[1])}:{parts[2]}")
    return {"AUTODEPLOY_API_TOKENS": ",".join(tokens), "AUTODEPLOY_ENDPOINT_KEYS": ",".join(keys)}


def haproxy_keys_map(endpoint_keys_env: str) -> str:
    """The HAProxy container's keys map from AUTODEPLOY_ENDPOINT_KEYS (hashes): the same
    `<deployment>:<sha256> 1|0` lines `serve --data-plane haproxy` keeps."""
    from gateway.haproxy_config import keys_map_text
    entries = {}
    for item in (k for k in endpoint_keys_env.split(",") if k):
        dep, key_hash, scale_out = item.split(":")
        entries[f"{dep}:{key_hash}"] = scale_out
    return keys_map_text(entries)


def haproxy_gateway_config(deployments: Sequence[Deployment], plans: Sequence[ContainerPlan],
                           activator_host: str, addresses: Mapping[str, str] | None = None) -> str:
    """The HAProxy container's config: `gateway/haproxy_config.render`, as `serve` renders
    it, with each deployment's instances as static servers (the stack changes them with an
    update) and the static gateway container as the activator."""
    from controller.contracts import HealthProbe, RouteEntry
    from gateway.haproxy_config import Server, Settings, backend_of, render
    addresses = addresses or {}
    backends, servers = [], {}
    for dep in sorted(deployments, key=lambda d: d.name):
        hc = dep.load_balancer.health_check
        backends.append(backend_of(RouteEntry(
            access=dep.access,  # private: HAProxy checks the key against KEYS_MAP_PATH
            algorithm=dep.load_balancer.algorithm, sticky=dep.load_balancer.sticky_sessions,
            request_timeout=dep.request_timeout_s, protocol=dep.protocol,
            tunnel_idle_timeout=dep.tunnel_idle_timeout_s,
            health=None if hc is None else HealthProbe(hc.path, hc.interval_s, hc.timeout_s, hc.failure_threshold)),
            dep.name))
        servers[dep.name] = []
        for p in plans:
            if p.deployment != dep.name:
                continue
            host, _, port = addresses.get(p.slot_name, p.network_address).rpartition(":")
            servers[dep.name].append(Server(p.slot_name, host, int(port)))
    settings = Settings(bind_host="0.0.0.0", bind_port=GATEWAY_INTERNAL_PORT, activator_host=activator_host,
                        activator_port=GATEWAY_INTERNAL_PORT, socket_path="/tmp/haproxy.sock", maxconn=4096,
                        docker_dns=True, keys_map=KEYS_MAP_PATH)
    return render(settings, backends, servers)


# The HAProxy container writes its config from the environment, then runs it in the foreground.
# The endpoint keys (hashes, from the secret HAPROXY_KEYS) go to a map file next to it.
KEYS_MAP_PATH = "/tmp/keys.map"
HAPROXY_COMMAND = ["sh", "-c", 'printf "%s" "$HAPROXY_CONFIG" > /tmp/haproxy.cfg && '
                               f'printf "%s" "$HAPROXY_KEYS" > {KEYS_MAP_PATH} && '
                               "exec haproxy -W -db -f /tmp/haproxy.cfg"]


def instance_endpoint(docker_host: str | None) -> tuple[str, str]:
    """(IP to publish instance ports on, host the controller dials them at).

    A local engine publishes on loopback only: instances are for the gateway, not the
    network. A remote engine (tcp://, ssh://) must publish on all interfaces and is
    dialled at its own host name.
    """
    if not docker_host or docker_host.startswith(("unix://", "npipe://")):
        return "127.0.0.1", "127.0.0.1"
    host = urlparse(docker_host).hostname
    if not host:
        raise AutoDeployError(SPEC_INVALID, f"{NAMESPACE}:dockerHost {docker_host!r} names no host")
    return "0.0.0.0", host


def gateway_url(gateway_host: str, gateway_port: int, docker_host: str | None) -> str:
    host = gateway_host
    if host in _WILDCARD_HOSTS:
        host = instance_endpoint(docker_host)[1]
    return f"http://{host}:{gateway_port}"


def instance_output(plan: ContainerPlan, host: str, external_port: int | None,
                    container_id: str | None) -> dict[str, Any]:
    """One item of `deployments.<name>.instances`."""
    return {"name": plan.slot_name, "address": f"{host}:{external_port}",
            "gpu_ids": list(plan.gpu_ids), "container_id": container_id}


def published_port(ports: Any, internal: int) -> int | None:
    """The host port Docker gave `internal`, from a Container's `ports` output."""
    for port in ports or []:
        get = port.get if isinstance(port, Mapping) else (lambda k, p=port: getattr(p, k, None))
        if get("internal") == internal:
            external = get("external")
            return int(external) if external is not None else None
    return None


def deployments_output(deployments: Sequence[Deployment],
                       instances: Mapping[str, Sequence[dict[str, Any]]]) -> dict[str, Any]:
    return {d.name: {"instances": list(instances.get(d.name, []))}
            for d in sorted(deployments, key=lambda d: d.name)}


# --- config and YAML ---------------------------------------------------------------------

def _bool(value: str | None, key: str, default: bool) -> bool:
    if value is None:
        return default
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise AutoDeployError(SPEC_INVALID, f"{NAMESPACE}:{key} must be true or false, got {value!r}")


def declared_gpus(raw: Any) -> tuple[Any, ...]:
    """`gpus` config -> controller.stack.DeclaredGpu items (what discover_inventory reads)."""
    from controller.stack import DeclaredGpu
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise AutoDeployError(SPEC_INVALID, f"{NAMESPACE}:gpus must be a list of {{index, name, uuid?, "
                                            f"memoryMb?}}, got {raw!r}")
    out = []
    for pos, item in enumerate(raw):
        if not isinstance(item, Mapping) or "index" not in item or "name" not in item:
            raise AutoDeployError(SPEC_INVALID, f"{NAMESPACE}:gpus item {pos} needs `index` and `name`, "
                                                f"got {item!r}")
        memory = item.get("memoryMb")
        out.append(DeclaredGpu(index=int(item["index"]), name=str(item["name"]),
                               uuid=None if item.get("uuid") is None else str(item["uuid"]),
                               memory_mb=None if memory is None else int(memory)))
    return tuple(out)


def parse_nodes(raw: Any) -> tuple[Any, ...]:
    """`nodes` config -> controller.stack.NodeConfig items, checked as `autodeploy serve` checks them."""
    from controller.stack import _Invalid, _nodes
    try:
        return tuple(_nodes(raw))
    except _Invalid as exc:
        raise AutoDeployError(SPEC_INVALID, f"{NAMESPACE}:nodes: {exc}") from None


def parse_placements(raw: Any) -> dict[str, str]:
    raw = _json_config(raw, "placements")
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or not all(isinstance(v, str) for v in raw.values()):
        raise AutoDeployError(SPEC_INVALID, f"{NAMESPACE}:placements must map slot (<deployment>-<n>) to a "
                                            f"node name, got {raw!r}")
    return {str(k): v for k, v in raw.items()}


def provider_args(node: Any) -> dict[str, Any]:
    """docker.Provider arguments for one node: its host, and TLS material read from the
    files the stack names (kept secret in the state)."""
    import pulumi
    args: dict[str, Any] = {"host": node.docker_host}
    if node.tls is not None:
        for arg, path in (("ca_material", node.tls.ca_cert), ("cert_material", node.tls.cert),
                          ("key_material", node.tls.key)):
            try:
                text = Path(path).read_text()
            except OSError as exc:
                raise AutoDeployError(SPEC_INVALID, f"{NAMESPACE}:nodes: node {node.name!r} tls: cannot read "
                                                    f"{path}: {exc.strerror}") from None
            args[arg] = pulumi.Output.secret(text) if arg == "key_material" else text
    return args


def read_config(config: Any) -> ProgramConfig:
    """`config` is a `pulumi.Config("autodeploy")` (or anything with its get/get_object)."""
    port = config.get_int("gatewayPort")
    return ProgramConfig(
        nodes=parse_nodes(config.get_object("nodes")),
        placements=parse_placements(config.get_object("placements")),
        deployments_dir=config.get("deploymentsDir") or "deployments",
        replicas=parse_replicas(config.get_object("replicas")),
        pins=parse_pins(config.get_object("pins")),
        gpus=declared_gpus(config.get_object("gpus")),
        gateway_port=8080 if port is None else port,
        gateway_host=config.get("gatewayHost") or "127.0.0.1",
        docker_host=config.get("dockerHost"),
        gateway_container=_bool(config.get("gatewayContainer"), "gatewayContainer", True),
        data_plane=_data_plane(config.get("dataPlane")))


def _data_plane(value: str | None) -> str:
    if value in (None, ""):
        return "haproxy"
    if value not in ("haproxy", "python"):
        raise AutoDeployError(SPEC_INVALID, f"{NAMESPACE}:dataPlane must be haproxy or python, got {value!r}")
    return value


def load_deployments(deployments_dir: Path) -> list[Deployment]:
    """Every deployment in the folder, or one error listing every FILE:LINE problem:
    an update never applies half of a broken commit."""
    from controller.loader import load_paths
    result = load_paths([deployments_dir], require_image=True)
    if not result.ok:
        lines = "\n".join(f"  {e}" for e in result.errors)
        raise AutoDeployError(SPEC_INVALID, f"{len(result.errors)} error(s) in {deployments_dir}; "
                                            f"nothing was changed:\n{lines}")
    return list(result.deployments)


def gateway_image_name() -> str:
    # Versioned so that upgrading the package rebuilds the image *and* replaces the
    # gateway container (an unchanged name would leave the old container running).
    return f"{GATEWAY_REPOSITORY}:{metadata.version('autodeploy')}"


# --- the program ----------------------------------------------------------------------------

@dataclass
class ProgramResult:
    """What `program()` declared, for tests and for callers composing it."""
    config: ProgramConfig
    deployments: list[Deployment]
    plans: list[ContainerPlan]
    inventory: Inventory
    network: Any
    containers: dict[str, Any]           # slot name -> docker.Container
    envs: dict[str, Any]                 # slot name -> the envs input (an Output when secret)
    gateway_image: Any | None
    gateway: Any | None
    outputs: dict[str, Any]              # exported name -> value / Output
    providers: dict[str | None, Any] = field(default_factory=dict)  # node -> docker.Provider
    networks: dict[str | None, Any] = field(default_factory=dict)   # node -> its stack network
    haproxy: Any | None = None           # the HAProxy container (autodeploy:dataPlane haproxy)


def _inventory(cfg: ProgramConfig, nvml: Any | None) -> Inventory:
    import pulumi

    from controller.gpus import discover_inventory
    from controller.stack import StackConfig
    # Named like the file the config normally comes from; inventory.source then reads
    # "stack config Pulumi.<stack>.yaml", as `autodeploy gpus` prints it.
    stack = StackConfig(name=pulumi.get_stack(), source=f"Pulumi.{pulumi.get_stack()}.yaml", gpus=list(cfg.gpus))
    return discover_inventory(stack, nvml)


def _envs(plan: ContainerPlan) -> Any:
    import pulumi
    plain = [f"{k}={v}" for k, v in sorted(plan.env.items())]
    if not plan.secret_env:
        return plain
    names = sorted(plan.secret_env)
    values = [pulumi.Config(plan.secret_env[n][0]).require_secret(plan.secret_env[n][1]) for n in names]
    # The secret Outputs make the whole list secret: Pulumi stores and shows it as [secret].
    return pulumi.Output.all(*values).apply(
        lambda vals: sorted(plain + [f"{n}={v}" for n, v in zip(names, vals)]))


def program(project_dir: Path | None = None, nvml: Any | None = None) -> ProgramResult:
    """Declare the stack. `project_dir` defaults to the working directory, which is the
    project when Pulumi runs the program; `nvml` is a `controller.gpus.NvmlGpuSource`
    (default: a new one) for the GPU inventory."""
    import pulumi
    import pulumi_docker as docker

    project = (project_dir or Path.cwd()).resolve()
    cfg = read_config(pulumi.Config(NAMESPACE))
    deployments_dir = Path(cfg.deployments_dir)
    if not deployments_dir.is_absolute():
        deployments_dir = project / deployments_dir
    deployments = load_deployments(deployments_dir)
    inventory = _inventory(cfg, nvml)
    pulumi.log.info(f"GPU inventory from {inventory.source}" + (f" ({inventory.detail})" if inventory.detail else ""))
    known = {d.name for d in deployments}
    for name in sorted(set(cfg.replicas) - known):
        pulumi.log.warn(f"{NAMESPACE}:replicas names {name!r}, which is not in {deployments_dir}; ignored")
    if cfg.nodes and cfg.docker_host:
        raise AutoDeployError(SPEC_INVALID, f"{NAMESPACE}:dockerHost is the one-node shorthand; with "
                                            f"{NAMESPACE}:nodes give each node its own dockerHost instead")
    plans = plan_resources(deployments, {k: list(v) for k, v in cfg.replicas.items()}, inventory, cfg.pins,
                           nodes=node_views(cfg.nodes) if cfg.nodes else None, placements=cfg.placements)

    def network_of(opts: Any, resource: str) -> Any:
        return docker.Network(resource, name=f"autodeploy-{pulumi.get_stack()}",
                              labels=[docker.NetworkLabelArgs(label=f"{LABEL_PREFIX}managed", value="true")],
                              opts=opts)

    # One provider (and stack network) per node; the one-node shorthand keeps the names
    # it always had ("docker", "autodeploy"), so existing stacks replace nothing.
    endpoints: dict[str | None, tuple[str, str]] = {}
    if cfg.nodes:
        providers = {n.name: docker.Provider(f"docker-{n.name}", **provider_args(n)) for n in cfg.nodes}
        options = {n.name: pulumi.ResourceOptions(provider=providers[n.name]) for n in cfg.nodes}
        networks = {n.name: network_of(options[n.name], f"autodeploy-{n.name}") for n in cfg.nodes}
        endpoints = {n.name: (bind_address(n.address), n.address) for n in cfg.nodes}
        first = cfg.nodes[0].name
        base, network = options[first], networks[first]
    else:
        provider = docker.Provider("docker", host=cfg.docker_host) if cfg.docker_host else None
        providers = {None: provider} if provider is not None else {}
        base = pulumi.ResourceOptions(provider=provider)
        options = {None: base}
        network = network_of(base, "autodeploy")
        networks = {None: network}
        endpoints = {None: instance_endpoint(cfg.docker_host)}
    containers: dict[str, Any] = {}
    envs: dict[str, Any] = {}
    for plan in plans:
        bind_ip = endpoints[plan.node][0]
        check = plan.healthcheck
        envs[plan.slot_name] = _envs(plan)
        containers[plan.slot_name] = docker.Container(
            plan.resource_name,
            name=plan.container_name,
            # By name, never pulled: the image must already be on the engine (no registry
            # is assumed reachable). A RemoteImage with keep_locally and no pull does not exist.
            image=plan.image,
            command=list(plan.command),
            envs=envs[plan.slot_name],
            ports=[docker.ContainerPortArgs(internal=plan.port, ip=bind_ip)],
            cpus=plan.cpus,
            memory=plan.memory_mb,
            gpus=plan.gpus_flag,
            labels=[docker.ContainerLabelArgs(label=k, value=v) for k, v in sorted(plan.labels.items())],
            healthcheck=None if check is None else docker.ContainerHealthcheckArgs(
                tests=list(check.tests), interval=check.interval, timeout=check.timeout, retries=check.retries),
            networks_advanced=[docker.ContainerNetworksAdvancedArgs(name=networks[plan.node].name,
                                                                    aliases=[plan.slot_name])],
            # Without a controller watching, Docker itself restarts a crashed model.
            restart="unless-stopped",
            # An init as PID 1 passes SIGTERM on (a PID 1 without a handler ignores it), so
            # removing a slot stops the model gracefully; kill after the grace period.
            init=True,
            destroy_grace_seconds=DESTROY_GRACE_S,
            # The container name is fixed, so the old one must go before its replacement.
            opts=pulumi.ResourceOptions.merge(options[plan.node], pulumi.ResourceOptions(delete_before_replace=True)))

    gateway_image = gateway = haproxy = None
    if cfg.gateway_container:
        gateway_image = docker.Image(
            "gateway-image", image_name=gateway_image_name(),
            build=docker.DockerBuildArgs(context=str(project), dockerfile=str(project / GATEWAY_DOCKERFILE)),
            skip_push=True, opts=base)
        bind_env = f"AUTODEPLOY_GATEWAY_BIND=0.0.0.0:{GATEWAY_INTERNAL_PORT}"
        # Access control from the stack's secrets, hashed inside an apply: the values only
        # ever exist as secret Outputs (stored and shown as [secret], never exported).
        stack_config = pulumi.Config(NAMESPACE)
        private = sorted(d.name for d in deployments if d.access == "private")

        def _auth(values: list[Any]) -> dict[str, str]:
            env = auth_env(values[0], values[1])
            if private and not env["AUTODEPLOY_ENDPOINT_KEYS"]:
                pulumi.log.warn(f"{', '.join(private)}: private, but {NAMESPACE}:endpointKeys is not set: "
                                "every request to them is refused (1035)")
            return env
        auth: Any = pulumi.Output.secret(pulumi.Output.all(
            stack_config.get_secret("apiTokens") or "", stack_config.get_secret("endpointKeys") or "").apply(_auth))
        if cfg.nodes:
            # Instances on other nodes are not on this node's network: the gateway (on the
            # first node) dials each at its node's address and published port.
            def _routes(ports: list[Any]) -> list[str]:
                addresses = {p.slot_name: f"{endpoints[p.node][1]}:{published_port(ps, p.port)}"
                             for p, ps in zip(plans, ports)}
                return [f"AUTODEPLOY_ROUTES={json.dumps(gateway_routes(deployments, plans, addresses), sort_keys=True)}",
                        bind_env]
            gateway_envs: Any = pulumi.Output.all(*[containers[p.slot_name].ports for p in plans]).apply(_routes)
        else:
            gateway_envs = [f"AUTODEPLOY_ROUTES={json.dumps(gateway_routes(deployments, plans), sort_keys=True)}",
                            bind_env]
        published = [docker.ContainerPortArgs(internal=GATEWAY_INTERNAL_PORT, external=cfg.gateway_port,
                                              ip=cfg.gateway_host)]
        activator_name = f"autodeploy-gateway-{pulumi.get_stack()}"
        gateway_envs = pulumi.Output.secret(pulumi.Output.all(gateway_envs, auth).apply(
            lambda v: list(v[0]) + [f"{k}={val}" for k, val in sorted(v[1].items())]))
        gateway = docker.Container(
            "gateway", name=activator_name,
            image=gateway_image.image_name,
            envs=gateway_envs,
            # haproxy data plane: HAProxy publishes the gateway port; this one is its activator.
            ports=published if cfg.data_plane == "python" else [],
            networks_advanced=[docker.ContainerNetworksAdvancedArgs(name=network.name)],
            labels=[docker.ContainerLabelArgs(label=f"{LABEL_PREFIX}managed", value="true"),
                    docker.ContainerLabelArgs(label=f"{LABEL_PREFIX}role", value="gateway")],
            restart="unless-stopped",
            opts=pulumi.ResourceOptions.merge(base, pulumi.ResourceOptions(
                delete_before_replace=True, depends_on=list(containers.values()))))
        if cfg.data_plane == "haproxy":
            if cfg.nodes:
                def _haproxy_env(ports: list[Any]) -> list[str]:
                    addresses = {p.slot_name: f"{endpoints[p.node][1]}:{published_port(ps, p.port)}"
                                 for p, ps in zip(plans, ports)}
                    return [f"HAPROXY_CONFIG={haproxy_gateway_config(deployments, plans, activator_name, addresses)}"]
                haproxy_envs: Any = pulumi.Output.all(*[containers[p.slot_name].ports for p in plans]) \
                    .apply(_haproxy_env)
            else:
                haproxy_envs = [f"HAPROXY_CONFIG={haproxy_gateway_config(deployments, plans, activator_name)}"]
            haproxy_envs = pulumi.Output.secret(pulumi.Output.all(haproxy_envs, auth).apply(
                lambda v: list(v[0]) + [f"HAPROXY_KEYS={haproxy_keys_map(v[1]['AUTODEPLOY_ENDPOINT_KEYS'])}"]))
            haproxy = docker.Container(
                "haproxy", name=f"autodeploy-haproxy-{pulumi.get_stack()}",
                image=gateway_image.image_name,
                command=list(HAPROXY_COMMAND),
                envs=haproxy_envs,
                ports=published,
                networks_advanced=[docker.ContainerNetworksAdvancedArgs(name=network.name)],
                labels=[docker.ContainerLabelArgs(label=f"{LABEL_PREFIX}managed", value="true"),
                        docker.ContainerLabelArgs(label=f"{LABEL_PREFIX}role", value="haproxy")],
                restart="unless-stopped",
                opts=pulumi.ResourceOptions.merge(base, pulumi.ResourceOptions(
                    delete_before_replace=True, depends_on=[gateway])))

    def _instances_output(args: list[Any]) -> dict[str, Any]:
        by_dep: dict[str, list[dict[str, Any]]] = {}
        for plan, (ports, container_id) in zip(plans, zip(args[0::2], args[1::2])):
            by_dep.setdefault(plan.deployment, []).append(
                instance_output(plan, endpoints[plan.node][1], published_port(ports, plan.port), container_id))
        return deployments_output(deployments, by_dep)

    resolved = [x for p in plans for x in (containers[p.slot_name].ports, containers[p.slot_name].id)]
    outputs: dict[str, Any] = {
        "gateway_url": gateway_url(cfg.gateway_host, cfg.gateway_port,
                                   cfg.nodes[0].docker_host if cfg.nodes else cfg.docker_host),
        "deployments": pulumi.Output.all(*resolved).apply(_instances_output),
        "replicas": applied_replicas(deployments, plans),
        "pins": applied_pins(plans),
        "gpu_inventory": inventory.source,
    }
    if cfg.nodes:
        outputs["placements"] = applied_placements(plans)
    for name, value in outputs.items():
        pulumi.export(name, value)
    return ProgramResult(config=cfg, deployments=deployments, plans=plans, inventory=inventory, network=network,
                         containers=containers, envs=envs, gateway_image=gateway_image, gateway=gateway,
                         haproxy=haproxy,
                         outputs=outputs, providers=providers, networks=networks)
