"""Fakes for boundaries that cannot run on the development machine, and the
controller harness (`FakeDriver`, `FakeClock`: the one exception the project allows).

`FakeNvml` stands in for the `pynvml` module where there is no NVIDIA GPU: it has the
functions `controller.gpus.NvmlGpuSource` calls, with pynvml's signatures, and raises
pynvml's own exception classes (they import fine without the library), so code that
catches `pynvml.NVMLError_NotSupported` behaves the same against both.
"""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml

from controller.drivers.base import Exit, Instance
from controller.spec import Deployment, HealthCheck

MIB = 1024 * 1024


@dataclass
class FakeGpuProcess:
    pid: int
    used_mb: int | None  # None: the driver cannot tell (pynvml reports usedGpuMemory None)


@dataclass
class FakeDevice:
    uuid: str
    name: str
    memory_total_mb: int
    memory_used_mb: int = 0
    utilization_pct: int | None = 0  # None: NVML answers "Not Supported" (e.g. MIG)
    processes: list[FakeGpuProcess] = field(default_factory=list)


class FakeNvml:
    """A pynvml-like module over a list of `FakeDevice`s.

    `init_error` is the NVML error code `nvmlInit` fails with (e.g.
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND), None for a working NVML.
    """

    NVMLError = pynvml.NVMLError
    NVMLError_LibraryNotFound = pynvml.NVMLError_LibraryNotFound
    NVMLError_DriverNotLoaded = pynvml.NVMLError_DriverNotLoaded
    NVMLError_Uninitialized = pynvml.NVMLError_Uninitialized
    NVMLError_NotSupported = pynvml.NVMLError_NotSupported
    NVMLError_NotFound = pynvml.NVMLError_NotFound
    NVMLError_InvalidArgument = pynvml.NVMLError_InvalidArgument

    def __init__(self, devices: list[FakeDevice] | None = None, init_error: int | None = None) -> None:
        self.devices = list(devices or [])
        self.init_error = init_error
        self.refcount = 0  # NVML counts nvmlInit calls; every one needs an nvmlShutdown

    def _check_init(self) -> None:
        if self.refcount <= 0:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)

    def _device(self, handle: object) -> FakeDevice:
        self._check_init()
        if not isinstance(handle, FakeDevice) or handle not in self.devices:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return handle

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)
        self.refcount += 1

    def nvmlShutdown(self) -> None:
        self._check_init()
        self.refcount -= 1

    def nvmlDeviceGetCount(self) -> int:
        self._check_init()
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeDevice:
        self._check_init()
        if not 0 <= index < len(self.devices):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self.devices[index]

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> FakeDevice:
        self._check_init()
        for device in self.devices:
            if device.uuid == uuid:
                return device
        # Real NVML: a well-formed but unknown uuid is NOT_FOUND, a malformed one INVALID_ARGUMENT.
        code = pynvml.NVML_ERROR_NOT_FOUND if uuid.startswith("GPU-") else pynvml.NVML_ERROR_INVALID_ARGUMENT
        raise pynvml.NVMLError(code)

    def nvmlDeviceGetUUID(self, handle: object) -> str:
        return self._device(handle).uuid

    def nvmlDeviceGetName(self, handle: object) -> str:
        return self._device(handle).name

    def nvmlDeviceGetMemoryInfo(self, handle: object) -> SimpleNamespace:
        device = self._device(handle)
        total = device.memory_total_mb * MIB
        used = device.memory_used_mb * MIB
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetUtilizationRates(self, handle: object) -> SimpleNamespace:
        device = self._device(handle)
        if device.utilization_pct is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return SimpleNamespace(gpu=device.utilization_pct, memory=0)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: object) -> list[SimpleNamespace]:
        device = self._device(handle)
        return [SimpleNamespace(pid=p.pid, usedGpuMemory=None if p.used_mb is None else p.used_mb * MIB,
                                gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF)
                for p in device.processes]


# ---------------------------------------------------------------------------- controller harness
class FakeClock:
    """The controller's injected clock: time moves only when a test says so."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds

    @staticmethod
    def sleep(seconds: float) -> None:
        """What the launch loop sleeps between readiness polls: a real yield, no fake time."""
        time.sleep(0.001)


@dataclass
class FakeProcess:
    spec: Deployment
    inst: Instance
    ready: bool
    exit: Exit | None = None


class FakeDriver:
    """The `Driver` interface over a table of pretend processes, with test controls:
    `crash`, `make_ready`, and `fail(call, exc, times, instance)` to make a call raise.

    It is also the controller's injected `Probes` (port_open, ready, problem)."""

    name = "fake"
    tcp_accept_means_ready = True

    def __init__(self, auto_ready: bool = True, owner: str | None = None) -> None:
        self.auto_ready = auto_ready
        self.owner = owner  # like LocalDriver/DockerDriver: instances carry it; discover finds them by it
        self.procs: dict[str, FakeProcess] = {}
        self.calls: list[tuple[str, str]] = []  # (call, instance id), in order
        self._ports = itertools.count(20_000)
        self._faults: list[list[Any]] = []  # [call, exc, times left, instance id or None]
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- test controls
    def fail(self, call: str, exc: BaseException, times: int = 1_000_000, instance: str | None = None) -> None:
        """Make `call` ("start", "poll", "stop", "adopt", "discover") raise `exc` the next `times` times."""
        with self._lock:
            self._faults.append([call, exc, times, instance])

    def heal(self) -> None:
        with self._lock:
            self._faults.clear()

    def crash(self, instance_id: str, code: int = 1, tail: str = "Traceback: boom") -> None:
        self.procs[instance_id].exit = Exit(code, tail)

    def make_ready(self, instance_id: str) -> None:
        self.procs[instance_id].ready = True

    def running(self) -> list[str]:
        return [i for i, p in self.procs.items() if p.exit is None]

    def _call(self, call: str, instance_id: str) -> None:
        with self._lock:
            self.calls.append((call, instance_id))
            for fault in self._faults:
                if fault[0] == call and fault[2] > 0 and fault[3] in (None, instance_id):
                    fault[2] -= 1
                    raise fault[1]

    # ---------------------------------------------------------------- the Driver interface
    def start(self, dep: Deployment, instance_id: str, gpu_ids: list[str], node: str | None = None) -> Instance:
        self._call("start", instance_id)
        inst = Instance(id=instance_id, deployment=dep.name, revision=dep.revision, host="127.0.0.1",
                        port=next(self._ports), started_at=time.time(), pid=None, gpu_ids=list(gpu_ids), node=node,
                        owner=self.owner)
        self.procs[instance_id] = FakeProcess(dep, inst, ready=self.auto_ready)
        return inst

    def poll(self, inst: Instance) -> Exit | None:
        self._call("poll", inst.id)
        proc = self.procs.get(inst.id)
        return Exit(None, "unknown to the fake driver") if proc is None else proc.exit

    def stop(self, inst: Instance, timeout: float) -> None:
        self._call("stop", inst.id)
        proc = self.procs.get(inst.id)
        if proc is not None and proc.exit is None:
            proc.exit = Exit(-15, "stopped")

    def adopt(self, inst: Instance) -> bool:
        self._call("adopt", inst.id)
        proc = self.procs.get(inst.id)
        return proc is not None and proc.exit is None

    def discover(self) -> list[Instance]:
        self._call("discover", "")
        return [p.inst for p in self.procs.values() if p.exit is None]

    def log_tail(self, inst: Instance, lines: int = 20) -> str:
        return f"fake log of {inst.id}"

    def log_path(self, inst: Instance) -> str | None:
        return None

    def close(self) -> None:
        pass

    # ---------------------------------------------------------------- the injected probes
    def port_open(self, inst: Instance) -> bool:
        return self.ready(inst, None, True)

    def ready(self, inst: Instance, health: HealthCheck | None, tcp_is_enough: bool, protocol: str = "http") -> bool:
        proc = self.procs.get(inst.id)
        return proc is not None and proc.exit is None and proc.ready

    def problem(self, driver: Any, inst: Instance) -> str | None:
        return None
