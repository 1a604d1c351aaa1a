"""Passive health in a gateway worker (gateway.outliers): which failures eject, for how
long, and which failed requests may go to another instance."""
from __future__ import annotations

from gateway.outliers import CONNECT_FAILED, RESET, Outliers, retry_allowed


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_connect_failure_may_be_retried_for_any_method_once():
    for method in ("GET", "POST", "PATCH"):
        assert retry_allowed(method, CONNECT_FAILED, True, attempt=1)
        assert not retry_allowed(method, CONNECT_FAILED, True, attempt=2)


def test_reset_is_retried_only_for_idempotent_methods_without_a_body():
    for method in ("GET", "HEAD", "OPTIONS", "PUT", "DELETE"):
        assert retry_allowed(method, RESET, True, attempt=1)
        assert not retry_allowed(method, RESET, False, attempt=1)
    for method in ("POST", "PATCH"):
        assert not retry_allowed(method, RESET, True, attempt=1)
    assert not retry_allowed("GET", "other", True, attempt=1)


def test_a_failed_connection_ejects_at_once_and_the_ejection_expires():
    clock, ejected = FakeClock(), []
    o = Outliers(clock=clock, on_eject=ejected.append)
    o.record("a", None, total=2)
    assert o.ejected() == {"a"} and ejected == ["a"]
    clock.now += 29.9
    assert o.ejected() == {"a"}
    clock.now += 0.2
    assert o.ejected() == frozenset()


def test_five_5xx_in_a_row_eject_and_a_success_resets_the_count():
    clock = FakeClock()
    o = Outliers(clock=clock)
    for _ in range(4):
        o.record("a", 503, total=4)
    o.record("a", 200, total=4)
    for _ in range(4):
        o.record("a", 500, total=4)
    assert o.ejected() == frozenset()
    o.record("a", 502, total=4)
    assert o.ejected() == {"a"}


def test_second_ejection_lasts_longer_and_at_most_half_are_ejected():
    clock = FakeClock()
    o = Outliers(clock=clock)
    o.record("a", None, total=2)
    o.record("b", None, total=2)
    assert o.ejected() == {"a"}  # one of two at most
    clock.now += 31
    o.record("a", None, total=2)
    clock.now += 59
    assert "a" in o.ejected()  # 60 s the second time


def test_forgetting_removed_instances_frees_their_ejection():
    o = Outliers(clock=FakeClock())
    o.record("a", None, total=2)
    o.forget(["b"])
    assert o.ejected() == frozenset()
