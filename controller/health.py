"""Readiness and health probes against an instance's address (same for every driver)."""
from __future__ import annotations

import http.client
import socket


def port_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_status(host: str, port: int, path: str, timeout: float) -> int | None:
    """The status of GET path, or None when nothing answered over HTTP."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": "autodeploy-health"})
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def http_ok(host: str, port: int, path: str, timeout: float) -> bool:
    """True when GET path answers 2xx."""
    status = http_status(host, port, path, timeout)
    return status is not None and 200 <= status < 300


def is_ready(host: str, port: int, health_path: str | None, timeout: float = 1.0,
             tcp_is_enough: bool = True) -> bool:
    """Ready = the health path answers 2xx; without one, the port accepts (or, behind a
    port proxy, any HTTP answer at all)."""
    if health_path:
        return http_ok(host, port, health_path, timeout)
    if tcp_is_enough:
        return port_accepts(host, port, timeout)
    return http_status(host, port, "/", timeout) is not None


def listener_problem(driver: object, inst: object) -> str | None:
    """Readiness proof: the answer must come from the instance itself. A driver that can
    tell who holds the port (`owns_listener`, the local driver) is asked; a port held by
    someone else (the gateway itself, when a command that ignores ${PORT} has the
    gateway's port as spec.port) makes the start fail with what to change."""
    owns = getattr(driver, "owns_listener", None)
    if owns is None or owns(inst) is not False:
        return None
    port = getattr(inst, "port", "?")
    return (f"port {port} answers, but no process of the instance listens there: another program holds it "
            f"(the gateway itself, when spec.port is the gateway's port); use ${{PORT}} in spec.command "
            "so that the instance gets a free port of its own")
