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


# gRPC health protocol (grpc.health.v1), spoken with grpcio's generic calls: the two
# messages are one string and one enum, so they are encoded here and the controller needs
# no generated protobuf code.
GRPC_HEALTH_CHECK = "/grpc.health.v1.Health/Check"
SERVING_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def grpc_service(health_path: str | None) -> str:
    """The service a gRPC health check asks about: healthCheck.path without its slash
    ("/" or none: the whole server, "")."""
    return (health_path or "/").lstrip("/")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def encode_health_request(service: str) -> bytes:
    """HealthCheckRequest{service = 1}; the empty string is the default, sent as nothing."""
    data = service.encode()
    return b"\x0a" + _varint(len(data)) + data if data else b""


def decode_health_status(reply: bytes) -> int:
    """HealthCheckResponse.status (field 1, a varint); absent means 0, UNKNOWN."""
    i, status = 0, 0
    while i < len(reply):
        tag = reply[i]
        i += 1
        if tag & 7 != 0:  # only varints are expected; anything else ends the parse
            break
        value, shift = 0, 0
        while i < len(reply):
            b = reply[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        if tag >> 3 == 1:
            status = value
    return status


def grpc_health(host: str, port: int, service: str, timeout: float) -> tuple[bool | None, str]:
    """One grpc.health.v1.Health/Check over h2c: (True, "SERVING"), (False, why), or
    (None, ...) when the server answers gRPC but has no health service (UNIMPLEMENTED)."""
    import grpc  # only deployments with protocol: grpc pay for loading it

    with grpc.insecure_channel(f"{host}:{port}", options=[("grpc.enable_retries", 0)]) as channel:
        check = channel.unary_unary(GRPC_HEALTH_CHECK)
        try:
            reply = check(encode_health_request(service), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            detail = f"gRPC {code.name}: {exc.details()}"  # type: ignore[attr-defined]
            return (None if code == grpc.StatusCode.UNIMPLEMENTED else False), detail
    status = decode_health_status(reply)
    return status == 1, f"gRPC health {SERVING_STATUS.get(status, status)}"


def is_ready(host: str, port: int, health_path: str | None, timeout: float = 1.0,
             tcp_is_enough: bool = True, protocol: str = "http") -> bool:
    """Ready = the health path answers 2xx; without one, the port accepts (or, behind a
    port proxy, any HTTP answer at all). gRPC instances: the gRPC health service answers
    SERVING; without a healthCheck, a server with no health service is ready once it
    answers gRPC at all."""
    if protocol == "grpc":
        serving, _ = grpc_health(host, port, grpc_service(health_path), timeout)
        return bool(serving) or (serving is None and not health_path)
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
