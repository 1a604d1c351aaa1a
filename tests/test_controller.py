"""The controller against the harness: a `FakeDriver` (the Driver interface over pretend
processes, with injectable failures) and a `FakeClock`, with the real store, loader,
policies and fleet. Every transition and every driver failure, in milliseconds.
What only real processes prove (ports, signals, HTTP, containers) stays in the e2e tests."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from conftest import deployment_yaml, wait_until
from controller import errors
from controller.core import Controller
from controller.errors import AutoDeployError
from controller.fleet import DRAINING, GONE, READY, STARTING, STOPPING, InstancePhase, Rec
from controller.inventory import Gpu, Inventory
from controller.loader import load_text
from controller.policy.capacity import SCALE_OUT
from controller.stack import Prices
from controller.store import Store
from fakes import FakeClock, FakeDriver

GPU0 = Gpu(0, "GPU-00000000-0000-0000-0000-000000000000", "NVIDIA H100 80GB HBM3", 81559)


@dataclass
class Harness:
    c: Controller
    driver: FakeDriver
    clock: FakeClock
    store: Store
    path: Path

    def apply(self, *docs: str) -> None:
        result = load_text("---\n".join(docs), "deployments.yaml")
        assert not result.errors, result.errors
        self.c.apply(result)

    def recs(self, name: str) -> list[Rec]:
        with self.c.fleet:
            rt = self.c.deps.get(name)
            return sorted(rt.instances.values(), key=lambda r: r.created) if rt else []

    def phases(self, name: str) -> list[str]:
        return [r.phase.value for r in self.recs(name)]

    def settle(self, name: str, *phases: str, what: str = "") -> list[Rec]:
        """Wait (bounded, real time) until the deployment's instances are in these phases."""
        want = sorted(phases)
        wait_until(lambda: sorted(self.phases(name)) == want, what or f"{name} instances {want}", timeout=10)
        return self.recs(name)

    def tick_until(self, predicate, what: str) -> None:
        """Run reconcile passes (as the serve loop does) until `predicate` holds; bounded."""
        wait_until(lambda: (self.c.tick(), predicate())[1], what, timeout=10)

    def kinds(self, name: str) -> list[str]:
        return [e.kind for e in self.store.events(name, limit=200)]

    def acquire_in_thread(self, name: str, rule: str | None = None, timeout: float = 10) -> dict:
        out: dict = {}

        def run() -> None:
            try:
                out["address"] = self.c.acquire(name, rule, timeout=timeout)
            except AutoDeployError as exc:
                out["error"] = exc
        t = threading.Thread(target=run, daemon=True)
        t.start()
        out["thread"] = t
        return out


def make(tmp_path: Path, *, auto_ready: bool = True, gpus: tuple[Gpu, ...] = (),
         driver: FakeDriver | None = None, store: Store | None = None) -> Harness:
    clock = FakeClock()
    driver = driver or FakeDriver(auto_ready=auto_ready)
    store = store or Store(tmp_path / "autodeploy.db")
    c = Controller(driver, store, inventory=Inventory(list(gpus), "stack config test"),
                   prices=Prices(default_gpu=1.0), stop_timeout=1.0, clock=clock, sleep=clock.sleep,
                   probes=driver)
    return Harness(c, driver, clock, store, tmp_path)


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = make(tmp_path)
    yield harness
    harness.c.shutdown()


def dep(name: str = "m", **kw) -> str:
    return deployment_yaml(name, "fake", **kw)


# ---------------------------------------------------------------------------- acquire
def test_first_request_starts_one_instance_and_gets_its_address(h: Harness):
    h.apply(dep(idle="10m"))
    address = h.c.acquire("m", None, timeout=5)
    assert h.phases("m") == ["ready"]
    assert address.id == h.recs("m")[0].id and address.port == h.recs("m")[0].inst.port
    assert [c for c, _ in h.driver.calls if c == "start"] == ["start"]
    assert h.kinds("m")[-2:] == ["start", "ready"]
    assert h.c.status("m")["status"] == "Running"


def test_a_burst_at_zero_starts_exactly_one_instance(tmp_path: Path):
    h = make(tmp_path, auto_ready=False)
    try:
        h.apply(dep(max_replicas=3))
        waiters = [h.acquire_in_thread("m") for _ in range(8)]
        wait_until(lambda: len(h.driver.procs) == 1, "the first start")
        for w in waiters:  # all of them are held, none started a second instance
            assert w["thread"].is_alive()
        h.driver.make_ready(next(iter(h.driver.procs)))
        for w in waiters:
            w["thread"].join(5)
        assert {w["address"].id for w in waiters} == set(h.driver.procs)
        assert len(h.driver.procs) == 1
    finally:
        h.c.shutdown()


def test_scale_out_starts_instances_until_max_replicas_then_answers_1007(h: Harness):
    h.apply(dep(max_replicas=2))
    a = h.c.acquire("m", SCALE_OUT, timeout=5)
    b = h.c.acquire("m", SCALE_OUT, timeout=5)
    assert a.id != b.id and h.phases("m") == ["ready", "ready"]
    with pytest.raises(AutoDeployError) as err:
        h.c.acquire("m", SCALE_OUT, timeout=5)
    assert err.value.error is errors.REPLICA_QUOTA_EXCEEDED


def test_an_instance_id_rule_routes_to_that_instance_or_answers_1006(h: Harness):
    h.apply(dep(max_replicas=2))
    a = h.c.acquire("m", SCALE_OUT, timeout=5)
    h.c.acquire("m", SCALE_OUT, timeout=5)
    assert h.c.acquire("m", a.id, timeout=5).id == a.id
    with pytest.raises(AutoDeployError) as err:
        h.c.acquire("m", "nosuchid", timeout=5)
    assert err.value.error is errors.ROUTE_TARGET_NOT_FOUND


def test_unknown_and_stopped_deployments_answer_coded_errors(h: Harness):
    h.apply(dep("s", state="stopped"))
    with pytest.raises(AutoDeployError) as err:
        h.c.acquire("nope", None, timeout=1)
    assert err.value.error is errors.UNKNOWN_DEPLOYMENT
    with pytest.raises(AutoDeployError) as err:
        h.c.acquire("s", None, timeout=1)
    assert err.value.error is errors.DEPLOYMENT_STOPPED
    assert h.driver.procs == {}


# ---------------------------------------------------------------------------- idle release and drain
def test_an_idle_instance_is_drained_then_stopped_after_idle_timeout(h: Harness):
    h.apply(dep(idle="10s"))
    h.c.acquire("m", None, timeout=5)
    h.clock.advance(9)
    h.c.tick()
    assert h.phases("m") == ["ready"]
    h.clock.advance(2)
    h.c.tick()  # no gateway worker holds a request: drained and stopped in the same pass
    h.settle("m")
    assert h.c.status("m")["status"] == "Standby"
    assert h.driver.running() == []
    assert ["release", "stop"] == [k for k in h.kinds("m") if k in ("release", "stop")]


def test_a_draining_instance_waits_for_in_flight_requests_and_for_every_worker(h: Harness):
    h.apply(dep(idle="10s"))
    iid = h.c.acquire("m", None, timeout=5).id
    h.clock.advance(11)
    h.c.sync(worker=1, version=h.c.version, inflight={}, activity={}, wait=0)
    h.c.tick()
    assert h.phases("m") == ["draining"]  # worker 1 has not seen the version that drops it
    h.c.sync(worker=1, version=h.c.version, inflight={iid: 1}, activity={}, wait=0)
    h.c.tick()
    assert h.phases("m") == ["draining"]  # it has, but a request is still in flight there
    h.c.sync(worker=1, version=h.c.version, inflight={}, activity={}, wait=0)
    h.c.tick()
    h.settle("m")


def test_traffic_during_an_idle_release_revives_the_instance(h: Harness):
    h.apply(dep(idle="10s"))
    iid = h.c.acquire("m", None, timeout=5).id
    h.clock.advance(11)
    h.c.sync(worker=1, version=h.c.version, inflight={}, activity={}, wait=0)
    h.c.tick()
    assert h.phases("m") == ["draining"]
    h.c.sync(worker=1, version=h.c.version - 1, inflight={}, activity={iid: [h.clock() + 0.5, 1, 0]}, wait=0)
    h.c.tick()
    assert h.phases("m") == ["ready"]
    assert "revived" in h.kinds("m")


def test_traffic_still_finishing_on_a_scaled_down_instance_does_not_revive_it(h: Harness):
    h.apply(dep(idle="10m"))
    iid = h.c.acquire("m", None, timeout=5).id
    rec = h.recs("m")[0]
    with h.c.fleet:
        h.c.fleet.drain(rec, "autoscale down to 0", revivable=False)
    h.c.sync(worker=1, version=h.c.version - 1, inflight={}, activity={iid: [h.clock() + 0.5, 1, 0]}, wait=0)
    h.c.tick()
    assert h.phases("m") == ["draining"]
    h.c.sync(worker=1, version=h.c.version, inflight={}, activity={}, wait=0)
    h.c.tick()
    h.settle("m")


def test_a_request_during_release_revives_the_draining_instance_instead_of_starting_one(h: Harness):
    h.apply(dep(idle="10s"))
    iid = h.c.acquire("m", None, timeout=5).id
    h.clock.advance(11)
    h.c.sync(worker=1, version=h.c.version, inflight={}, activity={}, wait=0)
    h.c.tick()
    assert h.phases("m") == ["draining"]
    assert h.c.acquire("m", None, timeout=5).id == iid
    assert h.phases("m") == ["ready"] and len(h.driver.procs) == 1


# ---------------------------------------------------------------------------- minReplicas, crash, backoff
def test_min_replicas_are_kept_past_idle_timeout_and_a_crash_is_replaced_after_backoff(h: Harness):
    h.apply(dep(min_replicas=1, idle="1s"))
    h.c.tick()
    first = h.settle("m", "ready")[0]
    h.clock.advance(5)
    h.c.tick()
    assert h.phases("m") == ["ready"]  # past idleTimeout: minReplicas are kept
    h.driver.crash(first.id, code=3, tail="CUDA error")
    h.c.tick()
    assert first.phase is GONE and h.phases("m") == []  # backing off: no restart in this pass
    status = h.c.status("m")
    assert "exited with code 3" in status["last_error"] and "CUDA error" in status["last_error"]
    assert "crashed" in h.kinds("m")
    h.clock.advance(1.5)
    h.c.tick()
    second = h.settle("m", "ready")[0]
    assert second.id != first.id


def test_a_driver_start_that_raises_fails_the_waiters_with_1015_and_backs_off(h: Harness):
    h.apply(dep())
    h.driver.fail("start", RuntimeError("engine unreachable"), times=1)
    with pytest.raises(AutoDeployError) as err:
        h.c.acquire("m", None, timeout=5)
    assert err.value.error is errors.DRIVER_FAILED and "engine unreachable" in err.value.message
    with pytest.raises(AutoDeployError) as err:
        h.c.acquire("m", None, timeout=5)
    assert err.value.error is errors.INSTANCE_START_FAILED and "engine unreachable" in err.value.operator_message
    assert err.value.retry_after is not None and err.value.retry_after > 0
    h.clock.advance(2)
    assert h.c.acquire("m", None, timeout=5).id


def test_an_instance_that_exits_before_it_is_ready_fails_with_1003_and_its_log(tmp_path: Path):
    h = make(tmp_path, auto_ready=False)
    try:
        h.apply(dep())
        waiter = h.acquire_in_thread("m")
        wait_until(lambda: h.driver.procs, "the start")
        h.driver.crash(next(iter(h.driver.procs)), code=2, tail="ImportError: torch")
        waiter["thread"].join(5)
        err = waiter["error"]
        assert err.error is errors.INSTANCE_START_FAILED
        assert "exited with code 2" in err.message and "ImportError: torch" not in err.message
        assert "ImportError: torch" in err.private_detail  # the log tail: operators only
        assert h.phases("m") == [] and "failed" in h.kinds("m")
    finally:
        h.c.shutdown()


def test_an_instance_not_ready_within_start_timeout_fails_with_1003(tmp_path: Path):
    h = make(tmp_path, auto_ready=False)
    try:
        h.apply(dep(start_timeout="30s"))
        waiter = h.acquire_in_thread("m")
        # Time moves on until the launch gives up (it reads the clock when it begins to poll).
        wait_until(lambda: (h.clock.advance(31), not waiter["thread"].is_alive())[1], "the start timeout")
        err = waiter["error"]
        assert err.error is errors.INSTANCE_START_FAILED and "was not ready after 30 s" in err.message
        iid = next(iter(h.driver.procs))
        wait_until(lambda: ("stop", iid) in h.driver.calls, "the stop of the failed instance")
    finally:
        h.c.shutdown()


# ---------------------------------------------------------------------------- driver failures
def test_a_raising_stop_keeps_the_instance_stopping_with_its_gpu_and_is_retried_with_backoff(tmp_path: Path):
    h = make(tmp_path, gpus=(GPU0,))
    try:
        gpu = "  resources: {gpu: {count: 1}}\n"
        h.apply(dep("a", extra_spec=gpu), dep("b", extra_spec=gpu), dep("other", min_replicas=1))
        a = h.c.acquire("a", None, timeout=5).id
        h.driver.fail("stop", RuntimeError("docker daemon restarting"), times=2, instance=a)
        h.c.action("a", "stop", {})
        h.c.tick()
        wait_until(lambda: h.recs("a") and h.recs("a")[0].driver_failures == 1, "the first failed stop")
        rec = h.recs("a")[0]
        assert rec.phase is STOPPING and "docker daemon restarting" in rec.driver_error
        shown = h.c.status("a")["instances"][0]
        assert shown["state"] == "stopping" and "docker daemon restarting" in shown["driver_error"]
        assert "stop-failed" in h.kinds("a")
        # It may still run: its GPU stays taken, so another deployment cannot be placed on it.
        with pytest.raises(AutoDeployError) as err:
            h.c.acquire("b", None, timeout=5)
        assert err.value.error is errors.NO_FREE_GPU
        # The others are still reconciled: "other" got its minReplicas in the same passes.
        h.settle("other", "ready")
        stops = lambda: sum(1 for c, i in h.driver.calls if (c, i) == ("stop", a))  # noqa: E731
        h.c.tick()
        assert stops() == 1  # not before its backoff
        h.clock.advance(1.1)
        h.tick_until(lambda: stops() == 2 and h.recs("a")[0].driver_failures == 2, "the second try")
        h.clock.advance(2.1)
        h.tick_until(lambda: not h.recs("a"), "the third try to stop it")
        assert h.c.acquire("b", None, timeout=5).id  # the GPU is free once it is gone
    finally:
        h.c.shutdown()


def test_a_raising_poll_marks_only_that_instance_and_the_pass_goes_on(h: Harness):
    h.apply(dep("a", min_replicas=1), dep("b", min_replicas=1))
    h.c.tick()
    a = h.settle("a", "ready")[0]
    b = h.settle("b", "ready")[0]
    h.driver.fail("poll", ConnectionError("engine socket closed"), instance=a.id)
    h.driver.crash(b.id, code=9)
    h.c.tick()
    assert a.phase is READY and a.driver_failures == 1 and "engine socket closed" in a.driver_error
    assert b.phase is GONE and "crashed" in h.kinds("b")  # noticed in the same pass
    assert "poll-failed" in h.kinds("a")
    assert h.c.status("a")["instances"][0]["driver_failures"] == 1


def test_an_instance_the_driver_cannot_poll_three_times_is_replaced(h: Harness):
    h.apply(dep("a", min_replicas=1))
    h.c.tick()
    a = h.settle("a", "ready")[0]
    h.driver.fail("poll", ConnectionError("engine socket closed"), times=3, instance=a.id)
    for _ in range(3):
        h.c.tick()
        h.clock.advance(5)
    wait_until(lambda: a.phase is GONE, "the unpollable instance to go")
    h.clock.advance(5)
    h.c.tick()
    fresh = h.settle("a", "ready")[0]
    assert fresh.id != a.id
    assert "could not poll it 3 times" in " ".join(e.message for e in h.store.events("a", limit=100))


def test_a_poll_that_works_again_clears_the_mark(h: Harness):
    h.apply(dep("a", min_replicas=1))
    h.c.tick()
    a = h.settle("a", "ready")[0]
    h.driver.fail("poll", ConnectionError("blip"), times=1, instance=a.id)
    h.c.tick()
    assert a.driver_failures == 1
    h.clock.advance(1.5)
    h.c.tick()
    assert a.driver_failures == 0 and a.driver_error is None and a.phase is READY
    assert "poll-ok" in h.kinds("a")


def test_a_raising_stop_after_a_crash_keeps_the_instance_until_it_is_cleaned_up(h: Harness):
    h.apply(dep("a", min_replicas=1))
    h.c.tick()
    a = h.settle("a", "ready")[0]
    h.driver.crash(a.id)
    h.driver.fail("stop", RuntimeError("container busy"), times=1, instance=a.id)
    h.c.tick()
    wait_until(lambda: a.phase is STOPPING, "the failed clean-up to be kept")
    assert h.recs("a") == [a] and "container busy" in a.driver_error
    h.clock.advance(1.5)
    h.tick_until(lambda: a.phase is GONE, "the retried clean-up")


def test_a_raising_unreachable_check_marks_the_instance_only(h: Harness):
    h.apply(dep("a"))
    iid = h.c.acquire("a", None, timeout=5).id
    h.driver.fail("poll", OSError("broken pipe"), times=1)
    h.c.report_unreachable(iid)
    assert h.recs("a")[0].driver_failures == 1 and h.phases("a") == ["ready"]


def test_an_unreachable_instance_still_exiting_is_polled_until_its_exit_is_booked(h: Harness):
    """A killed process refuses connections a moment before its exit can be seen: the report
    keeps polling (bounded) so the worker's retry meets the crash booked, not the same address."""
    h.apply(dep("a"))
    iid = h.c.acquire("a", None, timeout=5).id
    polls = {"n": 0}
    real_poll = h.driver.poll

    def exiting(inst):  # alive for two more polls, then the exit shows
        polls["n"] += 1
        if polls["n"] == 3:
            h.driver.crash(iid, code=-9, tail="killed")
        return real_poll(inst)
    h.driver.poll = exiting
    h.c.report_unreachable(iid)
    assert polls["n"] == 3  # no poll after the exit was seen
    assert "crashed" in h.kinds("a") and "ready" not in h.phases("a")


def test_an_unreachable_instance_that_stays_alive_is_polled_a_bounded_number_of_times(h: Harness):
    from controller.core import UNREACHABLE_CHECKS
    h.apply(dep("a"))
    iid = h.c.acquire("a", None, timeout=5).id
    before = h.driver.calls.count(("poll", iid))
    h.c.report_unreachable(iid)
    assert h.driver.calls.count(("poll", iid)) - before == UNREACHABLE_CHECKS
    assert h.phases("a") == ["ready"]


# ---------------------------------------------------------------------------- adoption
def test_a_restarted_controller_adopts_live_instances_and_books_the_rest_as_lost(tmp_path: Path):
    first = make(tmp_path)
    first.apply(dep("a", min_replicas=2), dep("b", min_replicas=1))
    first.c.tick()
    a1, a2 = first.settle("a", "ready", "ready")
    (b1,) = first.settle("b", "ready")
    # The controller dies (not shut down): its processes live on in the driver.
    first.driver.crash(a2.id)
    first.driver.fail("adopt", RuntimeError("inspect timed out"), times=1, instance=b1.id)
    second = make(tmp_path, driver=first.driver, store=first.store)
    try:
        second.apply(dep("a", min_replicas=2), dep("b", min_replicas=1))
        second.c.adopt_stored()
        assert [r.id for r in second.recs("a")] == [a1.id] and second.phases("a") == ["ready"]
        assert second.recs("b") == []
        kinds = second.kinds("a") + second.kinds("b")
        assert kinds.count("adopted") == 1 and kinds.count("lost") == 2 and "adopt-failed" in kinds
        assert not [i for i in first.driver.running() if i == b1.id]  # not adopted: stopped
        second.c.tick()
        second.settle("a", "ready", "ready")  # minReplicas tops it up with one new instance
    finally:
        second.c.shutdown()


def test_an_instance_still_loading_when_the_controller_died_is_awaited_not_killed(tmp_path: Path):
    """A model mid-load (a GPU model takes minutes) is adopted as starting and becomes ready
    when it answers; one that never answers fails at startTimeout, counted from adoption."""
    first = make(tmp_path, auto_ready=False)
    first.apply(dep("a", min_replicas=2, start_timeout="60s"))
    first.c.tick()
    a1, a2 = first.settle("a", "starting", "starting")
    wait_until(lambda: len(first.store.instances()) == 2, "both started and stored")
    second = make(tmp_path, driver=first.driver, store=first.store)
    try:
        second.apply(dep("a", min_replicas=2, start_timeout="60s"))
        second.c.adopt_stored()
        assert sorted(r.id for r in second.recs("a")) == sorted([a1.id, a2.id])
        assert second.phases("a") == ["starting", "starting"]
        assert second.kinds("a").count("adopted") == 2 and "lost" not in second.kinds("a")
        first.driver.make_ready(a1.id)
        wait_until(lambda: {r.id: r.phase.value for r in second.recs("a")}[a1.id] == "ready", "a1 ready")
        second.c.tick()
        assert [r.id for r in second.recs("a")] == [a1.id, a2.id]  # nothing new started meanwhile
        assert ("stop", a1.id) not in first.driver.calls and ("stop", a2.id) not in first.driver.calls
        wait_until(lambda: (second.clock.advance(61), ("stop", a2.id) in first.driver.calls)[1],
                   "the start timeout of the one that never answers")
        assert "was not ready after 60 s" in " ".join(e.message for e in second.store.events("a", limit=200))
    finally:
        second.c.shutdown()
        first.c.shutdown()


def test_a_lost_store_adopts_a_loading_instance_as_starting_and_stops_an_unwanted_one(tmp_path: Path):
    """The database is gone: discover finds this serve's instances by their owner mark. A wanted
    one still loading its model is awaited (not killed and started over); an unwanted one stops."""
    driver = FakeDriver(auto_ready=False, owner="state-1")
    first = make(tmp_path / "first", driver=driver)
    first.apply(dep("a", min_replicas=1, start_timeout="60s"), dep("b", min_replicas=1))
    first.c.tick()
    (a1,) = first.settle("a", "starting")
    (b1,) = first.settle("b", "starting")
    second = make(tmp_path / "second", driver=driver)  # a new, empty store
    try:
        second.apply(dep("a", min_replicas=1, start_timeout="60s"))  # b is no longer in the files
        second.c.adopt_stored()
        assert [r.id for r in second.recs("a")] == [a1.id] and second.phases("a") == ["starting"]
        assert "adopted" in second.kinds("a") and "not in the store" in second.store.events("a", limit=5)[-1].message
        assert ("stop", a1.id) not in driver.calls
        assert ("stop", b1.id) in driver.calls and b1.id not in driver.running()
        assert second.kinds("b") == ["stopped"]
        assert [s.instance.id for s in second.store.instances()] == [a1.id]
        driver.make_ready(a1.id)
        wait_until(lambda: second.phases("a") == ["ready"], "the adopted instance becomes ready")
    finally:
        second.c.shutdown()
        first.c.shutdown()


def test_a_running_instance_not_in_the_store_is_reported_and_left_alone(tmp_path: Path):
    first = make(tmp_path)
    first.apply(dep("a", min_replicas=1))
    first.c.tick()
    (a1,) = first.settle("a", "ready")
    stray = make(tmp_path / "other", driver=first.driver)  # another store: it knows nothing
    try:
        stray.apply(dep("a"))
        stray.c.adopt_stored()
        assert "unknown" in stray.kinds("a") and stray.recs("a") == []
        assert a1.id in first.driver.running()
    finally:
        stray.c.shutdown()
        first.c.shutdown()


# ---------------------------------------------------------------------------- desired state
def test_a_removed_deployment_is_drained_then_forgotten(h: Harness):
    h.apply(dep("a", min_replicas=1), dep("b"))
    h.c.tick()
    h.settle("a", "ready")
    h.apply(dep("b"))
    h.c.tick()
    wait_until(lambda: "a" not in h.c.deps or not h.recs("a"), "the instance to stop")
    h.c.tick()
    assert "a" not in h.c.deps and h.driver.running() == []
    assert "removed" in h.kinds("a")


def test_shutdown_stops_every_instance_and_wakes_the_waiters(tmp_path: Path):
    h = make(tmp_path, auto_ready=False)
    h.apply(dep("a", min_replicas=1), dep("b"))
    h.c.tick()
    waiter = h.acquire_in_thread("b")
    wait_until(lambda: len(h.driver.procs) == 2, "both starts")
    h.c.shutdown()
    waiter["thread"].join(5)
    assert waiter["error"].error in (errors.SHUTTING_DOWN, errors.INSTANCE_START_FAILED)
    assert h.driver.running() == []


# ---------------------------------------------------------------------------- the fleet itself
def test_every_phase_is_a_member_of_the_enum_and_reads_as_its_name():
    assert [p.value for p in InstancePhase] == ["starting", "ready", "draining", "stopping", "failed", "gone"]
    assert STARTING == "starting" and f"{DRAINING}" == "draining"


def test_events_are_written_after_the_lock_is_let_go(tmp_path: Path):
    held: list[str] = []

    class WatchedStore(Store):
        def event(self, deployment, kind, message, instance=None, at=None):  # type: ignore[override]
            if h.c.fleet.held():
                held.append(kind)
            super().event(deployment, kind, message, instance, at)

    h = make(tmp_path, store=WatchedStore(tmp_path / "watched.db"))
    try:
        h.apply(dep(idle="10s"))
        h.c.acquire("m", None, timeout=5)
        h.clock.advance(11)
        h.c.tick()
        h.settle("m")
        assert {"applied", "start", "ready", "release", "stop"} <= set(h.kinds("m"))
        assert held == []
    finally:
        h.c.shutdown()


def test_a_listener_sees_every_phase_change_of_an_instance(h: Harness):
    seen: list[tuple[str | None, str]] = []
    h.c.fleet.listeners.append(lambda rec, old, new: seen.append((old and old.value, new.value)))
    h.apply(dep(idle="10s"))
    h.c.acquire("m", None, timeout=5)
    h.clock.advance(11)
    h.c.tick()
    h.settle("m")
    assert seen == [(None, "starting"), ("starting", "ready"), ("ready", "draining"),
                    ("draining", "stopping"), ("stopping", "gone")]


# ---------------------------------------------------------------------------- autoscaling
AUTOSCALING = ("    autoscaling: {enabled: true, targetConcurrency: 2, stableWindow: 6s, panicWindow: 2s,"
               " scaleDownDelay: 2s}\n")


def autoscaled(name: str, max_replicas: int = 3, idle: str = "3s") -> str:
    text = dep(name, max_replicas=max_replicas, idle=idle)
    marker = f"    idleTimeout: {idle}\n"
    assert marker in text
    return text.replace(marker, marker + AUTOSCALING)


def drive_load(h: Harness, name: str, in_flight: int, until, what: str, sizes: list[int],
               passes: int = 400) -> None:
    """Reconcile passes 0.25 s of fake time apart while one gateway worker reports
    `in_flight` requests spread round robin over the ready instances, until `until()` holds."""
    for n in range(passes):
        h.clock.advance(0.25)
        ready = [r.id for r in h.recs(name) if r.phase is READY]
        spread = dict.fromkeys(ready, 0)
        for k in range(in_flight if ready else 0):  # round robin, like the gateway
            spread[ready[(n + k) % len(ready)]] += 1
        h.c.sync(worker=1, version=h.c.version, inflight=spread, wait=0,
                 activity={i: [h.clock(), n, 0] for i, n in spread.items() if n})
        h.c.tick()
        wait_until(lambda: STARTING not in [r.phase for r in h.recs(name)], "starting instances to be ready")
        sizes.append(len(h.recs(name)))
        if until():
            return
    raise AssertionError(f"{what} did not happen in {passes} passes; events: {h.kinds(name)}")


def test_concurrency_grows_to_max_replicas_then_shrinks_to_zero_with_reasons(h: Harness):
    h.apply(autoscaled("auto"))
    h.c.acquire("auto", None, timeout=5)
    sizes: list[int] = []
    ready = lambda: sum(r.phase is READY for r in h.recs("auto"))  # noqa: E731
    # 8 requests in flight against targetConcurrency 2 want 4 instances: capped at 3.
    drive_load(h, "auto", 8, lambda: ready() == 3, "growth to 3", sizes)
    # One request left: after the windows catch up one instance is enough.
    drive_load(h, "auto", 1, lambda: len(h.recs("auto")) == 1, "scale-down to 1", sizes)
    drive_load(h, "auto", 0, lambda: h.recs("auto") == [], "scale to zero", sizes)
    assert max(sizes) == 3  # grew to maxReplicas and never above it
    dep_status = h.c.status("auto")
    assert dep_status["status"] == "Standby"
    events = h.store.events("auto", limit=500)
    story = "\n".join(f"{e.kind} {e.instance}: {e.message}" for e in events)
    decisions = [e.message for e in events if e.kind == "autoscale"]
    ups = [m for m in decisions if _sizes(m)[0] < _sizes(m)[1]]
    assert any("concurrency" in m and "target 2" in m for m in ups), story
    assert any("-> 1:" in m and "scaleDownDelay" in m for m in decisions), story
    starts = [e.message for e in events if e.kind == "start"]
    assert any(m.startswith("autoscale") and "concurrency" in m for m in starts), story
    assert any("idle" in e.message for e in events if e.kind in ("release", "autoscale")), story


def _sizes(message: str) -> tuple[int, int]:
    """'1 -> 3: concurrency ...' -> (1, 3)"""
    before, after = message.split(":", 1)[0].split(" -> ")
    return int(before), int(after)


def test_without_autoscaling_load_does_not_add_instances(h: Harness):
    h.apply(dep("fixed", max_replicas=3))
    h.c.acquire("fixed", None, timeout=5)
    sizes: list[int] = []
    passes = iter(range(40))
    drive_load(h, "fixed", 8, lambda: next(passes) == 39, "40 passes under load", sizes)
    assert set(sizes) == {1}
    assert h.c.status("fixed")["autoscaling"] == {"enabled": False}
    assert "autoscale" not in h.kinds("fixed")


def test_a_scale_down_drains_the_least_busy_instance_and_traffic_does_not_revive_it(h: Harness):
    h.apply(autoscaled("auto", idle="10m"))
    h.c.acquire("auto", None, timeout=5)
    sizes: list[int] = []
    drive_load(h, "auto", 6, lambda: len(h.recs("auto")) == 3, "growth to 3", sizes)
    drive_load(h, "auto", 1, lambda: DRAINING in [r.phase for r in h.recs("auto")], "a scale-down", sizes)
    victims = [r for r in h.recs("auto") if r.phase is DRAINING]
    assert victims and all(not r.revivable for r in victims)
