"""The haproxy data plane: HAProxy carries warm traffic; the controller programs it.

`HaproxyDataPlane` is, to the controller, one more gateway worker: it syncs over the
controller's IPC socket like a gunicorn worker does (worker id -1), receives every
routing snapshot, makes HAProxy's servers match it through the Runtime API, and only
then acknowledges the snapshot's version. What it reports back comes from HAProxy:
in-flight counts (`scur` + `qcur`) and activity (`stot`, `lastsess`) from `show stat`,
request counts, errors and latencies from the request log. So idle release, drains
and autoscaling work unchanged: an instance the controller takes out of the snapshot
is set to `drain` here, and the controller stops it only once this worker reports the
new version with nothing in flight on it; it is deleted from HAProxy when its last
session ends.

Reloads happen only when the set of backends or a backend's settings change
(deployments added or removed); HAProxy's master-worker mode passes the listening
sockets to the new process, so no request fails. `HaproxyProcess` owns the process:
started detached with a pid file in the state directory so that it outlives a
SIGKILLed `serve`, adopted by the next `serve` on the same state directory.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import psutil

from controller import errors
from controller.contracts import EMPTY_SNAPSHOT, Snapshot, Sync, SyncReply
from controller.errors import AutoDeployError
from gateway.haproxy_config import (WAKE_LUA, Backend, Server, Settings, backend_name, backend_of, keys_map_text,
                                    keys_of, render, revision_map_text, server_options, servers_of, tunnels_to_check)
from gateway.haproxy_runtime import RequestLog, RuntimeApi, ServerStat

log = logging.getLogger("autodeploy.haproxy")

MIN_VERSION = (2, 6)
WORKER_ID = -1  # gunicorn workers sync with their pids; the data plane with this
SYNC_WAIT_S = 0.25
START_TIMEOUT_S = 15.0
RELOAD_TIMEOUT_S = 15.0
RELOAD_RESEND_S = 2.0  # no new worker after this long: the master did not take the signal; send it again
TUNNEL_SWEEP_S = 1.0  # how often tunnels past spec.tunnelTimeout are looked for (`show sess`)


# ---------------------------------------------------------------------- choosing a data plane
def haproxy_version(binary: str | None) -> tuple[int, int] | None:
    """(major, minor) of `binary -v`, or None when it is missing or does not run."""
    if not binary:
        return None
    try:
        out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"version (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def choose_data_plane(requested: str | None, version: tuple[int, int] | None,
                      binary: str | None) -> tuple[str, str]:
    """(data plane, why). `requested`: --data-plane or the stack's autodeploy:dataPlane."""
    found = f"haproxy {version[0]}.{version[1]} at {binary}" if version and binary else None
    if requested == "python":
        return "python", "asked for python"
    if requested == "haproxy":
        if version is None or version < MIN_VERSION:
            raise AutoDeployError(errors.DATA_PLANE_UNAVAILABLE,
                                  f"--data-plane haproxy needs haproxy >= 2.6 on PATH; found "
                                  f"{found or 'none'}")
        return "haproxy", f"asked for haproxy; {found}"
    if requested not in (None, ""):
        raise AutoDeployError(errors.BAD_REQUEST, f"data plane {requested!r}: use haproxy or python")
    if version is not None and version >= MIN_VERSION:
        return "haproxy", f"{found} is on PATH"
    if version is not None:
        return "python", f"{found} is older than 2.6"
    return "python", "no haproxy on PATH (apt-get install haproxy for the faster data plane)"


def runtime_dir(state_dir: Path) -> Path:
    """Where the sockets go: the state directory, or a short stable path when that one is
    too long for AF_UNIX (108 bytes); stable so a restarted serve finds the same sockets."""
    path = state_dir.resolve() / "haproxy"
    if len(str(path / "haproxy-log.sock")) < 100:
        return path
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"autodeploy-{digest}"


def _routing(snapshot: Snapshot) -> tuple[dict[str, Backend], dict[str, list[Server]], dict[str, str]]:
    """What HAProxy should have for a routing snapshot: backends, their servers, endpoint keys."""
    deps = snapshot.deployments
    return ({name: backend_of(dep, name) for name, dep in deps.items()},
            {name: servers_of(dep) for name, dep in deps.items()}, keys_of(deps))


# ---------------------------------------------------------------------- the process
def _children(pid: int) -> set[int]:
    """The master's worker pids (a reload forks a new one)."""
    try:
        return {c.pid for c in psutil.Process(pid).children()}
    except psutil.Error:
        return set()


class HaproxyProcess:
    """Start, adopt, reload and stop one HAProxy master (pid file in the state directory)."""

    def __init__(self, binary: str, state_dir: Path, api: RuntimeApi) -> None:
        self.binary = binary
        self.dir = state_dir / "haproxy"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "haproxy.cfg"
        self.pid_file = self.dir / "haproxy.pid"
        self.log_path = self.dir / "haproxy.log"
        self.api = api

    def master_pid(self) -> int | None:
        """The running master of this state directory, or None."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE or "haproxy" not in proc.name():
                return None
            return pid if str(self.config_path) in " ".join(proc.cmdline()) else None
        except (OSError, ValueError, IndexError, psutil.Error):
            return None

    def check(self, path: Path) -> None:
        res = subprocess.run([self.binary, "-c", "-q", "-f", str(path)], capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            raise AutoDeployError(errors.DATA_PLANE_COMMAND_FAILED,
                                  f"HAProxy refused the generated config {path}: {(res.stdout + res.stderr)[-2000:]}")

    def _write(self, text: str, revision_map: str, map_text: str) -> None:
        tmp = self.config_path.with_suffix(".new")
        tmp.write_text(text)
        Path(revision_map).write_text(map_text)
        self.check(tmp)
        os.replace(tmp, self.config_path)

    def start(self, text: str, revision_map: str, map_text: str) -> int:
        self._write(text, revision_map, map_text)
        with open(self.log_path, "ab") as out:
            # -D: the master detaches (own session), so a SIGKILLed serve leaves it serving.
            res = subprocess.run([self.binary, "-W", "-D", "-f", str(self.config_path), "-p", str(self.pid_file)],
                                 stdout=out, stderr=subprocess.STDOUT, timeout=START_TIMEOUT_S,
                                 start_new_session=True)
        if res.returncode != 0:
            raise AutoDeployError(errors.DATA_PLANE_UNAVAILABLE,
                                  f"haproxy exited with {res.returncode}: {self._log_tail()}")
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            pid = self.master_pid()
            if pid is not None and self.api.alive():
                return pid
            time.sleep(0.02)
        raise AutoDeployError(errors.DATA_PLANE_UNAVAILABLE, f"haproxy did not answer in time: {self._log_tail()}")

    def reload(self, text: str, revision_map: str, map_text: str) -> None:
        """Seamless: the master re-executes with the new file and hands the listening
        sockets to the new worker; the old one finishes its requests (hard-stop-after)."""
        pid = self.master_pid()
        if pid is None:
            raise AutoDeployError(errors.DATA_PLANE_UNAVAILABLE, "haproxy is not running")
        self._write(text, revision_map, map_text)
        old_worker = self.api.info().get("Pid")
        before = _children(pid)
        os.kill(pid, signal.SIGUSR2)
        deadline = time.monotonic() + RELOAD_TIMEOUT_S
        resend = time.monotonic() + RELOAD_RESEND_S
        answering: Any = None
        while time.monotonic() < deadline:
            if time.monotonic() >= resend and _children(pid) == before:
                # No new worker forked: a master still finishing its own start lets a SIGUSR2 go
                # unheeded. Ask again (never while a new worker exists: that reload is under way).
                os.kill(pid, signal.SIGUSR2)
                resend = time.monotonic() + RELOAD_RESEND_S
            try:
                # Until the old worker lets go of the Runtime API socket, a connection may still
                # reach it and read the old config (then `add server` of a server the new file
                # already has fails): done when the new worker answers and the old one is deaf.
                answering = self.api.info().get("Pid")
                if answering not in (None, old_worker) and not self._listens(old_worker):
                    return
            except AutoDeployError as exc:
                answering = exc.message
            time.sleep(0.02)
        raise AutoDeployError(errors.DATA_PLANE_UNAVAILABLE, f"haproxy reload did not finish in {RELOAD_TIMEOUT_S:g}s"
                              f" (old worker {old_worker}, Runtime API answered by {answering!r}, old worker "
                              f"still listening: {self._listens(old_worker)}): {self._log_tail()}")

    def _listens(self, worker: Any) -> bool:
        """The (old) worker still holds the Runtime API's listening socket."""
        try:
            conns = psutil.Process(int(worker)).net_connections(kind="unix")
        except (TypeError, ValueError, psutil.Error):
            return False  # gone, or not a pid
        path = self.api.path  # HAProxy binds "<path>.<pid>.tmp", then renames it to <path>
        return any(c.laddr == path or str(c.laddr).startswith(path + ".") for c in conns)

    def stop(self, timeout: float) -> None:
        """Soft stop (listeners close, in-flight requests finish, idle keep-alive
        connections close), bounded by `timeout`; then terminate, then kill."""
        pid = self.master_pid()
        if pid is None:
            return
        for sig, wait in ((signal.SIGUSR1, timeout), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            if _wait_gone(pid, wait):
                break
        try:
            self.pid_file.unlink()
        except FileNotFoundError:
            pass

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-1500:]
        except OSError:
            return ""


def _wait_gone(pid: int, timeout: float) -> bool:
    """True once `pid` has exited (a zombie counts: the detached master is init's to reap)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def running_master(state_dir: Path) -> int | None:
    """The pid of the HAProxy master serving `state_dir`, or None."""
    return HaproxyProcess("haproxy", state_dir.resolve(), RuntimeApi("")).master_pid()


# ---------------------------------------------------------------------- the data plane
class HaproxyDataPlane:
    def __init__(self, binary: str, state_dir: Path, settings: Settings,
                 sync: Callable[[Sync], SyncReply], metrics: Any | None = None) -> None:
        """`settings`: bind address, activator address, limits (socket paths are filled in
        here); `sync`: the controller's sync call (`IpcClient.request`)."""
        rdir = runtime_dir(state_dir)
        rdir.mkdir(parents=True, exist_ok=True)
        self.settings = Settings(**{**settings.__dict__, "socket_path": str(rdir / "haproxy.sock"),
                                    "log_path": str(rdir / "haproxy-log.sock"),
                                    "revision_map": str(state_dir.resolve() / "haproxy" / "revisions.map"),
                                    "lua_path": str(state_dir.resolve() / "haproxy" / "wake.lua"),
                                    "keys_map": str(state_dir.resolve() / "haproxy" / "keys.map"),
                                    "pid_file": ""})
        self.api = RuntimeApi(self.settings.socket_path)
        self.process = HaproxyProcess(binary, state_dir.resolve(), self.api)
        Path(self.settings.lua_path).write_text(WAKE_LUA)  # loaded by the rendered config (lua-load)
        self._sync = sync
        self.metrics = metrics  # gateway.metrics.GatewayMetrics: /metrics counts warm traffic too
        self.requests = RequestLog(self.settings.log_path, metrics)
        self._backends: dict[str, Backend] | None = None  # None: the running config is unknown
        self._snapshot: Snapshot = EMPTY_SNAPSHOT
        self._applied = 0
        self._stot: dict[tuple[str, str], tuple[int, int]] = {}  # (backend, server) -> (stot, 5xx) last seen
        self._map: dict[str, str] = {}
        self._last_stats: list[ServerStat] = []
        self._busy: dict[tuple[str, str], int] = {}  # (backend, server) -> last in-flight count
        self._master: int | None = None  # `show stat` after the last apply
        self._keys: dict[str, str] = {}  # the keys map as HAProxy has it (private deployments' key hashes)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.adopted = False
        self._next_sweep = 0.0

    # -------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Boot, then keep HAProxy in step with the controller's snapshots in a thread."""
        self.boot()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="haproxy-plane")
        self._thread.start()

    def boot(self) -> None:
        """Adopt the HAProxy a previous serve left running on this state directory, or start one."""
        pid = self.process.master_pid()
        if pid is not None and self.api.alive():
            self.adopted = True
            log.info("adopted the running HAProxy (master pid %s)", pid)
            self._map = self.api.show_map(self.settings.revision_map)
            try:
                self._keys = self.api.show_map(self.settings.keys_map)
            except AutoDeployError:
                self._keys = {}  # its config has no private deployment: the map is not loaded
        else:
            # Started with the controller's routing as it is now, not empty and reloaded a moment
            # later: a request in between would reach the old worker's empty config, which sends
            # everything to the activator (a gRPC call there is a 404).
            snapshot = self._first_snapshot()
            pid = self._install(*_routing(snapshot), run=self.process.start)
            self._snapshot = snapshot
            log.info("started HAProxy (master pid %s) on %s:%s with %d backend(s)", pid, self.settings.bind_host,
                     self.settings.bind_port, len(self._backends or {}))

    def _first_snapshot(self) -> Snapshot:
        """The controller's routing now (one sync without waiting); empty if it cannot answer yet."""
        try:
            reply = self._sync(Sync(worker=WORKER_ID, version=0, wait=0))
        except AutoDeployError as exc:
            log.warning("data plane: no routing from the controller yet (%s): HAProxy starts empty", exc.message)
            return EMPTY_SNAPSHOT
        return reply.snapshot or EMPTY_SNAPSHOT

    def close(self, stop_haproxy: bool, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if stop_haproxy:
            self.process.stop(timeout)
        self.requests.close()

    # -------------------------------------------------------------- the loop
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except AutoDeployError as exc:
                log.warning("data plane: %s", exc.message)
                self._stop.wait(0.5)
            except Exception:  # noqa: BLE001 - one bad pass must not stop the data plane; it is logged
                log.exception("data plane pass failed")
                self._stop.wait(0.5)

    def step(self) -> None:
        """Program HAProxy to the last snapshot, measure, report, take the next snapshot."""
        snapshot = self._snapshot
        changed = self.apply(snapshot)
        stats = self._last_stats
        self._applied = snapshot.version
        self._sweep_tunnels()
        inflight, activity = self._measure(stats)
        reply = self._sync(Sync(worker=WORKER_ID, version=self._applied, inflight=inflight, activity=activity,
                                wait=SYNC_WAIT_S if self._applied else 0, metrics=self.requests.take()))
        if reply.snapshot is not None:
            self._snapshot = reply.snapshot

    def _sweep_tunnels(self) -> None:
        """End WebSockets past their deployment's spec.tunnelTimeout (every TUNNEL_SWEEP_S)."""
        now = time.monotonic()
        if now < self._next_sweep or not self._backends:
            return
        self._next_sweep = now + TUNNEL_SWEEP_S
        for sess in tunnels_to_check(self.api.sessions(), self._backends.values()):
            if self.api.is_tunnel(sess.ptr):
                log.info("closing the WebSocket tunnel to %s/%s after %.0f s (spec.tunnelTimeout)",
                         sess.backend, sess.server, sess.age_s)
                self.api.shutdown_session(sess.ptr)

    def apply(self, snapshot: Snapshot) -> bool:
        """Make HAProxy match `snapshot`; True when a command changed something."""
        backends, desired, keys = _routing(snapshot)
        changed = False
        if self._backends is not None and not self._master_alive():
            self._backends = None  # HAProxy is gone: start it again with everything
        if backends != self._backends:
            self._reload(backends, desired, keys)
            changed = True
        if any(b.private for b in backends.values()):
            changed |= self._ensure_keys(keys)
        stats = self.api.show_stat()
        actual = {(s.backend, s.name): s for s in stats}
        wanted = {(backends[name].section, srv.id) for name, servers in desired.items() for srv in servers}
        # Servers leaving first: between a snapshot and its last command HAProxy should
        # rather lack a new server (its requests then go to the activator) than keep
        # sending to one the controller is taking away.
        for key, st in actual.items():
            if key not in wanted:
                changed |= self._retire(backends, st)
        for name, servers in desired.items():
            b = backends[name]
            for srv in servers:
                changed |= self._ensure_server(b, srv, actual.get((b.section, srv.id)))
        if any(b.sticky for b in backends.values()):
            changed |= self._ensure_sticky(backends, desired, changed)
        self._last_stats = self.api.show_stat() if changed else stats
        return changed

    def _master_alive(self) -> bool:
        """Cheap enough for every pass: one /proc read for the master found last time."""
        if self._master is not None:
            try:
                if psutil.Process(self._master).status() != psutil.STATUS_ZOMBIE:
                    return True
            except psutil.NoSuchProcess:
                pass
        self._master = self.process.master_pid()
        return self._master is not None

    def _reload(self, backends: dict[str, Backend], desired: dict[str, list[Server]],
                keys: dict[str, str] | None = None) -> None:
        if self.process.master_pid() is None:  # it died (or was killed): serve goes on with a new one
            log.error("HAProxy was not running: starting it again with %d backend(s)", len(backends))
            pid = self._install(backends, desired, keys, run=self.process.start)
            log.info("started HAProxy again (master pid %s)", pid)
        else:
            self._install(backends, desired, keys, run=self.process.reload)
            log.info("HAProxy reloaded: backends %s", ", ".join(sorted(backends)) or "none")

    def _install(self, backends: dict[str, Backend], desired: dict[str, list[Server]], keys: dict[str, str] | None,
                 run: Callable[[str, str, str], Any]) -> Any:
        """Write the config, maps and keys for this routing and start or reload HAProxy with
        them (`run`); then what HAProxy has is known again. Returns what `run` returns."""
        self._write_keys(keys or {})
        result = run(render(self.settings, backends.values(), desired), self.settings.revision_map,
                     revision_map_text(desired))
        self._backends = dict(backends)
        self._map = self.api.show_map(self.settings.revision_map)
        self._keys = dict(keys or {}) if any(b.private for b in backends.values()) else {}
        self._stot.clear()
        return result

    def _write_keys(self, keys: dict[str, str]) -> None:
        """The keys map file HAProxy loads at a (re)load; only hashes, owner-only."""
        path = Path(self.settings.keys_map)
        fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(keys_map_text(keys))

    def _ensure_keys(self, keys: dict[str, str]) -> bool:
        """Endpoint keys over the Runtime API: a new or revoked key needs no reload."""
        changed = False
        for k, v in keys.items():
            if self._keys.get(k) != v:
                self.api.set_map(self.settings.keys_map, k, v, k in self._keys)
                self._keys[k] = v
                changed = True
        for k in [k for k in self._keys if k not in keys]:
            self.api.del_map(self.settings.keys_map, k)
            self._keys.pop(k, None)
            changed = True
        return changed

    def _ensure_server(self, b: Backend, srv: Server, st: ServerStat | None) -> bool:
        be = b.section
        changed = False
        if st is None:
            self.api.add_server(be, srv.id, srv.host, srv.port, server_options(b, srv.weight))
            self.api.enable_health(be, srv.id)
            self.api.enable_server(be, srv.id)
            self._stot[(be, srv.id)] = (0, 0)
            changed = True
        else:
            if st.admin_state != "READY":  # revived while draining
                self.api.set_state(be, srv.id, "ready")
                changed = True
            if st.weight != srv.weight:
                self.api.set_weight(be, srv.id, srv.weight)
                changed = True
        if self._map.get(srv.id) != srv.revision:
            self.api.set_map(self.settings.revision_map, srv.id, srv.revision, srv.id in self._map)
            self._map[srv.id] = srv.revision
        return changed

    def _retire(self, backends: dict[str, Backend], st: ServerStat) -> bool:
        """A server whose instance left the snapshot: drain, and delete once idle."""
        be, name = st.backend, st.name
        sticky = any(b.section == be and b.sticky for b in backends.values())
        if st.admin_state == "READY":
            self.api.set_state(be, name, "drain")
            if sticky:
                self.api.clear_table_key(be, name)
            return True
        if st.scur == 0 and st.qcur == 0:
            if st.admin_state != "MAINT":
                self.api.set_state(be, name, "maint")
            self.api.del_server(be, name)
            if name in self._map:
                self.api.del_map(self.settings.revision_map, name)
                self._map.pop(name, None)
            self._stot.pop((be, name), None)
            return True
        return False

    def _ensure_sticky(self, backends: dict[str, Backend], desired: dict[str, list[Server]], changed: bool) -> bool:
        """Each sticky backend's table maps every instance id (the cookie) to its server."""
        did = False
        for name, b in backends.items():
            if not b.sticky:
                continue
            ids = self.api.server_ids(b.section)
            table = self.api.show_table(b.section)
            for srv in desired.get(name, ()):
                sid = ids.get(srv.id)
                if sid is not None and table.get(srv.id) != sid:
                    self.api.set_table_server(b.section, srv.id, sid)
                    did = True
        return did

    def _measure(self, stats: list[ServerStat]) -> tuple[dict[str, int], dict[str, list[float]]]:
        now = time.time()
        inflight: dict[str, int] = {}
        activity: dict[str, list[float]] = {}
        for st in stats:
            key = (st.backend, st.name)
            busy = st.scur + st.qcur
            if busy:
                inflight[st.name] = inflight.get(st.name, 0) + busy
            if self.metrics is not None and (busy or self._busy.get(key)):
                self.metrics.set_in_flight(st.backend[3:], st.name, busy)
            self._busy[key] = busy
            prev = self._stot.get(key)
            if prev is None:
                prev = (st.stot, st.hrsp_5xx)  # first sight (adopted, reloaded): nothing new yet
            served = st.stot - prev[0] if st.stot >= prev[0] else st.stot
            errs = st.hrsp_5xx - prev[1] if st.hrsp_5xx >= prev[1] else st.hrsp_5xx
            self._stot[key] = (st.stot, st.hrsp_5xx)
            if served > 0:
                last = now - max(0, st.lastsess)  # when the latest request was handed to it
                activity[st.name] = [last, served, errs]
        return inflight, activity


def find_haproxy() -> str | None:
    return shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy")
                                            if os.access(p, os.X_OK)), None)

