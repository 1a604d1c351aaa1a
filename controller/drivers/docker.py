"""Docker driver: each instance is one container on a Docker Engine, via the docker SDK.

The driver never pulls: an image that is not on the engine is a user error (1010) with
the command that builds or loads it, because a silent pull of a multi-GB model image
from a registry we may not reach would stall a cold start for minutes.

Containers carry `autodeploy.*` labels so a restarted controller can adopt what it
started (`adopt`) and report what it did not (`discover`). Restart policy is `no`: the
controller restarts crashed instances itself, with backoff, and records why.
"""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import threading
import math
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any

import docker
import docker.errors
import docker.tls
import docker.types
import requests

from controller.drivers.base import Exit, Instance
from controller.errors import DRIVER_FAILED, IMAGE_MISSING, NODE_UNREACHABLE, AutoDeployError
from controller.gpus import Gpu
from controller.nodes import PROBE_COMMAND, NodeBook, NodeState, declared_gpus, parse_probe_output
from controller.spec import Deployment
from controller.secrets import SecretSource
from controller.stack import NodeConfig

log = logging.getLogger("autodeploy.docker")

LABEL_MANAGED = "autodeploy.managed"
LABEL_DEPLOYMENT = "autodeploy.deployment"
LABEL_INSTANCE = "autodeploy.instance"
LABEL_REVISION = "autodeploy.revision"
LABEL_GPUS = "autodeploy.gpus"
# The container port, so `discover` knows which published port is the instance's.
LABEL_PORT = "autodeploy.port"
LABEL_OWNER = "autodeploy.owner"  # the state dir of the serve that started it

HOST = "127.0.0.1"
DECLARED_PREFIX = "declared-"
GIB = 1024 ** 3

# Storage drivers whose `--storage-opt size` the engine enforces. overlay2 only does
# on xfs mounted with pquota; the mount option is not in `docker info`, so that case
# is settled by the engine's answer to the first create that asks for a size.
_SIZED_DRIVERS = {"devicemapper", "btrfs", "zfs"}

_ENGINE_ERRORS = (docker.errors.DockerException, requests.RequestException)


def container_name(deployment: str, instance_id: str) -> str:
    return f"autodeploy-{deployment}-{instance_id}"


def storage_support(info: dict[str, Any]) -> str | None:
    """None when this engine (its `docker info`) can cap a container's disk; else why not."""
    driver = str(info.get("Driver", ""))
    status = {str(pair[0]): str(pair[1]) for pair in info.get("DriverStatus") or [] if len(pair) == 2}
    fs = status.get("Backing Filesystem", "")
    if driver in _SIZED_DRIVERS or (driver == "overlay2" and fs == "xfs"):
        return None
    on = f" on {fs}" if fs else ""
    return (f"storageGb is not enforced: the engine's storage driver {driver or 'unknown'}{on} "
            "cannot cap a container's disk (that needs overlay2 on xfs mounted with pquota, "
            "devicemapper, btrfs or zfs)")


def container_config(dep: Deployment, instance_id: str, gpu_ids: list[str],
                     limit_storage: bool = True, bind_ip: str = HOST, owner: str | None = None) -> dict[str, Any]:
    """Keyword arguments for `client.containers.create` that make one instance of `dep`.

    Pure: the same inputs give the same container, so tests can inspect what `start`
    would run without starting it (e.g. GPU requests on a machine with no GPU)."""
    if not dep.image:
        raise AutoDeployError(IMAGE_MISSING, f"deployment '{dep.name}' sets no spec.image; "
                              "the docker driver runs images only")
    env: dict[str, str] = {"PYTHONUNBUFFERED": "1"}  # so crash logs hold the last lines
    env.update(dep.env)
    env.update({
        "PORT": str(dep.port),
        "AUTODEPLOY_INSTANCE_ID": instance_id,
        "AUTODEPLOY_DEPLOYMENT": dep.name,
        "AUTODEPLOY_REVISION": dep.revision,
        # docker-init (tini) then sends SIGTERM to the whole process group, so a
        # command like `cd /app && python api.py` stops gracefully, not by SIGKILL.
        "TINI_KILL_PROCESS_GROUP": "1",
    })
    config: dict[str, Any] = {
        "image": dep.image,
        "name": container_name(dep.name, instance_id),
        "environment": env,
        "labels": {
            LABEL_MANAGED: "true",
            LABEL_DEPLOYMENT: dep.name,
            LABEL_INSTANCE: instance_id,
            LABEL_REVISION: dep.revision,
            LABEL_GPUS: ",".join(gpu_ids),
            LABEL_PORT: str(dep.port),
            **({LABEL_OWNER: owner} if owner else {}),
        },
        # A free host port on the node's address only (loopback for the local engine).
        "ports": {f"{dep.port}/tcp": (bind_ip, None)},
        "restart_policy": {"Name": "no"},
        # An init as PID 1: the kernel drops SIGTERM to a PID 1 without a handler
        # (most model servers), which would turn every stop into a kill.
        "init": True,
        "detach": True,
    }
    if dep.command:
        config["entrypoint"] = ["/bin/sh", "-c"]
        config["command"] = [dep.command.replace("${PORT}", str(dep.port))]
    res = dep.resources
    if res.cpu:
        config["nano_cpus"] = int(round(res.cpu * 1e9))
    if res.memory_gb:
        config["mem_limit"] = int(round(res.memory_gb * GIB))
        # Without this the engine allows as much swap again, and the limit the user
        # declared would not be the one that holds.
        config["memswap_limit"] = config["mem_limit"]
    if res.storage_gb and limit_storage:
        config["storage_opt"] = {"size": str(int(round(res.storage_gb * GIB)))}
    if gpu_ids:
        # The exact ids placement chose; the NVIDIA runtime maps them into the container
        # (and sets NVIDIA_VISIBLE_DEVICES), so CUDA_VISIBLE_DEVICES stays unset.
        # A GPU declared in the stack config has no real uuid ("declared-2"): its index.
        config["device_requests"] = [docker.types.DeviceRequest(
            driver="nvidia", device_ids=[_device_id(g) for g in gpu_ids], capabilities=[["gpu"]])]
    return config


def _device_id(gpu_id: str) -> str:
    return gpu_id[len(DECLARED_PREFIX):] if gpu_id.startswith(DECLARED_PREFIX) else gpu_id


def bind_address(address: str) -> str:
    """The IP to publish on so that instances are reached at `address` and nowhere else;
    a host name cannot be bound, so then every interface of that node."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return "0.0.0.0"


def usage_from_stats(raw: dict[str, Any], nano_cpus: int = 0) -> dict[str, float]:
    """cpu_pct (of the container's CPU limit, else of the host's CPUs), mem_pct (of its
    memory limit) and mem_bytes from one Engine stats sample; {} when it has no data."""
    cpu, pre = raw.get("cpu_stats") or {}, raw.get("precpu_stats") or {}
    mem = raw.get("memory_stats") or {}
    if "usage" not in mem or "system_cpu_usage" not in cpu:
        return {}  # the container is not running
    cpu_delta = cpu["cpu_usage"]["total_usage"] - (pre.get("cpu_usage") or {}).get("total_usage", 0)
    sys_delta = cpu["system_cpu_usage"] - pre.get("system_cpu_usage", 0)
    online = cpu.get("online_cpus") or len(cpu["cpu_usage"].get("percpu_usage") or [1])
    used_cores = cpu_delta / sys_delta * online if sys_delta > 0 and pre else 0.0
    limit_cores = nano_cpus / 1e9 if nano_cpus else float(online)
    # Page cache is reclaimable, so it is not pressure: the same subtraction `docker
    # stats` makes (cgroup v1 names it total_inactive_file, v2 inactive_file).
    detail = mem.get("stats") or {}
    cache = detail.get("total_inactive_file", detail.get("inactive_file", 0))
    used = max(0, mem["usage"] - cache)
    limit = mem.get("limit") or 0
    return {"cpu_pct": 100.0 * used_cores / limit_cores,
            "mem_pct": 100.0 * used / limit if limit else 0.0, "mem_bytes": float(used)}


class _Engine:
    """One node's Docker Engine: its client, and what this engine can cap."""

    def __init__(self, node: NodeConfig, client: Any, storage_note: str | None) -> None:
        self.node = node
        self.client = client
        self.storage_note = storage_note
        self.pinger: Any = None
        self.lock = threading.Lock()  # guards storage_note, learnt from a create


def _client(node: NodeConfig, timeout: float) -> Any:
    """A Docker SDK client for the node's engine (unix, ssh or tcp with TLS)."""
    if not node.docker_host:
        return docker.from_env(timeout=int(timeout))
    tls: Any = False
    if node.tls is not None:
        tls = docker.tls.TLSConfig(client_cert=(node.tls.cert, node.tls.key), ca_cert=node.tls.ca_cert, verify=True)
    # ssh://: the system ssh client, so ~/.ssh/config and agents work as they do for `docker -H`.
    return docker.DockerClient(base_url=node.docker_host, timeout=int(timeout), tls=tls,
                               use_ssh_client=node.docker_host.startswith("ssh://"))


class DockerDriver:
    """Runs instances as containers on one or several Docker Engines (`nodes`), one client
    per engine. Without `nodes`, one node named "local" at `base_url` (default:
    DOCKER_HOST, else the local unix socket) whose GPUs are `inventory`'s.

    Engines that stop answering are marked unreachable in `self.nodes` (a NodeBook) by a
    watcher that pings each one every `ping_interval` s, and at once by any call that
    fails to reach it; calls for instances on such a node never block or raise there
    (poll says "still running", stop leaves the container for when it returns)."""

    name = "docker"
    tcp_accept_means_ready = False  # docker-proxy accepts on the published port before the container listens

    def __init__(self, base_url: str | None = None, timeout: float = 60, *,
                 nodes: Sequence[NodeConfig] | None = None, inventory: Any = None,
                 on_event: Callable[[str, str, str], None] | None = None,
                 ping_interval: float = 1.0, ping_timeout: float = 3.0,
                 clock: Callable[[], float] = time.time, owner: str | None = None) -> None:
        self.base_url = base_url
        self.owner = owner  # labels our containers, so a serve that lost its store finds its own
        self.timeout = timeout
        # `{secret: KEY}` values for an instance (serve sets the stack-aware source).
        self.secrets: Callable[[Deployment], dict[str, str]] = SecretSource().resolve
        self.ping_timeout = ping_timeout
        self.clock = clock
        self.on_event = on_event or (lambda node, kind, msg: log.info("node %s %s: %s", node, kind, msg))
        shorthand = not nodes
        configs = list(nodes) if nodes else [NodeConfig(name="local", docker_host=base_url, address=HOST)]
        self.engines: dict[str, _Engine] = {}
        states: list[NodeState] = []
        failures: list[str] = []
        now = clock()
        for node in configs:
            where = node.docker_host or "DOCKER_HOST or unix:///var/run/docker.sock"
            client, info, error = None, None, ""
            try:
                client = _client(node, timeout)
                info = client.info()
            except _ENGINE_ERRORS as exc:
                error = f"no Docker Engine answers at {where} ({exc})"
                failures.append(f"node {node.name}: {error}")
            self.engines[node.name] = _Engine(node, client, storage_support(info) if info else None)
            gpus, source, detail = self._gpus(node, client if info else None, inventory if shorthand else None)
            states.append(NodeState(name=node.name, address=node.address, docker_host=node.docker_host,
                                    labels=dict(node.labels), gpus=tuple(gpus), gpu_source=source, gpu_detail=detail,
                                    reachable=info is not None, error=error, since=now))
        if len(failures) == len(configs):
            # Nothing to run on at all: say so at start rather than fail every request.
            raise AutoDeployError(DRIVER_FAILED, "; ".join(failures) + "; start dockerd or point DOCKER_HOST "
                                  "(or the stack's dockerHost) at a running engine")
        self.nodes = NodeBook(states)
        for failure in failures:
            self.on_event(failure.split(":", 1)[0].removeprefix("node "), "unreachable", failure.split(": ", 1)[1])
        # instance id -> what `start` could not apply, for the controller's events.
        self.notes: dict[str, str] = {}
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, args=(ping_interval,), name="docker-nodes", daemon=True)
        self._watcher.start()

    # ------------------------------------------------------------------ nodes
    def _gpus(self, node: NodeConfig, client: Any, inventory: Any) -> tuple[list[Gpu], str, str]:
        if inventory is not None:  # the one-node shorthand: NVML or the stack's autodeploy:gpus
            return list(inventory.gpus), str(inventory.source), str(getattr(inventory, "detail", ""))
        if node.gpus:
            return declared_gpus(node), "stack config", ""
        if node.gpu_probe_image is None:
            return [], "none", "no gpus declared for this node"
        if client is None:
            return [], "none", "the node did not answer, so its GPUs were not probed"
        return self._probe(node, client)

    def _probe(self, node: NodeConfig, client: Any) -> tuple[list[Gpu], str, str]:
        """Run nvidia-smi in the probe image with `--gpus all` on the node (never pulled)."""
        image = node.gpu_probe_image or ""
        source = f"probe {image}"
        try:
            client.images.get(image)
        except docker.errors.ImageNotFound:
            return [], "none", (f"probe image {image!r} is not on node {node.name}: load it there "
                                "(docker load) or declare the node's gpus")
        except _ENGINE_ERRORS as exc:
            return [], "none", f"probing GPUs failed: {exc}"
        name = f"autodeploy-gpu-probe-{node.name}-{int(self.clock())}"
        try:
            raw = client.containers.run(image, PROBE_COMMAND, entrypoint=[], remove=True, stdout=True, stderr=True,
                                        device_requests=[docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])],
                                        name=name)
        except _ENGINE_ERRORS as exc:
            try:  # a probe the engine created but could not start stays behind otherwise
                client.containers.get(name).remove(force=True)
            except _ENGINE_ERRORS:
                pass
            return [], "none", f"probing GPUs with {image} failed: {exc}"
        gpus = parse_probe_output(raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw))
        return gpus, source, "" if gpus else "nvidia-smi listed no GPU"

    def _watch(self, interval: float) -> None:
        while not self._stop.wait(interval):
            for name, engine in list(self.engines.items()):
                self._ping(name, engine)

    def _ping(self, name: str, engine: _Engine) -> None:
        try:
            if engine.client is None:
                engine.client = _client(engine.node, self.timeout)
            if engine.pinger is None:  # its own client: a short timeout, and no pool shared with calls
                engine.pinger = _client(engine.node, self.ping_timeout)
            engine.pinger.ping()
        except _ENGINE_ERRORS as exc:
            if engine.pinger is not None:
                engine.pinger.close()
                engine.pinger = None
            self._unreachable(name, f"ping: {exc}")
            return
        if self.nodes.mark(name, True, "", self.clock()):
            self.on_event(name, "reachable", f"engine {engine.node.docker_host or 'default'} answers again")

    def _unreachable(self, name: str, error: str) -> None:
        if self.nodes.mark(name, False, error, self.clock()):
            self.on_event(name, "unreachable", error)

    def _engine_of(self, inst: Instance | None = None, node: str | None = None) -> _Engine:
        name = node or (inst.node if inst is not None else None) or self.nodes.names()[0]
        try:
            return self.engines[name]
        except KeyError:
            raise AutoDeployError(NODE_UNREACHABLE, f"node {name!r} is not in the stack config's "
                                  "autodeploy:nodes any more") from None

    def _reachable(self, engine: _Engine) -> bool:
        return self.nodes.get(engine.node.name).reachable and engine.client is not None

    @contextlib.contextmanager
    def _on(self, engine: _Engine, action: str) -> Iterator[None]:
        """Engine failures become DRIVER_FAILED; a connection that fails marks the node
        unreachable and becomes NODE_UNREACHABLE."""
        try:
            yield
        except docker.errors.NotFound:
            raise
        except (requests.ConnectionError, requests.Timeout) as exc:
            self._unreachable(engine.node.name, f"{action}: {exc}")
            raise AutoDeployError(NODE_UNREACHABLE, f"node {engine.node.name}: {action}: {exc}") from exc
        except _ENGINE_ERRORS as exc:
            raise AutoDeployError(DRIVER_FAILED, f"{action}: {exc}") from exc

    def storage_note(self, node: str | None = None) -> str | None:
        """Why storageGb is not enforced on this node's engine; None when it is."""
        return self._engine_of(node=node).storage_note

    def container_config(self, dep: Deployment, instance_id: str, gpu_ids: list[str],
                         node: str | None = None) -> dict[str, Any]:
        engine = self._engine_of(node=node)
        return container_config(dep, instance_id, gpu_ids, limit_storage=engine.storage_note is None,
                                bind_ip=bind_address(engine.node.address), owner=self.owner)

    # ------------------------------------------------------------------ instances
    def start(self, dep: Deployment, instance_id: str, gpu_ids: list[str], node: str | None = None) -> Instance:
        """Create and start the container on `node` (default: the first); returns once it
        runs (not once it is ready).

        Raises IMAGE_MISSING when the image is not on the engine (nothing is pulled),
        NODE_UNREACHABLE when the node's engine does not answer, and DRIVER_FAILED when
        the engine refuses the container (the engine's words kept)."""
        engine = self._engine_of(node=node)
        if not self._reachable(engine):
            raise AutoDeployError(NODE_UNREACHABLE, f"node {engine.node.name}: {self.nodes.get(engine.node.name).error}")
        config = self.container_config(dep, instance_id, gpu_ids, node=engine.node.name)
        # Resolved here, never in container_config: its result is inspected and logged by tests.
        config["environment"] = {**dep.env, **self.secrets(dep), **config["environment"]}
        with self._on(engine, f"checking image {dep.image!r}"):
            try:
                engine.client.images.get(config["image"])
            except docker.errors.ImageNotFound:
                on = f" on node {engine.node.name}" if len(self.engines) > 1 else ""
                raise AutoDeployError(IMAGE_MISSING, (
                    f"image '{dep.image}' is not on the engine{on}; build it with "
                    f"`docker build -t {dep.image} .` or load it with `docker load -i {_tar_name(dep.image)}`; "
                    "Auto Deploy never pulls")) from None
        container = self._create(engine, dep, instance_id, config)
        try:
            with self._on(engine, f"starting container {config['name']}"):
                container.start()
                container.reload()  # the host port is known only once it runs
        except AutoDeployError as err:
            try:
                container.remove(force=True)
            except _ENGINE_ERRORS as exc:  # say so: a leftover container blocks the name
                raise AutoDeployError(err.error, f"{err.detail}; removing it failed too: {exc}") from exc
            raise
        note = self.notes.pop(instance_id, None)
        return Instance(id=instance_id, deployment=dep.name, revision=dep.revision, host=engine.node.address,
                        port=_published_port(container.attrs, dep.port),
                        started_at=_parse_time(container.attrs["State"].get("StartedAt")) or time.time(),
                        container_id=container.id, gpu_ids=list(gpu_ids), notes=[note] if note else [],
                        node=engine.node.name)

    def _create(self, engine: _Engine, dep: Deployment, instance_id: str, config: dict[str, Any]) -> Any:
        try:
            with self._on(engine, f"creating container {config['name']}"):
                try:
                    container = engine.client.containers.create(**config)
                except docker.errors.APIError as exc:
                    # overlay2 on xfs without pquota: only the engine knows, and says so here.
                    if "storage_opt" not in config or "storage-opt" not in str(exc):
                        raise
                    with engine.lock:
                        engine.storage_note = ("storageGb is not enforced: the engine refused a disk size "
                                               f"({exc.explanation or exc})")
                    config = {k: v for k, v in config.items() if k != "storage_opt"}
                    container = engine.client.containers.create(**config)
        except docker.errors.NotFound as exc:  # the image went away since we looked
            raise AutoDeployError(DRIVER_FAILED, f"creating container {config['name']}: {exc}") from exc
        if dep.resources.storage_gb and engine.storage_note:
            self.notes[instance_id] = engine.storage_note
        return container

    def poll(self, inst: Instance) -> Exit | None:
        """None while the container runs, or while its node does not answer (the node
        watch takes its instances out); Exit(code, log tail) once it exited, died or was
        removed (a removed one has no code and no log left)."""
        engine = self._engine_of(inst)
        if not self._reachable(engine):
            return None
        try:
            container = self._get(inst)
        except AutoDeployError as err:
            if err.error is NODE_UNREACHABLE:
                return None
            raise
        if container is None:
            return Exit(code=None, log_tail="")
        state = container.attrs.get("State") or {}
        status = state.get("Status")
        if status in ("running", "paused", "restarting"):
            return None
        if status == "created":  # never started, and nothing will start it: no exit code
            return Exit(code=None, log_tail="")
        tail = self.log_tail(inst)
        if state.get("OOMKilled"):
            tail += "\n[autodeploy] the container was killed: out of memory (resources.memoryGb)"
        return Exit(code=state.get("ExitCode"), log_tail=tail)

    def stop(self, inst: Instance, timeout: float) -> None:
        """SIGTERM, SIGKILL after `timeout` s, then remove the container. Idempotent.
        On a node that does not answer it returns at once: the container is reconciled
        when the node comes back (`controller.node_watch`).

        Removal takes the logs with it: read `log_tail` of a crashed instance first."""
        engine = self._engine_of(inst)
        if not self._reachable(engine):
            return
        try:
            container = self._get(inst)
            if container is None:
                return
            with self._on(engine, f"stopping container {container.name}"):
                try:
                    container.stop(timeout=math.ceil(timeout))
                    container.remove(force=True)
                except docker.errors.NotFound:
                    return
                except docker.errors.APIError as exc:
                    if exc.status_code != 409:  # 409: a removal already in progress
                        raise
        except AutoDeployError as err:
            if err.error is not NODE_UNREACHABLE:
                raise

    def adopt(self, inst: Instance) -> bool:
        """True when the container `inst` names still runs, on a node that answers, and its
        labels are `inst`'s."""
        engine = self._engine_of(inst)
        if not self._reachable(engine):
            return False
        try:
            container = self._get(inst)
        except AutoDeployError as err:
            if err.error is NODE_UNREACHABLE:
                return False
            raise
        if container is None:
            return False
        labels = container.labels
        return (container.status == "running"
                and labels.get(LABEL_MANAGED) == "true"
                and labels.get(LABEL_INSTANCE) == inst.id
                and labels.get(LABEL_DEPLOYMENT) == inst.deployment
                and labels.get(LABEL_REVISION) == inst.revision)

    def discover(self, node: str | None = None) -> list[Instance]:
        """Every container labelled autodeploy.managed=true, running or not, on every
        reachable node (or on `node` only)."""
        found: list[Instance] = []
        for name, engine in self.engines.items():
            if (node is not None and name != node) or not self._reachable(engine):
                continue
            try:
                with self._on(engine, f"listing containers on node {name}"):
                    containers = engine.client.containers.list(
                        all=True, filters={"label": f"{LABEL_MANAGED}=true"}, ignore_removed=True)
            except AutoDeployError as err:
                if err.error is NODE_UNREACHABLE:
                    continue
                raise
            found += [_instance_from(c.attrs, engine.node) for c in containers]
        return found

    def log_tail(self, inst: Instance, lines: int = 20) -> str:
        """The container's last output lines; works after it exited, until `stop` removes it."""
        engine = self._engine_of(inst)
        container = self._get(inst)
        if container is None:
            return ""
        try:
            with self._on(engine, f"reading logs of {container.name}"):
                raw = container.logs(stdout=True, stderr=True, tail=lines)
        except docker.errors.NotFound:
            return ""
        return raw.decode(errors="replace").rstrip("\n")

    def follow_logs(self, inst: Instance) -> Iterator[str]:
        """Output lines as they come (for `autodeploy logs --follow`); ends when the
        container stops."""
        engine = self._engine_of(inst)
        container = self._get(inst)
        if container is None:
            return
        pending = b""
        with self._on(engine, f"following logs of {container.name}"):
            for chunk in container.logs(stdout=True, stderr=True, stream=True, follow=True):
                pending += chunk
                *done, pending = pending.split(b"\n")
                for line in done:
                    yield line.decode(errors="replace")
        if pending:
            yield pending.decode(errors="replace")

    def log_path(self, inst: Instance) -> str | None:
        return None  # the engine keeps the log; use log_tail / follow_logs

    def stats(self, inst: Instance) -> dict[str, float]:
        """cpu_pct of its CPU limit, mem_pct of its memory limit, mem_bytes; {} when it
        does not run or its node does not answer. Blocks about a second: the engine
        samples CPU twice."""
        engine = self._engine_of(inst)
        if not self._reachable(engine):
            return {}
        container = self._get(inst)
        if container is None:
            return {}
        with self._on(engine, f"reading stats of {container.name}"):
            raw = container.stats(stream=False)
        return usage_from_stats(raw, int((container.attrs.get("HostConfig") or {}).get("NanoCpus") or 0))

    def close(self) -> None:
        self._stop.set()
        self._watcher.join(timeout=self.ping_timeout + 2)
        for engine in self.engines.values():
            for client in (engine.client, engine.pinger):
                if client is not None:
                    client.close()

    @property
    def client(self) -> Any:
        """The first node's client (the only one without `nodes`)."""
        return self._engine_of().client

    def _get(self, inst: Instance) -> Any | None:
        """The container, freshly inspected, or None when it no longer exists."""
        engine = self._engine_of(inst)
        if engine.client is None:
            raise AutoDeployError(NODE_UNREACHABLE, f"node {engine.node.name}: {self.nodes.get(engine.node.name).error}")
        ref = inst.container_id or container_name(inst.deployment, inst.id)
        with self._on(engine, f"inspecting container {ref}"):
            try:
                return engine.client.containers.get(ref)
            except docker.errors.NotFound:
                return None


def _instance_from(attrs: dict[str, Any], node: NodeConfig | None = None) -> Instance:
    labels = (attrs.get("Config") or {}).get("Labels") or {}
    container_port = int(labels.get(LABEL_PORT) or 0)
    gpus = labels.get(LABEL_GPUS) or ""
    state = attrs.get("State") or {}
    return Instance(id=labels.get(LABEL_INSTANCE, ""), deployment=labels.get(LABEL_DEPLOYMENT, ""),
                    revision=labels.get(LABEL_REVISION, ""), host=node.address if node else HOST,
                    port=_published_port(attrs, container_port),
                    started_at=_parse_time(state.get("StartedAt")) or 0.0,
                    container_id=attrs.get("Id"), gpu_ids=[g for g in gpus.split(",") if g],
                    node=node.name if node else None, owner=labels.get(LABEL_OWNER))


def _published_port(attrs: dict[str, Any], container_port: int) -> int:
    """The host port published for `container_port`; 0 when none (not running)."""
    bindings = ((attrs.get("NetworkSettings") or {}).get("Ports") or {}).get(f"{container_port}/tcp") or []
    for b in bindings:
        if b.get("HostPort"):
            return int(b["HostPort"])
    return 0


def _parse_time(stamp: str | None) -> float | None:
    """Engine times are RFC 3339 with nanoseconds; Python takes microseconds."""
    if not stamp or stamp.startswith("0001-"):
        return None
    head, _, frac = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}+00:00").timestamp()


def _tar_name(image: str) -> str:
    return image.rsplit("/", 1)[-1].replace(":", "_") + ".tar"
