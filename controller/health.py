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


def http_ok(host: str, port: int, path: str, timeout: float) -> bool:
    """True when GET path answers 2xx."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": "autodeploy-health"})
        return 200 <= conn.getresponse().status < 300
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def is_ready(host: str, port: int, health_path: str | None, timeout: float = 1.0) -> bool:
    if health_path:
        return http_ok(host, port, health_path, timeout)
    return port_accepts(host, port, timeout)
