"""Two real Docker engines under one controller: the machine's dockerd and a second one
this test starts (its own socket, data root, exec root, pid file and bridge, with
--live-restore so its containers outlive it), whose instances are published on
127.0.0.2 as that node's address. Images are built here and copied with save/load."""
from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import docker
import docker.errors
import pytest
import requests

from conftest import wait_until
from docker_images import HTTPD_COMMAND, busybox_image, docker_client_or_skip

pytestmark = pytest.mark.docker
TARGET = "Deploy-Route-Target"
SECOND_ADDRESS = "127.0.0.2"


@dataclass
class Engine:
    """A dockerd of our own; `stop` and `start` it at will, teardown always stops it."""
    root: Path
    bridge: str
    cidr: str
    proc: subprocess.Popen | None = None
    log: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"unix://{self.root}/docker.sock"

    def args(self) -> list[str]:
        return ["dockerd", "--host", self.url, "--data-root", str(self.root / "data"),
                "--exec-root", str(self.root / "exec"), "--pidfile", str(self.root / "docker.pid"),
                # Its own bridge, and hands off the host's iptables, so the machine's dockerd
                # and its networks are untouched; docker-proxy publishes the ports.
                "--bridge", self.bridge, "--iptables=false", "--ip-masq=false", "--ip-forward=false",
                "--live-restore"]

    def start(self) -> None:
        log = self.root / f"dockerd-{len(self.log)}.log"
        self.log.append(log)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(self.args(), stdout=out, stderr=subprocess.STDOUT)
        wait_until(self._pings, "the second dockerd to answer", timeout=60, interval=0.2)

    def _pings(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"the second dockerd exited: {self.log[-1].read_text()[-2000:]}")
        try:
            client = docker.DockerClient(base_url=self.url, timeout=5)
        except (docker.errors.DockerException, requests.RequestException):
            return False
        try:
            return bool(client.ping())
        except (docker.errors.DockerException, requests.RequestException):
            return False
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.url, timeout=30)


def _free_subnet() -> str:
    """A /24 in 10.213.0.0/16 that no route of this machine covers."""
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, check=True).stdout
    used = [ipaddress.ip_network(line.split()[0], strict=False) for line in routes.splitlines()
            if line and line.split()[0][0].isdigit()]
    for third in range(20 + os.getpid() % 200, 256):
        net = ipaddress.ip_network(f"10.213.{third}.0/24")
        if not any(net.overlaps(u) for u in used):
            return f"10.213.{third}.1/24"
    raise AssertionError("no free 10.213.x.0/24 for the second engine's bridge")


@pytest.fixture(scope="module")
def main_client():
    client = docker_client_or_skip()
    yield client
    client.close()


@pytest.fixture(scope="module")
def second_engine(main_client):
    if os.geteuid() != 0 or not shutil.which("dockerd") or not shutil.which("ip"):
        reason = "a second dockerd needs root, dockerd and ip (iproute2)"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so Docker tests must run: {reason}")
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="autodeploy-test-i13-", dir="/tmp"))
    engine = Engine(root=root, bridge=f"adi13-{os.getpid() % 100000}", cidr=_free_subnet())
    subprocess.run(["ip", "link", "add", engine.bridge, "type", "bridge"], check=True)
    try:
        subprocess.run(["ip", "addr", "add", engine.cidr, "dev", engine.bridge], check=True)
        subprocess.run(["ip", "link", "set", engine.bridge, "up"], check=True)
        engine.start()
        image = busybox_image(main_client)
        second = engine.client()
        try:
            second.images.load(b"".join(main_client.images.get(image).save(named=True)))  # docker save | docker load
        finally:
            second.close()
        yield engine
    finally:
        _teardown(engine)


def _teardown(engine: Engine) -> None:
    try:
        if engine.proc is not None and engine.proc.poll() is None:
            client = engine.client()
            try:  # --live-restore would leave them running past their dockerd
                for c in client.containers.list(all=True):
                    c.remove(force=True)
            except (docker.errors.DockerException, requests.RequestException):
                pass
            finally:
                client.close()
    finally:
        engine.stop()
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                  if line.split()[1].startswith(str(engine.root))]
        for mount in sorted(mounts, reverse=True):
            subprocess.run(["umount", "-l", mount], check=False)
        subprocess.run(["ip", "link", "del", engine.bridge], check=False)
        shutil.rmtree(engine.root, ignore_errors=True)


def _yaml(name: str, image: str, replicas: int, selector: str = "", command: str = HTTPD_COMMAND) -> str:
    text = (f"apiVersion: autodeploy/v1\nkind: Deployment\nmetadata: {{name: {name}}}\nspec:\n"
            f"  model: {{id: busybox, version: v1}}\n  image: {image}\n  command: '{command}'\n"
            f"  port: 8080\n  resources: {{cpu: 0.25, memoryGb: 0.125}}\n"
            f"  scaling: {{minReplicas: {replicas}, maxReplicas: {replicas}, idleTimeout: 30m}}\n"
            "  loadBalancer: {healthCheck: {path: /health, intervalSeconds: 10, timeoutSeconds: 2}}\n")
    return text + (f"  placement: {{nodeSelector: {{{selector}}}}}\n" if selector else "")


def _ours(client: docker.DockerClient, deployment: str) -> list:
    return client.containers.list(all=True, filters={"label": f"autodeploy.deployment={deployment}"},
                                  ignore_removed=True)


def _nodes_cli(url: str) -> str:
    out = subprocess.run([str(Path(sys.executable).parent / "autodeploy"), "nodes", "--url", url],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


class Load:
    """Idempotent GETs through the gateway from two threads: (sent at, status or error)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.results: list[tuple[float, int | str, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(2)]

    def _run(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                sent = time.time()
                try:
                    resp = session.get(self.url, timeout=30)
                    self.results.append((sent, resp.status_code, resp.headers.get(TARGET, "") or resp.text[:300]))
                except requests.RequestException as exc:
                    self.results.append((sent, f"{type(exc).__name__}: {exc}", ""))
                time.sleep(0.01)

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=40)


def test_two_engines_spread_fail_over_and_reconcile_when_the_second_returns(
        serve, tmp_path, main_client, second_engine, data_plane) -> None:
    image = busybox_image(main_client)
    project = tmp_path / "project"
    (project / "stacks").mkdir(parents=True)
    (project / "stacks" / "Pulumi.i13.yaml").write_text(
        "config:\n  autodeploy:driver: docker\n  autodeploy:prices: {cpu: 0.10}\n  autodeploy:nodes:\n"
        "    - {name: main, dockerHost: 'unix:///var/run/docker.sock', labels: {pool: main}}\n"
        f"    - {{name: second, dockerHost: '{second_engine.url}', address: {SECOND_ADDRESS}, "
        "labels: {pool: second}, prices: {cpu: 0.50}}\n")
    files = {"spread.yaml": _yaml("i13spread", image, 4),
             "pinned.yaml": _yaml("i13pinned", image, 1, selector="pool: second",
                                  command=f"echo serving from the second engine; {HTTPD_COMMAND}")}
    second = second_engine.client()
    try:
        s = serve(files, "--stack", "i13", "--project-dir", str(project))
        s.wait_for(lambda: sum(i["state"] == "ready" for i in s.instances("i13spread")) == 4, timeout=120,
                   what="4 ready instances of i13spread")
        s.wait_for(lambda: [i["state"] for i in s.instances("i13pinned")] == ["ready"], timeout=60,
                   what="the pinned instance ready")

        # Spread: two replicas on each engine, each container where its node says.
        spread = {i["id"]: i["node"] for i in s.instances("i13spread")}
        assert Counter(spread.values()) == {"main": 2, "second": 2}
        on_main = {c.labels["autodeploy.instance"] for c in _ours(main_client, "i13spread")}
        on_second = {c.labels["autodeploy.instance"] for c in _ours(second, "i13spread")}
        assert on_main == {i for i, n in spread.items() if n == "main"}
        assert on_second == {i for i, n in spread.items() if n == "second"}
        bindings = _ours(second, "i13spread")[0].attrs["NetworkSettings"]["Ports"]["8080/tcp"]
        assert {b["HostIp"] for b in bindings} == {SECOND_ADDRESS}
        for iid in on_second:  # the data plane routes to node.address:published_port
            r = s.get("/d/i13spread/health", headers={"Deploy-Route-Rule": iid})
            assert (r.status_code, r.headers[TARGET]) == (200, iid)
        [pinned] = s.instances("i13pinned")
        assert pinned["node"] == "second"
        nodes = {n["name"]: n for n in s.status()["nodes"]}
        assert nodes["second"]["reachable"] and nodes["second"]["address"] == SECOND_ADDRESS
        assert {i["id"] for i in nodes["second"]["instances"]} == on_second | {pinned["id"]}
        table = _nodes_cli(s.url)
        assert "second" in table and "127.0.0.2" in table and "pool=second" in table

        # A crashed serve restarted on the same state dir adopts its containers on both nodes.
        s.crash()
        s = serve(files, "--stack", "i13", "--project-dir", str(project), state_dir=s.state_dir,
                  port=int(s.url.rsplit(":", 1)[1]))
        assert {i["id"]: i["node"] for i in s.instances("i13spread")} == spread
        assert [(i["id"], i["node"]) for i in s.instances("i13pinned")] == [(pinned["id"], "second")]
        adopted = [e["instance"] for e in s.get("/api/events?limit=1000").json() if e["kind"] == "adopted"]
        assert sorted(adopted) == sorted([*spread, pinned["id"]])
        for iid in on_second:
            r = s.get("/d/i13spread/health", headers={"Deploy-Route-Rule": iid})
            assert (r.status_code, r.headers[TARGET]) == (200, iid)

        # Stop the second engine under load: its instances leave routing and are replaced on main.
        with Load(s.url + "/d/i13spread/health") as load:
            s.wait_for(lambda: len(load.results) > 20, what="load running")
            second_engine.stop()
            s.wait_for(lambda: not {n["name"]: n for n in s.status()["nodes"]}["second"]["reachable"],
                       timeout=30, what="node second marked unreachable")
            s.wait_for(lambda: Counter(i["node"] for i in s.instances("i13spread") if i["state"] == "ready")
                       == {"main": 4}, timeout=120, what="4 ready instances on main")
            events = s.status("i13spread")["events"]
            lost = [e for e in events if e["kind"] == "lost"]
            assert {e["instance"] for e in lost} == on_second
            # Ejected: the controller took them out (the `lost` events) and the data plane no
            # longer routes there (each gateway worker, or HAProxy, applies the new routing a
            # moment later; a request sent in between may still reach a dying instance).
            controller_ejected = max(e["at"] for e in lost)

            def ejected() -> float:
                return max([controller_ejected] + [r[0] for r in list(load.results) if r[2] in on_second])

            s.wait_for(lambda: len([r for r in load.results if r[0] > ejected() + 1.0]) > 50, timeout=60,
                       what="requests after the ejection")
        after = [r for r in load.results if r[0] > ejected()]
        assert [r for r in after if r[1] != 200] == []
        assert not {r[2] for r in load.results[-50:]} & on_second
        assert "no node can run this instance" in (s.status("i13pinned")["last_error"] or "")
        assert "unreachable" in _nodes_cli(s.url)

        # Restart it: its containers outlived it (--live-restore). The pinned one is still
        # wanted (nowhere else to run) and adopted; the spread ones were replaced: stopped.
        second_engine.start()
        s.wait_for(lambda: [(i["id"], i["state"], i["node"]) for i in s.instances("i13pinned")]
                   == [(pinned["id"], "ready", "second")], timeout=60, what="the pinned instance adopted")
        s.wait_for(lambda: not [c for c in _ours(second, "i13spread")], timeout=60,
                   what="stale spread containers removed from the second engine")
        assert "adopted" in [e["kind"] for e in s.status("i13pinned")["events"]]
        assert [e for e in s.status("i13spread")["events"] if e["kind"] == "stale"]
        r = s.get("/d/i13pinned/health")
        assert (r.status_code, r.headers[TARGET]) == (200, pinned["id"])
        logs = subprocess.run([str(Path(sys.executable).parent / "autodeploy"), "logs", "i13pinned", "--state-dir",
                               str(s.state_dir)], capture_output=True, text=True, timeout=30)
        assert logs.returncode == 0 and "serving from the second engine" in logs.stdout, logs.stderr
        assert json.loads(subprocess.run([str(Path(sys.executable).parent / "autodeploy"), "nodes", "--json",
                                          "--url", s.url], capture_output=True, text=True, timeout=30).stdout)[1][
            "reachable"] is True
        assert s.terminate() == 0
        assert not _ours(main_client, "i13spread") and not _ours(second, "i13pinned")
        # The ledger says which node served, at that node's price.
        with sqlite3.connect(s.state_dir / "autodeploy.db") as db:
            rows = set(db.execute("SELECT deployment, node, price_per_hour FROM ledger"))
        assert rows == {("i13spread", "main", 0.10), ("i13spread", "second", 0.50), ("i13pinned", "second", 0.50)}
    finally:
        for client in (main_client, second):
            for name in ("i13spread", "i13pinned"):
                try:
                    for c in _ours(client, name):
                        c.remove(force=True)
                except (docker.errors.DockerException, requests.RequestException):
                    pass
        second.close()
