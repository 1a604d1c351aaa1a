"""The Docker driver against the real engine on this machine, with images built here."""
from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import docker
import docker.errors
import pytest
import requests

from controller.drivers.base import Exit, Instance
from controller.drivers.docker import (GIB, LABEL_DEPLOYMENT, DockerDriver, container_config,
                                       storage_support, usage_from_stats)
from controller.errors import DRIVER_FAILED, IMAGE_MISSING, AutoDeployError
from controller.spec import Deployment, GpuSpec, Resources
from docker_images import HTTPD_COMMAND, busybox_image, docker_client_or_skip

pytestmark = pytest.mark.docker

# Every deployment name in this run starts with RUN, so cleanup finds exactly ours.
RUN = f"t{secrets.token_hex(3)}"


@pytest.fixture(scope="module")
def client() -> Iterator[docker.DockerClient]:
    c = docker_client_or_skip()
    yield c
    c.close()


@pytest.fixture(scope="module")
def image(client: docker.DockerClient) -> str:
    return busybox_image(client)


@pytest.fixture
def driver(client: docker.DockerClient) -> Iterator[DockerDriver]:
    d = DockerDriver()
    yield d
    d.close()
    _remove_ours(client)


def _remove_ours(client: docker.DockerClient) -> None:
    """Remove this run's containers, managed or foreign, whatever the test did."""
    for c in client.containers.list(all=True, ignore_removed=True):
        if c.name.startswith((f"autodeploy-{RUN}", f"foreign-{RUN}")):
            try:
                c.remove(force=True)
            except docker.errors.NotFound:
                pass


def _dep(name: str, image: str, command: str = HTTPD_COMMAND, **resources: object) -> Deployment:
    return Deployment(name=f"{RUN}-{name}", model_id="m", model_version="v1", command=command, port=8080,
                      image=image, env={"LOG_LEVEL": "debug"}, resources=Resources(**resources),  # type: ignore[arg-type]
                      raw={"metadata": {"name": name}, "spec": {"command": command}})


def _get_200(url: str) -> requests.Response:
    """GET until the server inside the container listens; bounded, so a dead one fails."""
    last: Exception | None = None
    for _ in range(200):
        try:
            resp = requests.get(url, timeout=2)
            if resp.status_code == 200:
                return resp
        except requests.ConnectionError as exc:
            last = exc
        time.sleep(0.05)
    raise AssertionError(f"no 200 from {url}: {last}")


def _wait_exit(driver: DockerDriver, inst: Instance) -> Exit:
    for _ in range(200):
        if (exit_ := driver.poll(inst)) is not None:
            return exit_
        time.sleep(0.05)
    raise AssertionError(f"{inst.id} never exited")


def test_started_instance_answers_http_200_on_its_published_port(driver: DockerDriver, image: str) -> None:
    inst = driver.start(_dep("web", image), "aaaaaaaa", [])
    assert inst.host == "127.0.0.1" and inst.port > 0 and inst.container_id
    assert _get_200(f"http://{inst.host}:{inst.port}/health").text == "ok\n"
    assert _get_200(f"http://{inst.host}:{inst.port}/index.html").status_code == 200
    assert driver.poll(inst) is None


def test_container_carries_name_labels_env_and_limits(driver: DockerDriver, client: docker.DockerClient,
                                                      image: str) -> None:
    dep = _dep("limits", image, cpu=0.5, memory_gb=0.25)
    inst = driver.start(dep, "bbbbbbbb", [])
    attrs = client.containers.get(inst.container_id).attrs
    assert attrs["Name"] == f"/autodeploy-{dep.name}-bbbbbbbb"
    assert attrs["HostConfig"]["NanoCpus"] == 500_000_000
    assert attrs["HostConfig"]["Memory"] == GIB // 4
    assert attrs["HostConfig"]["RestartPolicy"]["Name"] == "no"
    assert attrs["HostConfig"]["Init"] is True
    assert attrs["HostConfig"]["PortBindings"] == {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]}
    assert attrs["Config"]["Labels"] == {
        "autodeploy.managed": "true", "autodeploy.deployment": dep.name, "autodeploy.instance": "bbbbbbbb",
        "autodeploy.revision": dep.revision, "autodeploy.gpus": "", "autodeploy.port": "8080"}
    env = dict(e.split("=", 1) for e in attrs["Config"]["Env"])
    assert env["PORT"] == "8080" and env["LOG_LEVEL"] == "debug"
    assert (env["AUTODEPLOY_INSTANCE_ID"], env["AUTODEPLOY_DEPLOYMENT"], env["AUTODEPLOY_REVISION"]) == \
        ("bbbbbbbb", dep.name, dep.revision)
    assert attrs["Config"]["Entrypoint"] == ["/bin/sh", "-c"]
    assert attrs["Config"]["Cmd"] == ["busybox httpd -f -p 8080 -h /www"]


def test_unreachable_engine_is_error_1015_naming_where_it_looked() -> None:
    with pytest.raises(AutoDeployError) as err:
        DockerDriver(base_url="unix:///nonexistent/docker.sock")
    assert err.value.error is DRIVER_FAILED and "unix:///nonexistent/docker.sock" in err.value.message


def test_gpu_ids_become_an_nvidia_device_request_for_exactly_those_ids(client: docker.DockerClient,
                                                                        image: str, driver: DockerDriver) -> None:
    dep = _dep("gpu", image)
    config = container_config(dep, "cccccccc", ["GPU-1234", "2"])
    # Created, never started: this engine has no NVIDIA runtime, and the request is
    # what the driver owns; the runtime's mapping is the runtime's.
    container = client.containers.create(**config)
    host = client.containers.get(container.id).attrs["HostConfig"]
    assert [(r["Driver"], r["DeviceIDs"], r["Capabilities"]) for r in host["DeviceRequests"]] == \
        [("nvidia", ["GPU-1234", "2"], [["gpu"]])]
    assert container.labels["autodeploy.gpus"] == "GPU-1234,2"
    assert not any(e.startswith("CUDA_VISIBLE_DEVICES=") for e in container.attrs["Config"]["Env"])


def test_no_gpu_ids_means_no_device_request() -> None:
    assert "device_requests" not in container_config(_dep("cpu", "any:1", gpu=GpuSpec(count=0)), "dddddddd", [])


def test_crashed_instance_polls_as_exit_code_with_its_output(driver: DockerDriver, image: str) -> None:
    inst = driver.start(_dep("crash", image, command="echo loading weights; echo boom >&2; exit 3"),
                        "eeeeeeee", [])
    exit_ = _wait_exit(driver, inst)
    assert exit_.code == 3
    assert "loading weights" in exit_.log_tail and "boom" in exit_.log_tail  # stdout and stderr
    # One line; which one is the engine's business, as it copies the two streams apart.
    assert driver.log_tail(inst, lines=1) in ("loading weights", "boom")


def test_missing_image_is_error_1010_with_build_hint_and_nothing_pulled(
        driver: DockerDriver, client: docker.DockerClient) -> None:
    absent = f"autodeploy-test/absent-{RUN}:v1"
    with pytest.raises(AutoDeployError) as err:
        driver.start(_dep("absent", absent), "ffffffff", [])
    assert err.value.error is IMAGE_MISSING and err.value.to_json()["code"] == 1010
    assert f"docker build -t {absent} ." in err.value.message and "never pulls" in err.value.message
    with pytest.raises(docker.errors.ImageNotFound):
        client.images.get(absent)
    assert not client.containers.list(all=True, filters={"label": f"{LABEL_DEPLOYMENT}={RUN}-absent"})


def test_new_driver_adopts_a_live_instance_and_not_a_removed_one(driver: DockerDriver, image: str) -> None:
    live = driver.start(_dep("adopt", image), "gggggggg", [])
    gone = driver.start(_dep("adopt", image), "hhhhhhhh", [])
    driver.stop(gone, timeout=1)
    restarted = DockerDriver()  # a controller restart: nothing in memory
    try:
        assert restarted.adopt(live) is True
        assert restarted.adopt(gone) is False
        assert restarted.poll(gone) == Exit(code=None, log_tail="")
    finally:
        restarted.close()


def test_adopt_refuses_a_container_whose_labels_name_another_instance(driver: DockerDriver, image: str) -> None:
    inst = driver.start(_dep("impostor", image), "iiiiiiii", [])
    stored = Instance(**{**inst.__dict__, "id": "jjjjjjjj"})
    assert driver.adopt(stored) is False


def test_discover_lists_our_containers_and_not_a_foreign_one(driver: DockerDriver, client: docker.DockerClient,
                                                             image: str) -> None:
    dep = _dep("disc", image)
    running = driver.start(dep, "kkkkkkkk", [])
    # Never started (no NVIDIA runtime needed): discover lists containers in any state.
    created = client.containers.create(**container_config(dep, "kkkkkkk2", ["3"]))
    foreign = client.containers.create(image, ["sleep", "60"], name=f"foreign-{RUN}")
    found = {i.container_id: i for i in driver.discover()}
    assert foreign.id not in found
    mine = found[running.container_id]
    assert (mine.id, mine.deployment, mine.revision, mine.host, mine.port, mine.gpu_ids) == \
        ("kkkkkkkk", dep.name, dep.revision, "127.0.0.1", running.port, [])
    assert (found[created.id].id, found[created.id].port, found[created.id].gpu_ids) == ("kkkkkkk2", 0, ["3"])


def test_start_the_engine_refuses_is_error_1015_and_leaves_no_container(
        driver: DockerDriver, client: docker.DockerClient, image: str) -> None:
    if "nvidia" in (client.info().get("Runtimes") or {}):
        pytest.skip("this engine has the NVIDIA runtime, so a GPU request does not fail here")
    dep = _dep("nogpu", image)
    with pytest.raises(AutoDeployError) as err:
        driver.start(dep, "rrrrrrrr", ["0"])
    assert err.value.error is DRIVER_FAILED and "nvidia" in err.value.message
    assert not client.containers.list(all=True, filters={"label": f"{LABEL_DEPLOYMENT}={dep.name}"})


def test_stop_removes_the_container_and_is_idempotent(driver: DockerDriver, client: docker.DockerClient,
                                                      image: str) -> None:
    inst = driver.start(_dep("stop", image), "llllllll", [])
    driver.stop(inst, timeout=5)
    with pytest.raises(docker.errors.NotFound):
        client.containers.get(inst.container_id)
    driver.stop(inst, timeout=5)
    assert driver.poll(inst) == Exit(code=None, log_tail="")


def test_sigterm_reaches_a_command_the_shell_did_not_exec(driver: DockerDriver, client: docker.DockerClient,
                                                          image: str) -> None:
    # `sleep` is a child of the shell here, as in `cd /app && python api.py`; the
    # container's init must deliver SIGTERM to it rather than leave it for SIGKILL.
    inst = driver.start(_dep("term", image, command="sleep 600; echo never"), "mmmmmmmm", [])
    container = client.containers.get(inst.container_id)
    container.stop(timeout=60)
    assert container.wait()["StatusCode"] == 143  # 128 + SIGTERM; SIGKILL would be 137


def test_follow_logs_yields_lines_until_the_container_ends(driver: DockerDriver, image: str) -> None:
    inst = driver.start(_dep("follow", image, command="for i in 1 2 3; do echo line $i; done"), "nnnnnnnn", [])
    assert list(driver.follow_logs(inst)) == ["line 1", "line 2", "line 3"]


def test_storage_size_is_applied_or_the_reason_is_noted(driver: DockerDriver, client: docker.DockerClient,
                                                        image: str) -> None:
    inst = driver.start(_dep("disk", image, storage_gb=1), "oooooooo", [])
    storage_opt = client.containers.get(inst.container_id).attrs["HostConfig"].get("StorageOpt")
    note = driver.storage_note()
    if note is None:
        assert storage_opt == {"size": str(GIB)} and inst.notes == []
    else:
        assert not storage_opt and inst.notes == [note] and "storageGb is not enforced" in note
    plain = driver.start(_dep("nodisk", image), "pppppppp", [])
    assert plain.notes == []  # nothing asked, nothing to say


def test_storage_support_follows_the_engine_storage_driver() -> None:
    def info(driver: str, fs: str = "") -> dict:
        return {"Driver": driver, "DriverStatus": [["Backing Filesystem", fs]] if fs else []}
    assert storage_support(info("overlay2", "xfs")) is None
    assert storage_support(info("btrfs", "btrfs")) is None
    assert storage_support(info("zfs")) is None
    assert storage_support(info("devicemapper")) is None
    assert "overlay2 on extfs" in (storage_support(info("overlay2", "extfs")) or "")
    assert storage_support(info("vfs")) is not None


def test_stats_report_memory_of_a_running_instance(driver: DockerDriver, image: str) -> None:
    inst = driver.start(_dep("stats", image, cpu=1, memory_gb=0.25), "qqqqqqqq", [])
    _get_200(f"http://{inst.host}:{inst.port}/health")
    stats = driver.stats(inst)
    assert stats["mem_bytes"] > 0
    assert stats["mem_pct"] == pytest.approx(100 * stats["mem_bytes"] / (GIB / 4))
    assert stats["cpu_pct"] >= 0


def test_cpu_percent_is_of_the_container_limit_not_the_host() -> None:
    # Half a core used out of a 0.5-core limit on a 2-core host: the limit is full.
    sample = {"cpu_stats": {"cpu_usage": {"total_usage": 1_500}, "system_cpu_usage": 12_000, "online_cpus": 2},
              "precpu_stats": {"cpu_usage": {"total_usage": 1_000}, "system_cpu_usage": 10_000},
              "memory_stats": {"usage": 300, "limit": 1_000, "stats": {"total_inactive_file": 100}}}
    assert usage_from_stats(sample, nano_cpus=500_000_000) == {"cpu_pct": 100.0, "mem_pct": 20.0, "mem_bytes": 200.0}
    assert usage_from_stats(sample)["cpu_pct"] == 25.0
    assert usage_from_stats({"cpu_stats": {}, "precpu_stats": {}, "memory_stats": {}}) == {}
