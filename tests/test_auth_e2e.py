"""Access control end to end: a real `autodeploy serve`, real HTTP, the real CLI.

Every role against every kind of call, every 401/403 and CSRF attempts (on both data planes), the audit trail,
what is stored on disk, and the loopback-only `--insecure-no-auth`."""
from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
import requests

from conftest import PY, deployment_yaml, free_port
from controller.auth import HostPolicy, bearer, required_role

CLI = str(Path(PY).parent / "autodeploy")


def cli(s, *args: str, token: str | None = None, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "AUTODEPLOY_TOKEN"}
    if token is not None:
        env["AUTODEPLOY_TOKEN"] = token
    env.update(env_extra or {})
    return subprocess.run([CLI, *args, "--url", s.url], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, env=env)


def bearer_of(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def make_token(s, role: str, name: str) -> str:
    out = cli(s, "token", "create", "--role", role, "--name", name, token=s.token)
    assert out.returncode == 0, out.stderr
    assert "shown once" in out.stderr
    return out.stdout.strip()


def call(s, method: str, path: str, token: str | None, body: dict | None = None) -> requests.Response:
    headers = bearer_of(token) if token else {}
    return requests.request(method, s.url + path, json=body if method == "POST" else None,
                            headers=headers, timeout=30)


READS = [("GET", "/api/deployments"), ("GET", "/api/deployments/hello"), ("GET", "/api/deployments/hello/history"),
         ("GET", "/api/deployments/hello/rollout"), ("GET", "/api/deployments/hello/drift"), ("GET", "/api/drift"),
         ("GET", "/metrics")]
OPERATE = [("POST", "/api/deployments/hello/scale", {"replicas": 0}), ("POST", "/api/deployments/hello/stop", {}),
           ("POST", "/api/deployments/hello/start", {}), ("POST", "/api/deployments/hello/rollback", {})]
ADMIN = [("GET", "/api/tokens", None), ("POST", "/api/tokens", {"name": "x", "role": "viewer"}),
         ("POST", "/api/tokens/revoke", {"name": "nobody"}), ("GET", "/api/keys", None),
         ("POST", "/api/deployments/hello/delete", {"yes": True})]


def test_every_role_gets_what_it_may_and_401_or_403_otherwise(serve, data_plane):
    s = serve({"hello.yaml": deployment_yaml("hello")})
    viewer, operator = make_token(s, "viewer", "ci-viewer"), make_token(s, "operator", "ops")
    assert viewer.startswith("adt_") and viewer != operator

    # Anonymous: 401 with a coded body and a Bearer challenge, on reads, writes and /metrics alike.
    for method, path, *body in READS + OPERATE + ADMIN:
        r = call(s, method, path, None, body[0] if body else None)
        assert (r.status_code, r.json()["code"]) == (401, 1030), (method, path, r.text)
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    for bad in ("Bearer adt_not-a-real-token", "Basic YWRtaW46YWRtaW4=", "Bearer", "Bearer a b"):
        r = requests.get(s.url + "/api/deployments", headers={"Authorization": bad}, timeout=30)
        assert r.status_code == 401 and r.json()["code"] in (1030, 1031), bad
    # A credential is never taken from a cookie.
    r = requests.get(s.url + "/api/deployments", cookies={"Authorization": f"Bearer {s.token}", "token": s.token},
                     timeout=30)
    assert r.json()["code"] == 1030

    # viewer: every read, no write.
    for method, path in READS:
        assert call(s, method, path, viewer).status_code == 200, path
    for method, path, body in OPERATE + ADMIN:
        r = call(s, method, path, viewer, body)
        assert (r.status_code, r.json()["code"]) == (403, 1032), (path, r.text)
        assert "ci-viewer" in r.json()["msg"]

    # operator: reads and operations, not delete nor tokens and keys.
    for method, path in READS:
        assert call(s, method, path, operator).status_code == 200, path
    for method, path, body in OPERATE:
        r = call(s, method, path, operator, body)
        assert r.status_code in (200, 404), (path, r.text)  # rollback of a first revision: 1016, still allowed
        assert r.json().get("code") in (None, 1016)
    for method, path, body in ADMIN:
        assert (call(s, method, path, operator, body).json()["code"]) == 1032, path

    # admin (the bootstrap token from admin.token): everything, delete last.
    for method, path, *body in READS + OPERATE + ADMIN:
        r = call(s, method, path, s.token, body[0] if body else None)
        assert r.status_code < 400 or (path, r.json()["code"]) in (("/api/tokens/revoke", 1037),
                                                                   ("/api/deployments/hello/rollback", 1016)), r.text
    assert call(s, "GET", "/api/deployments/hello", s.token).json()["code"] == 1001  # deleted

    # Audit: every authenticated mutating call is an event naming its token, refused ones too.
    events = [e.message for e in _events(s, ("hello", "auth"))]
    assert any("scale(replicas=0) by token ops (operator): done" in m for m in events), events
    assert any("delete(yes=True) by token admin (admin): done" in m for m in events), events
    assert any("create token 'ops' role 'operator' by token admin (admin): done" in m for m in events), events
    assert any("revoke token 'nobody' by token admin (admin): refused (1037" in m for m in events), events


def _events(s, deployments: tuple[str, ...]):
    from controller.store import Store
    store = Store(s.state_dir / "autodeploy.db")
    try:
        return [e for d in deployments for e in store.events(d, limit=500)]
    finally:
        store.close()


def test_tokens_are_shown_once_stored_as_hashes_and_revocable(serve):
    s = serve({"hello.yaml": deployment_yaml("hello")})
    admin_file = s.state_dir / "admin.token"
    assert stat.S_IMODE(admin_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((s.state_dir / "autodeploy.db").stat().st_mode) == 0o600
    tok = make_token(s, "viewer", "dash")
    listed = cli(s, "token", "list", token=s.token)
    assert listed.returncode == 0 and "dash" in listed.stdout and "viewer" in listed.stdout
    assert tok not in listed.stdout
    api = call(s, "GET", "/api/tokens", s.token).json()["tokens"]
    assert {t["name"]: t["role"] for t in api} == {"admin": "admin", "dash": "viewer"}
    assert tok not in str(api) and s.token not in str(api)
    # Only hashes on disk: neither raw token appears in any file of the state dir.
    for path in s.state_dir.rglob("*"):
        if path.is_file() and path.name != "admin.token":
            data = path.read_bytes()
            assert tok.encode() not in data and s.token.encode() not in data, path
    # Name taken, bad role: coded errors from the CLI.
    again = cli(s, "token", "create", "--role", "viewer", "--name", "dash", token=s.token)
    assert again.returncode == 1 and "error 1038" in again.stderr
    assert call(s, "POST", "/api/tokens", s.token, {"name": "z", "role": "root"}).json()["code"] == 1013
    # Revoked: the next call is refused at once.
    assert call(s, "GET", "/api/deployments", tok).status_code == 200
    out = cli(s, "token", "revoke", "dash", token=s.token)
    assert out.returncode == 0 and "dash revoked" in out.stdout
    r = call(s, "GET", "/api/deployments", tok)
    assert (r.status_code, r.json()["code"]) == (401, 1031)
    # The CLI with a bad token says what to do.
    bad = cli(s, "status", token="adt_wrong")
    assert bad.returncode == 1 and "error 1031" in bad.stderr and "AUTODEPLOY_TOKEN" in bad.stderr


def test_local_cli_finds_admin_token_in_the_state_dir_and_restart_keeps_it(serve, tmp_path):
    s = serve({"hello.yaml": deployment_yaml("hello")})
    first = s.token
    # No AUTODEPLOY_TOKEN: the CLI reads <state-dir>/admin.token for a loopback --url.
    anon = cli(s, "status", "--state-dir", str(tmp_path / "elsewhere"))
    assert anon.returncode == 1 and "error 1030" in anon.stderr
    local = cli(s, "status", "--state-dir", str(s.state_dir))
    assert local.returncode == 0 and "hello" in local.stdout, local.stderr
    # The same state dir found through the stack config, the way serve finds it.
    project = tmp_path / "project"
    (project / "stacks").mkdir(parents=True)
    (project / "stacks" / "Pulumi.dev.yaml").write_text(f"config:\n  autodeploy:stateDir: {s.state_dir}\n")
    via_stack = cli(s, "status", "--project-dir", str(project))
    assert via_stack.returncode == 0 and "hello" in via_stack.stdout, via_stack.stderr
    # Restart on the same state dir: same admin token.
    assert s.terminate() == 0
    s2 = serve({"hello.yaml": deployment_yaml("hello")}, state_dir=s.state_dir)
    assert s2.token == first and s2.get("/api/deployments").status_code == 200
    # Revoking the bootstrap token removes its file, so a restart does not bring it back.
    out = cli(s2, "token", "revoke", "admin", token=first)
    assert out.returncode == 0 and "admin.token removed" in out.stdout
    assert not (s.state_dir / "admin.token").exists()
    assert call(s2, "GET", "/api/deployments", first).json()["code"] == 1031


def test_csrf_attempts_are_refused(serve, data_plane):
    s = serve({"hello.yaml": deployment_yaml("hello")})
    auth = bearer_of(s.token)
    url = s.url + "/api/deployments/hello/stop"
    # An HTML form and a text/plain fetch: no JSON, no action.
    form = requests.post(url, data={"yes": "true"}, headers=auth, timeout=30)
    assert (form.status_code, form.json()["code"]) == (415, 1033)
    plain = requests.post(url, data='{"yes": true}', headers={**auth, "Content-Type": "text/plain"}, timeout=30)
    assert (plain.status_code, plain.json()["code"]) == (415, 1033)
    array = requests.post(url, data="[1]", headers={**auth, "Content-Type": "application/json"}, timeout=30)
    assert (array.status_code, array.json()["code"]) == (400, 1013)
    # A foreign Origin or Host, or a browser saying cross-site: refused before anything runs.
    for extra in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Host": "evil.example:80"},
                  {"Host": f"rebind.evil:{s.url.rsplit(':', 1)[1]}"}, {"Sec-Fetch-Site": "cross-site"}):
        r = requests.post(url, json={}, headers={**auth, **extra}, timeout=30)
        assert (r.status_code, r.json()["code"]) == (403, 1034), extra
    # Confirmation is JSON true and nothing else.
    for yes in ("no", "true", 1, None):
        r = requests.post(s.url + "/api/deployments/hello/delete", json={"yes": yes}, headers=auth, timeout=30)
        assert r.json()["code"] == 1017, yes
    assert s.status("hello")["state"] == "running"
    # The same origin is fine.
    ok = requests.post(url, json={}, headers={**auth, "Origin": s.url}, timeout=30)
    assert ok.status_code == 200 and s.status("hello")["state"] == "stopped"


def test_insecure_no_auth_is_loopback_only(serve, tmp_path):
    port = free_port()
    refused = subprocess.run([CLI, "serve", "--deployments", str(tmp_path), "--state-dir", str(tmp_path / "st"),
                              "--host", "0.0.0.0", "--port", str(port), "--insecure-no-auth"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "--insecure-no-auth is refused with --host 0.0.0.0" in refused.stderr
    # The prod stack binds 0.0.0.0: it always needs tokens.
    prod = subprocess.run([CLI, "serve", "--stack", "prod", "--deployments", str(tmp_path), "--state-dir",
                           str(tmp_path / "st"), "--port", str(port), "--insecure-no-auth"],
                          capture_output=True, text=True, timeout=60)
    assert prod.returncode != 0 and "refused with --host 0.0.0.0" in prod.stderr
    s = serve({"hello.yaml": deployment_yaml("hello")}, "--insecure-no-auth")
    assert "--insecure-no-auth" in s.log() and "WARNING" in s.log()
    r = requests.post(s.url + "/api/deployments/hello/stop", json={}, timeout=30)
    assert r.status_code == 200
    # Still no cross-site requests: a web page must not drive a local unauthenticated API.
    r = requests.post(s.url + "/api/deployments/hello/start", json={}, headers={"Origin": "http://evil.example"},
                      timeout=30)
    assert r.json()["code"] == 1034


# ---------------------------------------------------------------------- decisions, in process
@pytest.mark.parametrize("method,path,role", [
    ("GET", "/api/deployments", "viewer"), ("GET", "/metrics", "viewer"),
    ("GET", "/api/deployments/x/history", "viewer"), ("POST", "/api/deployments/x/scale", "operator"),
    ("POST", "/api/deployments/x/rollback", "operator"), ("POST", "/api/deployments/x/delete", "admin"),
    ("POST", "/api/deployments/x/bogus", "operator"), ("GET", "/api/tokens", "admin"), ("GET", "/api/keys", "admin"),
    ("POST", "/api/tokens/revoke", "admin"), ("POST", "/api/something-new", "admin"), ("GET", "/other", "admin"),
    ("GET", "/api/git", "viewer"), ("POST", "/api/git/sync", "operator"),
])
def test_required_role(method, path, role):
    assert required_role(method, path) == role


def test_bearer_parsing():
    assert bearer("Bearer abc") == "abc" and bearer("bearer abc ") == "abc"
    assert bearer(None) is None and bearer("Basic abc") is None and bearer("Bearer ") is None
    assert bearer("Bearer " + "a" * 1000) is None


def test_host_policy():
    local = HostPolicy.for_bind("127.0.0.1", 8080)
    assert local.host_ok("127.0.0.1:8080") and local.host_ok("localhost:8080") and local.host_ok("[::1]:8080")
    assert not local.host_ok("127.0.0.1:9090") and not local.host_ok("evil.example:8080") and not local.host_ok("")
    assert local.origin_ok("http://localhost:8080") and not local.origin_ok("http://evil.example")
    assert not local.origin_ok("null") and not local.origin_ok("file://")
    wide = HostPolicy.for_bind("0.0.0.0", 8080, ("gpu.example.com",))
    assert wide.host_ok("10.0.0.5:8080") and wide.host_ok("gpu.example.com") and wide.host_ok("gpu.example.com:443")
    assert not wide.host_ok("attacker.example:8080")  # DNS rebinding needs a name; names must be listed
    assert wide.origin_ok("https://gpu.example.com") and not wide.origin_ok("https://gpu.example.com.evil")
    assert HostPolicy.from_env(wide.to_env()) == wide


def test_the_local_admin_token_is_sent_only_to_a_gateway_on_this_machine(tmp_path, monkeypatch):
    import argparse

    from controller.cli_auth import client_token
    monkeypatch.delenv("AUTODEPLOY_TOKEN", raising=False)
    (tmp_path / "admin.token").write_text("adt_local_admin\n")

    def token_for(url: str) -> str | None:
        return client_token(argparse.Namespace(url=url, state_dir=tmp_path, project_dir=None, stack="dev"))
    for url in ("http://127.0.0.1:8080", "http://localhost:8080", "http://[::1]:8080", "https://127.0.0.2"):
        assert token_for(url) == "adt_local_admin", url
    for url in ("http://gpu.example.com:8080", "http://10.0.0.5:8080", "http://127.0.0.1.evil.example:8080",
                "http://localhost.evil.example", "http://[::1"):
        assert token_for(url) is None, url
    monkeypatch.setenv("AUTODEPLOY_TOKEN", "adt_from_env")  # an explicit token goes wherever --url says
    assert token_for("http://gpu.example.com:8080") == "adt_from_env"
