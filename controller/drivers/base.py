"""The seam between the controller (decides) and a driver (acts).

A driver starts one instance of a deployment, says whether it is still alive, stops
it, and on controller restart re-attaches to what it started before. Readiness is
checked by the controller (`controller.health`) against `Instance.host:port`, so every
driver gets the same ready semantics.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from controller.spec import Deployment


@dataclass
class Instance:
    """One running (or starting) instance as the driver knows it."""
    id: str
    deployment: str
    revision: str
    host: str
    port: int
    started_at: float
    pid: int | None = None
    pid_create_time: float | None = None  # psutil create_time, to verify adoption
    container_id: str | None = None
    gpu_ids: list[str] = field(default_factory=list)
    log_path: str | None = None
    notes: list[str] = field(default_factory=list)  # what the driver could not honour, for events
    node: str | None = None  # the Docker host it runs on (docker driver with several nodes)
    # Which serve started it (its state dir), as its process environment or container label
    # says: what `discover` finds with our owner is adopted or stopped, never left orphaned.
    owner: str | None = None


@dataclass(frozen=True)
class Exit:
    """An instance that is no longer running."""
    code: int | None
    log_tail: str


class Driver(Protocol):
    name: str
    # False where something accepts connections before the instance does (Docker's
    # port proxy): readiness then needs an HTTP answer, not just a connect.
    tcp_accept_means_ready: bool

    def start(self, dep: Deployment, instance_id: str, gpu_ids: list[str]) -> Instance:
        """Launch the instance and return at once (readiness is polled by the caller).

        Raises AutoDeployError (e.g. IMAGE_MISSING) when it cannot be launched at all."""

    def poll(self, inst: Instance) -> Exit | None:
        """None while the instance runs; its exit otherwise."""

    def stop(self, inst: Instance, timeout: float) -> None:
        """Graceful stop, then kill after `timeout` seconds. Idempotent."""

    def adopt(self, inst: Instance) -> bool:
        """True if `inst` (a stored record) is still the same live thing and now owned again."""

    def discover(self) -> list[Instance]:
        """Instances this driver can see that carry our labels (docker) or none (local)."""

    def log_tail(self, inst: Instance, lines: int = 20) -> str:
        """Last lines of the instance's output."""

    def log_path(self, inst: Instance) -> str | None:
        """A file that holds the instance's output, when there is one."""

    def close(self) -> None:
        """Release driver resources (clients, threads)."""
