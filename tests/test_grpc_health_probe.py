"""The gRPC health probe (controller/health.py) against real grpcio servers in this process."""
from __future__ import annotations

import sys
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health_pb2

from conftest import ROOT
from conftest import free_port
from controller.health import (decode_health_status, encode_health_request, grpc_health, grpc_service,
                               is_ready)
from controller.health_checker import probe

sys.path.insert(0, str(ROOT / "deployments" / "models"))
import grpc_echo  # noqa: E402


@pytest.fixture
def echo():
    server, port = grpc_echo.build(0)
    server.start()
    yield port
    server.stop(0)


@pytest.mark.parametrize("service", ["", "echo.Echo", "x" * 300])
def test_health_request_encoding_equals_protobuf(service):
    assert encode_health_request(service) == health_pb2.HealthCheckRequest(service=service).SerializeToString()


@pytest.mark.parametrize("status", [0, 1, 2, 3])
def test_health_status_decoding_equals_protobuf(status):
    assert decode_health_status(health_pb2.HealthCheckResponse(status=status).SerializeToString()) == status


def test_health_path_names_the_service():
    assert (grpc_service(None), grpc_service("/"), grpc_service("/echo.Echo")) == ("", "", "echo.Echo")


def test_serving_then_not_serving_then_serving_again(echo):
    assert grpc_health("127.0.0.1", echo, "", 2.0) == (True, "gRPC health SERVING")
    with grpc.insecure_channel(f"127.0.0.1:{echo}") as channel:
        channel.unary_unary("/echo.Echo/SetHealth")(b"NOT_SERVING", timeout=5)
        assert grpc_health("127.0.0.1", echo, "", 2.0) == (False, "gRPC health NOT_SERVING")
        assert probe("127.0.0.1", echo, "/", 2.0, protocol="grpc").ok is False
        assert not is_ready("127.0.0.1", echo, "/", protocol="grpc")
        channel.unary_unary("/echo.Echo/SetHealth")(b"SERVING", timeout=5)
    assert probe("127.0.0.1", echo, "/", 2.0, protocol="grpc").ok is True
    assert is_ready("127.0.0.1", echo, "/", protocol="grpc")


def test_unknown_service_is_unhealthy_with_the_grpc_code(echo):
    ok, detail = grpc_health("127.0.0.1", echo, "no.Such", 2.0)
    assert ok is False and detail.startswith("gRPC NOT_FOUND")


def test_server_without_health_service_is_ready_only_when_no_check_is_configured():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        assert grpc_health("127.0.0.1", port, "", 2.0)[0] is None  # UNIMPLEMENTED
        assert is_ready("127.0.0.1", port, None, protocol="grpc")
        assert not is_ready("127.0.0.1", port, "/", protocol="grpc")
    finally:
        server.stop(0)


def test_nothing_listening_is_not_ready_and_says_why():
    port = free_port()
    result = probe("127.0.0.1", port, "/", 1.0, protocol="grpc")
    assert result.ok is False and "UNAVAILABLE" in result.detail
    assert not is_ready("127.0.0.1", port, None, protocol="grpc")
