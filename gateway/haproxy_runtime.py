"""HAProxy's Runtime API (the stats socket, level admin) and its request log.

`RuntimeApi` sends one command per connection (HAProxy's non-interactive mode) and
turns its text answers into data or a coded error (1085) quoting HAProxy. Nothing here
decides; gateway/haproxy_plane.py says what to do.

`RequestLog` binds the Unix datagram socket HAProxy logs to (`log <path> format raw`,
one line per request in haproxy_config's `log-format`) and sums what it reads per
instance: requests, errors and a latency histogram, the report the controller takes
from gateway workers in python mode.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import re
import socket
import threading
from dataclasses import dataclass
from typing import Any

from controller import errors
from controller.errors import AutoDeployError
from controller.latency import bucket_of
from gateway.haproxy_config import ACTIVATOR, LOG_TAG

log = logging.getLogger("autodeploy.haproxy")

MAX_ANSWER = 16 * 1024 * 1024  # `show stat` of thousands of servers fits; anything beyond is a bug


@dataclass(frozen=True)
class Session:
    """One line of `show sess`: a client connection HAProxy is carrying."""
    ptr: str  # 0x...: what `show sess PTR` and `shutdown session PTR` take
    backend: str
    server: str
    age_s: float


_SESSION = re.compile(r"^(0x[0-9a-f]+): .*? be=(\S+) srv=(\S+) .*?\bage=(\S+)")
_AGE_PART = re.compile(r"(\d+)([dhms])")
_AGE_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_age(text: str) -> float:
    """HAProxy's human time: `2s`, `4m57s`, `1h3m`, `2d5h` (seconds)."""
    return float(sum(int(n) * _AGE_UNITS[u] for n, u in _AGE_PART.findall(text)))


def parse_sessions(text: str) -> list[Session]:
    out = []
    for line in text.splitlines():
        m = _SESSION.match(line.strip())
        if m:
            out.append(Session(m.group(1), m.group(2), m.group(3), parse_age(m.group(4))))
    return out


@dataclass(frozen=True)
class ServerStat:
    """One server row of `show stat`."""
    backend: str
    name: str
    status: str  # UP, DOWN, MAINT, DRAIN, "UP 1/2", "no check", ...
    weight: int
    scur: int  # requests in flight (sessions)
    qcur: int  # queued for it
    stot: int  # sessions since it was added
    lastsess: int  # seconds since the last session was assigned to it; -1: never
    hrsp_5xx: int
    sid: int  # server id (the stick table stores it)

    @property
    def admin_state(self) -> str:
        head = self.status.split(" ")[0]
        return head if head in ("MAINT", "DRAIN") else "READY"


def _int(value: str, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


class RuntimeApi:
    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout

    def command(self, cmd: str) -> str:
        """Send one command, return HAProxy's whole answer. Connection problems raise 1084."""
        if "\n" in cmd or ";" in cmd:
            raise ValueError(f"one command at a time: {cmd!r}")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(self.path)
                sock.sendall(cmd.encode() + b"\n")
                chunks, size = [], 0
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > MAX_ANSWER:
                        raise AutoDeployError(errors.DATA_PLANE_COMMAND_FAILED, f"{cmd}: answer over {MAX_ANSWER} bytes")
        except OSError as exc:
            raise AutoDeployError(errors.DATA_PLANE_UNAVAILABLE, f"HAProxy Runtime API at {self.path}: {exc}") from exc
        log.debug("haproxy> %s", cmd)
        return b"".join(chunks).decode(errors="replace")

    def alive(self) -> bool:
        try:
            return "Pid:" in self.command("show info")
        except AutoDeployError:
            return False

    def _ok(self, cmd: str, *accept: str) -> str:
        """Run a command whose success answer is empty or starts with one of `accept`."""
        answer = self.command(cmd).strip()
        if answer and not any(answer.startswith(a) for a in accept):
            raise AutoDeployError(errors.DATA_PLANE_COMMAND_FAILED, f"{cmd}: {answer}")
        return answer

    # ------------------------------------------------------------------ info
    def info(self) -> dict[str, str]:
        out = {}
        for line in self.command("show info").splitlines():
            key, sep, value = line.partition(":")
            if sep:
                out[key.strip()] = value.strip()
        return out

    def show_stat(self) -> list[ServerStat]:
        """Every server of every backend (frontends, backends and the activator left out)."""
        text = self.command("show stat -1 4 -1")
        if not text.startswith("# "):
            raise AutoDeployError(errors.DATA_PLANE_COMMAND_FAILED, f"show stat: {text.strip()[:200]}")
        rows = csv.DictReader(io.StringIO(text[2:]))
        out = []
        for row in rows:
            if not row.get("pxname") or row.get("svname") in ("FRONTEND", "BACKEND"):
                continue
            if row["pxname"] == ACTIVATOR:
                continue
            out.append(ServerStat(backend=row["pxname"], name=row["svname"], status=row.get("status", ""),
                                  weight=_int(row.get("weight", "")), scur=_int(row.get("scur", "")),
                                  qcur=_int(row.get("qcur", "")), stot=_int(row.get("stot", "")),
                                  lastsess=_int(row.get("lastsess", ""), -1),
                                  hrsp_5xx=_int(row.get("hrsp_5xx", "")), sid=_int(row.get("sid", ""))))
        return out

    def sessions(self) -> list[Session]:
        return parse_sessions(self.command("show sess"))

    def is_tunnel(self, ptr: str) -> bool:
        """The session's HTTP transaction became a tunnel (a WebSocket after its 101)."""
        return "req.st=MSG_TUNNEL" in self.command(f"show sess {ptr}")

    def shutdown_session(self, ptr: str) -> None:
        self._ok(f"shutdown session {ptr}")

    # ------------------------------------------------------------------ servers
    def add_server(self, backend: str, name: str, host: str, port: int, options: str) -> None:
        self._ok(f"add server {backend}/{name} {host}:{int(port)} {options}", "New server registered.")

    def enable_server(self, backend: str, name: str) -> None:
        self._ok(f"enable server {backend}/{name}")

    def enable_health(self, backend: str, name: str) -> None:
        self._ok(f"enable health {backend}/{name}")

    def set_state(self, backend: str, name: str, state: str) -> None:
        if state not in ("ready", "drain", "maint"):
            raise ValueError(state)
        self._ok(f"set server {backend}/{name} state {state}")

    def set_weight(self, backend: str, name: str, weight: int) -> None:
        self._ok(f"set server {backend}/{name} weight {int(weight)}")

    def del_server(self, backend: str, name: str) -> None:
        self._ok(f"del server {backend}/{name}", "Server deleted.")

    def server_ids(self, backend: str) -> dict[str, int]:
        """Server name -> id (what a stick table entry points at)."""
        out = {}
        for line in self.command(f"show servers state {backend}").splitlines():
            parts = line.split()
            if len(parts) > 4 and not line.startswith("#") and parts[1] == backend:
                out[parts[3]] = _int(parts[2])
        return out

    # ------------------------------------------------------------------ maps and tables
    def show_map(self, path: str) -> dict[str, str]:
        out = {}
        for line in self.command(f"show map {path}").splitlines():
            parts = line.split()
            if len(parts) == 3:
                out[parts[1]] = parts[2]
        return out

    def set_map(self, path: str, key: str, value: str, present: bool) -> None:
        """Add or change one entry; `present`: the key is already in the map."""
        if present:
            self._ok(f"set map {path} {key} {value}")
        else:
            self._ok(f"add map {path} {key} {value}")

    def del_map(self, path: str, key: str) -> None:
        self._ok(f"del map {path} {key}")

    def show_table(self, table: str) -> dict[str, int]:
        """Stick table key -> server id."""
        out = {}
        for line in self.command(f"show table {table}").splitlines():
            if "key=" not in line:
                continue
            fields = dict(p.split("=", 1) for p in line.split()[1:] if "=" in p)
            out[fields.get("key", "")] = _int(fields.get("server_id", ""))
        return out

    def set_table_server(self, table: str, key: str, server_id: int) -> None:
        self._ok(f"set table {table} key {key} data.server_id {int(server_id)}")

    def clear_table_key(self, table: str, key: str) -> None:
        self._ok(f"clear table {table} key {key}")


MAX_LOG_WEIGHT = 1_000_000  # a line's weight is a request rate over the sampling target: bounded


@dataclass
class _Sums:
    deployment: str
    n: int = 0
    e: int = 0

    def __post_init__(self) -> None:
        self.h: dict[int, int] = {}  # latency bucket (controller.latency) -> count


class RequestLog:
    """Reads HAProxy's request log from a Unix datagram socket, in a thread of its own."""

    def __init__(self, path: str, metrics: Any | None = None) -> None:
        """`metrics`: a gateway.metrics.GatewayMetrics that each logged request is also
        counted in, so /metrics sees warm traffic in haproxy mode as it does in python mode."""
        self.path = path
        self.metrics = metrics
        if os.path.exists(path):
            os.unlink(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(path)
        # Bursts of thousands of requests between two reads must not be dropped by the kernel.
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self._sock.settimeout(0.2)
        self._lock = threading.Lock()
        self._sums: dict[str, _Sums] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="haproxy-log")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            self.feed(data.decode(errors="replace"))

    def feed(self, line: str) -> None:
        """One log line: `AD1 <backend> <server> <status> <Ta ms> <termination> <weight>`; the
        weight (requests the line stands for, the log being sampled) is `-` or absent for 1."""
        parts = line.split()
        if len(parts) < 6 or parts[0] != LOG_TAG or not parts[1].startswith("be_") or parts[2].startswith("<"):
            return
        deployment, server = parts[1][3:], parts[2]
        status, total_ms = _int(parts[3], -1), _int(parts[4], -1)
        weight = max(1, min(MAX_LOG_WEIGHT, _int(parts[6], 1))) if len(parts) > 6 else 1
        failed = status < 0 or status >= 500 or parts[5][:1] in ("S", "s")  # S: the server side broke
        with self._lock:
            sums = self._sums.get(server)
            if sums is None:
                sums = self._sums[server] = _Sums(deployment)
            sums.n += weight
            sums.e += weight if failed else 0
            if total_ms >= 0:
                b = bucket_of(float(total_ms))
                sums.h[b] = sums.h.get(b, 0) + weight
        if self.metrics is not None:
            self.metrics.response(deployment, server, status if status >= 0 else None,
                                  total_ms / 1000.0 if total_ms >= 0 else None, weight)

    def take(self) -> dict[str, dict]:
        """What was logged since the last call, per instance: {"d", "n", "e", "h"}."""
        with self._lock:
            sums, self._sums = self._sums, {}
        return {iid: {"d": s.deployment, "n": s.n, "e": s.e, "h": s.h} for iid, s in sums.items()}

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(timeout=2)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
