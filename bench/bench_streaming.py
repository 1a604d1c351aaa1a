#!/usr/bin/env python3
"""Streaming protocols through the gateway, each side by side with its reference in one run.

  1. WebSocket: messages/s over one connection, echoed one at a time (round trips) and
     pipelined (a window of 64 in flight), direct to the instance vs through the python
     data plane vs through the haproxy data plane
  2. gRPC: unary calls/s on one channel, direct vs through the gateway (haproxy data
     plane; the python data plane does not carry HTTP/2)

Run: .venv/bin/python bench/bench_streaming.py [--seconds 3]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import time
from pathlib import Path

import grpc
from websockets.sync.client import connect

from common import PY, ROOT, Serve, deployment, free_port, wait_http

WS_ECHO = ROOT / "deployments" / "models" / "ws_echo.py"
GRPC_ECHO = ROOT / "deployments" / "models" / "grpc_echo.py"
MESSAGE = b"x" * 100
WINDOW = 64


def ws_round_trips(url: str, seconds: float) -> float:
    with connect(url, open_timeout=60, max_size=None) as ws:
        for _ in range(50):  # warm
            ws.send(MESSAGE)
            ws.recv(timeout=30)
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            ws.send(MESSAGE)
            ws.recv(timeout=30)
            done += 1
        return done / (time.perf_counter() - start)


def ws_pipelined(url: str, seconds: float) -> float:
    with connect(url, open_timeout=60, max_size=None) as ws:
        sent = received = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            while sent - received < WINDOW:
                ws.send(MESSAGE)
                sent += 1
            ws.recv(timeout=30)
            received += 1
        elapsed = time.perf_counter() - start
        while received < sent:
            ws.recv(timeout=30)
            received += 1
        return received / elapsed


def grpc_unary(target: str, seconds: float, method: str = "/echo.Echo/Unary", metadata=()) -> float:
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(method)
        for _ in range(50):  # warm (and, through the gateway, wait out the cold start)
            call(MESSAGE, metadata=metadata, timeout=60)
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            call(MESSAGE, metadata=metadata, timeout=30)
            done += 1
        return done / (time.perf_counter() - start)


def spawn(script: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen([PY, str(script), "--port", str(port)], env=dict(os.environ, PORT=str(port)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    t = args.seconds

    ws_port, grpc_port = free_port(), free_port()
    ws_direct, grpc_direct = spawn(WS_ECHO, ws_port), spawn(GRPC_ECHO, grpc_port)
    ws_yaml = deployment("ws", f"{PY} {WS_ECHO} --port ${{PORT}}",
                         extra="  loadBalancer: {healthCheck: {path: /health}}\n")
    grpc_yaml = deployment("g", f"{PY} {GRPC_ECHO} --port ${{PORT}}", extra="  protocol: grpc\n")
    planes = {name: Serve({"ws.yaml": ws_yaml, "g.yaml": grpc_yaml}, "--data-plane", name)
              for name in ("python", "haproxy")}
    try:
        wait_http(f"http://127.0.0.1:{ws_port}/health")
        rows = {"round trips": ws_round_trips, f"pipelined ({WINDOW} in flight)": ws_pipelined}
        print(f"WebSocket, one connection, {len(MESSAGE)}-byte messages, {t:g} s each")
        print(f"{'messages/s':32}{'direct':>10}{'python':>10}{'haproxy':>10}{'py/direct':>11}{'hap/direct':>11}")
        for label, fn in rows.items():
            direct = fn(f"ws://127.0.0.1:{ws_port}/echo", t)
            python = fn(planes["python"].url.replace("http", "ws") + "/d/ws/echo", t)
            haproxy = fn(planes["haproxy"].url.replace("http", "ws") + "/d/ws/echo", t)
            print(f"  {label:30}{direct:10.0f}{python:10.0f}{haproxy:10.0f}{python / direct:10.2f}x"
                  f"{haproxy / direct:10.2f}x")
        print()
        direct = grpc_unary(f"127.0.0.1:{grpc_port}", t)
        gateway = planes["haproxy"].url.removeprefix("http://")
        by_path = grpc_unary(gateway, t, method="/d/g/echo.Echo/Unary")
        by_header = grpc_unary(gateway, t, metadata=[("deploy-deployment", "g")])
        print(f"gRPC unary calls/s, one channel, {t:g} s each")
        print(f"{'':32}{'direct':>10}{'gateway':>10}{'ratio':>11}")
        print(f"  {'by path /d/g/...':30}{direct:10.0f}{by_path:10.0f}{by_path / direct:10.2f}x")
        print(f"  {'by Deploy-Deployment header':30}{direct:10.0f}{by_header:10.0f}{by_header / direct:10.2f}x")
    finally:
        for s in planes.values():
            s.close()
        for p in (ws_direct, grpc_direct):
            p.terminate()
            p.wait(timeout=10)


if __name__ == "__main__":
    main()
