"""Safe state, with real `serve` processes: one serve per state dir, a non-zero exit when
the gateway cannot bind, private files, SQLite's integrity check, readiness that proves the
listener is the instance's, and the local driver finding its own processes by environment."""
from __future__ import annotations

import os
import socket
import stat
import subprocess
import time
from pathlib import Path

import psutil

from conftest import ECHO_MODEL, PY, ROOT, deployment_yaml, echo_command, start_serve
from controller.drivers.local import LocalDriver
from conftest import free_port
from controller.loader import load_text
from controller.store import Store

AUTODEPLOY = str(Path(PY).parent / "autodeploy")
TARGET = "Deploy-Route-Target"


def serve_cmd(s, *extra: str, state_dir: Path | None = None, port: int | None = None) -> list[str]:
    return [AUTODEPLOY, "serve", "--deployments", str(s.deployments), "--state-dir", str(state_dir or s.state_dir),
            "--port", str(port or free_port()), "--project-dir", str(ROOT), "--data-plane", "python", *extra]


def test_second_serve_on_the_same_state_dir_exits_naming_the_holder_and_touches_nothing(serve):
    s = serve({"hello.yaml": deployment_yaml("hello")})
    first = s.get("/d/hello/whoami")
    events = len(s.status("hello")["events"])
    before = {p.name: p.stat().st_mtime_ns for p in s.state_dir.iterdir()}
    out = subprocess.run(serve_cmd(s), capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert f"is in use by autodeploy serve (pid {s.proc.pid})" in out.stderr
    again = s.get("/d/hello/whoami")  # the first serve's instance still serves
    assert again.headers[TARGET] == first.headers[TARGET]
    assert len(s.status("hello")["events"]) == events
    after = {p.name: p.stat().st_mtime_ns for p in s.state_dir.iterdir()}
    assert after.keys() == before.keys()
    assert after["autodeploy.db"] == before["autodeploy.db"] and after["serve.lock"] == before["serve.lock"]


def test_the_lock_goes_with_its_holder_even_when_it_is_killed(serve):
    s = serve({"hello.yaml": deployment_yaml("hello")})
    s.proc.kill()
    s.proc.wait()
    for child in s.descendants():
        child.kill()
    again = serve({}, state_dir=s.state_dir)  # no stale lock left by a SIGKILLed serve
    assert again.status("hello")["status"] == "Standby"
    assert again.terminate() == 0


def test_serve_exits_non_zero_when_the_gateway_cannot_bind(serve, tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "hello.yaml").write_text(deployment_yaml("hello", min_replicas=1))
    out = subprocess.run([AUTODEPLOY, "serve", "--deployments", str(tmp_path / "d"), "--state-dir",
                          str(tmp_path / "st"), "--port", str(port), "--project-dir", str(ROOT), "--data-plane",
                          "python"], capture_output=True, text=True, timeout=60)
    busy.close()
    assert out.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in out.stderr
    assert not (tmp_path / "st" / "logs").exists() or not list((tmp_path / "st" / "logs").iterdir())


def test_state_files_are_private_and_instances_keep_the_users_umask(serve, tmp_path):
    made = tmp_path / "made-by-instance"
    command = f"{PY} -c \"open('{made}', 'w')\" && " + echo_command()
    s = serve({"hello.yaml": deployment_yaml("hello", command)})
    assert s.get("/d/hello/whoami").status_code == 200
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(s.state_dir) == 0o700 and mode(s.state_dir / "logs") == 0o700
    assert mode(s.state_dir / "autodeploy.db") == 0o600
    logs = list((s.state_dir / "logs").iterdir())
    assert logs and all(mode(p) == 0o600 for p in logs)
    user_umask = os.umask(0o022)
    os.umask(user_umask)
    assert mode(made) == 0o666 & ~user_umask


def test_a_state_dir_made_readable_by_others_is_tightened_at_start(tmp_path):
    state = tmp_path / "state"
    (state / "logs").mkdir(parents=True)
    (state / "logs" / "old-aaaaaaaa.log").write_text("x")
    state.chmod(0o755)
    (state / "logs" / "old-aaaaaaaa.log").chmod(0o644)
    s = start_serve(tmp_path, {}, "--data-plane", "python", state_dir=state)
    try:
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert stat.S_IMODE((state / "logs" / "old-aaaaaaaa.log").stat().st_mode) == 0o600
    finally:
        s.terminate()


def test_a_corrupt_database_is_moved_aside_and_serve_starts(tmp_path):
    s = start_serve(tmp_path, {"hello.yaml": deployment_yaml("hello")}, "--data-plane", "python")
    assert s.get("/d/hello/whoami").status_code == 200
    assert s.terminate() == 0
    db = s.state_dir / "autodeploy.db"
    data = bytearray(db.read_bytes())
    data[4096 + 100:4096 + 400] = os.urandom(300)  # a torn page in the middle of the file
    data[0:16] = b"definitely not a"  # and the header
    db.write_bytes(bytes(data))
    again = start_serve(tmp_path, {}, "--data-plane", "python", state_dir=s.state_dir)
    try:
        assert again.get("/d/hello/whoami").status_code == 200
        aside = list(s.state_dir.glob("autodeploy.db.corrupt-*"))
        assert len([p for p in aside if not p.name.endswith(("-wal", "-shm"))]) == 1
        assert "failed SQLite's integrity check" in again.log() and "started a new store" in again.log()
    finally:
        again.terminate()


def test_readiness_refuses_a_listener_that_is_not_the_instance(serve):
    # The PORT trap: a command that ignores ${PORT}, with the gateway's own port as spec.port.
    # The gateway answers on that port; it must never count as the instance being ready.
    port = free_port()
    text = deployment_yaml("trap", "sleep 60", health=None).replace("port: 8080", f"port: {port}")
    s = serve({"trap.yaml": text}, port=port)
    r = s.get("/d/trap/x", timeout=60)
    assert (r.status_code, r.json()["code"]) == (502, 1003)
    assert "no process of the instance listens there" in r.json()["msg"]
    assert "use ${PORT} in spec.command" in r.json()["msg"]
    assert s.instances("trap") == []


def _dep(name: str):
    result = load_text(deployment_yaml(name, echo_command()), f"{name}.yaml")
    assert not result.errors
    return result.deployments[0]


def test_local_driver_finds_its_own_processes_by_their_environment(tmp_path):
    mine = LocalDriver(tmp_path / "state", ROOT)
    other = LocalDriver(tmp_path / "elsewhere", ROOT)
    a = mine.start(_dep("hello"), "aaaaaaaa", [])
    b = other.start(_dep("hello"), "bbbbbbbb", [])
    try:
        fresh = LocalDriver(tmp_path / "state", ROOT)  # a new serve that lost its database
        deadline = time.monotonic() + 10
        found = []
        while time.monotonic() < deadline and not found:
            found = fresh.discover()
            time.sleep(0.05)
        assert [(i.id, i.deployment, i.revision, i.port, i.pid) for i in found] == \
            [("aaaaaaaa", "hello", a.revision, a.port, a.pid)]
        assert found[0].pid_create_time == psutil.Process(a.pid).create_time()
        assert fresh.adopt(found[0])
        fresh.stop(found[0], timeout=5)
        assert not psutil.pid_exists(a.pid) or psutil.Process(a.pid).status() == psutil.STATUS_ZOMBIE
    finally:
        mine.stop(a, timeout=5)
        other.stop(b, timeout=5)


def test_owns_listener_tells_the_instance_from_another_program(tmp_path):
    driver = LocalDriver(tmp_path / "state", ROOT)
    port = free_port()
    # A command that ignores ${PORT} listens on the fixed spec.port: that is where a stranger can answer.
    text = deployment_yaml("fixed", f"{PY} {ECHO_MODEL} --port {port}").replace("port: 8080", f"port: {port}")
    fixed = load_text(text, "fixed.yaml").deployments[0]
    inst = driver.start(fixed, "cccccccc", [])
    chosen = driver.start(_dep("hello"), "dddddddd", [])
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not driver.owns_listener(inst):
            time.sleep(0.05)
        assert driver.owns_listener(inst) is True
        # A port the driver just found free for ${PORT} needs no proof (and no socket-table scan).
        assert driver.owns_listener(chosen) is None
        with socket.socket() as stranger:
            stranger.bind(("127.0.0.1", 0))
            stranger.listen()
            inst.port = stranger.getsockname()[1]
            assert driver.owns_listener(inst) is False
    finally:
        driver.stop(inst, timeout=5)
        driver.stop(chosen, timeout=5)


def test_the_store_integrity_check_keeps_a_healthy_database(tmp_path):
    store, problem = Store.open_checked(tmp_path / "a.db")
    store.event("x", "k", "m")
    store.close()
    again, problem = Store.open_checked(tmp_path / "a.db")
    assert problem is None and [e.message for e in again.events("x")] == ["m"]
    again.close()
