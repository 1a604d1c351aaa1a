"""`autodeploy serve --data-plane haproxy` end to end: HAProxy carries warm traffic, the
Flask gateway only cold starts and the API; the data plane outlives a SIGKILLed serve,
is adopted by the next one and stops with SIGTERM."""
from __future__ import annotations

import signal

import psutil

from conftest import deployment_yaml
from controller.errors import AutoDeployError
from gateway.haproxy_plane import running_master, runtime_dir
from gateway.haproxy_runtime import RuntimeApi

TARGET = "Deploy-Route-Target"


def _api(s) -> RuntimeApi:
    return RuntimeApi(str(runtime_dir(s.state_dir) / "haproxy.sock"))  # short path when the state dir is deep


def _master(s) -> int | None:
    return running_master(s.state_dir)  # None while none runs or its pid file is being written


def _restarted_with(s, old: int, iid: str) -> bool:
    """A new master runs and its runtime API already lists the instance's server."""
    master = _master(s)
    if master is None or master == old:
        return False
    try:
        return any(st.name == iid for st in _api(s).show_stat())
    except AutoDeployError:  # 1084: the new master's socket is not listening yet
        return False


def _served_by_haproxy(s, iid: str) -> int:
    return sum(st.stot for st in _api(s).show_stat() if st.name == iid)


def test_warm_requests_go_through_haproxy_and_only_the_cold_one_through_the_activator(serve):
    s = serve({"hello.yaml": deployment_yaml("hello")}, "--data-plane", "haproxy")
    assert "data plane haproxy" in s.log()
    # HAProxy starts with the deployments' backends already in its config: never an empty
    # config reloaded a moment later, which would send the first requests to the activator.
    assert "with 1 backend(s)" in s.log()
    iid = s.get("/d/hello/whoami").headers[TARGET]  # cold: held by the activator
    s.wait_for(lambda: any(st.name == iid for st in _api(s).show_stat()), what="server added to HAProxy")
    for _ in range(10):
        r = s.get("/d/hello/whoami")
        assert r.status_code == 200 and r.headers[TARGET] == iid and r.headers["Deploy-Revision"] == "1"
    assert _served_by_haproxy(s, iid) == 10
    assert "HAProxy reloaded" not in s.log()
    # the status API keeps its fields: requests counted from HAProxy's log and stats
    s.wait_for(lambda: s.status("hello")["metrics"]["requests"] >= 11, what="requests in the status API")
    assert s.instances("hello")[0]["requests_served"] >= 10


def test_data_plane_outlives_a_sigkilled_serve_and_the_next_serve_adopts_it(serve):
    files = {"hello.yaml": deployment_yaml("hello")}
    s = serve(files, "--data-plane", "haproxy")
    iid = s.get("/d/hello/whoami").headers[TARGET]
    s.wait_for(lambda: any(st.name == iid for st in _api(s).show_stat()), what="server added to HAProxy")
    master = _master(s)
    s.terminate(signal.SIGKILL)
    for _ in range(5):  # warm traffic needs no controller
        r = s.get("/d/hello/whoami")
        assert r.status_code == 200 and r.headers[TARGET] == iid
    s2 = serve(files, "--data-plane", "haproxy", state_dir=s.state_dir, port=int(s.url.rsplit(":", 1)[1]))
    # The adopted HAProxy answers on the port before the new serve has booted its data plane.
    s2.wait_for(lambda: "adopted the running HAProxy" in s2.log(), what="the data plane adopted")
    # ... and until the new activator is up, the API through it answers a coded 503 (retry).
    s2.wait_for(lambda: s2.get("/api/deployments").status_code == 200, what="the new activator answering")
    assert _master(s2) == master
    assert [i["id"] for i in s2.instances("hello")] == [iid]
    assert s2.get("/d/hello/whoami").headers[TARGET] == iid
    assert s2.terminate() == 0
    assert not psutil.pid_exists(master) or psutil.Process(master).status() == psutil.STATUS_ZOMBIE


def test_a_killed_haproxy_is_started_again_with_its_servers(serve):
    s = serve({"hello.yaml": deployment_yaml("hello")}, "--data-plane", "haproxy")
    iid = s.get("/d/hello/whoami").headers[TARGET]
    s.wait_for(lambda: any(st.name == iid for st in _api(s).show_stat()), what="server added to HAProxy")
    old = _master(s)
    for proc in [psutil.Process(old), *psutil.Process(old).children()]:
        proc.kill()
    s.wait_for(lambda: _restarted_with(s, old, iid), timeout=30, what="HAProxy started again")
    r = s.get("/d/hello/whoami")
    assert (r.status_code, r.headers.get(TARGET)) == (200, iid), (r.headers, r.text, s.log()[-3000:])
    assert "HAProxy was not running" in s.log()
