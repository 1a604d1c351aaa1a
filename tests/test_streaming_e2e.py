"""Server-sent events stay unbuffered, and gRPC instances are checked with the gRPC
health protocol: real `autodeploy serve`, real instances, real clients."""
from __future__ import annotations

import json
import uuid

import grpc
import requests

from conftest import PY, ROOT, deployment_yaml

GRPC_ECHO = ROOT / "deployments" / "models" / "grpc_echo.py"
TARGET = "Deploy-Route-Target"


def test_each_server_sent_event_reaches_the_client_before_the_next_is_sent(serve, data_plane):
    """Lockstep: the instance sends event i+1 only after the client, having read event i
    through the gateway, acknowledged it (10 s at most). A gateway that held events back
    would leave them unacknowledged, and the next event says so."""
    s = serve({"hello.yaml": deployment_yaml("hello")})
    assert s.get("/d/hello/health", timeout=60).status_code == 200  # warm: haproxy mode streams itself
    s.wait_for(lambda: s.status("hello")["status"] == "Running", what="instance ready")
    token = uuid.uuid4().hex
    events = []
    with requests.get(s.url + f"/d/hello/stream?n=6&lockstep={token}", stream=True, timeout=60) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        target = r.headers[TARGET]
        for line in r.iter_lines(chunk_size=1):
            if not line:
                continue
            event = json.loads(line.removeprefix(b"data: "))
            events.append(event)
            ack = s.get(f"/d/hello/admin/ack?token={token}&i={event['i']}", headers={"Deploy-Route-Rule": target})
            assert ack.status_code == 200
    assert [e["i"] for e in events] == list(range(6))
    assert all(e["prev_acked"] for e in events)


def grpc_yaml(name: str = "g", health: str | None = "/", min_replicas: int = 1, interval: int = 1) -> str:
    text = deployment_yaml(name, f"{PY} {GRPC_ECHO} --port ${{PORT}}", min_replicas=min_replicas, health=None,
                           extra_spec="protocol: grpc")
    if health:
        text += (f"  loadBalancer:\n    healthCheck: {{path: '{health}', intervalSeconds: {interval}, "
                 "timeoutSeconds: 0.5, failureThreshold: 100}\n")
    return text


def test_grpc_instance_is_ready_by_the_health_protocol_and_its_failing_check_takes_it_out_of_routing(serve):
    s = serve({"g.yaml": grpc_yaml()})
    s.wait_for(lambda: s.status("g")["status"] == "Running", timeout=60, what="gRPC instance ready")
    inst = s.instances("g")[0]
    ready_event = next(e for e in s.status("g")["events"] if e["kind"] == "ready")
    assert ready_event["instance"] == inst["id"]
    with grpc.insecure_channel(f"127.0.0.1:{inst['port']}") as channel:
        assert channel.unary_unary("/echo.Echo/SetHealth")(b"NOT_SERVING", timeout=10) == b"NOT_SERVING"
        s.wait_for(lambda: not s.instances("g")[0]["healthy"], timeout=30, what="unhealthy by gRPC health")
        event = next(e for e in s.status("g")["events"] if e["kind"] == "unhealthy")
        assert "gRPC health Check('')" in event["message"] and "NOT_SERVING" in event["message"]
        channel.unary_unary("/echo.Echo/SetHealth")(b"SERVING", timeout=10)
        s.wait_for(lambda: s.instances("g")[0]["healthy"], timeout=30, what="healthy again")
    assert [i["id"] for i in s.instances("g")] == [inst["id"]]  # same instance, back in routing
