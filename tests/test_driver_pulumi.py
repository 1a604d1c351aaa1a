"""The pulumi driver over `FakeStack` (the Automation API's Stack, without the CLI).

The driver, the program's pure planning functions and placement are the real code;
only the Pulumi engine behind `Stack.up` is faked.
"""
from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import wait_until
from pulumi.automation import ConfigValue

from controller.drivers.base import Instance
from controller.drivers.pulumi import PulumiDriver, choose_slot, classify_update_error, retry_delay
from controller.errors import DRIVER_FAILED, IMAGE_MISSING, NO_FREE_GPU, SPEC_INVALID, AutoDeployError
from controller.gpus import Gpu, Inventory
from controller.spec import Deployment, GpuSpec, Resources, Scaling
from fakes_pulumi import FakeStack

H100 = "NVIDIA H100 80GB HBM3"
SERVE_CONFIG = {"autodeploy:gatewayContainer": "false"}


def dep(name: str = "hello", gpus: int = 0, min_replicas: int = 0) -> Deployment:
    return Deployment(name=name, model_id="m", model_version="v1", command="python serve.py", port=8080,
                      image="example/model:1", resources=Resources(gpu=GpuSpec(gpus, "H100" if gpus else None)),
                      scaling=Scaling(min_replicas=min_replicas, max_replicas=20))


def h100s(n: int) -> Inventory:
    return Inventory([Gpu(i, f"GPU-{i}", H100, 81559) for i in range(n)], "test")


class Harness:
    def __init__(self) -> None:
        self.drivers: list[PulumiDriver] = []
        self.events: list[tuple[str, str]] = []
        self.sleeps: list[float] = []

    def driver(self, stack: FakeStack, **kw: Any) -> PulumiDriver:
        kw.setdefault("outputs_max_age_s", None)
        driver = PulumiDriver(Path("."), stack.name, stack_factory=lambda name, project: stack,
                              on_event=lambda kind, message: self.events.append((kind, message)),
                              sleep=self.sleeps.append, **kw)
        self.drivers.append(driver)
        return driver

    def kinds(self) -> list[str]:
        return [k for k, _ in self.events]


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    for driver in h.drivers:
        driver.close()


def replicas(stack: FakeStack) -> str:
    return stack.get_all_config()["autodeploy:replicas"].value


def container_ids(stack: FakeStack) -> dict[str, str]:
    return {i["name"]: i["container_id"] for d in stack.outputs()["deployments"].value.values()
            for i in d["instances"]}


# --- start, addresses, slots ---------------------------------------------------------------------

def test_start_returns_the_instance_at_the_address_in_the_stack_outputs(harness: Harness) -> None:
    stack = FakeStack([dep()], config=SERVE_CONFIG)
    driver = harness.driver(stack)
    inst = driver.start(dep(), "xykemlvy", [])
    out = stack.outputs()["deployments"].value["hello"]["instances"][0]
    assert out["name"] == "hello-0"
    assert f"{inst.host}:{inst.port}" == out["address"] == "127.0.0.1:32768"
    assert inst.id == "xykemlvy" and inst.container_id == out["container_id"]
    assert inst.revision == dep().revision
    assert driver.poll(inst) is None


def test_instance_ids_map_to_stable_numbered_slots(harness: Harness) -> None:
    stack = FakeStack([dep()], config=SERVE_CONFIG)
    driver = harness.driver(stack)
    for iid in ("aaa", "bbb", "ccc"):
        driver.start(dep(), iid, [])
    assert replicas(stack) == '{"hello": [0, 1, 2]}'
    assert set(container_ids(stack)) == {"hello-0", "hello-1", "hello-2"}


def test_controller_gpu_choice_is_written_as_pins_and_honoured(harness: Harness) -> None:
    stack = FakeStack([dep(gpus=1)], h100s(4), config=SERVE_CONFIG)
    driver = harness.driver(stack)
    inst = driver.start(dep(gpus=1), "aaa", ["GPU-2"])
    assert inst.gpu_ids == ["GPU-2"]
    assert stack.get_all_config()["autodeploy:pins"].value == '{"hello-0": ["GPU-2"]}'


# --- coalescing and single flight -----------------------------------------------------------------

def test_ten_concurrent_starts_take_at_most_two_updates(harness: Harness) -> None:
    stack = FakeStack([dep()], config=SERVE_CONFIG)
    driver = harness.driver(stack)
    stack.gate.clear()  # hold the first update in flight while the others arrive
    started: dict[str, Instance] = {}
    threads = [threading.Thread(target=lambda i=i: started.__setitem__(f"i{i}", driver.start(dep(), f"i{i}", [])))
               for i in range(10)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: stack.active == 1, "the first update")
        first = next(m for k, m in harness.events if k == "update")
        carried = int(re.search(r"\((\d+) request", first).group(1))
        wait_until(lambda: driver.queued == 10 - carried, "every start to queue")
    finally:
        stack.gate.set()
    for t in threads:
        t.join()
    assert stack.up_attempts <= 2
    assert len({(i.host, i.port) for i in started.values()}) == 10
    assert replicas(stack) == '{"hello": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]}'


def test_updates_never_overlap(harness: Harness) -> None:
    stack = FakeStack([dep()], config=SERVE_CONFIG, up_seconds=0.002)
    driver = harness.driver(stack)

    def churn(n: int) -> None:
        for round_ in range(3):
            inst = driver.start(dep(), f"w{n}-{round_}", [])
            driver.stop(inst, 1.0)

    threads = [threading.Thread(target=churn, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stack.max_active == 1
    assert replicas(stack) == '{"hello": []}'


# --- retries -----------------------------------------------------------------------------------------

def test_a_concurrent_update_is_retried_with_doubling_backoff(harness: Harness) -> None:
    stack = FakeStack([dep()], config=SERVE_CONFIG, concurrent_failures=3)
    driver = harness.driver(stack, backoff_base_s=1.5, backoff_cap_s=60.0)
    inst = driver.start(dep(), "aaa", [])
    assert driver.poll(inst) is None
    assert harness.sleeps == [1.5, 3.0, 6.0]
    assert harness.kinds().count("update-retry") == 3
    assert stack.up_attempts == 4


def test_retries_are_bounded_and_end_in_a_driver_error(harness: Harness) -> None:
    stack = FakeStack([dep()], config=SERVE_CONFIG, concurrent_failures=1000)
    driver = harness.driver(stack, max_attempts=3, backoff_base_s=1.0)
    with pytest.raises(AutoDeployError) as info:
        driver.start(dep(), "aaa", [])
    assert info.value.error is DRIVER_FAILED
    assert "another update still holds the stack after 3 attempts" in info.value.message
    assert harness.sleeps[:2] == [1.0, 2.0]
    assert driver.discover() == []


def test_retry_delay_doubles_up_to_the_cap_then_gives_up() -> None:
    assert [retry_delay(a, 2.0, 10.0, 6) for a in range(1, 7)] == [2.0, 4.0, 8.0, 10.0, 10.0, None]


# --- stop ---------------------------------------------------------------------------------------------

def test_stopping_a_middle_instance_removes_exactly_its_container(harness: Harness) -> None:
    stack = FakeStack([dep()], config=SERVE_CONFIG)
    driver = harness.driver(stack)
    a, b, c = (driver.start(dep(), iid, []) for iid in ("aaa", "bbb", "ccc"))
    before = container_ids(stack)
    driver.stop(b, 10.0)
    assert replicas(stack) == '{"hello": [0, 2]}'
    after = container_ids(stack)
    assert after == {"hello-0": before["hello-0"], "hello-2": before["hello-2"]}
    assert driver.poll(a) is None and driver.poll(c) is None
    gone = driver.poll(b)
    assert gone is not None and "holds no slot" in gone.log_tail


def test_a_freed_slot_is_taken_by_the_next_start(harness: Harness) -> None:
    stack = FakeStack([dep()], config=SERVE_CONFIG)
    driver = harness.driver(stack)
    _, b, _ = (driver.start(dep(), iid, []) for iid in ("aaa", "bbb", "ccc"))
    driver.stop(b, 10.0)
    d = driver.start(dep(), "ddd", [])
    assert replicas(stack) == '{"hello": [0, 1, 2]}'
    assert container_ids(stack)["hello-1"] == d.container_id != b.container_id


def test_stop_is_idempotent(harness: Harness) -> None:
    stack = FakeStack([dep()], config=SERVE_CONFIG)
    driver = harness.driver(stack)
    inst = driver.start(dep(), "aaa", [])
    driver.stop(inst, 1.0)
    updates = stack.up_attempts
    driver.stop(inst, 1.0)
    assert stack.up_attempts == updates


# --- failures -----------------------------------------------------------------------------------------

def test_not_enough_gpus_fails_the_start_and_keeps_the_running_instance(harness: Harness) -> None:
    stack = FakeStack([dep(gpus=1)], h100s(1), config=SERVE_CONFIG)
    driver = harness.driver(stack)
    first = driver.start(dep(gpus=1), "aaa", [])
    with pytest.raises(AutoDeployError) as info:
        driver.start(dep(gpus=1), "bbb", [])
    assert info.value.error is NO_FREE_GPU
    assert "deployment hello slot hello-1" in info.value.message
    wait_until(lambda: replicas(stack) == '{"hello": [0]}' and stack.active == 0, "the failed slot to go")
    assert driver.poll(first) is None


def test_a_missing_image_fails_the_start_as_image_missing(harness: Harness) -> None:
    stack = FakeStack([dep()], config=SERVE_CONFIG)
    driver = harness.driver(stack)
    stack.fail_with = ("docker:index/container:Container hello-0 creating failed: Error: "
                       "No such image: example/model:1")
    with pytest.raises(AutoDeployError) as info:
        driver.start(dep(), "aaa", [])
    assert info.value.error is IMAGE_MISSING
    assert "update-failed" in harness.kinds()


def test_update_errors_are_classified() -> None:
    assert classify_update_error("Error response from daemon: No such image: x:1") is IMAGE_MISSING
    assert classify_update_error("no free GPU for this deployment: not enough GPUs (...)") is NO_FREE_GPU
    assert classify_update_error("deployment spec invalid: 2 error(s) in d; nothing was changed") is SPEC_INVALID
    assert classify_update_error("error: connection refused") is DRIVER_FAILED


def test_the_driver_refuses_a_stack_that_also_runs_the_gateway_container() -> None:
    stack = FakeStack([dep()])
    with pytest.raises(AutoDeployError) as info:
        PulumiDriver(Path("."), "dev", stack_factory=lambda name, project: stack)
    assert info.value.error is SPEC_INVALID
    assert "pulumi config set autodeploy:gatewayContainer false --stack dev" in info.value.message


# --- restart: refresh, adopt, discover ----------------------------------------------------------------

def test_refresh_runs_once_when_the_driver_starts(harness: Harness) -> None:
    stack = FakeStack([dep()], config=SERVE_CONFIG)
    driver = harness.driver(stack)
    for iid in ("aaa", "bbb"):
        driver.start(dep(), iid, [])
    assert stack.refreshes == 1
    assert harness.kinds()[0] == "refresh"


def test_a_new_driver_adopts_its_instances_by_container_id(harness: Harness) -> None:
    stack = FakeStack([dep()], config=SERVE_CONFIG)
    old = harness.driver(stack)
    a, b = old.start(dep(), "aaa", []), old.start(dep(), "bbb", [])
    old.close()
    new = harness.driver(stack)
    assert [i.id for i in new.discover()] == ["hello-0", "hello-1"]  # nobody owns them yet
    assert new.adopt(a) and new.adopt(b)
    assert new.discover() == []
    assert new.poll(a) is None
    stranger = Instance(id="zzz", deployment="hello", revision="r", host="127.0.0.1", port=1, started_at=0.0,
                        container_id="not-ours")
    assert not new.adopt(stranger)
    # The adopted slots stay when another instance starts.
    new.start(dep(), "ccc", [])
    assert replicas(stack) == '{"hello": [0, 1, 2]}'


def test_a_slot_made_from_min_replicas_is_handed_out_without_an_update(harness: Harness) -> None:
    stack = FakeStack([dep(min_replicas=1)], config=SERVE_CONFIG)
    stack.up()  # a human `pulumi up`: the program made hello-0 from minReplicas
    driver = harness.driver(stack)
    updates = stack.up_attempts
    inst = driver.start(dep(min_replicas=1), "aaa", [])
    assert stack.up_attempts == updates
    assert container_ids(stack)["hello-0"] == inst.container_id


def test_an_instance_removed_by_someone_elses_update_is_reported_gone(harness: Harness) -> None:
    stack = FakeStack([dep()], config=SERVE_CONFIG)
    driver = harness.driver(stack)
    inst = driver.start(dep(), "aaa", [])
    stack.set_all_config({"autodeploy:replicas": ConfigValue(value='{"hello": []}')})
    stack.up()  # a human update with a stale replicas config
    driver.sync_outputs()
    gone = driver.poll(inst)
    assert gone is not None and "no longer in the outputs" in gone.log_tail


def test_every_update_and_its_outcome_is_an_event(harness: Harness) -> None:
    stack = FakeStack([dep()], config=SERVE_CONFIG)
    driver = harness.driver(stack)
    inst = driver.start(dep(), "aaa", [])
    driver.stop(inst, 1.0)
    updates = [m for k, m in harness.events if k == "update"]
    done = [m for k, m in harness.events if k == "update-done"]
    assert len(updates) == len(done) == 2
    assert 'replicas {"hello": [0]}' in updates[0] and 'replicas {"hello": []}' in updates[1]
    assert all("succeeded" in m for m in done)


def test_log_tail_shows_the_update_lines_about_the_instance(harness: Harness) -> None:
    stack = FakeStack([dep()], config=SERVE_CONFIG)
    driver = harness.driver(stack)
    inst = driver.start(dep(), "aaa", [])
    tail = driver.log_tail(inst)
    assert "Container hello-0 created" in tail
    assert "docker logs autodeploy-hello-0" in tail


def test_close_lets_the_update_in_flight_finish_and_fails_queued_requests(harness: Harness) -> None:
    stack = FakeStack([dep()], config=SERVE_CONFIG)
    driver = PulumiDriver(Path("."), "dev", stack_factory=lambda name, project: stack, outputs_max_age_s=None)
    results: dict[str, Any] = {}

    def start(iid: str) -> None:
        try:
            results[iid] = driver.start(dep(), iid, [])
        except AutoDeployError as exc:
            results[iid] = exc

    stack.gate.clear()
    first = threading.Thread(target=start, args=("aaa",))
    second = threading.Thread(target=start, args=("bbb",))
    closer = threading.Thread(target=driver.close)
    try:
        first.start()
        wait_until(lambda: stack.active == 1, "the first update")
        second.start()
        wait_until(lambda: driver.queued == 1, "the second start to queue")
        closer.start()
        # close() must wait for the update in flight: it cannot be done while the gate holds it.
        wait_until(lambda: driver.closed, "close to begin")
    finally:
        stack.gate.set()
    for t in (first, second, closer):
        t.join()
    assert isinstance(results["aaa"], Instance)
    assert isinstance(results["bbb"], AutoDeployError) and "closed" in results["bbb"].message
    assert stack.up_attempts == 1


def test_choose_slot_prefers_an_unowned_running_slot_then_the_lowest_free_number() -> None:
    assert choose_slot(wanted={0, 1}, owned={0}, existing={0, 1}) == 1
    assert choose_slot(wanted={0, 2}, owned={0, 2}, existing={0, 2}) == 1
    assert choose_slot(wanted=set(), owned=set(), existing=set()) == 0
    # A wanted slot that does not run yet is not spare: it may belong to a pending start.
    assert choose_slot(wanted={0}, owned=set(), existing=set()) == 1
