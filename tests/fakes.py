"""Fakes for boundaries that cannot run on the development machine.

`FakeNvml` stands in for the `pynvml` module where there is no NVIDIA GPU: it has the
functions `controller.gpus.NvmlGpuSource` calls, with pynvml's signatures, and raises
pynvml's own exception classes (they import fine without the library), so code that
catches `pynvml.NVMLError_NotSupported` behaves the same against both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pynvml

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
