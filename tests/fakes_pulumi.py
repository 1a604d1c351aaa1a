"""`FakeStack`: the part of `pulumi.automation.Stack` the pulumi driver uses, for machines
without the Pulumi CLI (this one: no registry ships it).

Same method names and signatures as the real Stack subset; results are the Automation
API's own classes (`UpResult`, `UpdateSummary`, `OutputValue`) and failures its own
exceptions (`ConcurrentUpdateError`, `CommandError`). An update computes the outputs
the way `controller.pulumi_program.program()` does, through the same pure functions
(`plan_resources`, `instance_output`, ...), over a fixed list of deployments and a GPU
inventory instead of YAML on disk and NVML. A slot keeps its host port and container id
across updates while its plan is unchanged, as a container Pulumi leaves alone does.
"""
from __future__ import annotations

import itertools
import threading
import time
from datetime import datetime
from typing import Any, Callable, Mapping, Sequence

from pulumi.automation import ConfigValue, DestroyResult, OutputValue, RefreshResult, UpdateSummary, UpResult
from pulumi.automation._cmd import CommandResult
from pulumi.automation.errors import CommandError, ConcurrentUpdateError

from controller.errors import AutoDeployError
from controller.gpus import Inventory
from controller.pulumi_program import (ContainerPlan, applied_pins, applied_replicas, deployments_output,
                                       gateway_url, instance_output, parse_pins, parse_replicas, plan_resources)
from controller.spec import Deployment

OnOutput = Callable[[str], Any]


def _summary(kind: str, result: str) -> UpdateSummary:
    now = datetime.now()
    return UpdateSummary(kind=kind, start_time=now, end_time=now, message="", environment={}, config={},
                         result=result)


class FakeStack:
    def __init__(self, deployments: Sequence[Deployment], inventory: Inventory | None = None, *,
                 name: str = "dev", config: Mapping[str, str] | None = None, up_seconds: float = 0.0,
                 concurrent_failures: int = 0, host: str = "127.0.0.1") -> None:
        """`up_seconds`: how long an update takes; `concurrent_failures`: how many `up`
        calls in a row fail with ConcurrentUpdateError (another update holds the lock)."""
        self.name = name
        self.deployments = list(deployments)
        self.inventory = inventory or Inventory([], "none")
        self.config: dict[str, ConfigValue] = {k: ConfigValue(value=v) for k, v in (config or {}).items()}
        self.up_seconds = up_seconds
        self.concurrent_failures = concurrent_failures
        self.host = host
        # `up` blocks on `gate` while it is cleared: tests hold an update "in flight".
        self.gate = threading.Event()
        self.gate.set()
        # Set to make the next updates fail like a provider error would.
        self.fail_with: str | None = None

        self.up_attempts = 0
        self.updates: list[dict[str, Any]] = []  # the replicas/pins config of each update that ran
        self.refreshes = 0
        self.destroys = 0
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()
        self._outputs: dict[str, OutputValue] = {}
        self._containers: dict[str, tuple[ContainerPlan, int, str]] = {}  # slot -> (plan, port, id)
        self._ports = itertools.count(32768)
        self._ids = itertools.count(1)

    # --- config -----------------------------------------------------------------------------

    def set_config(self, key: str, value: ConfigValue, *, path: bool = False) -> None:
        with self._lock:
            self.config[key] = value

    def set_all_config(self, config: Mapping[str, ConfigValue], *, path: bool = False) -> None:
        with self._lock:
            self.config.update(config)

    def get_config(self, key: str, *, path: bool = False) -> ConfigValue:
        with self._lock:
            if key not in self.config:
                # What the CLI does for a missing key.
                raise CommandError(CommandResult("", f"error: configuration key '{key}' not found for stack "
                                                     f"'{self.name}'", 255))
            return self.config[key]

    def get_all_config(self) -> dict[str, ConfigValue]:
        with self._lock:
            return dict(self.config)

    # --- operations -------------------------------------------------------------------------

    def up(self, *, on_output: OnOutput | None = None, **_: Any) -> UpResult:
        with self._lock:
            self.up_attempts += 1
            if self.concurrent_failures > 0:
                self.concurrent_failures -= 1
                raise ConcurrentUpdateError(CommandResult(
                    "", "error: [409] Conflict: Another update is currently in progress.", 255))
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            self.gate.wait()
            time.sleep(self.up_seconds)
            return self._apply(on_output)
        finally:
            with self._lock:
                self.active -= 1

    def refresh(self, *, on_output: OnOutput | None = None, **_: Any) -> RefreshResult:
        with self._lock:
            self.refreshes += 1
        self._say(on_output, f"Refreshing (stack {self.name})")
        return RefreshResult("", "", _summary("refresh", "succeeded"))

    def outputs(self) -> dict[str, OutputValue]:
        with self._lock:
            return dict(self._outputs)

    def destroy(self, *, on_output: OnOutput | None = None, **_: Any) -> DestroyResult:
        with self._lock:
            self.destroys += 1
            for slot in sorted(self._containers):
                self._say(on_output, f"- docker:index/container:Container {slot} deleted")
            self._containers.clear()
            self._outputs = {}
        return DestroyResult("", "", _summary("destroy", "succeeded"))

    # --- internals ---------------------------------------------------------------------------

    @staticmethod
    def _say(on_output: OnOutput | None, line: str) -> None:
        if on_output is not None:
            on_output(line)

    def _value(self, key: str) -> str | None:
        value = self.config.get(key)
        return None if value is None else value.value

    def _apply(self, on_output: OnOutput | None) -> UpResult:
        with self._lock:
            if self.fail_with is not None:
                raise CommandError(CommandResult("", f"error: {self.fail_with}", 255))
            replicas = parse_replicas(self._value("autodeploy:replicas"))
            pins = parse_pins(self._value("autodeploy:pins"))
            self.updates.append({"replicas": {k: list(v) for k, v in replicas.items()},
                                 "pins": {k: list(v) for k, v in pins.items()}})
            try:
                plans = plan_resources(self.deployments, {k: list(v) for k, v in replicas.items()},
                                       self.inventory, pins)
            except AutoDeployError as exc:
                # The real program's exception reaches the caller as the CLI's error text.
                raise CommandError(CommandResult("", f"error: Program failed with an unhandled exception: "
                                                     f"{exc}", 255)) from exc
            kept: dict[str, tuple[ContainerPlan, int, str]] = {}
            for plan in plans:
                old = self._containers.get(plan.slot_name)
                if old is not None and old[0] == plan:
                    kept[plan.slot_name] = old
                else:
                    verb = "replaced" if old is not None else "created"
                    kept[plan.slot_name] = (plan, next(self._ports), f"c{next(self._ids):063x}")
                    self._say(on_output, f"+ docker:index/container:Container {plan.slot_name} {verb}")
            for slot in sorted(set(self._containers) - set(kept)):
                self._say(on_output, f"- docker:index/container:Container {slot} deleted")
            self._containers = kept
            by_dep: dict[str, list[dict[str, Any]]] = {}
            for plan in plans:
                _, port, cid = kept[plan.slot_name]
                by_dep.setdefault(plan.deployment, []).append(instance_output(plan, self.host, port, cid))
            port_text = self._value("autodeploy:gatewayPort") or "8080"
            self._outputs = {
                "gateway_url": OutputValue(gateway_url("127.0.0.1", int(port_text), None), False),
                "deployments": OutputValue(deployments_output(self.deployments, by_dep), False),
                "replicas": OutputValue(applied_replicas(self.deployments, plans), False),
                "pins": OutputValue(applied_pins(plans), False),
                "gpu_inventory": OutputValue(self.inventory.source, False),
            }
            return UpResult("", "", _summary("update", "succeeded"), dict(self._outputs))
