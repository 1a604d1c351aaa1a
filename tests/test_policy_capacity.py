"""The cold-start / route-rule decision, with an injected clock."""
from __future__ import annotations

from controller import errors
from controller.policy.capacity import (CRASH_LOOP_AFTER, Capacity, decide_acquire, hold_through_failure,
                                       readiness_poll_interval, restart_backoff)


def cap(ready=(), starting=(), draining=(), stopping=0, max_replicas=3, waiting=0, queue_limit=10,
        backoff_until=0.0, running=True) -> Capacity:
    return Capacity(tuple(ready), tuple(starting), tuple(draining), stopping, max_replicas, waiting, queue_limit,
                    backoff_until, running)


def test_no_rule_at_zero_starts_an_instance():
    assert decide_acquire(None, cap(), now=0).action == "start"


def test_no_rule_joins_an_instance_already_starting_instead_of_starting_another():
    d = decide_acquire(None, cap(starting=["a"]), now=0)
    assert (d.action, d.instance) == ("wait", "a")


def test_no_rule_uses_a_ready_instance():
    assert decide_acquire(None, cap(ready=["a"], starting=["b"]), now=0).instance == "a"


def test_request_during_idle_release_revives_the_instance():
    d = decide_acquire(None, cap(draining=["a"]), now=0)
    assert (d.action, d.instance) == ("revive", "a")


def test_scale_out_starts_until_max_replicas_counting_every_phase():
    assert decide_acquire("scale-out", cap(ready=["a"], starting=["b"]), now=0).action == "start"
    d = decide_acquire("scale-out", cap(ready=["a"], starting=["b"], draining=["c"]), now=0)
    assert d.error is errors.REPLICA_QUOTA_EXCEEDED
    assert decide_acquire("scale-out", cap(ready=["a", "b"], stopping=1), now=0).error is errors.REPLICA_QUOTA_EXCEEDED


def test_random_and_round_robin_never_start_instances():
    for rule in ("random", "round-robin"):
        assert decide_acquire(rule, cap(), now=0).error is errors.ROUTE_TARGET_NOT_FOUND
        assert decide_acquire(rule, cap(starting=["a"]), now=0).error is errors.ROUTE_TARGET_NOT_FOUND
        assert decide_acquire(rule, cap(ready=["a"]), now=0).action == "use"


def test_instance_id_rule_finds_only_its_own_instances():
    assert decide_acquire("a", cap(ready=["a"]), now=0).instance == "a"
    assert decide_acquire("b", cap(starting=["b"]), now=0).action == "wait"
    assert decide_acquire("zz", cap(ready=["a"]), now=0).error is errors.ROUTE_TARGET_NOT_FOUND


def test_at_max_with_only_stopping_instances_waits_for_a_slot():
    d = decide_acquire(None, cap(stopping=3), now=0)
    assert (d.action, d.instance) == ("wait", None)


def test_full_queue_rejects_with_retry_after():
    d = decide_acquire(None, cap(starting=["a"], waiting=10), now=0)
    assert d.error is errors.QUEUE_FULL and d.retry_after


def test_backoff_after_failures_rejects_starts_until_it_ends():
    d = decide_acquire(None, cap(backoff_until=5.0), now=2.0)
    assert d.error is errors.INSTANCE_START_FAILED and d.retry_after == 3.0
    assert decide_acquire(None, cap(backoff_until=5.0), now=5.0).action == "start"


def test_stopped_deployment_rejects_every_rule():
    for rule in (None, "scale-out", "random", "a"):
        assert decide_acquire(rule, cap(running=False), now=0).error is errors.DEPLOYMENT_STOPPED


def test_restart_backoff_doubles_and_is_capped():
    assert [restart_backoff(n) for n in range(0, 9)] == [0, 1, 2, 4, 8, 16, 32, 60, 60]


def test_readiness_polls_tightly_at_first_then_relaxes():
    assert readiness_poll_interval(0.1) <= 0.005
    assert readiness_poll_interval(5) <= 0.01
    assert readiness_poll_interval(60) == 0.1


def test_a_crash_holds_requests_until_the_restart_and_a_crash_loop_rejects():
    def crashed(failures: int, waiting: int = 0, was_crash: bool = True) -> Capacity:
        return Capacity((), (), (), 0, 3, waiting, 10, backoff_until=5.0, failures=failures, crashed=was_crash)
    held = decide_acquire(None, crashed(1), now=2.0)
    assert (held.action, held.instance, held.until) == ("wait", None, 5.0)
    assert decide_acquire(None, crashed(2), now=5.0).action == "start"
    loop = decide_acquire(None, crashed(CRASH_LOOP_AFTER), now=2.0)
    assert loop.error is errors.INSTANCE_START_FAILED and loop.retry_after == 3.0
    assert "3 failures in a row" in loop.reason
    assert decide_acquire(None, crashed(1, waiting=10), now=2.0).error is errors.QUEUE_FULL
    cold = decide_acquire(None, crashed(1, was_crash=False), now=2.0)  # a failed cold start: no hold
    assert cold.error is errors.INSTANCE_START_FAILED
    assert [hold_through_failure(n, True) for n in range(5)] == [True, True, True, False, False]
    assert not hold_through_failure(1, False)
