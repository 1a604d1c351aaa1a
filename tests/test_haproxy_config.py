"""The HAProxy config rendering and the data plane choice: pure functions, plus HAProxy's
own check (`haproxy -c`) of what we render."""
from __future__ import annotations

import json
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from controller import errors
from controller.contracts import Address, RouteEntry, Split
from controller.errors import AutoDeployError
from gateway.haproxy_config import (BASE_WEIGHT, Backend, Health, Server, Settings, backend_of, render,
                                    server_options, server_weights)
from gateway.haproxy_plane import choose_data_plane, find_haproxy
from conftest import accepts, wait_until

HAPROXY = find_haproxy()


def settings(tmp: Path, **kw) -> Settings:
    return Settings(bind_host="127.0.0.1", bind_port=18080, activator_host="127.0.0.1", activator_port=18081,
                    socket_path=str(tmp / "h.sock"), log_path=str(tmp / "log.sock"),
                    revision_map=str(tmp / "rev.map"), **kw)


def section(text: str, name: str) -> str:
    m = re.search(rf"^backend {name}\n(.*?)(?=^\S|\Z)", text, re.M | re.S)
    assert m, f"no backend {name} in:\n{text}"
    return m.group(1)


def test_algorithms_map_onto_haproxy_balance_modes(tmp_path):
    text = render(settings(tmp_path), [Backend("rr"), Backend("lc", "least-connections"), Backend("ih", "ip-hash")])
    assert "balance roundrobin" in section(text, "be_rr")
    assert "balance leastconn" in section(text, "be_lc")
    ih = section(text, "be_ih")
    assert "balance source" in ih and "hash-type consistent" in ih


def test_ip_hash_behind_trusted_proxies_hashes_the_address_they_vouch_for(tmp_path):
    text = render(settings(tmp_path, trusted_proxies=("10.0.0.0/8",)), [Backend("ih", "ip-hash")])
    assert "balance hash var(txn.client)" in section(text, "be_ih")
    assert "req.hdr_ip(X-Forwarded-For,-1) if { var(txn.client) -m ip 10.0.0.0/8 }" in text


def test_sticky_sessions_use_a_stick_table_keyed_on_our_cookie_not_server_cookies(tmp_path):
    text = render(settings(tmp_path), [Backend("s", sticky=True)])
    be = section(text, "be_s")
    assert "stick match req.cook(autodeploy-s)" in be and "stick-table type string" in be
    assert " cookie " not in be  # dynamic servers refuse the cookie option (DESIGN.md)
    assert 'Set-Cookie "autodeploy-s=%s; Path=/d/s' in be


def test_each_deployment_falls_back_to_the_activator_and_route_rules_always_go_there(tmp_path):
    text = render(settings(tmp_path), [Backend("a"), Backend("b")])
    front = text.split("frontend gateway\n")[1].split("\nbackend")[0]
    assert "use_backend activator if { req.hdr(Deploy-Route-Rule) -m found }" in front
    assert "use_backend be_a if { var(txn.dep) -m str a } { nbsrv(be_a) gt 0 }" in front
    assert "default_backend activator" in front
    assert front.index("Deploy-Route-Rule") < front.index("use_backend be_a")


def test_timeouts_come_from_the_spec_with_a_300_s_default(tmp_path):
    dep = RouteEntry(algorithm="round-robin", ready=(), health=None)
    assert backend_of(dep, "a").request_timeout_s == 300.0
    b = backend_of(replace(dep, request_timeout=12.5), "b")
    text = render(settings(tmp_path), [b])
    assert "timeout server 12500ms" in section(text, "be_b")
    assert "timeout http-request 10000ms" in text and "option http-no-delay" in text


def test_health_check_and_passive_ejection_go_on_every_server(tmp_path):
    b = Backend("h", health=Health("/health", 10, 2, 3))
    assert "option httpchk" in render(settings(tmp_path), [b])
    opts = server_options(b, 100)
    assert "check inter 10000 fall 3" in opts and "observe layer7" in opts and "on-error mark-down" in opts


def test_haproxy_errors_are_the_projects_coded_json(tmp_path):
    text = render(settings(tmp_path), [])
    bodies = dict(re.findall(r"http-error status (\d+) content-type application/json string '(.*)'", text))
    assert set(bodies) >= {"400", "408", "502", "503", "504"}
    for status, body in bodies.items():
        data = json.loads(body)
        assert errors.BY_CODE[data["code"]].http_status == int(status)
        assert data["msg"].startswith(errors.BY_CODE[data["code"]].msg)


def test_canary_split_becomes_server_weights():
    ready = (Address("new1", "h", 1, 2), Address("old1", "h", 2, 1), Address("old2", "h", 3, 1))

    def split(new: float, old: float) -> RouteEntry:
        return RouteEntry(ready=ready, split=Split(slot=0, new_revision=2, new_weight=new, old_weight=old))
    assert server_weights(RouteEntry(ready=ready)) == {"new1": BASE_WEIGHT, "old1": BASE_WEIGHT, "old2": BASE_WEIGHT}
    w = server_weights(split(10, 90))
    share = w["new1"] / (w["new1"] + w["old1"] + w["old2"])
    assert 0.08 < share < 0.12
    # blue-green before its switch: the new side gets nothing; after it, the old side nothing
    assert server_weights(split(0, 100))["new1"] == 0
    after = server_weights(split(100, 0))
    assert after["old1"] == after["old2"] == 0 and after["new1"] > 0


@pytest.mark.parametrize("requested,version,expected", [
    (None, (2, 6), "haproxy"), (None, (2, 4), "python"), (None, None, "python"),
    ("python", (2, 6), "python"), ("haproxy", (2, 8), "haproxy")])
def test_data_plane_defaults_to_haproxy_when_2_6_or_newer_is_installed(requested, version, expected):
    name, why = choose_data_plane(requested, version, "/usr/sbin/haproxy" if version else None)
    assert name == expected and why


def test_asking_for_haproxy_without_it_is_a_coded_error():
    with pytest.raises(AutoDeployError) as exc:
        choose_data_plane("haproxy", None, None)
    assert exc.value.error == errors.DATA_PLANE_UNAVAILABLE


def test_rendered_config_with_every_feature_passes_haproxys_own_check(tmp_path):
    assert HAPROXY, "haproxy must be installed (apt-get install haproxy); CI installs it"
    (tmp_path / "rev.map").write_text("")
    backends = [Backend("rr", health=Health("/health", 10, 2, 3), request_timeout_s=30),
                Backend("lc", "least-connections"), Backend("ih", "ip-hash", sticky=True)]
    servers = {"rr": [Server("abcdefgh", "127.0.0.1", 9, 100, "3")], "ih": [Server("ijklmnop", "127.0.0.1", 10, 0, "1")]}
    cfg = tmp_path / "h.cfg"
    cfg.write_text(render(settings(tmp_path, trusted_proxies=("10.0.0.0/8", "192.168.1.1")), backends, servers))
    res = subprocess.run([HAPROXY, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_request_log_is_sampled_per_deployment_above_its_line_rate_and_errors_always_logged(tmp_path):
    text = render(settings(tmp_path, log_lines_per_s=50), [Backend("a"), Backend("b")])
    assert 'log-format "AD1 %b %s %ST %Ta %tsc %[var(txn.logw)]"' in text  # the weight rides on each line
    for name in ("a", "b"):
        be = section(text, f"be_{name}")
        # k = ceil(this backend's requests per second / 50), for responses under 500 only
        assert "http-response set-var(txn.logw) be_sess_rate,add(49),div(50) if { status lt 500 }" in be
        assert ("http-response set-log-level silent if { var(txn.logw) -m int gt 1 } "
                "!{ rand(1000000),mod(txn.logw) eq 0 }") in be
    assert "set-var(txn.logw)" not in render(replace(settings(tmp_path), log_path=""), [Backend("a")])  # no log


def test_a_second_haproxy_on_the_same_port_fails_instead_of_sharing_its_connections(tmp_path):
    """Without `noreuseport` HAProxy binds with SO_REUSEPORT, and a second one on the same
    port would silently take a share of the first one's clients."""
    from conftest import free_port
    port = free_port()
    procs = []
    try:
        for name in ("a", "b"):
            d = tmp_path / name
            d.mkdir()
            (d / "rev.map").write_text("")
            cfg = d / "h.cfg"
            cfg.write_text(render(replace(settings(d), bind_port=port, log_path=""), [Backend("x")]))
            procs.append(subprocess.Popen([HAPROXY, "-f", str(cfg)], stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
            if name == "a":
                wait_until(lambda: accepts(port), "the first HAProxy listening", 10)
        out, _ = procs[1].communicate(timeout=30)
        assert procs[1].returncode != 0 and "Address already in use" in out, out
        assert procs[0].poll() is None
    finally:
        for p in procs:
            p.kill()
            p.wait()

