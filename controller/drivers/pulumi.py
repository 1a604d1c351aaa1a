"""Pulumi driver: instances are replica slots of a Pulumi stack, changed through the Automation API.

The stack runs `controller.pulumi_program.program()` (the project's `__main__.py`), so
this driver never creates a container itself: it edits two stack config keys and runs
`pulumi up`.

How instance ids map to slots. The controller names instances with random ids; the
program names containers by slot, `<deployment>-<n>` (container `autodeploy-<dep>-<n>`).
`start` gives the new instance a slot: an existing slot of that deployment that no
instance owns (one the program made from `minReplicas`), else the lowest free number.
The driver writes the slots as a sparse list, `autodeploy:replicas = {"dep": [0, 2]}`,
so `stop` of the instance on slot 1 removes exactly container `autodeploy-dep-1`: no
renumbering, and the other containers (and their GPUs) are untouched. The controller's
GPU choice goes to `autodeploy:pins` (slot -> GPU uuids) so the program pins the same
GPUs and an update never moves a running slot.

Updates are single-flight and coalesced: one worker thread runs every `pulumi up`;
the scale requests that arrive while one runs are all carried by the next one. An
update refused because another holds the stack lock (`ConcurrentUpdateError`: a human
`pulumi up`, CI) is retried with exponential backoff, a bounded number of times.
Every update and its outcome is reported through `on_event(kind, message)`.

The program and the controller's own gateway would both serve the gateway port, so a
stack driven from `autodeploy serve` must set `autodeploy:gatewayContainer: false`;
the driver refuses a stack that does not (error 1014 says how).
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

from pulumi.automation import ConfigValue
from pulumi.automation.errors import CommandError, ConcurrentUpdateError

from controller.drivers.base import Exit, Instance
from controller.errors import DRIVER_FAILED, IMAGE_MISSING, NO_FREE_GPU, SPEC_INVALID, AutoDeployError, ErrorCode
from controller.pulumi_program import NAMESPACE, slot_name, split_slot_name
from controller.spec import Deployment

log = logging.getLogger(__name__)

REPLICAS_KEY = f"{NAMESPACE}:replicas"
PINS_KEY = f"{NAMESPACE}:pins"
GATEWAY_CONTAINER_KEY = f"{NAMESPACE}:gatewayContainer"

EventSink = Callable[[str, str], None]


class StackLike(Protocol):
    """The part of `pulumi.automation.Stack` this driver uses (tests: `FakeStack`)."""
    name: str

    def set_all_config(self, config: Mapping[str, ConfigValue], *, path: bool = False) -> None: ...

    def get_all_config(self) -> Mapping[str, ConfigValue]: ...

    def up(self, *, on_output: Callable[[str], Any] | None = None) -> Any: ...

    def refresh(self, *, on_output: Callable[[str], Any] | None = None) -> Any: ...

    def outputs(self) -> Mapping[str, Any]: ...


StackFactory = Callable[[str, Path], StackLike]


def automation_stack(stack_name: str, project_dir: Path) -> StackLike:
    """The real stack: the local program in `project_dir` (Pulumi.yaml, __main__.py)."""
    from pulumi import automation as auto
    try:
        return auto.create_or_select_stack(stack_name=stack_name, work_dir=str(project_dir))
    except FileNotFoundError as exc:
        raise AutoDeployError(DRIVER_FAILED, "the pulumi CLI is not on PATH; install it "
                                             "(https://www.pulumi.com/docs/install/) or use --driver docker") from exc


# --- pure decisions ---------------------------------------------------------------------

def retry_delay(attempt: int, base_s: float, cap_s: float, max_attempts: int) -> float | None:
    """Seconds to wait after failed attempt `attempt` (1-based) before the next one;
    None when `max_attempts` are used up. Doubling: another update usually ends soon,
    a long one (image build) should not be hammered."""
    if attempt >= max_attempts:
        return None
    return min(cap_s, base_s * 2 ** (attempt - 1))


def classify_update_error(text: str) -> ErrorCode:
    """The error code for a failed `pulumi up`, from its output."""
    lowered = text.lower()
    if "no such image" in lowered or "unable to find image" in lowered:
        return IMAGE_MISSING
    if "not enough gpus" in lowered:
        return NO_FREE_GPU
    if "error(s) in" in lowered and "nothing was changed" in lowered:
        return SPEC_INVALID
    return DRIVER_FAILED


def choose_slot(wanted: set[int], owned: set[int], existing: set[int]) -> int:
    """A slot for one more instance: an existing, wanted slot nobody owns (the program
    made it from minReplicas or a human update), else the lowest number not wanted."""
    spare = sorted((wanted & existing) - owned)
    if spare:
        return spare[0]
    n = 0
    while n in wanted:
        n += 1
    return n


@dataclass(frozen=True)
class SlotOutput:
    """One item of the stack output `deployments.<name>.instances`."""
    deployment: str
    slot: int
    host: str
    port: int
    gpu_ids: tuple[str, ...] = ()
    container_id: str | None = None

    @property
    def name(self) -> str:
        return slot_name(self.deployment, self.slot)


@dataclass(frozen=True)
class StackView:
    """The stack outputs as plain data."""
    instances: dict[str, SlotOutput] = field(default_factory=dict)
    replicas: dict[str, tuple[int, ...]] = field(default_factory=dict)
    pins: dict[str, tuple[str, ...]] = field(default_factory=dict)
    gateway_url: str | None = None


def _value(output: Any) -> Any:
    # Automation API outputs are OutputValue(value, secret); plain values pass through.
    return getattr(output, "value", output)


def read_outputs(outputs: Mapping[str, Any]) -> StackView:
    """Parse what `program()` exports. An empty map (a stack never updated) is no instances."""
    instances: dict[str, SlotOutput] = {}
    for dep_name, dep in (_value(outputs.get("deployments")) or {}).items():
        for item in dep.get("instances", []):
            deployment, slot = split_slot_name(item["name"])
            host, _, port = str(item["address"]).rpartition(":")
            if not port.isdigit():
                raise ValueError(f"stack output {dep_name}.{item['name']} has no host:port address: "
                                 f"{item['address']!r}")
            instances[item["name"]] = SlotOutput(deployment=deployment, slot=slot, host=host, port=int(port),
                                                 gpu_ids=tuple(item.get("gpu_ids") or ()),
                                                 container_id=item.get("container_id"))
    replicas = {k: tuple(v) for k, v in (_value(outputs.get("replicas")) or {}).items()}
    pins = {k: tuple(v) for k, v in (_value(outputs.get("pins")) or {}).items()}
    url = _value(outputs.get("gateway_url"))
    return StackView(instances=instances, replicas=replicas, pins=pins, gateway_url=url)


def _tail(text: str, limit: int = 2000) -> str:
    return text if len(text) <= limit else "..." + text[-limit:]


# --- the driver ----------------------------------------------------------------------------

@dataclass
class _Ticket:
    """One scale request waiting for the update that carries it."""
    done: threading.Event = field(default_factory=threading.Event)
    error: AutoDeployError | None = None


class PulumiDriver:
    name = "pulumi"
    tcp_accept_means_ready = False  # published ports go through docker-proxy, which accepts first

    def __init__(self, project_dir: Path, stack_name: str, *, stack_factory: StackFactory = automation_stack,
                 on_event: EventSink | None = None, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep, max_attempts: int = 6,
                 backoff_base_s: float = 2.0, backoff_cap_s: float = 60.0,
                 outputs_max_age_s: float | None = 30.0, output_lines: int = 500) -> None:
        """`outputs_max_age_s`: when idle, re-read the stack outputs this often so that a
        container removed by someone else's update shows up in `poll`; None: only after
        this driver's own updates."""
        self.project_dir = project_dir
        self.stack_name = stack_name
        self._on_event = on_event
        self._clock = clock
        self._sleep = sleep
        self._max_attempts = max_attempts
        self._backoff = (backoff_base_s, backoff_cap_s)
        self._outputs_max_age_s = outputs_max_age_s
        self._lines: deque[str] = deque(maxlen=output_lines)

        self._cv = threading.Condition()
        self._stack_lock = threading.Lock()  # one Pulumi command at a time from this process
        self._pending: list[_Ticket] = []
        self._closed = False
        self._updates = 0
        self._wanted: dict[str, set[int]] = {}
        self._pins: dict[str, tuple[str, ...]] = {}
        self._owner: dict[str, str] = {}    # slot name -> instance id
        self._slot_of: dict[str, str] = {}  # instance id -> slot name
        self._view = StackView()
        self._view_version = 0

        self._stack = stack_factory(stack_name, project_dir)
        self._check_gateway_setting()
        self._initial_refresh()
        self._worker = threading.Thread(target=self._run, name=f"pulumi-{stack_name}", daemon=True)
        self._worker.start()

    # --- setup ---------------------------------------------------------------------------

    def _check_gateway_setting(self) -> None:
        value = self._stack.get_all_config().get(GATEWAY_CONTAINER_KEY)
        text = "true (the default)" if value is None else value.value
        if value is None or value.value.strip().lower() not in ("false", "0", "no"):
            raise AutoDeployError(SPEC_INVALID, (
                f"stack {self.stack_name}: {GATEWAY_CONTAINER_KEY} is {text}, but with the pulumi driver the "
                f"controller's own gateway serves the endpoints on the gateway port; run `pulumi config set "
                f"{GATEWAY_CONTAINER_KEY} false --stack {self.stack_name}` (or add it to the stack file)"))

    def _initial_refresh(self) -> None:
        # Once, so that state matches the engine (a container removed by hand is gone
        # from the stack) before the controller adopts anything from the outputs.
        try:
            self._with_retries("refresh", lambda: self._stack.refresh(on_output=self._output_line))
            self._emit("refresh", f"stack {self.stack_name} refreshed")
        except AutoDeployError as exc:
            # Not fatal: the last update's outputs are still the best knowledge there is.
            self._emit("refresh-failed", f"stack {self.stack_name}: {exc.message}")
        view = self._read_view()
        with self._cv:
            self._install_view(view)
            self._wanted = {dep: set(slots) for dep, slots in view.replicas.items()}
            self._pins = dict(view.pins)

    # --- the Driver seam -------------------------------------------------------------------

    def start(self, dep: Deployment, instance_id: str, gpu_ids: list[str]) -> Instance:
        """Add a slot for `instance_id` and block until the update carrying it is done."""
        with self._cv:
            self._check_open()
            wanted = self._wanted.setdefault(dep.name, set())
            owned = {split_slot_name(s)[1] for s in self._owner if split_slot_name(s)[0] == dep.name}
            existing = {o.slot for o in self._view.instances.values() if o.deployment == dep.name}
            n = choose_slot(wanted, owned, existing)
            key = slot_name(dep.name, n)
            wanted.add(n)
            self._owner[key], self._slot_of[instance_id] = instance_id, key
            pins_changed = bool(gpu_ids) and self._pins.get(key) != tuple(gpu_ids)
            if pins_changed:
                self._pins[key] = tuple(gpu_ids)
            # A spare slot already running as pinned needs no update at all.
            ticket = self._request() if pins_changed or key not in self._view.instances else None
        if ticket is not None:
            ticket.done.wait()
        with self._cv:
            error = ticket.error if ticket is not None else None
            out = self._view.instances.get(key)
            if error is None and out is None:
                error = AutoDeployError(DRIVER_FAILED, (
                    f"the update finished but slot {key} is not in the outputs of stack {self.stack_name}; "
                    f"is {dep.name} in the stack's deploymentsDir with state: running?"))
            if error is not None:
                self._release(instance_id)
                self._request()  # removes whatever the failed update left of the slot
                raise error
            assert out is not None
        if gpu_ids and list(out.gpu_ids) != list(gpu_ids):
            self._emit("pins-differ", f"{key} runs on GPUs {','.join(out.gpu_ids)}, not {','.join(gpu_ids)}")
        return Instance(id=instance_id, deployment=dep.name, revision=dep.revision, host=out.host, port=out.port,
                        started_at=self._clock(), container_id=out.container_id, gpu_ids=list(out.gpu_ids))

    def poll(self, inst: Instance) -> Exit | None:
        with self._cv:
            key = self._slot_of.get(inst.id)
            out = self._view.instances.get(key) if key else None
        if key is None:
            return Exit(None, f"instance {inst.id} holds no slot of stack {self.stack_name}")
        if out is None or (inst.container_id and out.container_id != inst.container_id):
            return Exit(None, f"container autodeploy-{key} is no longer in the outputs of stack "
                              f"{self.stack_name} (removed or replaced by another update)")
        return None

    def stop(self, inst: Instance, timeout: float) -> None:
        """Drop the instance's slot and wait for the update that removes its container.

        `timeout` is not passed on: the Docker provider stops the container itself
        (SIGTERM, then SIGKILL after Docker's stop timeout)."""
        with self._cv:
            if inst.id not in self._slot_of:
                return
            self._release(inst.id)
            ticket = self._request()
        ticket.done.wait()
        if ticket.error is not None:
            # The slot stays out of the config, so the next update that succeeds removes it.
            self._emit("stop-failed", f"instance {inst.id}: {ticket.error.message}")

    def adopt(self, inst: Instance) -> bool:
        """Own again a slot that a previous controller started: matched by container id."""
        with self._cv:
            for key, out in self._view.instances.items():
                if out.deployment != inst.deployment or not inst.container_id \
                        or out.container_id != inst.container_id:
                    continue
                if self._owner.get(key, inst.id) != inst.id:
                    return False
                self._owner[key], self._slot_of[inst.id] = inst.id, key
                self._wanted.setdefault(out.deployment, set()).add(out.slot)
                return True
        return False

    def discover(self) -> list[Instance]:
        """Slots in the stack that no instance owns (id = slot name)."""
        with self._cv:
            return [Instance(id=key, deployment=out.deployment, revision="", host=out.host, port=out.port,
                             started_at=0.0, container_id=out.container_id, gpu_ids=list(out.gpu_ids))
                    for key, out in sorted(self._view.instances.items()) if key not in self._owner]

    def log_tail(self, inst: Instance, lines: int = 20) -> str:
        with self._cv:
            key = self._slot_of.get(inst.id, inst.id)
            mentions = [line for line in self._lines if key in line]
        hint = f"(the container's own output: docker logs autodeploy-{key})"
        return "\n".join(mentions[-lines:] + [hint])

    def log_path(self, inst: Instance) -> str | None:
        return None

    def close(self) -> None:
        """Let an update in flight finish (a half-run update leaves the stack locked),
        fail the requests still queued, and stop the worker."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._worker.join()

    # --- for the controller's status and for tests -------------------------------------------

    @property
    def closed(self) -> bool:
        with self._cv:
            return self._closed

    @property
    def queued(self) -> int:
        """Scale requests waiting for the next update."""
        with self._cv:
            return len(self._pending)

    @property
    def gateway_url(self) -> str | None:
        with self._cv:
            return self._view.gateway_url

    def sync_outputs(self) -> None:
        """Re-read the stack outputs now (someone else's update may have changed them)."""
        with self._cv:
            version = self._view_version
        view = self._read_view()
        with self._cv:
            # An update that finished meanwhile wrote fresher outputs than this read.
            if self._view_version == version:
                self._install_view(view)

    # --- internals ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise AutoDeployError(DRIVER_FAILED, f"the pulumi driver of stack {self.stack_name} is closed")

    def _release(self, instance_id: str) -> None:
        key = self._slot_of.pop(instance_id)
        self._owner.pop(key, None)
        deployment, n = split_slot_name(key)
        self._wanted.get(deployment, set()).discard(n)
        self._pins.pop(key, None)

    def _request(self) -> _Ticket:
        ticket = _Ticket()
        self._pending.append(ticket)
        self._cv.notify_all()
        return ticket

    def _install_view(self, view: StackView) -> None:
        self._view = view
        self._view_version += 1

    def _config(self) -> dict[str, str]:
        replicas = {dep: sorted(slots) for dep, slots in sorted(self._wanted.items())}
        pins = {key: list(ids) for key, ids in sorted(self._pins.items())}
        return {REPLICAS_KEY: json.dumps(replicas), PINS_KEY: json.dumps(pins)}

    def _emit(self, kind: str, message: str) -> None:
        log.info("pulumi %s: %s", kind, message)
        if self._on_event is not None:
            self._on_event(kind, message)

    def _output_line(self, line: str) -> None:
        text = line.rstrip("\n")
        log.debug("pulumi: %s", text)
        with self._cv:
            self._lines.append(text)

    def _read_view(self) -> StackView:
        try:
            with self._stack_lock:
                outputs = self._stack.outputs()
            return read_outputs(outputs)
        except (CommandError, ValueError, KeyError, TypeError) as exc:
            raise AutoDeployError(DRIVER_FAILED, f"cannot read the outputs of stack {self.stack_name}: "
                                                 f"{_tail(str(exc))}") from exc

    def _with_retries(self, what: str, command: Callable[[], Any]) -> Any:
        """Run one Pulumi command, waiting out other updates that hold the stack."""
        attempt = 0
        while True:
            attempt += 1
            try:
                with self._stack_lock:
                    return command()
            except ConcurrentUpdateError as exc:
                delay = retry_delay(attempt, *self._backoff, self._max_attempts)
                if delay is None:
                    raise AutoDeployError(DRIVER_FAILED, (
                        f"{what} of stack {self.stack_name}: another update still holds the stack after "
                        f"{attempt} attempts; retry when it is done (`pulumi cancel` if it is stuck)")) from exc
                self._emit("update-retry", f"{what}: another update holds stack {self.stack_name} "
                                           f"(attempt {attempt} of {self._max_attempts}); retrying in {delay:g} s")
                self._sleep(delay)
            except CommandError as exc:
                text = str(exc)
                raise AutoDeployError(classify_update_error(text), f"{what} of stack {self.stack_name} failed: "
                                                                   f"{_tail(text)}") from exc

    def _update(self, number: int, config: dict[str, str], requests: int) -> AutoDeployError | None:
        self._emit("update", f"update {number}: replicas {config[REPLICAS_KEY]}, pins {config[PINS_KEY]} "
                             f"({requests} request(s))")

        def run() -> Any:
            self._stack.set_all_config({k: ConfigValue(value=v) for k, v in config.items()})
            return self._stack.up(on_output=self._output_line)

        try:
            result = self._with_retries(f"update {number}", run)
            view = read_outputs(result.outputs)
        except AutoDeployError as exc:
            self._emit("update-failed", f"update {number}: {exc.message}")
            return exc
        except Exception as exc:  # noqa: BLE001 - every failure must reach the waiting requests
            log.exception("pulumi update %d failed", number)
            error = AutoDeployError(DRIVER_FAILED, f"update {number}: {type(exc).__name__}: {exc}")
            self._emit("update-failed", error.message)
            return error
        with self._cv:
            self._install_view(view)
        outcome = getattr(result.summary, "result", "succeeded")
        self._emit("update-done", f"update {number}: {outcome}; {len(view.instances)} instance(s) in the outputs")
        if outcome != "succeeded":
            return AutoDeployError(DRIVER_FAILED, f"update {number} of stack {self.stack_name} ended {outcome}")
        return None

    def _run(self) -> None:
        """The single worker: one update at a time, each carrying every request queued."""
        while True:
            with self._cv:
                if not self._pending and not self._closed:
                    self._cv.wait(timeout=self._outputs_max_age_s)
                if self._closed:
                    batch, self._pending = self._pending, []
                    break
                if not self._pending:
                    resync = self._outputs_max_age_s is not None
                else:
                    resync = False
                    batch, self._pending = self._pending, []
                    self._updates += 1
                    number, config = self._updates, self._config()
            if resync:
                try:
                    self.sync_outputs()
                except AutoDeployError as exc:
                    self._emit("outputs-failed", exc.message)
                continue
            error = self._update(number, config, len(batch))
            for ticket in batch:
                ticket.error = error
                ticket.done.set()
        closed = AutoDeployError(DRIVER_FAILED, f"the pulumi driver of stack {self.stack_name} closed")
        for ticket in batch:
            ticket.error = closed
            ticket.done.set()
