"""Resource use as percentages of an instance's limits (controller.usage.usage_of), and
the autoscaler's sampling cadence and event wording (controller.autoscaler)."""
from __future__ import annotations

import pytest

from controller.autoscaler import readable, sample_period
from controller.policy.autoscale import Sample, decide
from controller.spec import Autoscaling, GpuSpec, Resources, Scaling
from controller.usage import usage_of

GIB = 1024 ** 3


def test_local_cpu_is_a_share_of_the_requested_cores():
    u = usage_of({"cpu_cores": 1.5, "cpu_pct": 150.0, "mem_bytes": 2 * GIB}, Resources(cpu=2, memory_gb=8), [], 5.0)
    assert u.cpu_pct == pytest.approx(75.0)
    assert u.mem_pct == pytest.approx(25.0)
    assert u.at == 5.0 and u.gpu_pct is None


def test_local_cpu_without_a_cpu_request_is_a_share_of_one_core_and_memory_unknown():
    u = usage_of({"cpu_cores": 0.4, "mem_bytes": GIB}, Resources(), [], 0.0)
    assert u.cpu_pct == pytest.approx(40.0)
    assert u.mem_pct is None and u.mem_bytes == GIB


def test_container_stats_are_already_against_its_limits():
    u = usage_of({"cpu_pct": 60.0, "mem_pct": 30.0, "mem_bytes": 1e9}, Resources(cpu=4, memory_gb=1), [80, 40], 0.0)
    assert (u.cpu_pct, u.mem_pct, u.gpu_pct) == (60.0, 30.0, 60.0)


def test_gpu_readings_nvml_cannot_give_are_left_out():
    assert usage_of({}, Resources(gpu=GpuSpec(2)), [None, 90], 0.0).gpu_pct == 90.0
    assert usage_of({}, Resources(gpu=GpuSpec(1)), [None], 0.0).gpu_pct is None


def test_sampling_gives_six_samples_per_panic_window_but_at_most_one_a_second():
    assert sample_period(Autoscaling(panic_window_s=6.0)) == 1.0
    assert sample_period(Autoscaling(panic_window_s=60.0)) == 1.0
    assert sample_period(Autoscaling(panic_window_s=2.0)) == pytest.approx(1 / 3)
    assert sample_period(Autoscaling(panic_window_s=0.1)) == 0.1


def test_panic_reason_says_how_long_is_left_instead_of_an_epoch_time():
    scaling = Scaling(max_replicas=10, autoscaling=Autoscaling(enabled=True, target_concurrency=1))
    now = 1_795_000_000.0
    d = decide(scaling, 1, [Sample(now - 1, 8, None, None, None, 1)], now, None)
    assert d.reason.startswith("panic until t=")
    assert readable(d, now).startswith("panic (60.0s left): concurrency 8.0 / target 1")
