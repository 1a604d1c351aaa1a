"""GPU pinning on a real NVIDIA GPU (run with `-m gpu` on a machine that has one).

Skipped elsewhere with the reason; see the README's "GPU proof" section for the command."""
from __future__ import annotations

import sys

import pytest

from conftest import ROOT, deployment_yaml

pytestmark = pytest.mark.gpu


def _nvml_uuids() -> list[str]:
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - any NVML failure means: no GPU here
        pytest.skip(f"needs an NVIDIA GPU with NVML ({exc})")
    try:
        uuids = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            uuid = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))
            uuids.append(uuid.decode() if isinstance(uuid, bytes) else uuid)
        return uuids
    finally:
        pynvml.nvmlShutdown()


def test_local_instance_sees_exactly_its_pinned_gpu_and_the_next_gets_1009(serve):
    uuids = _nvml_uuids()
    pytest.importorskip("torch", reason="the GPU probe model needs torch")
    probe = ROOT / "deployments" / "models" / "gpu_probe.py"
    spec = deployment_yaml("gpu", f"{sys.executable} {probe}", max_replicas=len(uuids) + 1,
                           extra_spec="resources: {gpu: {count: 1, type: H100}}")
    s = serve({"gpu.yaml": spec})
    assert s.status()["gpu_inventory"] == "nvml"
    seen = []
    for i in range(len(uuids)):
        r = s.get("/d/gpu/gpu", headers={"Deploy-Route-Rule": "scale-out"}, timeout=120)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["device_count"] == 1 and body["matmul_ok"]
        assert body["cuda_visible_devices"] == body["devices"][0]["uuid"]
        inst = next(x for x in s.instances("gpu") if x["id"] == r.headers["Deploy-Route-Target"])
        assert inst["gpu_ids"] == [body["devices"][0]["uuid"]]
        seen.append(body["devices"][0]["uuid"])
    assert sorted(seen) == sorted(uuids)  # exclusive: every GPU once
    full = s.get("/d/gpu/gpu", headers={"Deploy-Route-Rule": "scale-out"})
    assert (full.status_code, full.json()["code"]) == (503, 1009)
    assert "free" in full.json()["msg"]
