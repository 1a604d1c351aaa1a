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
import math
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import docker
import docker.errors
import docker.types
import requests

from controller.drivers.base import Exit, Instance
from controller.errors import DRIVER_FAILED, IMAGE_MISSING, AutoDeployError
from controller.spec import Deployment

LABEL_MANAGED = "autodeploy.managed"
LABEL_DEPLOYMENT = "autodeploy.deployment"
LABEL_INSTANCE = "autodeploy.instance"
LABEL_REVISION = "autodeploy.revision"
LABEL_GPUS = "autodeploy.gpus"
# The container port, so `discover` knows which published port is the instance's.
LABEL_PORT = "autodeploy.port"

HOST = "127.0.0.1"
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
                     limit_storage: bool = True) -> dict[str, Any]:
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
        },
        "ports": {f"{dep.port}/tcp": (HOST, None)},  # a free host port, loopback only
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
        config["device_requests"] = [docker.types.DeviceRequest(
            driver="nvidia", device_ids=list(gpu_ids), capabilities=[["gpu"]])]
    return config


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


class DockerDriver:
    """Runs instances as containers on the engine at `base_url` (default: DOCKER_HOST,
    else the local unix socket)."""

    name = "docker"
    tcp_accept_means_ready = False  # docker-proxy accepts on the published port before the container listens

    def __init__(self, base_url: str | None = None, timeout: float = 60) -> None:
        self.base_url = base_url
        try:
            self.client = (docker.DockerClient(base_url=base_url, timeout=int(timeout))
                           if base_url else docker.from_env(timeout=int(timeout)))
            info = self.client.info()
        except _ENGINE_ERRORS as exc:
            where = base_url or "DOCKER_HOST or unix:///var/run/docker.sock"
            raise AutoDeployError(DRIVER_FAILED, f"no Docker Engine answers at {where} ({exc}); "
                                  "start dockerd or point DOCKER_HOST at a running engine") from exc
        self._storage_note = storage_support(info)
        # instance id -> what `start` could not apply, for the controller's events.
        self.notes: dict[str, str] = {}

    def storage_note(self) -> str | None:
        """Why storageGb is not enforced on this engine; None when it is."""
        return self._storage_note

    def container_config(self, dep: Deployment, instance_id: str, gpu_ids: list[str]) -> dict[str, Any]:
        return container_config(dep, instance_id, gpu_ids, limit_storage=self._storage_note is None)

    def start(self, dep: Deployment, instance_id: str, gpu_ids: list[str]) -> Instance:
        """Create and start the container; returns once it runs (not once it is ready).

        Raises IMAGE_MISSING when the image is not on the engine (nothing is pulled) and
        DRIVER_FAILED when the engine refuses the container (the engine's words kept)."""
        config = self.container_config(dep, instance_id, gpu_ids)
        with _engine(f"checking image {dep.image!r}"):
            try:
                self.client.images.get(config["image"])
            except docker.errors.ImageNotFound:
                raise AutoDeployError(IMAGE_MISSING, (
                    f"image '{dep.image}' is not on the engine; build it with "
                    f"`docker build -t {dep.image} .` or load it with `docker load -i {_tar_name(dep.image)}`; "
                    "Auto Deploy never pulls")) from None
        container = self._create(dep, instance_id, config)
        try:
            with _engine(f"starting container {config['name']}"):
                container.start()
                container.reload()  # the host port is known only once it runs
        except AutoDeployError as err:
            try:
                container.remove(force=True)
            except _ENGINE_ERRORS as exc:  # say so: a leftover container blocks the name
                raise AutoDeployError(DRIVER_FAILED, f"{err.detail}; removing it failed too: {exc}") from exc
            raise
        note = self.notes.pop(instance_id, None)
        return Instance(id=instance_id, deployment=dep.name, revision=dep.revision, host=HOST,
                        port=_published_port(container.attrs, dep.port),
                        started_at=_parse_time(container.attrs["State"].get("StartedAt")) or time.time(),
                        container_id=container.id, gpu_ids=list(gpu_ids), notes=[note] if note else [])

    def _create(self, dep: Deployment, instance_id: str, config: dict[str, Any]) -> Any:
        try:
            with _engine(f"creating container {config['name']}"):
                try:
                    container = self.client.containers.create(**config)
                except docker.errors.APIError as exc:
                    # overlay2 on xfs without pquota: only the engine knows, and says so here.
                    if "storage_opt" not in config or "storage-opt" not in str(exc):
                        raise
                    self._storage_note = ("storageGb is not enforced: the engine refused a disk size "
                                          f"({exc.explanation or exc})")
                    config = {k: v for k, v in config.items() if k != "storage_opt"}
                    container = self.client.containers.create(**config)
        except docker.errors.NotFound as exc:  # the image went away since we looked
            raise AutoDeployError(DRIVER_FAILED, f"creating container {config['name']}: {exc}") from exc
        if dep.resources.storage_gb and self._storage_note:
            self.notes[instance_id] = self._storage_note
        return container

    def poll(self, inst: Instance) -> Exit | None:
        """None while the container runs; Exit(code, log tail) once it exited, died or
        was removed (a removed one has no code and no log left)."""
        container = self._get(inst)
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

        Removal takes the logs with it: read `log_tail` of a crashed instance first."""
        container = self._get(inst)
        if container is None:
            return
        with _engine(f"stopping container {container.name}"):
            try:
                container.stop(timeout=math.ceil(timeout))
                container.remove(force=True)
            except docker.errors.NotFound:
                return
            except docker.errors.APIError as exc:
                if exc.status_code != 409:  # 409: a removal already in progress
                    raise

    def adopt(self, inst: Instance) -> bool:
        """True when the container `inst` names still runs and its labels are `inst`'s."""
        container = self._get(inst)
        if container is None:
            return False
        labels = container.labels
        return (container.status == "running"
                and labels.get(LABEL_MANAGED) == "true"
                and labels.get(LABEL_INSTANCE) == inst.id
                and labels.get(LABEL_DEPLOYMENT) == inst.deployment
                and labels.get(LABEL_REVISION) == inst.revision)

    def discover(self) -> list[Instance]:
        """Every container labelled autodeploy.managed=true, running or not."""
        with _engine("listing containers"):
            containers = self.client.containers.list(all=True, filters={"label": f"{LABEL_MANAGED}=true"},
                                                     ignore_removed=True)
        return [_instance_from(c.attrs) for c in containers]

    def log_tail(self, inst: Instance, lines: int = 20) -> str:
        """The container's last output lines; works after it exited, until `stop` removes it."""
        container = self._get(inst)
        if container is None:
            return ""
        try:
            raw = container.logs(stdout=True, stderr=True, tail=lines)
        except docker.errors.NotFound:
            return ""
        except _ENGINE_ERRORS as exc:
            raise AutoDeployError(DRIVER_FAILED, f"reading logs of {container.name}: {exc}") from exc
        return raw.decode(errors="replace").rstrip("\n")

    def follow_logs(self, inst: Instance) -> Iterator[str]:
        """Output lines as they come (for `autodeploy logs --follow`); ends when the
        container stops."""
        container = self._get(inst)
        if container is None:
            return
        pending = b""
        with _engine(f"following logs of {container.name}"):
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
        does not run. Blocks about a second: the engine samples CPU twice."""
        container = self._get(inst)
        if container is None:
            return {}
        with _engine(f"reading stats of {container.name}"):
            raw = container.stats(stream=False)
        return usage_from_stats(raw, int((container.attrs.get("HostConfig") or {}).get("NanoCpus") or 0))

    def close(self) -> None:
        self.client.close()

    def _get(self, inst: Instance) -> Any | None:
        """The container, freshly inspected, or None when it no longer exists."""
        ref = inst.container_id or container_name(inst.deployment, inst.id)
        with _engine(f"inspecting container {ref}"):
            try:
                return self.client.containers.get(ref)
            except docker.errors.NotFound:
                return None


@contextlib.contextmanager
def _engine(action: str) -> Iterator[None]:
    """Engine failures become DRIVER_FAILED with what we were doing and what it said."""
    try:
        yield
    except docker.errors.NotFound:
        raise
    except _ENGINE_ERRORS as exc:
        raise AutoDeployError(DRIVER_FAILED, f"{action}: {exc}") from exc


def _instance_from(attrs: dict[str, Any]) -> Instance:
    labels = (attrs.get("Config") or {}).get("Labels") or {}
    container_port = int(labels.get(LABEL_PORT) or 0)
    gpus = labels.get(LABEL_GPUS) or ""
    state = attrs.get("State") or {}
    return Instance(id=labels.get(LABEL_INSTANCE, ""), deployment=labels.get(LABEL_DEPLOYMENT, ""),
                    revision=labels.get(LABEL_REVISION, ""), host=HOST,
                    port=_published_port(attrs, container_port),
                    started_at=_parse_time(state.get("StartedAt")) or 0.0,
                    container_id=attrs.get("Id"), gpu_ids=[g for g in gpus.split(",") if g])


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
