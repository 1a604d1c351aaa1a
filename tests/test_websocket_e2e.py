"""WebSocket through the gateway, end to end, on both data planes: a real `autodeploy
serve`, a real WebSocket instance (deployments/models/ws_echo.py on the `websockets`
library) and the `websockets` client. In haproxy mode a handshake with no ready instance
(cold start) or with a route rule goes through the activator's tunnel, the others through
HAProxy's."""
from __future__ import annotations

import json
import os
import time
from contextlib import ExitStack

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from conftest import PY, ROOT, deployment_yaml

WS_ECHO = ROOT / "deployments" / "models" / "ws_echo.py"
TARGET = "Deploy-Route-Target"


def ws_yaml(name: str = "ws", idle: str = "5m", extra_spec: str = "", max_replicas: int = 2) -> str:
    return deployment_yaml(name, f"{PY} {WS_ECHO} --port ${{PORT}}", idle=idle, max_replicas=max_replicas,
                           extra_spec=extra_spec)


def ws_url(served, path: str) -> str:
    return served.url.replace("http://", "ws://") + path


def open_tunnels(served, stack: ExitStack, n: int) -> None:
    """n WebSockets to /d/ws/echo, each answered once, left open until `stack` closes."""
    for i in range(n):
        ws = stack.enter_context(connect(ws_url(served, "/d/ws/echo"), open_timeout=60))
        ws.send(f"open {i}")
        assert ws.recv(timeout=30) == f"open {i}"


def warm(served, name: str = "ws") -> None:
    """One plain request first, so the WebSocket under test meets a ready instance (in
    haproxy mode: HAProxy's tunnel, not the activator's)."""
    assert served.get(f"/d/{name}/health", timeout=60).status_code == 200
    served.wait_for(lambda: served.status(name)["status"] == "Running", what="instance ready")


def test_handshake_cold_starts_an_instance_then_100_messages_and_1mib_round_trip(serve, data_plane):
    s = serve({"ws.yaml": ws_yaml()})
    assert s.status("ws")["status"] == "Standby"
    with connect(ws_url(s, "/d/ws/echo"), open_timeout=60, max_size=None) as ws:
        assert ws.response.status_code == 101
        target = ws.response.headers[TARGET]
        assert [i["id"] for i in s.instances("ws")] == [target]
        for i in range(100):
            ws.send(f"message {i}")
        answers = [ws.recv(timeout=30) for _ in range(100)]
    assert answers == [f"message {i}" for i in range(100)]
    # Warm now: in haproxy mode this handshake and its tunnel are HAProxy's own.
    payload = os.urandom(1024 * 1024)
    with connect(ws_url(s, "/d/ws/echo"), open_timeout=60, max_size=None) as ws:
        assert ws.response.headers[TARGET] == target
        assert ws.response.headers["Deploy-Revision"] == "1"
        for i in range(100):
            ws.send(f"warm {i}")
        assert [ws.recv(timeout=30) for _ in range(100)] == [f"warm {i}" for i in range(100)]
        ws.send(payload)  # a 1 MiB binary message arrives whole, both ways
        assert ws.recv(timeout=60) == payload


def test_server_initiated_close_and_server_pushed_messages_reach_the_client(serve, data_plane):
    s = serve({"ws.yaml": ws_yaml()})
    warm(s)
    with connect(ws_url(s, "/d/ws/close?code=4001&reason=bye"), open_timeout=60) as ws:
        ws.send("last words")
        assert ws.recv(timeout=30) == "last words"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4001, "bye")
    with connect(ws_url(s, "/d/ws/push?n=5"), open_timeout=60) as ws:
        got = [ws.recv(timeout=30) for _ in range(5)]  # the client sends nothing
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
    assert got == [f"push {i}" for i in range(5)]
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000


def test_open_tunnel_blocks_idle_release_until_it_closes(serve, data_plane):
    s = serve({"ws.yaml": ws_yaml(idle="3s")})
    warm(s)
    with connect(ws_url(s, "/d/ws/echo"), open_timeout=60) as ws:
        target = ws.response.headers[TARGET]
        s.wait_for(lambda: s.instances("ws") and s.instances("ws")[0]["in_flight"] == 1, what="tunnel in flight")
        time.sleep(7.0)  # two idle timeouts with the tunnel open and silent
        instances = s.instances("ws")
        assert [(i["id"], i["state"]) for i in instances] == [(target, "ready")]
        assert "release" not in [e["kind"] for e in s.status("ws")["events"]]
        ws.send("still here")
        assert ws.recv(timeout=30) == "still here"
    s.wait_for(lambda: s.status("ws")["status"] == "Standby", timeout=30, what="release after the tunnel closed")


def test_a_rolling_update_drains_an_instance_with_an_open_tunnel_until_it_closes(serve, data_plane):
    """The old instance leaves the routing at once but is stopped only when its tunnel ends
    (bounded by tunnelTimeout): the WebSocket keeps working through the whole rollout."""
    s = serve({"ws.yaml": ws_yaml()})
    warm(s)
    with connect(ws_url(s, "/d/ws/echo"), open_timeout=60) as ws:
        old = ws.response.headers[TARGET]
        s.wait_for(lambda: s.instances("ws")[0]["in_flight"] == 1, what="tunnel in flight")
        (s.deployments / "ws.yaml").write_text(ws_yaml(extra_spec="env: {REVISION_MARK: '2'}"))
        s.wait_for(lambda: any(i["id"] != old and i["state"] == "ready" for i in s.instances("ws")),
                   timeout=60, what="the new revision's instance ready")
        s.wait_for(lambda: {i["id"]: i["state"] for i in s.instances("ws")}.get(old) == "draining",
                   what="the old instance draining")
        new = [i["id"] for i in s.instances("ws") if i["id"] != old]
        assert s.get("/d/ws/health").headers[TARGET] in new  # new requests avoid the draining one
        time.sleep(2.0)  # the drain waits on the open tunnel, not on a short fixed timer
        assert {i["id"]: i["state"] for i in s.instances("ws")}.get(old) == "draining"
        for n in range(3):
            ws.send(f"during the rollout {n}")
            assert ws.recv(timeout=30) == f"during the rollout {n}"
    s.wait_for(lambda: old not in [i["id"] for i in s.instances("ws")], timeout=30,
               what="the old instance stopped once its tunnel closed")
    kinds = [(e["kind"], e["instance"]) for e in s.get("/api/events?deployment=ws&limit=200").json()]
    assert ("failed", old) not in kinds


def test_open_tunnels_count_as_concurrency_and_scale_the_deployment_out(serve, data_plane):
    """targetConcurrency 2 and five silent WebSockets: the autoscaler sees five requests in
    flight (the gateway's count, or HAProxy's sessions) and runs ceil(5/2) = 3 instances."""
    autoscaling = "autoscaling: {enabled: true, targetConcurrency: 2, stableWindow: 6s, panicWindow: 2s}"
    s = serve({"ws.yaml": ws_yaml(max_replicas=3).replace("    idleTimeout: 5m\n", "    idleTimeout: 5m\n    "
                                                                                    + autoscaling + "\n")})
    warm(s)
    with ExitStack() as stack:
        open_tunnels(s, stack, 5)
        s.wait_for(lambda: sum(i["state"] == "ready" for i in s.instances("ws")) == 3, timeout=60,
                   what="scaled out to 3 on open tunnels")
        scaled = [e["message"] for e in s.status("ws")["events"] if e["kind"] == "autoscale"]
        assert any(" -> 3: " in m for m in scaled), scaled


def test_silent_tunnel_is_closed_after_tunnel_idle_timeout(serve, data_plane):
    s = serve({"ws.yaml": ws_yaml(extra_spec="tunnelTimeout: 1m\ntunnelIdleTimeout: 1s")})
    warm(s)
    with connect(ws_url(s, "/d/ws/echo"), open_timeout=60) as ws:
        ws.send("hello")
        assert ws.recv(timeout=30) == "hello"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)  # nothing more is sent: the gateway cuts the idle tunnel
    # Cut at the TCP level, nothing written after the tunnel: no close frame either way (a
    # stray HTTP answer on the socket would be a protocol error, close code 1002, sent).
    assert closed.value.rcvd is None and closed.value.sent is None
    s.wait_for(lambda: s.instances("ws")[0]["in_flight"] == 0, what="tunnel no longer in flight")


def test_busy_tunnel_is_closed_after_tunnel_timeout(serve, data_plane):
    s = serve({"ws.yaml": ws_yaml(extra_spec="tunnelTimeout: 3s\ntunnelIdleTimeout: 2s")})
    warm(s)
    sent = 0
    with connect(ws_url(s, "/d/ws/echo"), open_timeout=60) as ws:
        with pytest.raises(ConnectionClosed):
            for sent in range(1, 200):  # never silent for the idle timeout; 60 s at most
                ws.send(f"tick {sent}")
                assert ws.recv(timeout=30) == f"tick {sent}"
                time.sleep(0.3)
    assert sent < 199  # the gateway ended it (at 3 s), the loop did not run out
    s.wait_for(lambda: s.instances("ws")[0]["in_flight"] == 0, what="tunnel no longer in flight")


def test_route_rules_apply_to_the_handshake(serve, data_plane):
    s = serve({"ws.yaml": ws_yaml()})
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(s, "/d/ws/echo"), additional_headers={"Deploy-Route-Rule": "nosuchid"}, open_timeout=60)
    assert refused.value.response.status_code == 404
    assert json.loads(refused.value.response.body)["code"] == 1006
    with connect(ws_url(s, "/d/ws/whoami"), open_timeout=60) as first:
        target = first.response.headers[TARGET]
        assert json.loads(first.recv(timeout=30))["instance"] == target
    with connect(ws_url(s, "/d/ws/whoami"), additional_headers={"Deploy-Route-Rule": target},
                 open_timeout=60) as pinned:
        assert pinned.response.headers[TARGET] == target
        assert json.loads(pinned.recv(timeout=30))["instance"] == target


def test_grpc_deployment_answers_1070_in_python_mode(serve):
    grpc_echo = ROOT / "deployments" / "models" / "grpc_echo.py"
    s = serve({"g.yaml": deployment_yaml("g", f"{PY} {grpc_echo} --port ${{PORT}}", health=None,
                                         extra_spec="protocol: grpc")})
    r = s.post("/d/g/echo.Echo/Unary", data=b"hi", headers={"Content-Type": "application/grpc"})
    assert r.status_code == 501
    assert r.json()["code"] == 1070
    assert s.status("g")["status"] == "Standby"  # nothing was started for a request it cannot carry


def test_a_worker_full_of_tunnels_refuses_the_next_with_1071_and_still_answers_plain_requests(serve):
    """Python mode, one gevent worker with 8 connections: 6 tunnels (three quarters) may be
    open; the seventh handshake gets 503/1071 with Retry-After, plain requests still pass,
    and a closed tunnel frees its slot."""
    s = serve({"ws.yaml": ws_yaml()}, "--workers", "1", "--worker-connections", "8")
    warm(s)
    with ExitStack() as stack:
        open_tunnels(s, stack, 6)
        with pytest.raises(InvalidStatus) as refused:
            connect(ws_url(s, "/d/ws/echo"), open_timeout=30)
        assert refused.value.response.status_code == 503
        assert json.loads(refused.value.response.body)["code"] == 1071
        assert refused.value.response.headers["Retry-After"]
        assert s.get("/d/ws/health", timeout=10).status_code == 200
    with connect(ws_url(s, "/d/ws/echo"), open_timeout=30) as again:  # the slots came back
        again.send("back")
        assert again.recv(timeout=30) == "back"
