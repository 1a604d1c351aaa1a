"""The haproxy data plane's rendering for streaming protocols (WebSocket, h2c, gRPC):
pure functions, plus HAProxy's own check (`haproxy -c`) of what we render."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

from controller.contracts import RouteEntry
from gateway.haproxy_config import (WAKE_LUA, Backend, Health, Server, Settings, backend_of, render,
                                    server_options)
from gateway.haproxy_plane import find_haproxy

HAPROXY = find_haproxy()


def settings(tmp: Path, **kw) -> Settings:
    return Settings(bind_host="127.0.0.1", bind_port=18080, activator_host="127.0.0.1", activator_port=18081,
                    socket_path=str(tmp / "h.sock"), log_path=str(tmp / "log.sock"),
                    revision_map=str(tmp / "rev.map"), **kw)


def section(text: str, name: str) -> str:
    m = re.search(rf"^backend {name}\n(.*?)(?=^\S|\Z)", text, re.M | re.S)
    assert m, f"no backend {name} in:\n{text}"
    return m.group(1)


def frontend(text: str) -> str:
    return text.split("frontend gateway\n")[1].split("\nbackend")[0]


def test_snapshot_protocol_and_tunnel_idle_timeout_reach_the_backend():
    b = backend_of(RouteEntry.from_json({"protocol": "grpc", "tunnel_idle_timeout": 7.5, "request_timeout": 30}), "g")
    assert (b.protocol, b.tunnel_idle_timeout_s) == ("grpc", 7.5)
    assert (backend_of(RouteEntry(), "h").protocol, backend_of(RouteEntry(), "h").tunnel_idle_timeout_s) == ("http", 300.0)


def test_each_backend_bounds_its_websockets_with_its_own_tunnel_idle_timeout(tmp_path):
    text = render(settings(tmp_path), [Backend("a", tunnel_idle_timeout_s=2), Backend("b")])
    assert "timeout tunnel 2000ms" in section(text, "be_a")
    assert "timeout tunnel 300000ms" in section(text, "be_b")


def test_grpc_and_h2c_servers_are_spoken_to_over_h2c_and_http_ones_not():
    assert "proto h2" in server_options(Backend("g", protocol="grpc"), 100)
    assert "proto h2" in server_options(Backend("h", protocol="h2c"), 100)
    assert "proto h2" not in server_options(Backend("w"), 100)


def test_grpc_health_is_the_controllers_so_haproxy_only_checks_tcp(tmp_path):
    health = Health("/", 1, 0.5, 3)
    text = render(settings(tmp_path), [Backend("g", health=health, protocol="grpc"),
                                       Backend("w", health=Health("/health", 1, 0.5, 3))])
    assert "httpchk" not in section(text, "be_g") and "httpchk" in section(text, "be_w")
    assert "check inter 1000" in server_options(Backend("g", health=health, protocol="grpc"), 100)


def test_grpc_deployments_are_named_by_path_prefix_header_or_authority(tmp_path):
    front = frontend(render(settings(tmp_path), [Backend("g", protocol="grpc"), Backend("w")]))
    assert "set-var(txn.hdep) req.hdr(Deploy-Deployment)" in front
    assert "set-var(txn.hdep) req.hdr(host),field(1,:),field(1,.)" in front
    assert "use_backend be_g if { var(txn.dep) -m str g } { nbsrv(be_g) gt 0 }" in front
    assert "use_backend be_g if !{ path_beg /d/ } { var(txn.hdep) -m str g } { nbsrv(be_g) gt 0 }" in front
    assert "txn.hdep) -m str w" not in front  # HTTP deployments keep the fixed /d/<name>/ endpoint only


def test_h2c_and_grpc_cold_starts_are_held_by_the_wake_action_only_when_lua_is_loaded(tmp_path):
    lua = str(tmp_path / "wake.lua")
    text = render(settings(tmp_path, lua_path=lua), [Backend("g", protocol="grpc"), Backend("w")])
    assert f"lua-load {lua}" in text
    wakes = [line for line in frontend(text).splitlines() if "lua.autodeploy_wake" in line]
    assert len(wakes) == 2 and all(" be_g g 127.0.0.1 18081 " in w and "nbsrv(be_g) eq 0" in w for w in wakes)
    assert "lua" not in render(settings(tmp_path), [Backend("g", protocol="grpc")])


def test_rendered_streaming_config_passes_haproxys_own_check(tmp_path):
    assert HAPROXY, "haproxy must be installed (apt-get install haproxy); CI installs it"
    (tmp_path / "rev.map").write_text("")
    (tmp_path / "wake.lua").write_text(WAKE_LUA)
    backends = [Backend("g", health=Health("/", 1, 0.5, 3), protocol="grpc", tunnel_idle_timeout_s=5),
                Backend("h", protocol="h2c"), Backend("w", tunnel_idle_timeout_s=60)]
    servers = {"g": [Server("abcdefgh", "127.0.0.1", 9, 100, "1")], "h": [Server("ijklmnop", "127.0.0.1", 10)]}
    cfg = tmp_path / "h.cfg"
    cfg.write_text(render(settings(tmp_path, lua_path=str(tmp_path / "wake.lua")), backends, servers))
    res = subprocess.run([HAPROXY, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "proto h2" in section(cfg.read_text(), "be_g")


SHOW_SESS = """\
0x560b2c3dd370: proto=tcpv4 src=127.0.0.1:45666 fe=gateway be=be_ws srv=grmfdkui ts=00 epoch=0 age=4m57s calls=3 \
rate=0 cpu=0 lat=0 rq[f=8848202h,i=0,an=00h,rx=4m57s,wx=,ax=] rp[f=88048202h,i=0,an=00h,rx=4m57s,wx=,ax=] \
scf=[8,0h,fd=12] scb=[8,11h,fd=14] exp=2s rc=0 c_exp=
0x560b2c3dd999: proto=tcpv4 src=127.0.0.1:45667 fe=gateway be=be_g srv=abcdefgh ts=00 epoch=0 age=1h2m calls=3 \
rate=0 cpu=0 lat=0 rq[f=8848202h,i=0,an=00h,rx=,wx=,ax=] rp[f=88048202h,i=0,an=00h,rx=,wx=,ax=] exp= rc=0 c_exp=
0x560b2c2ee8f0: proto=unix_stream src=unix:1 fe=GLOBAL be=<NONE> srv=<none> ts=00 epoch=0 age=0s calls=1 rate=0 \
cpu=0 lat=0 rq[f=c08000h,i=0,an=00h,rx=,wx=,ax=] rp[f=80008002h,i=0,an=00h,rx=,wx=,ax=] exp= rc=0 c_exp=
"""


def test_show_sess_lines_parse_into_backend_server_and_age():
    from gateway.haproxy_runtime import Session, parse_age, parse_sessions
    assert [parse_age(t) for t in ("0s", "2s", "4m57s", "1h2m", "2d5h")] == [0, 2, 297, 3720, 190800]
    assert parse_sessions(SHOW_SESS) == [Session("0x560b2c3dd370", "be_ws", "grmfdkui", 297.0),
                                         Session("0x560b2c3dd999", "be_g", "abcdefgh", 3720.0),
                                         Session("0x560b2c2ee8f0", "<NONE>", "<none>", 0.0)]


def test_only_sessions_past_their_deployments_tunnel_timeout_are_checked():
    from gateway.haproxy_config import tunnels_to_check
    from gateway.haproxy_runtime import parse_sessions
    sessions = parse_sessions(SHOW_SESS)
    backends = [Backend("ws", tunnel_timeout_s=60), Backend("g", tunnel_timeout_s=7200)]
    assert [s.ptr for s in tunnels_to_check(sessions, backends)] == ["0x560b2c3dd370"]
    assert tunnels_to_check(sessions, [Backend("ws", tunnel_timeout_s=297)])[0].server == "grmfdkui"
    assert tunnels_to_check(sessions, [Backend("ws", tunnel_timeout_s=298)]) == []
