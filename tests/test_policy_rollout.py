"""Rollout state machine, step by step with a fake clock and a fake fleet of instances."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.policy.rollout import (Action, Done, Observed, RevisionStats, RolloutSpec,
                                       RolloutState, SetWeights, StartNew, StartOld, StopNew,
                                       StopOld, canary_size, resolve_surge_unavailable, step)
from controller.spec import Rollout


@dataclass
class FakeFleet:
    """Instances of both revisions as the controller would see them.

    Applies actions the way the controller promises to: stops take instances
    that are not ready before ready ones; starts arrive as `starting`.
    """

    old_ready: int
    old_starting: int = 0
    new_ready: int = 0
    new_starting: int = 0
    new_failed: int = 0
    weights: tuple[float, float] = (100.0, 0.0)
    outcome: Done | None = None

    @property
    def total(self) -> int:
        return self.old_ready + self.old_starting + self.new_ready + self.new_starting + self.new_failed

    @property
    def ready(self) -> int:
        return self.old_ready + self.new_ready

    def observe(self, old_stats: RevisionStats | None = None,
                new_stats: RevisionStats | None = None) -> Observed:
        return Observed(self.old_ready, self.new_ready, self.new_starting, self.new_failed,
                        self.old_ready + self.old_starting,
                        self.new_ready + self.new_starting + self.new_failed, old_stats, new_stats)

    def apply(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, StartNew):
                self.new_starting += a.n
            elif isinstance(a, StartOld):
                self.old_starting += a.n
            elif isinstance(a, StopOld):
                n = a.n
                k = min(n, self.old_starting)
                self.old_starting -= k
                self.old_ready -= n - k
                assert self.old_ready >= 0
            elif isinstance(a, StopNew):
                n = a.n
                for attr in ("new_failed", "new_starting", "new_ready"):
                    k = min(n, getattr(self, attr))
                    setattr(self, attr, getattr(self, attr) - k)
                    n -= k
                assert n == 0, "stopped more new instances than exist"
            elif isinstance(a, SetWeights):
                self.weights = (a.old, a.new)
            elif isinstance(a, Done):
                self.outcome = a

    def start_all(self) -> None:
        self.new_ready += self.new_starting
        self.new_starting = 0
        self.old_ready += self.old_starting
        self.old_starting = 0


def run(spec: RolloutSpec, fleet: FakeFleet, state: RolloutState | None, now: float,
        **stats) -> tuple[RolloutState, list[Action]]:
    state, actions = step(spec, fleet.observe(**stats), state, now)
    fleet.apply(actions)
    return state, actions


GOOD = dict(old_stats=RevisionStats(1000, 10, 200.0), new_stats=RevisionStats(100, 1, 210.0))


# --- fenceposts -------------------------------------------------------------

@pytest.mark.parametrize("desired,surge,unavail,expected", [
    (4, "25%", "25%", (1, 1)),
    (10, "25%", "25%", (3, 2)),  # surge rounds up, unavailable rounds down
    (1, "25%", "25%", (1, 0)),
    (3, "0%", "0%", (0, 1)),  # never both zero
    (3, 0, 0, (0, 1)),
    (5, "2", 1, (2, 1)),
    (0, "25%", "25%", (0, 1)),
])
def test_surge_and_unavailable_resolve_like_kubernetes(desired, surge, unavail, expected):
    assert resolve_surge_unavailable(desired, surge, unavail) == expected


def test_negative_surge_is_rejected():
    with pytest.raises(ValueError, match="maxSurge"):
        resolve_surge_unavailable(3, -1, 1)


def test_spec_validation_names_the_problem():
    with pytest.raises(ValueError, match="unknown rollout strategy"):
        RolloutSpec("big-bang", 3)
    with pytest.raises(ValueError, match="canary steps"):
        RolloutSpec("canary", 3, canary_steps=(0, 50))


def test_spec_from_the_deployment_rollout_section():
    spec = RolloutSpec.from_rollout(Rollout(strategy="canary", canary_steps=(20, 60)), 5)
    assert spec.steps == (20, 60, 100)
    assert spec.fenceposts() == (2, 1)


# --- rolling ----------------------------------------------------------------

def test_rolling_update_of_four_goes_step_by_step_to_success():
    spec = RolloutSpec("rolling", 4)  # surge 1, unavailable 1
    fleet = FakeFleet(old_ready=4)
    state, actions = run(spec, fleet, None, 0.0)
    # One old may go (unavailable 1) and one new may come (surge 1) at once.
    assert actions == [StopOld(1), StartNew(1)]
    assert (fleet.total, fleet.ready) == (4, 3)
    state, actions = run(spec, fleet, state, 1.0)
    assert actions == [StartNew(1)]  # room under 4 + 1 now that one old has gone
    state, actions = run(spec, fleet, state, 2.0)
    assert actions == []  # nothing ready yet: no old may stop, no room to start
    fleet.start_all()
    state, actions = run(spec, fleet, state, 3.0)
    # 5 ready: two old may go; starts count the fleet before those stops land.
    assert actions == [StopOld(2)]
    assert (fleet.total, fleet.ready) == (3, 3)
    state, actions = run(spec, fleet, state, 4.0)
    assert actions == [StartNew(2)]
    fleet.start_all()
    state, actions = run(spec, fleet, state, 5.0)
    assert actions == [StopOld(1)]
    state, actions = run(spec, fleet, state, 6.0)
    assert state.phase == "succeeded"
    assert actions == [Done("succeeded", "rolling update: 4/4 new ready")]
    assert step(spec, fleet.observe(), state, 7.0) == (state, [])


def test_rolling_with_no_surge_replaces_one_at_a_time():
    spec = RolloutSpec("rolling", 2, max_surge=0, max_unavailable=1)
    fleet = FakeFleet(old_ready=2)
    state = None
    for t in range(10):
        state, _ = run(spec, fleet, state, float(t))
        assert fleet.total <= 2 and fleet.ready >= 1
        fleet.start_all()
        if state.phase == "succeeded":
            break
    assert state is not None and state.phase == "succeeded"
    assert fleet.new_ready == 2 and fleet.old_ready == 0


def test_rolling_with_no_unavailable_waits_for_each_new_instance():
    spec = RolloutSpec("rolling", 3, max_surge=1, max_unavailable=0)
    fleet = FakeFleet(old_ready=3)
    state, actions = run(spec, fleet, None, 0.0)
    assert actions == [StartNew(1)]
    state, actions = run(spec, fleet, state, 1.0)
    assert actions == []  # the new one is not ready: no old instance may stop
    fleet.start_all()
    state, actions = run(spec, fleet, state, 2.0)
    assert actions == [StopOld(1)]


def test_rolling_stops_old_instances_that_do_not_serve_first():
    spec = RolloutSpec("rolling", 3, max_surge=1, max_unavailable=0)
    fleet = FakeFleet(old_ready=2, old_starting=1)
    _, actions = run(spec, fleet, None, 0.0)
    # The unready old one costs no availability, so it goes now.
    assert StopOld(1) in actions
    assert fleet.ready == 2 and fleet.old_starting == 0


@settings(max_examples=300, deadline=None)
@given(desired=st.integers(0, 12),
       surge=st.one_of(st.integers(0, 4), st.sampled_from(["0%", "10%", "25%", "50%", "100%"])),
       unavail=st.one_of(st.integers(0, 4), st.sampled_from(["0%", "10%", "25%", "50%", "100%"])),
       data=st.data())
def test_rolling_keeps_surge_and_unavailable_bounds_at_every_step(desired, surge, unavail, data):
    spec = RolloutSpec("rolling", desired, max_surge=surge, max_unavailable=unavail)
    s, u = spec.fenceposts()
    fleet = FakeFleet(old_ready=desired)
    state: RolloutState | None = None
    for t in range(200):
        state, _ = run(spec, fleet, state, float(t))
        assert fleet.total <= desired + s, (t, fleet)
        assert fleet.ready >= desired - u, (t, fleet)
        if state.phase == "succeeded":
            break
        # Any number of the starting instances become ready this tick; after a
        # while all of them do, so the rollout must finish.
        k = data.draw(st.integers(0, fleet.new_starting)) if t < 50 else fleet.new_starting
        fleet.new_starting -= k
        fleet.new_ready += k
    assert state is not None and state.phase == "succeeded", fleet
    assert (fleet.old_ready, fleet.new_ready, fleet.total) == (0, desired, desired)


def test_rolling_rolls_back_when_a_new_instance_fails_and_restores_the_old_set():
    spec = RolloutSpec("rolling", 4)
    fleet = FakeFleet(old_ready=4)
    state, _ = run(spec, fleet, None, 0.0)
    state, _ = run(spec, fleet, state, 1.0)
    fleet.new_starting -= 1
    fleet.new_failed += 1
    state, actions = run(spec, fleet, state, 2.0)
    assert state.phase == "rolled_back"
    reason = "rolling update: 1 new instance(s) failed (0 ready, 1 starting)"
    assert actions == [SetWeights(100.0, 0.0), StartOld(1), StopNew(2), Done("rolled_back", reason)]
    assert state.reason == reason
    assert fleet.new_ready + fleet.new_starting + fleet.new_failed == 0
    fleet.start_all()
    assert fleet.old_ready == 4
    assert step(spec, fleet.observe(), state, 3.0) == (state, [])


# --- blue-green -------------------------------------------------------------

def test_blue_green_starts_the_full_set_switches_at_once_then_stops_old_after_keep_old():
    spec = RolloutSpec("blue-green", 3, keep_old_s=300)
    fleet = FakeFleet(old_ready=3)
    state, actions = run(spec, fleet, None, 0.0)
    assert actions == [SetWeights(100.0, 0.0), StartNew(3)]
    fleet.new_starting, fleet.new_ready = 1, 2
    state, actions = run(spec, fleet, state, 10.0)
    assert actions == [] and state.phase == "progressing"
    fleet.start_all()
    state, actions = run(spec, fleet, state, 20.0)
    assert actions == [SetWeights(0.0, 100.0)]
    assert (state.phase, state.switched_at) == ("switched", 20.0)
    state, actions = run(spec, fleet, state, 319.0)
    assert actions == [] and fleet.old_ready == 3  # the old set waits as a fallback
    state, actions = run(spec, fleet, state, 320.0)
    assert state.phase == "succeeded"
    assert actions == [StopOld(3), Done("succeeded", "blue-green: old set kept 300s >= 300s, stopped")]
    assert fleet.old_ready == 0


def test_blue_green_rolls_back_on_failure_before_the_switch():
    spec = RolloutSpec("blue-green", 2)
    fleet = FakeFleet(old_ready=2)
    state, _ = run(spec, fleet, None, 0.0)
    fleet.new_starting, fleet.new_ready, fleet.new_failed = 0, 1, 1
    state, actions = run(spec, fleet, state, 5.0)
    assert state.phase == "rolled_back"
    assert actions[0] == SetWeights(100.0, 0.0)
    assert StopNew(2) in actions
    assert isinstance(actions[-1], Done) and "before switch" in actions[-1].reason
    assert fleet.old_ready == 2 and fleet.weights == (100.0, 0.0)


def test_blue_green_switches_back_on_failure_while_the_old_set_is_kept():
    spec = RolloutSpec("blue-green", 2)
    fleet = FakeFleet(old_ready=2)
    state, _ = run(spec, fleet, None, 0.0)
    fleet.start_all()
    state, _ = run(spec, fleet, state, 1.0)
    assert fleet.weights == (0.0, 100.0)
    fleet.new_ready, fleet.new_failed = 1, 1
    state, actions = run(spec, fleet, state, 2.0)
    assert state.phase == "rolled_back"
    assert fleet.weights == (100.0, 0.0) and fleet.old_ready == 2
    assert "after switch" in state.reason


# --- canary -----------------------------------------------------------------

def test_canary_walks_each_step_with_pauses_and_analysis_to_success():
    spec = RolloutSpec("canary", 4, canary_steps=(10, 50, 100), step_pause_s=30)
    fleet = FakeFleet(old_ready=4)
    state, actions = run(spec, fleet, None, 0.0)
    assert actions == [SetWeights(100.0, 0.0), StartNew(1)]  # 10% of 4 -> at least 1
    fleet.start_all()
    state, actions = run(spec, fleet, state, 5.0)
    assert actions == [SetWeights(90.0, 10.0)]
    assert (state.phase, state.step, state.step_started_at) == ("paused", 0, 5.0)
    state, actions = run(spec, fleet, state, 34.0, **GOOD)
    assert actions == [] and state.phase == "paused"
    state, actions = run(spec, fleet, state, 35.0, **GOOD)
    assert actions == [StartNew(1)]  # 50% of 4 -> 2 new
    assert (state.phase, state.step) == ("progressing", 1)
    assert "canary step 1/3 (10%): passed: error rate 0.010 <= 0.060" in state.reason
    fleet.start_all()
    state, actions = run(spec, fleet, state, 40.0)
    assert actions == [SetWeights(50.0, 50.0)]
    state, actions = run(spec, fleet, state, 70.0, **GOOD)
    assert actions == [StartNew(2)]
    assert fleet.old_ready == 4  # old stays whole until the end: rollback is a weight change
    fleet.start_all()
    state, actions = run(spec, fleet, state, 75.0)
    assert actions == [SetWeights(0.0, 100.0), StopOld(4),
                       Done("succeeded", "canary step 3/3 (100%): 4/4 new ready, old stopped")]
    assert state.phase == "succeeded"
    assert (fleet.old_ready, fleet.new_ready) == (0, 4)


def test_canary_rolls_back_when_the_error_rate_rises():
    spec = RolloutSpec("canary", 4, step_pause_s=30)
    fleet = FakeFleet(old_ready=4)
    state, _ = run(spec, fleet, None, 0.0)
    fleet.start_all()
    state, _ = run(spec, fleet, state, 0.0)
    state, actions = run(spec, fleet, state, 30.0, old_stats=RevisionStats(1000, 10, 200.0),
                         new_stats=RevisionStats(100, 8, 200.0))
    assert state.phase == "rolled_back"
    assert state.reason == ("canary step 1/3 (10%): analysis failed: "
                            "error rate 0.080 > old 0.010 + 0.05")
    assert actions == [SetWeights(100.0, 0.0), StopNew(1), Done("rolled_back", state.reason)]
    assert fleet.new_ready == 0 and fleet.old_ready == 4


def test_canary_rolls_back_when_p99_grows_past_the_ratio():
    spec = RolloutSpec("canary", 4, step_pause_s=30)
    fleet = FakeFleet(old_ready=4)
    state, _ = run(spec, fleet, None, 0.0)
    fleet.start_all()
    state, _ = run(spec, fleet, state, 0.0)
    state, _ = run(spec, fleet, state, 30.0, old_stats=RevisionStats(1000, 0, 200.0),
                   new_stats=RevisionStats(100, 0, 301.0))
    assert state.phase == "rolled_back"
    assert "p99 301ms > old 200ms x 1.5" in state.reason


def test_canary_rolls_back_when_a_new_instance_fails():
    spec = RolloutSpec("canary", 4)
    fleet = FakeFleet(old_ready=4)
    state, _ = run(spec, fleet, None, 0.0)
    fleet.new_starting, fleet.new_failed = 0, 1
    state, actions = run(spec, fleet, state, 1.0)
    assert state.phase == "rolled_back"
    assert "1 new instance(s) failed" in state.reason
    assert fleet.weights == (100.0, 0.0)


def test_canary_without_enough_traffic_waits_up_to_three_pauses_then_promotes_as_inconclusive():
    spec = RolloutSpec("canary", 4, step_pause_s=30, min_requests=20)
    fleet = FakeFleet(old_ready=4)
    state, _ = run(spec, fleet, None, 0.0)
    fleet.start_all()
    state, _ = run(spec, fleet, state, 0.0)
    few = dict(old_stats=RevisionStats(50, 0, 100.0), new_stats=RevisionStats(5, 0, 100.0))
    for t in (30.0, 60.0, 89.0):
        state, actions = run(spec, fleet, state, t, **few)
        assert (state.phase, actions) == ("paused", [])
        assert "waiting for traffic, 5 requests < 20 needed" in state.reason
    state, actions = run(spec, fleet, state, 90.0, **few)
    assert (state.phase, state.step) == ("progressing", 1)
    assert "analysis inconclusive after 90s (5 requests < 20 needed), promoted" in state.reason


def test_canary_with_enough_traffic_during_the_extra_wait_is_analysed_normally():
    spec = RolloutSpec("canary", 4, step_pause_s=30)
    fleet = FakeFleet(old_ready=4)
    state, _ = run(spec, fleet, None, 0.0)
    fleet.start_all()
    state, _ = run(spec, fleet, state, 0.0)
    state, _ = run(spec, fleet, state, 30.0, new_stats=RevisionStats(3, 0, 1.0))
    assert state.phase == "paused"
    state, _ = run(spec, fleet, state, 45.0, old_stats=RevisionStats(500, 0, 100.0),
                   new_stats=RevisionStats(40, 20, 100.0))
    assert state.phase == "rolled_back"


def test_canary_size_is_proportional_at_least_one_at_most_desired():
    assert canary_size(4, 10) == 1
    assert canary_size(4, 50) == 2
    assert canary_size(10, 25) == 3
    assert canary_size(3, 100) == 3
    assert canary_size(1, 1) == 1


def test_canary_with_few_requests_fails_at_once_when_errors_cannot_be_diluted():
    # The gateway ejects a canary that answers 5xx, so it may never reach minRequests;
    # 5 errors can never fall under 5 % of 20 requests: fail, do not promote as inconclusive.
    spec = RolloutSpec("canary", 4, step_pause_s=30, min_requests=20)
    fleet = FakeFleet(old_ready=4)
    state, _ = run(spec, fleet, None, 0.0)
    fleet.start_all()
    state, _ = run(spec, fleet, state, 0.0)
    state, actions = run(spec, fleet, state, 30.0, old_stats=RevisionStats(500, 0, 100.0),
                         new_stats=RevisionStats(5, 5, 100.0))
    assert state.phase == "rolled_back"
    assert state.reason == ("canary step 1/3 (10%): analysis failed: 5 errors in 5 requests: the error rate "
                            "stays above old 0.000 + 0.05 even if the next 15 succeed")
    assert actions[0] == SetWeights(100.0, 0.0)


def test_canary_with_few_requests_and_one_error_still_waits():
    spec = RolloutSpec("canary", 4, step_pause_s=30, min_requests=20)  # 1 of 20 is exactly 5 %
    fleet = FakeFleet(old_ready=4)
    state, _ = run(spec, fleet, None, 0.0)
    fleet.start_all()
    state, _ = run(spec, fleet, state, 0.0)
    state, _ = run(spec, fleet, state, 30.0, new_stats=RevisionStats(5, 1, 100.0))
    assert state.phase == "paused" and "waiting for traffic" in state.reason


def test_p99_tolerance_absorbs_noise_on_fast_endpoints():
    spec = RolloutSpec("canary", 4, step_pause_s=30, p99_tolerance_ms=50.0)
    fleet = FakeFleet(old_ready=4)
    state, _ = run(spec, fleet, None, 0.0)
    fleet.start_all()
    state, _ = run(spec, fleet, state, 0.0)
    # 3 ms -> 9 ms is 3x, but only 6 ms worse: passes.
    state, _ = run(spec, fleet, state, 30.0, old_stats=RevisionStats(500, 0, 3.0),
                   new_stats=RevisionStats(50, 0, 9.0))
    assert (state.phase, state.step) == ("progressing", 1)
    assert "p99 9ms <= 53ms" in state.reason


def test_rollout_spec_from_the_yaml_carries_the_analysis_settings():
    r = Rollout(strategy="canary", min_requests=7, max_error_rate_increase=0.01, max_p99_ratio=2.0,
                p99_tolerance_ms=25.0)
    spec = RolloutSpec.from_rollout(r, 3)
    assert (spec.min_requests, spec.max_error_rate_increase, spec.max_p99_ratio, spec.p99_tolerance_ms) == \
        (7, 0.01, 2.0, 25.0)
