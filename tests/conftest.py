"""Shared fixtures: a real `autodeploy serve` process on a free port with its own
deployments and state directories."""
from __future__ import annotations

import fcntl
import itertools
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import psutil
import pytest
import requests


ROOT = Path(__file__).resolve().parent.parent
ECHO_MODEL = ROOT / "deployments" / "models" / "echo_model.py"
PY = sys.executable


def echo_command(*extra: str) -> str:
    return f"{PY} {ECHO_MODEL} --port ${{PORT}}" + "".join(f" {e}" for e in extra)


def deployment_yaml(name: str, command: str | None = None, *, min_replicas: int = 0, max_replicas: int = 3,
                    idle: str = "5m", health: str | None = "/health", state: str = "running",
                    extra_spec: str = "", start_timeout: str | None = None) -> str:
    command = command or echo_command()
    lines = [
        "apiVersion: autodeploy/v1", "kind: Deployment", "metadata:", f"  name: {name}", "spec:",
        "  model: {id: echo, version: v1}", "  command: '" + command.replace("'", "''") + "'", "  port: 8080", "  scaling:", f"    minReplicas: {min_replicas}",
        f"    maxReplicas: {max_replicas}", f"    idleTimeout: {idle}",
    ]
    if start_timeout:
        lines.append(f"    startTimeout: {start_timeout}")
    if health:
        lines += ["  loadBalancer:", f"    healthCheck: {{path: {health}, intervalSeconds: 10, timeoutSeconds: 2}}"]
    lines.append(f"  state: {state}")
    text = "\n".join(lines) + "\n"
    if extra_spec:
        text += textwrap.indent(textwrap.dedent(extra_spec).strip("\n"), "  ") + "\n"
    return text


def wait_until(predicate, what: str, timeout: float = 20.0, interval: float = 0.005):
    """Synchronisation only: how long it takes is never asserted."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


# Ports for the tests' own listeners (serve, HAProxy, models started by a test) come from
# below the kernel's ephemeral range (32768-60999 by default), so no outgoing connection
# takes one, and each is reserved for the life of the pytest process that picked it by a
# lock on its byte of a shared file: another xdist worker, or another pytest run on the
# same machine, never hands out the same port while this one may still bind it.
TEST_PORTS = range(20000, 32000)
_PORT_LOCKS = Path(os.environ.get("TMPDIR", "/tmp")) / "autodeploy-test-ports.lock"
_port_fd: int | None = None
_next_port = itertools.count(random.randrange(len(TEST_PORTS)))


def free_port(host: str = "127.0.0.1") -> int:
    global _port_fd
    if _port_fd is None:
        _port_fd = os.open(_PORT_LOCKS, os.O_RDWR | os.O_CREAT, 0o666)
    for _ in range(len(TEST_PORTS)):
        port = TEST_PORTS[next(_next_port) % len(TEST_PORTS)]
        try:
            fcntl.lockf(_port_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, port)
        except OSError:
            continue  # reserved by another live test process
        with socket.socket() as s:
            try:
                s.bind((host, port))  # no SO_REUSEADDR: a port in TIME_WAIT is skipped too
            except OSError:
                continue  # in use by something else: stays reserved here, never retried
        return port
    raise RuntimeError(f"no free port in {TEST_PORTS}")


def process_running(pid: int | None) -> bool:
    """The process exists and has not exited (a zombie waiting for its parent has)."""
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def accepts(port: int, host: str = "127.0.0.1") -> bool:
    """Something listens on host:port (a connect succeeds)."""
    try:
        socket.create_connection((host, port), timeout=0.2).close()
        return True
    except OSError:
        return False


def admin_token(state_dir: Path) -> str | None:
    """The token `serve` wrote on its first start (what the CLI on the same machine uses)."""
    try:
        return (state_dir / "admin.token").read_text().strip() or None
    except FileNotFoundError:
        return None


@dataclass
class Served:
    """A running `autodeploy serve`. `get`/`post` send its admin token to the API (`/api/...`,
    `/metrics`) unless the call passes its own `Authorization` header, or `auth=False` for an
    anonymous call."""
    proc: subprocess.Popen
    url: str
    deployments: Path
    state_dir: Path
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def token(self) -> str | None:
        return admin_token(self.state_dir)

    def _auth(self, path: str, kw: dict, method: str = "GET") -> dict:
        send = kw.pop("auth", True)
        headers = dict(kw.pop("headers", None) or {})
        api = path.startswith("/api") or path.startswith("/metrics")
        if send and api and self.token and not any(k.lower() == "authorization" for k in headers):
            headers["Authorization"] = f"Bearer {self.token}"
        kw["headers"] = headers
        if api and method == "POST" and "json" not in kw and "data" not in kw:
            kw["json"] = {}  # the API takes JSON objects only, as the CLI sends them
        return kw

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=kw.pop("timeout", 30), **self._auth(path, kw))

    def post(self, path: str, **kw) -> requests.Response:
        return requests.post(self.url + path, timeout=kw.pop("timeout", 30), **self._auth(path, kw, "POST"))

    def status(self, name: str | None = None) -> dict:
        resp = self.get("/api/deployments" + (f"/{name}" if name else ""))
        assert resp.status_code == 200, f"status of {name or 'all'}: HTTP {resp.status_code} {resp.text[:500]}"
        return resp.json()

    def instances(self, name: str) -> list[dict]:
        return self.status(name)["instances"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, predicate, timeout: float = 15.0, what: str = "condition"):
        try:
            return wait_until(predicate, what, timeout, interval=0.05)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; serve log:\n{self.log()[-4000:]}") from None

    def routing_settled(self, name: str, ids: set[str]) -> bool:
        """The data plane routes `name` to exactly `ids`. Python mode: at once (the gateway
        asks the controller); haproxy mode: once HAProxy's backend has those servers."""
        from gateway.haproxy_plane import runtime_dir
        from gateway.haproxy_runtime import RuntimeApi
        sock = runtime_dir(self.state_dir) / "haproxy.sock"  # a short path when the state dir is deep
        if not sock.exists():
            return "haproxy" not in self.args  # python mode routes at once; HAProxy not up yet: wait
        servers = {st.name for st in RuntimeApi(str(sock)).show_stat()
                   if st.backend == f"be_{name}" and st.admin_state == "READY" and st.status.startswith("UP")}
        return servers == ids

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def crash(self) -> None:
        """SIGKILL serve and its gateway workers, leaving the instances (and a detached HAProxy)
        running, as a crash of the controller would."""
        gateway = [c for c in self.descendants() if "gunicorn" in " ".join(c.cmdline())]
        self.proc.kill()
        self.proc.wait()
        for c in gateway:
            try:
                c.kill()
            except psutil.Error:
                pass

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = 40.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def start_serve(tmp: Path, files: dict[str, str], *extra: str, state_dir: Path | None = None,
                port: int | None = None, folder: bool = True) -> Served:
    """`folder=False`: no --deployments (the source comes from `extra`, e.g. --git-repo)."""
    deployments = tmp / "deployments"
    deployments.mkdir(exist_ok=True)
    for name, text in files.items():
        (deployments / name).write_text(text)
    state_dir = state_dir or tmp / "state"
    port = port or free_port()
    log_path = tmp / f"serve-{port}.log"
    args = [str(Path(PY).parent / "autodeploy"), "serve", *(["--deployments", str(deployments)] if folder else []),
            "--state-dir", str(state_dir), "--port", str(port), "--project-dir", str(ROOT), *extra]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    served = Served(proc, f"http://127.0.0.1:{port}", deployments, state_dir, log_path, args)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited with {proc.returncode}:\n{served.log()}")
        try:
            if served.token and served.get("/api/deployments", timeout=1).status_code == 200:
                return served
        except requests.RequestException:
            pass
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"serve did not become ready:\n{served.log()}")


def _kill_tree(served: Served) -> None:
    for child in served.descendants():
        try:
            child.kill()
        except psutil.Error:
            pass
    if served.proc.poll() is None:
        served.proc.kill()
        served.proc.wait()


DATA_PLANES = ("python", "haproxy")


@pytest.fixture(params=DATA_PLANES)
def data_plane(request: pytest.FixtureRequest) -> str:
    """Run a test once per data plane: a test that asks for this fixture gets `serve`
    started with `--data-plane python` and again with `--data-plane haproxy`."""
    return str(request.param)


@pytest.fixture
def serve(tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """Start `autodeploy serve` with the given deployment files; always cleaned up.

    Tests that do not ask for `data_plane` run on the python data plane (the gateway
    itself), so the default choice (haproxy when installed) never changes them silently.
    AUTODEPLOY_TOKEN is set to the latest serve's admin token, so `autodeploy ...` CLI
    subprocesses of the test authenticate as the admin of that serve."""
    plane = request.getfixturevalue("data_plane") if "data_plane" in request.fixturenames else "python"
    started: list[Served] = []

    def _start(files: dict[str, str], *extra: str, **kw) -> Served:
        if "--data-plane" not in extra:
            extra = (*extra, "--data-plane", plane)
        served = start_serve(tmp_path, files, *extra, **kw)
        started.append(served)
        if served.token:
            monkeypatch.setenv("AUTODEPLOY_TOKEN", served.token)
        return served

    yield _start
    for served in started:
        instance_pids = _instance_pids(served)
        if served.proc.poll() is None:
            try:
                served.terminate()
            except subprocess.TimeoutExpired:
                pass
        _kill_tree(served)
        _stop_haproxy(served.state_dir)
        for pid in instance_pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _stop_haproxy(state_dir: Path) -> None:
    """A SIGKILLed serve leaves its HAProxy serving (by design): stop it after the test."""
    try:
        pid = int((state_dir / "haproxy" / "haproxy.pid").read_text().split()[0])
        if "haproxy" in psutil.Process(pid).name():
            os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError, IndexError, psutil.Error):
        pass


def _instance_pids(served: Served) -> list[int]:
    try:
        data = served.get("/api/deployments", timeout=2).json()
    except (requests.RequestException, ValueError):
        return []
    pids = []
    for dep in data.get("deployments", []):
        try:
            detail = served.get(f"/api/deployments/{dep['name']}", timeout=2).json()
        except (requests.RequestException, ValueError):
            continue
        pids += [i["pid"] for i in detail.get("instances", []) if i.get("pid")]
    return pids
