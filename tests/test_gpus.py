"""GPU inventory: NVML reading (over FakeNvml here, real NVML under `-m gpu`), the
fallback to the stack config's GPUs, and the `autodeploy gpus` table."""
from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pynvml
import pytest

from controller import gpus as gpus_module
from controller.gpus import Gpu, Inventory, NvmlGpuSource, discover_inventory, format_inventory
from controller.policy.placement import Placement, place
from controller.spec import GpuSpec
from controller.stack import DeclaredGpu, StackConfig, load_stack
from fakes import FakeDevice, FakeGpuProcess, FakeNvml

REPO = Path(__file__).resolve().parent.parent
H100 = "NVIDIA H100 80GB HBM3"


def two_h100s() -> FakeNvml:
    return FakeNvml([
        FakeDevice(uuid="GPU-aaaa", name=H100, memory_total_mb=81559, memory_used_mb=1024, utilization_pct=37,
                   processes=[FakeGpuProcess(pid=100, used_mb=900), FakeGpuProcess(pid=200, used_mb=124)]),
        FakeDevice(uuid="GPU-bbbb", name=H100, memory_total_mb=81559, utilization_pct=None,
                   processes=[FakeGpuProcess(pid=100, used_mb=50), FakeGpuProcess(pid=101, used_mb=None)]),
    ])


def declared_stack(*gpus: DeclaredGpu) -> StackConfig:
    return StackConfig(name="dev", source="stacks/Pulumi.dev.yaml", gpus=list(gpus))


# --- the fake keeps to pynvml's interface

def _nvml_attributes_used() -> set[str]:
    tree = ast.parse(inspect.getsource(gpus_module))
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr.startswith(("nvml", "NVMLError"))}


def test_fake_nvml_has_every_pynvml_name_the_source_uses_and_nothing_pynvml_lacks() -> None:
    used = _nvml_attributes_used()
    assert "nvmlDeviceGetComputeRunningProcesses" in used
    for name in used:
        assert hasattr(pynvml, name), name
        assert hasattr(FakeNvml, name), name
        if callable(getattr(pynvml, name)) and not isinstance(getattr(pynvml, name), type):
            real = list(inspect.signature(getattr(pynvml, name)).parameters)
            fake = list(inspect.signature(getattr(FakeNvml(), name)).parameters)
            assert len(fake) >= len([p for p in real if p != "version"]), name


# --- NvmlGpuSource over FakeNvml

def test_source_lists_every_gpu_with_uuid_name_memory_and_utilization() -> None:
    source = NvmlGpuSource(two_h100s())
    assert source.available()
    assert source.list() == [
        Gpu(index=0, uuid="GPU-aaaa", name=H100, memory_total_mb=81559, memory_used_mb=1024, utilization_pct=37),
        Gpu(index=1, uuid="GPU-bbbb", name=H100, memory_total_mb=81559, memory_used_mb=0, utilization_pct=None),
    ]


def test_source_reports_why_nvml_is_unavailable() -> None:
    source = NvmlGpuSource(FakeNvml(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))
    assert not source.available()
    assert source.unavailable_reason == "NVML unavailable: NVML Shared Library Not Found"


def test_source_without_a_driver_is_unavailable_too() -> None:
    source = NvmlGpuSource(FakeNvml(init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED))
    assert not source.available()
    assert "Driver Not Loaded" in (source.unavailable_reason or "")


def test_process_usage_sums_the_memory_a_process_uses_per_gpu() -> None:
    source = NvmlGpuSource(two_h100s())
    assert source.process_usage(100) == {"GPU-aaaa": 900, "GPU-bbbb": 50}
    assert source.process_usage(200) == {"GPU-aaaa": 124}
    assert source.process_usage(999) == {}


def test_process_usage_counts_child_processes_given_with_it() -> None:
    assert NvmlGpuSource(two_h100s()).process_usage(200, 100) == {"GPU-aaaa": 1024, "GPU-bbbb": 50}


def test_process_usage_says_unknown_when_nvml_cannot_tell_the_amount() -> None:
    assert NvmlGpuSource(two_h100s()).process_usage(101) == {"GPU-bbbb": None}


def test_utilization_by_uuid() -> None:
    source = NvmlGpuSource(two_h100s())
    assert source.utilization("GPU-aaaa") == 37
    assert source.utilization("GPU-bbbb") is None  # NVML: Not Supported
    assert source.utilization("GPU-unknown") is None
    assert source.utilization("declared-0") is None


def test_source_shuts_nvml_down_once_when_closed() -> None:
    nvml = two_h100s()
    with NvmlGpuSource(nvml) as source:
        source.list()
        source.utilization("GPU-aaaa")
        assert nvml.refcount == 1
    assert nvml.refcount == 0


# --- discovery

def test_discovery_prefers_nvml_and_says_declared_gpus_are_unused() -> None:
    inv = discover_inventory(declared_stack(DeclaredGpu(0, "Tesla T4")), NvmlGpuSource(two_h100s()))
    assert inv.source == "nvml"
    assert [g.uuid for g in inv.gpus] == ["GPU-aaaa", "GPU-bbbb"]
    assert inv.detail == "1 GPU(s) declared in stacks/Pulumi.dev.yaml are not used"


def test_discovery_falls_back_to_the_stack_gpus_and_says_so() -> None:
    stack = declared_stack(DeclaredGpu(1, "Tesla T4", uuid="GPU-t4"), DeclaredGpu(0, H100, memory_mb=81559))
    inv = discover_inventory(stack, NvmlGpuSource(FakeNvml(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)))
    assert inv.source == "stack config stacks/Pulumi.dev.yaml"
    assert inv.detail == "NVML unavailable: NVML Shared Library Not Found"
    assert inv.gpus == [Gpu(index=0, uuid="declared-0", name=H100, memory_total_mb=81559),
                        Gpu(index=1, uuid="GPU-t4", name="Tesla T4", memory_total_mb=0)]


def test_discovery_with_neither_nvml_nor_declared_gpus_has_source_none() -> None:
    inv = discover_inventory(declared_stack(), NvmlGpuSource(FakeNvml(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)))
    assert (inv.gpus, inv.source) == ([], "none")
    assert "declares no autodeploy:gpus" in inv.detail


def test_discovery_leaves_a_given_source_open_for_its_owner() -> None:
    nvml = two_h100s()
    source = NvmlGpuSource(nvml)
    discover_inventory(declared_stack(), source)
    assert nvml.refcount == 1
    source.close()


def test_without_nvml_here_discovery_really_falls_back_to_the_dev_stack() -> None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("NVML works on this machine; the GPU tests cover it")
    inv = discover_inventory(load_stack(REPO, "dev"))
    assert inv.source == "stack config stacks/Pulumi.dev.yaml"
    assert inv.detail.startswith("NVML unavailable: ")
    # The dev stack's fake H100 is there so the examples place.
    assert place(inv.gpus, {}, GpuSpec(1, "H100")) == Placement(("declared-0",))


# --- the table

def test_table_starts_with_the_source_and_lists_each_gpu() -> None:
    inv = Inventory([Gpu(0, "GPU-aaaa", H100, 81559, 1024, 37), Gpu(1, "declared-1", "Tesla T4", 0)],
                    "stack config stacks/Pulumi.dev.yaml", "NVML unavailable: NVML Shared Library Not Found")
    assert format_inventory(inv).splitlines() == [
        "source: stack config stacks/Pulumi.dev.yaml (NVML unavailable: NVML Shared Library Not Found)",
        "INDEX  UUID        NAME                   MEMORY            UTIL",
        "0      GPU-aaaa    NVIDIA H100 80GB HBM3  1024 / 81559 MiB  37%",
        "1      declared-1  Tesla T4               -                 -",
    ]


def test_table_of_an_empty_inventory_says_no_gpus() -> None:
    assert format_inventory(Inventory([], "none", "why")) == "source: none (why)\nno GPUs"


# --- real NVML (run on a GPU machine: .venv/bin/python -m pytest -m gpu tests/test_gpus.py)

@pytest.fixture
def real_nvml() -> Iterator[NvmlGpuSource]:
    source = NvmlGpuSource()
    if not source.available():
        pytest.skip(f"needs an NVIDIA GPU with NVML ({source.unavailable_reason})")
    yield source
    source.close()


@pytest.mark.gpu
def test_real_nvml_discovers_gpus_with_real_uuids(real_nvml: NvmlGpuSource) -> None:
    found = real_nvml.list()
    assert len(found) >= 1
    for gpu in found:
        assert gpu.uuid.startswith("GPU-")
        assert gpu.name.startswith("NVIDIA") or gpu.name.startswith("Tesla")
        assert gpu.memory_total_mb > 0
        assert gpu.memory_used_mb is not None and 0 <= gpu.memory_used_mb <= gpu.memory_total_mb


@pytest.mark.gpu
def test_real_nvml_utilization_is_readable(real_nvml: NvmlGpuSource) -> None:
    for gpu in real_nvml.list():
        pct = real_nvml.utilization(gpu.uuid)
        assert pct is None or 0 <= pct <= 100
    # A plain (non-MIG) board such as the H100 reports it.
    assert any(real_nvml.utilization(g.uuid) is not None for g in real_nvml.list())


@pytest.mark.gpu
def test_real_discovery_uses_nvml_and_places_on_a_real_gpu(real_nvml: NvmlGpuSource) -> None:
    inv = discover_inventory(load_stack(REPO, "dev"), real_nvml)
    assert inv.source == "nvml"
    result = place(inv.gpus, {}, GpuSpec(1, None))
    assert isinstance(result, Placement) and result.gpu_ids[0].startswith("GPU-")


@pytest.mark.gpu
def test_real_process_usage_is_empty_for_a_process_without_a_cuda_context(real_nvml: NvmlGpuSource) -> None:
    assert real_nvml.process_usage(os.getpid()) == {}


# Holds 512 MiB on the first GPU until stdin closes.
_CUDA_CHILD = """
import sys, torch
x = torch.empty(512 * 1024 * 1024, dtype=torch.uint8, device="cuda:0")
torch.cuda.synchronize()
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.mark.gpu
def test_real_process_usage_sees_the_memory_a_cuda_process_holds(real_nvml: NvmlGpuSource) -> None:
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("needs PyTorch in this interpreter to make a CUDA process")
    child = subprocess.Popen([sys.executable, "-c", _CUDA_CHILD], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        usage = real_nvml.process_usage(child.pid)
        first = real_nvml.list()[0].uuid
        # NVML names processes by host pid: inside a container without the host's pid
        # namespace this is empty, and the driver has to match container pids instead.
        assert first in usage, f"NVML did not list pid {child.pid}: {usage}"
        assert usage[first] is None or usage[first] >= 512
    finally:
        child.communicate(input="")
