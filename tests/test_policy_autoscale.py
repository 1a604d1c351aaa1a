"""Autoscaling policy, driven by a fake clock: samples every 2 s, one decision per sample."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from controller.policy.autoscale import (ScaleDecision, ScaleState, Sample, decide,
                                         idle_instances)
from controller.spec import Autoscaling, Scaling

TICK = 2.0


def scaling(min_r: int = 0, max_r: int = 10, idle: float = 300.0, **auto) -> Scaling:
    auto.setdefault("enabled", True)
    if not any(k.startswith("target_") for k in auto):
        auto["target_concurrency"] = 4
    return Scaling(min_replicas=min_r, max_replicas=max_r, idle_timeout_s=idle,
                   autoscaling=Autoscaling(**auto))


@dataclass
class FakeCluster:
    """Feeds `decide` like the controller does; the size follows each decision at once."""

    spec: Scaling
    replicas: int = 1
    now: float = 0.0
    state: ScaleState | None = None
    samples: list[Sample] = field(default_factory=list)
    history: list[ScaleDecision] = field(default_factory=list)
    times: list[float] = field(default_factory=list)

    def tick(self, in_flight: float, cpu: float | None = None, mem: float | None = None,
             gpu: float | None = None, requests: int | None = None) -> ScaleDecision:
        """cpu/mem/gpu are the deployment's total load in percent of one instance
        (150 = one and a half instances busy); it spreads over the ready instances."""
        self.now += TICK
        reqs = int(in_flight) if requests is None else requests
        per = [None if x is None else x / max(1, self.replicas) for x in (cpu, mem, gpu)]
        self.samples.append(Sample(self.now, in_flight, *per, self.replicas, reqs))
        # The controller keeps only what the longest window can use.
        self.samples = [s for s in self.samples if s.at > self.now - 120]
        d = decide(self.spec, self.replicas, self.samples, self.now, self.state)
        self.state, self.replicas = d.state, d.replicas
        self.history.append(d)
        self.times.append(self.now)
        return d

    def run(self, seconds: float, load: Callable[[float], float], **kw) -> list[int]:
        sizes = []
        for _ in range(int(seconds / TICK)):
            sizes.append(self.tick(load(self.now), **kw).replicas)
        return sizes


def test_ramp_grows_size_in_step_with_concurrency_and_never_overshoots():
    c = FakeCluster(scaling(max_r=20), replicas=1)
    # +1 concurrent request every 4 s, from 1 to 30.
    load = lambda t: min(30.0, 1 + t // 4)  # noqa: E731
    sizes = []
    for _ in range(60):
        n = c.tick(load(c.now + TICK)).replicas
        assert n <= -(-load(c.now) // 4), "never more than the load now needs"
        sizes.append(n)
    assert sizes == sorted(sizes), "a ramp only ever scales up"
    assert sizes[-1] >= 6  # the windows lag the ramp a little
    c.run(60, lambda t: 30.0)
    assert c.replicas == 8  # ceil(30 / 4)


def test_reason_names_signal_values_and_window():
    c = FakeCluster(scaling(), replicas=1)
    d = None
    for _ in range(40):  # past the panic the first jump from 1 to 3 causes
        d = c.tick(9.0)
    assert d is not None
    assert d.signal == "concurrency"
    assert d.replicas == 3
    assert d.reason == "concurrency 9.0 / target 4 -> 3 (stable window 60s)"
    assert d.values["concurrency"] == 9.0 and d.values["desired_stable"] == 3.0


def steady_then_burst() -> FakeCluster:
    """One instance at its target for a minute, then a 10x burst held for one panic window."""
    c = FakeCluster(scaling(max_r=20), replicas=1)
    c.run(60, lambda t: 4.0)
    assert c.replicas == 1
    c.run(6, lambda t: 40.0)
    return c


def test_burst_enters_panic_and_scales_up_on_the_panic_window():
    c = steady_then_burst()
    d = c.history[-1]
    # The stable window (60 s) has barely moved; the panic window (6 s) is all burst.
    assert d.values["desired_stable"] < 4
    assert d.replicas == 10
    # Panic began with the first burst sample, which alone doubled the desire.
    assert c.history[-3].reason.startswith("panic until t=122s") and c.history[-3].replicas > 1
    assert d.reason == "panic until t=122s: concurrency 40.0 / target 4 -> 10 (panic window 6s)"


def test_in_panic_the_size_never_goes_down():
    c = steady_then_burst()
    # The burst stops at once; panic lasts one stable window after the trigger.
    sizes = c.run(54, lambda t: 0.5)
    assert sizes == [10] * len(sizes)
    assert all(d.reason.startswith("panic") for d in c.history[-len(sizes):])


def test_after_panic_scale_down_waits_for_the_delay_then_follows_the_highest_recent_desire():
    c = steady_then_burst()
    last_panic = c.now
    while c.tick(4.0).reason.startswith("panic"):
        last_panic = c.now
    assert c.replicas == 10
    while c.replicas == 10:
        c.tick(4.0)
    # Nothing comes down sooner than the 30 s delay after panic.
    assert c.now - last_panic >= 30
    assert "below 10 for scaleDownDelay 30s" in c.history[-1].reason
    steps = [c.replicas]
    for _ in range(60):
        if c.tick(4.0).replicas != steps[-1]:
            steps.append(c.replicas)
    # The stable window still held the burst when the delay began, so the first
    # step stops at that remembered desire; the rest follows as it fades.
    assert steps[-1] == 1
    assert steps == sorted(steps, reverse=True)
    assert_every_scale_down_followed_a_full_delay_of_lower_desire(c, 30)


def test_scale_down_goes_to_the_highest_desire_of_the_delay_not_the_lowest():
    spec = scaling(max_r=20, scale_down_delay_s=30)
    state = None
    desires = [12.0, 20.0, 4.0]  # -> 3, 5, 1 instances; current is 8
    got = []
    for i in range(40):
        now = float(i * 2)
        d = decide(spec, 8, [Sample(now, desires[i % 3], None, None, None, 8, 1)], now, state)
        state = d.state
        got.append(d.replicas)
    first_down = next(i for i, n in enumerate(got) if n != 8)
    assert first_down * 2 >= 30
    assert got[first_down] == 5


def test_flapping_load_does_not_flap_the_size():
    c = FakeCluster(scaling(max_r=20), replicas=1)
    # 20 s at 16 in flight, 20 s at 2: the stable window averages 9 -> 3 instances.
    load = lambda t: 16.0 if (t // 20) % 2 == 0 else 2.0  # noqa: E731
    c.run(120, load)  # settle
    sizes = c.run(600, load)
    assert sizes == [3] * len(sizes)


def test_flapping_desire_is_held_at_its_peak_by_the_scale_down_delay():
    # A 10 s stable window follows the same load closely: desire swings 1 <-> 4.
    c = FakeCluster(scaling(max_r=20, stable_window_s=10, panic_window_s=2), replicas=1)
    load = lambda t: 16.0 if (t // 20) % 2 == 0 else 2.0  # noqa: E731
    c.run(120, load)
    sizes = c.run(600, load)
    assert {round(d.values["desired_stable"]) for d in c.history[-300:]} == {1, 2, 3, 4}
    # Each low spell is shorter than the 30 s delay, so the size stays at the peak.
    assert sizes == [4] * len(sizes)


def assert_every_scale_down_followed_a_full_delay_of_lower_desire(c: FakeCluster, delay: float):
    for i in range(1, len(c.history)):
        before, t = c.history[i - 1].replicas, c.times[i]
        if c.history[i].replicas < before:
            recent = [h for h, at in zip(c.history, c.times) if t - delay < at <= t]
            assert all(h.values.get("desired_stable", 0) < before for h in recent), c.history[i].reason


def test_a_short_rise_during_the_delay_restarts_it():
    c = FakeCluster(scaling(max_r=20, stable_window_s=10, panic_window_s=2,
                            scale_down_delay_s=30), replicas=1)
    c.run(20, lambda t: 16.0)
    assert c.replicas == 4
    sizes = c.run(20, lambda t: 4.0)  # desire falls to 1, for less than the delay
    sizes += c.run(10, lambda t: 16.0)  # back up to 4
    assert sizes == [4] * len(sizes)
    sizes += c.run(30, lambda t: 4.0)  # lower again: the 30 s start over
    assert sizes == [4] * len(sizes)
    c.run(40, lambda t: 4.0)
    assert c.replicas == 1
    assert_every_scale_down_followed_a_full_delay_of_lower_desire(c, 30)


def test_zero_traffic_goes_to_zero_only_after_idle_timeout():
    c = FakeCluster(scaling(min_r=0, idle=300.0), replicas=2)
    c.run(30, lambda t: 8.0)
    last_traffic = c.now
    sizes = c.run(298, lambda t: 0.0)
    # Down to one warm instance after the scale-down delay, never zero before the timeout.
    assert min(sizes) == 1 and sizes[-1] == 1
    assert c.now - last_traffic < 300
    d = c.tick(0.0)
    assert c.now - last_traffic >= 300
    assert d.replicas == 0
    assert d.reason == "no traffic for 300s >= idleTimeout 300s -> 0"


def test_short_requests_between_samples_count_as_traffic():
    c = FakeCluster(scaling(min_r=0, idle=60.0), replicas=1)
    # Nothing in flight at sample time, but requests keep arriving.
    sizes = c.run(200, lambda t: 0.0, requests=3)
    assert sizes == [1] * len(sizes)


def test_idle_timeout_goes_to_min_replicas_when_min_is_set():
    c = FakeCluster(scaling(min_r=2, idle=60.0), replicas=5)
    c.run(10, lambda t: 20.0)
    sizes = c.run(70, lambda t: 0.0)
    assert sizes[-1] == 2
    assert "minReplicas 2" in c.history[-1].reason


def test_restart_with_no_state_keeps_running_instances_for_a_full_idle_timeout():
    spec = scaling(min_r=0, idle=300.0)
    d = decide(spec, 2, [], 1000.0, None)
    assert d.replicas == 2
    d = decide(spec, 2, [Sample(1299.0, 0, None, None, None, 2)], 1299.0, d.state)
    assert d.replicas >= 1
    d = decide(spec, 2, [Sample(1300.0, 0, None, None, None, 2)], 1300.0, d.state)
    assert d.replicas == 0


def test_stays_at_zero_without_traffic():
    spec = scaling(min_r=0)
    d = decide(spec, 0, [Sample(10.0, 0, None, None, None, 0)], 10.0, None)
    assert d.replicas == 0


def test_burst_at_zero_starts_enough_instances():
    spec = scaling(min_r=0)
    d = decide(spec, 0, [Sample(10.0, 9, None, None, None, 0, 9)], 10.0, None)
    assert d.replicas == 3
    assert d.reason.startswith("panic")


def test_one_signal_missing_uses_the_others():
    c = FakeCluster(scaling(target_concurrency=4, target_gpu_utilization=80), replicas=2)
    c.run(70, lambda t: 4.0, gpu=None)
    d = c.history[-1]
    assert "gpu_panic" not in d.values
    assert d.signal == "concurrency"
    assert "gpu" not in d.values
    assert d.replicas == 1


def test_all_signals_missing_holds_the_size():
    c = FakeCluster(scaling(target_gpu_utilization=80), replicas=3)
    d = c.tick(1.0, gpu=None)
    assert d.replicas == 3
    assert d.signal is None
    assert "no samples for gpu" in d.reason


def test_the_largest_signal_wins():
    c = FakeCluster(scaling(target_concurrency=4, target_cpu_utilization=70,
                            target_gpu_utilization=80), replicas=2)
    # concurrency 4 / 4 -> 1; cpu 100 / 70 -> 2; gpu 190 / 80 -> 3 (loads in % of one instance)
    c.run(70, lambda t: 4.0, cpu=100.0, gpu=190.0)
    d = c.history[-1]
    assert (d.signal, d.replicas) == ("gpu", 3)
    assert d.reason.startswith("gpu 63.3% on 3 ready / target 80% -> 3")
    assert d.values["cpu"] == pytest.approx(100.0)
    assert d.values["gpu"] == pytest.approx(190.0)


def test_utilisation_counts_only_ready_instances():
    spec = scaling(target_cpu_utilization=50)
    # 4 instances wanted but only 1 ready at 100 %: load is 1 x 100 %, asks for 2.
    samples = [Sample(t, 1, 100.0, None, None, 1) for t in range(2, 61, 2)]
    d = decide(spec, 4, samples, 60.0, ScaleState(last_request_at=60.0))
    assert d.values["desired_stable"] == 2.0


def test_clamped_to_max_replicas():
    c = FakeCluster(scaling(max_r=3), replicas=1)
    c.run(70, lambda t: 100.0)
    assert c.replicas == 3
    assert c.history[-1].reason.endswith("clamped to maxReplicas 3")


def test_clamped_to_min_replicas():
    c = FakeCluster(scaling(min_r=2), replicas=2)
    sizes = c.run(100, lambda t: 1.0)
    assert sizes == [2] * len(sizes)
    assert c.history[-1].reason.endswith("clamped to minReplicas 2")


def test_lowered_max_replicas_applies_at_once():
    spec = scaling(max_r=2)
    samples = [Sample(t, 20, None, None, None, 5) for t in range(2, 61, 2)]
    d = decide(spec, 5, samples, 60.0, None)
    assert d.replicas == 2


def test_disabled_returns_current_clamped():
    spec = Scaling(min_replicas=1, max_replicas=3, autoscaling=Autoscaling(enabled=False))
    busy = [Sample(1.0, 100, 99.0, 99.0, 99.0, 2)]
    assert decide(spec, 2, busy, 1.0, None).replicas == 2
    assert decide(spec, 7, busy, 1.0, None).replicas == 3
    d = decide(spec, 0, busy, 1.0, None)
    assert (d.replicas, d.reason, d.signal) == (1, "autoscaling disabled", None)


def test_samples_outside_the_window_or_in_the_future_are_ignored():
    spec = scaling()
    samples = [Sample(0.0, 400, None, None, None, 1), Sample(99.0, 4, None, None, None, 1),
               Sample(200.0, 400, None, None, None, 1)]
    d = decide(spec, 1, samples, 100.0, ScaleState(last_request_at=99.0))
    assert d.replicas == 1


def test_invalid_target_is_a_programming_error():
    with pytest.raises(ValueError, match="concurrency must be > 0"):
        decide(scaling(target_concurrency=0), 1, [Sample(1.0, 1, None, None, None, 1)], 1.0, None)


def test_idle_instances_releases_most_idle_first_and_keeps_min_replicas():
    last = {"a": 0.0, "b": 50.0, "c": 10.0, "d": 590.0}
    got = idle_instances(last, {}, idle_timeout_s=300, now=600, keep=1)
    assert got == ["a", "c", "b"]
    assert idle_instances(last, {}, 300, 600, keep=2) == ["a", "c"]
    assert idle_instances(last, {}, 300, 600, keep=4) == []


def test_idle_instances_never_releases_an_instance_with_requests_in_flight():
    last = {"a": 0.0, "b": 0.0}
    assert idle_instances(last, {"a": 1}, 300, 600, keep=0) == ["b"]


def test_idle_instances_waits_for_the_full_timeout():
    assert idle_instances({"a": 300.0}, {}, 300, 599.9, keep=0) == []
    assert idle_instances({"a": 300.0}, {}, 300, 600.0, keep=0) == ["a"]


def test_idle_instances_counts_instances_without_activity_towards_keep():
    # "new" has no recorded activity yet: never released, but it is an instance.
    assert idle_instances({"old": 0.0}, {"new": 0}, 300, 600, keep=1) == ["old"]


def test_scale_down_drains_unhealthy_then_least_busy_then_newest():
    from controller.policy.autoscale import DrainCandidate, scale_down_choice
    cands = [DrainCandidate("old-idle", False, 0, 1.0), DrainCandidate("new-idle", False, 0, 5.0),
             DrainCandidate("busy", False, 3, 2.0), DrainCandidate("sick", True, 2, 3.0)]
    assert scale_down_choice(cands, 2) == ["sick", "new-idle"]
    assert scale_down_choice(cands, 0) == [] and scale_down_choice(cands, 9)[-1] == "busy"
