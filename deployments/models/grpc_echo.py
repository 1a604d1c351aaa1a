#!/usr/bin/env python3
"""A gRPC model stand-in (Triton-style servers speak gRPC over HTTP/2), on grpcio.

Messages are raw bytes (no .proto to compile): a client calls the methods with no
serializer, e.g. `channel.unary_unary("/echo.Echo/Unary")(b"hi")`.

  /echo.Echo/Unary          answers the request bytes, with metadata instance=<id>
  /echo.Echo/ServerStream   request b"N": N answers b"0" .. b"N-1"
  /echo.Echo/Fail           status INVALID_ARGUMENT, details "bad on purpose",
                            trailing metadata fail-reason=on-purpose
  /echo.Echo/SetHealth      request b"SERVING" or b"NOT_SERVING": the health service's answer
  grpc.health.v1.Health     the standard health service (grpcio-health-checking), service ""
"""
from __future__ import annotations

import argparse
import os
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

INSTANCE = os.environ.get("AUTODEPLOY_INSTANCE_ID", "local")
STATUS = health_pb2.HealthCheckResponse


def build(port: int, host: str = "127.0.0.1") -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    checks = health.HealthServicer()
    checks.set("", STATUS.SERVING)

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.send_initial_metadata((("instance", INSTANCE),))
        return request

    def server_stream(request: bytes, context: grpc.ServicerContext):  # type: ignore[no-untyped-def]
        for i in range(int(request or b"3")):
            yield str(i).encode()

    def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.set_trailing_metadata((("fail-reason", "on-purpose"),))
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad on purpose")
        raise AssertionError("abort returns only by raising")

    def set_health(request: bytes, context: grpc.ServicerContext) -> bytes:
        checks.set("", STATUS.SERVING if request == b"SERVING" else STATUS.NOT_SERVING)
        return request

    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "SetHealth": grpc.unary_unary_rpc_method_handler(set_health),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("echo.Echo", handlers),))
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    return server, bound


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8080)))
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    server, port = build(args.port, args.host)
    server.start()
    print(f"grpc echo {INSTANCE} listening on {args.host}:{port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
