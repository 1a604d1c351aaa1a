"""The usage sampler against a real instance: psutil reads the process tree the local
driver started, NVML (a FakeNvml here: no GPU on this machine) reads its pinned GPU,
and the numbers land in the controller's traffic store as percentages."""
from __future__ import annotations

import time

import psutil
from pathlib import Path

from conftest import ROOT, deployment_yaml, echo_command
from controller.core import Controller
from controller.drivers.local import LocalDriver
from controller.gpus import Gpu, Inventory, NvmlGpuSource
from controller.loader import load_text
from controller.stack import Prices
from controller.store import Store
from controller.usage import UsageSampler
from fakes import FakeDevice, FakeGpuProcess, FakeNvml

UUID = "GPU-11111111-2222-3333-4444-555555555555"


def test_sampler_reads_cpu_memory_and_gpu_use_of_a_running_instance(tmp_path: Path):
    text = deployment_yaml("busy", echo_command()).replace(
        "  scaling:", "  resources: {cpu: 2, memoryGb: 1, gpu: {count: 1}}\n  scaling:")
    result = load_text(text, "busy.yaml")
    assert not result.errors, result.errors
    driver = LocalDriver(tmp_path / "state", ROOT)
    controller = Controller(driver, Store(tmp_path / "db.sqlite"), prices=Prices(default_gpu=1.0),
                            inventory=Inventory([Gpu(0, UUID, "NVIDIA H100 80GB HBM3", 81559)], "nvml"))
    controller.apply(result)
    device = FakeDevice(UUID, "NVIDIA H100 80GB HBM3", 81559, utilization_pct=73)
    nvml = NvmlGpuSource(FakeNvml([device]))
    sampler = UsageSampler(controller.fleet, controller.traffic, nvml)
    try:
        iid = controller.acquire("busy", None, timeout=30).id
        shell = controller.status("busy")["instances"][0]["pid"]
        model_pid = psutil.Process(shell).children()[0].pid  # NVML lists the process under the shell
        device.processes.append(FakeGpuProcess(model_pid, 1234))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            sampler.run_once()  # the first psutil reading is a baseline; the next ones measure
            time.sleep(0.3)
            usage = controller.traffic.usage.get(iid)
            if usage is not None and usage.cpu_pct is not None and usage.at > time.time() - 0.5:
                break
        usage = controller.traffic.usage[iid]
        assert usage.gpu_pct == 73.0
        assert usage.cpu_pct is not None and usage.cpu_pct >= 0.0
        assert usage.mem_bytes is not None and usage.mem_bytes > 1_000_000
        assert usage.mem_pct is not None and 0 < usage.mem_pct < 100  # of memoryGb 1
        metrics = controller.status("busy")["instances"][0]["metrics"]
        assert metrics["gpu_pct"] == 73.0 and metrics["mem_bytes"] == usage.mem_bytes
        assert usage.gpu_mem_mb == 1234.0 and metrics["gpu_mem_mb"] == 1234.0
    finally:
        sampler.stop()
        controller.shutdown()
        nvml.close()
