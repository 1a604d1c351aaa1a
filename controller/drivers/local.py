"""Local driver: each instance is a shell command in its own process group on this host."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections import deque
from pathlib import Path
from typing import Callable

import psutil

from controller.drivers.base import Exit, Instance
from controller.secrets import SecretSource, instance_env
from controller.spec import Deployment

_PORT_REF = re.compile(r"\$\{?PORT\b")
STATE_DIR_ENV = "AUTODEPLOY_STATE_DIR"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def tail_file(path: str | None, lines: int) -> str:
    if not path or not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64 * 1024))
        return "\n".join(deque(f.read().decode(errors="replace").splitlines(), maxlen=lines))


class LocalDriver:
    """Runs `spec.command` through /bin/sh with PORT set to a free port.

    A command that does not mention PORT listens on `spec.port` itself, so only one
    instance of it can run at a time; the README says so."""

    name = "local"
    tcp_accept_means_ready = True

    def __init__(self, state_dir: Path, workdir: Path, umask: int | None = None) -> None:
        self.state_dir = state_dir.resolve()
        self.owner = str(self.state_dir)
        self.log_dir = state_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        # serve keeps its own files private (umask 077); instances get the user's umask back.
        self.umask = umask
        # `{secret: KEY}` values for an instance (serve sets the stack-aware source).
        self.secrets: Callable[[Deployment], dict[str, str]] = SecretSource().resolve
        self._procs: dict[str, subprocess.Popen | psutil.Process] = {}
        self._ps_cache: dict[int, psutil.Process] = {}  # for stats(): psutil keeps CPU baselines per object
        # Instances listening on the fixed spec.port (their command ignores ${PORT}): only
        # there can a port answer from someone else, so only there is ownership proven.
        self._fixed_port: set[str] = set()

    def start(self, dep: Deployment, instance_id: str, gpu_ids: list[str]) -> Instance:
        uses_port = bool(_PORT_REF.search(dep.command))
        port = free_port() if uses_port else dep.port
        command = dep.command.replace("${PORT}", str(port))
        ours = {"PORT": str(port), "AUTODEPLOY_INSTANCE_ID": instance_id,
                "AUTODEPLOY_DEPLOYMENT": dep.name, "AUTODEPLOY_REVISION": dep.revision,
                # With the id, how `discover` finds this process when the store is lost.
                STATE_DIR_ENV: str(self.state_dir), "PYTHONUNBUFFERED": "1"}
        # A clean environment: nothing of serve's (its tokens, AUTODEPLOY_SECRET_*) but PATH, HOME, LANG, TZ.
        env = instance_env(dep, self.secrets(dep), ours)
        if gpu_ids:
            # NVML UUIDs are valid CUDA_VISIBLE_DEVICES entries; GPUs declared in the
            # stack config have no real UUID, so they are named by index.
            env["CUDA_VISIBLE_DEVICES"] = ",".join(g.removeprefix("declared-") for g in gpu_ids)
        log_path = self.log_dir / f"{dep.name}-{instance_id}.log"
        with open(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as log:
            proc = subprocess.Popen(["/bin/sh", "-c", command], cwd=self.workdir, env=env,
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, umask=-1 if self.umask is None else self.umask)
        self._procs[instance_id] = proc
        if not uses_port:
            self._fixed_port.add(instance_id)
        return Instance(id=instance_id, deployment=dep.name, revision=dep.revision, host="127.0.0.1",
                        port=port, started_at=time.time(), pid=proc.pid,
                        pid_create_time=_create_time(proc.pid), gpu_ids=list(gpu_ids),
                        log_path=str(log_path))

    def poll(self, inst: Instance) -> Exit | None:
        proc = self._procs.get(inst.id)
        if isinstance(proc, subprocess.Popen):
            code = proc.poll()
        elif isinstance(proc, psutil.Process):
            code = _psutil_exit(proc)
        else:
            code = -1
        if code is None:
            return None
        return Exit(code=code, log_tail=self.log_tail(inst))

    def stop(self, inst: Instance, timeout: float) -> None:
        proc = self._procs.pop(inst.id, None)
        self._fixed_port.discard(inst.id)
        if proc is None or inst.pid is None:
            return
        _signal_group(inst.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _gone(proc) and not _group_alive(inst.pid):
                return
            time.sleep(0.02)
        _signal_group(inst.pid, signal.SIGKILL)
        if isinstance(proc, subprocess.Popen):
            proc.wait(timeout=5)

    def adopt(self, inst: Instance) -> bool:
        if inst.pid is None:
            return False
        try:
            proc = psutil.Process(inst.pid)
            same = inst.pid_create_time is not None and abs(proc.create_time() - inst.pid_create_time) < 0.01
            if not same or proc.status() == psutil.STATUS_ZOMBIE:
                return False
        except psutil.Error:
            return False
        self._procs[inst.id] = proc
        return True

    def discover(self) -> list[Instance]:
        """Instances this state dir started, found by their environment: each carries
        AUTODEPLOY_INSTANCE_ID and the state dir. What the store forgot (a lost or corrupt
        database) is found here, so it can be adopted or stopped rather than orphaned."""
        found: dict[str, Instance] = {}
        mine = str(self.state_dir)
        for proc in psutil.process_iter(["pid", "create_time"]):
            try:
                if os.getpgid(proc.pid) != proc.pid:
                    continue  # only the group leader (the /bin/sh we started) stands for the instance
                env = proc.environ()
            except (psutil.Error, OSError):
                continue  # gone, or another user's: not ours
            iid = env.get("AUTODEPLOY_INSTANCE_ID")
            if not iid or env.get(STATE_DIR_ENV) != mine or iid in found:
                continue
            try:
                port = int(env.get("PORT", "0"))
            except ValueError:
                port = 0
            log_path = self.log_dir / f"{env.get('AUTODEPLOY_DEPLOYMENT', '')}-{iid}.log"
            found[iid] = Instance(id=iid, deployment=env.get("AUTODEPLOY_DEPLOYMENT", ""),
                                  revision=env.get("AUTODEPLOY_REVISION", ""), host="127.0.0.1", port=port,
                                  started_at=proc.info["create_time"] or time.time(), pid=proc.pid,
                                  pid_create_time=proc.info["create_time"],
                                  gpu_ids=[g if g.startswith("GPU-") else f"declared-{g}"
                                           for g in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if g],
                                  log_path=str(log_path) if log_path.exists() else None, owner=mine)
        return sorted(found.values(), key=lambda i: i.started_at)

    def owns_listener(self, inst: Instance) -> bool | None:
        """Whether the socket listening on the instance's port belongs to its own processes.

        Readiness must prove the answer came from the instance: a command that ignores
        ${PORT} on the gateway's own port would otherwise be "ready" because the gateway
        answered itself. None when it cannot be told (no pid, or /proc hides sockets), and
        when the driver gave the instance a port it had just found free (${PORT}): no one
        else listens there, and the scan of every socket table (tens of ms on a busy host)
        stays off the cold-start path."""
        if inst.pid is None or inst.id not in self._fixed_port:
            return None
        try:
            root = psutil.Process(inst.pid)
            procs = {root.pid: root, **{c.pid: c for c in root.children(recursive=True)}}
        except psutil.Error:
            return False
        for proc in psutil.process_iter():  # members of its process group that left the tree
            try:
                if proc.pid not in procs and os.getpgid(proc.pid) == inst.pid:
                    procs[proc.pid] = proc
            except (OSError, psutil.Error):
                continue
        seen_any = False
        for proc in procs.values():
            try:
                conns = proc.net_connections(kind="inet")
            except psutil.Error:
                continue
            seen_any = True
            if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == inst.port for c in conns):
                return True
        return False if seen_any else None

    def log_tail(self, inst: Instance, lines: int = 20) -> str:
        return tail_file(inst.log_path, lines)

    def log_path(self, inst: Instance) -> str | None:
        return inst.log_path

    def stats(self, inst: Instance) -> dict[str, float]:
        """CPU and memory of the instance's process tree (psutil).

        cpu_pct is of one core and cpu_cores the cores in use, both since the previous
        call for the same processes: psutil measures CPU between two readings of one
        Process object, so those objects are kept (a first reading says 0)."""
        if inst.pid is None:
            return {}
        try:
            root = self._ps(inst.pid)
            procs = [root, *(self._ps(c.pid) for c in root.children(recursive=True))]
            cpu = sum(p.cpu_percent(interval=None) for p in procs)
            rss = sum(p.memory_info().rss for p in procs)
        except psutil.Error:
            return {}
        live = {p.pid for p in procs}
        for pid in [p for p, proc in list(self._ps_cache.items()) if p not in live and not proc.is_running()]:
            self._ps_cache.pop(pid, None)
        return {"cpu_pct": cpu, "cpu_cores": cpu / 100.0, "mem_bytes": float(rss)}

    def _ps(self, pid: int) -> psutil.Process:
        proc = self._ps_cache.get(pid)
        if proc is None or not proc.is_running():  # is_running also catches a reused pid
            proc = self._ps_cache[pid] = psutil.Process(pid)
        return proc

    def close(self) -> None:
        self._procs.clear()


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _psutil_exit(proc: psutil.Process) -> int | None:
    try:
        if proc.status() != psutil.STATUS_ZOMBIE:
            return None
    except psutil.NoSuchProcess:
        pass
    return -1  # not our child: the real exit status is not ours to read


def _gone(proc: subprocess.Popen | psutil.Process) -> bool:
    if isinstance(proc, subprocess.Popen):
        return proc.poll() is not None
    return _psutil_exit(proc) is not None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
