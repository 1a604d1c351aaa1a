"""Endpoint keys (data plane) and forwarded headers, end to end in python mode: a real
`autodeploy serve`, the real CLI and the echo model reporting the headers it received."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import PY, deployment_yaml
from controller.auth import endpoint_check
from controller.errors import KEY_FORBIDDEN, KEY_REQUIRED

CLI = str(Path(PY).parent / "autodeploy")
RULE = "Deploy-Route-Rule"


def cli(s, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args, "--url", s.url], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, env=dict(os.environ, AUTODEPLOY_TOKEN=s.token))


def key(s, deployment: str, *extra: str) -> str:
    out = cli(s, "key", "create", deployment, *extra)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def bearer(k: str) -> dict:
    return {"Authorization": f"Bearer {k}"}


def from_haproxy(r) -> bool:
    """Answered by HAProxy itself or an instance behind it, not by the Python gateway."""
    return "gunicorn" not in r.headers.get("Server", "")


def test_private_deployment_needs_its_key_and_scale_out_needs_the_permission(serve, data_plane):
    s = serve({"priv.yaml": deployment_yaml("priv", extra_spec="access: private"),
               "pub.yaml": deployment_yaml("pub")})
    plain, scaler, other = key(s, "priv", "--name", "app"), key(s, "priv", "--name", "ops", "--scale-out"), \
        key(s, "pub", "--name", "elsewhere")
    assert plain.startswith("adk_") and len({plain, scaler, other}) == 3

    anon = s.get("/d/priv/whoami")
    assert (anon.status_code, anon.json()["code"]) == (401, 1035)
    # HAProxy checks keys in front of everything, cold path included; python mode: the gateway.
    assert from_haproxy(anon) == (data_plane == "haproxy")
    assert anon.headers["WWW-Authenticate"].startswith("Bearer")
    for wrong in (other, "adk_made-up", s.token):  # another deployment's key, a guess, an API token
        r = s.get("/d/priv/whoami", headers=bearer(wrong))
        assert (r.status_code, r.json()["code"]) == (401, 1035), wrong
    ok = s.get("/d/priv/echo", headers=bearer(plain))
    assert ok.status_code == 200 and ok.headers["Deploy-Route-Target"]
    assert "authorization" not in ok.json()["headers"]  # the key never reaches the instance
    if data_plane == "haproxy":
        # With a ready instance, HAProxy itself checks keys (its map, kept over the Runtime API).
        s.wait_for(lambda: from_haproxy(s.get("/d/priv/echo", headers=bearer(plain))), what="warm path in HAProxy")
        warm = s.get("/d/priv/echo", headers=bearer(plain))
        assert warm.status_code == 200 and "authorization" not in warm.json()["headers"]
        for headers in ({}, bearer(other), bearer("adk_made-up")):
            r = s.get("/d/priv/whoami", headers=headers)
            assert (r.status_code, r.json()["code"], from_haproxy(r)) == (401, 1035, True), headers
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        r = s.get("/d/priv/whoami", headers={**bearer(plain), RULE: "scale-out"})
        assert (r.status_code, r.json()["code"], from_haproxy(r)) == (403, 1036, True)
    # scale-out starts GPUs: only with a key that may.
    denied = s.get("/d/priv/whoami", headers={**bearer(plain), RULE: "scale-out"})
    assert (denied.status_code, denied.json()["code"]) == (403, 1036)
    assert s.get("/d/priv/whoami", headers={**bearer(scaler), RULE: "scale-out"}).status_code == 200
    assert s.status("priv")["access"] == "private"

    # A public deployment: no key needed, its own Authorization header passes through.
    pub = s.get("/d/pub/echo", headers={"Authorization": "Bearer app-level"})
    assert pub.status_code == 200 and pub.json()["headers"]["authorization"] == "Bearer app-level"
    assert s.get("/d/pub/whoami", headers={RULE: "scale-out"}).status_code == 200

    listed = cli(s, "key", "list")
    assert listed.returncode == 0 and "priv" in listed.stdout and "ops" in listed.stdout
    assert plain not in listed.stdout and scaler not in listed.stdout
    assert cli(s, "key", "create", "ghost").stderr.startswith("error 1001")
    # Revoked: refused as soon as the gateway workers have the new routing table.
    assert cli(s, "key", "revoke", "priv", "app").returncode == 0
    s.wait_for(lambda: s.get("/d/priv/whoami", headers=bearer(plain)).status_code == 401, what="key revoked")
    if data_plane == "haproxy":
        assert from_haproxy(s.get("/d/priv/whoami", headers=bearer(plain)))  # refused by HAProxy's map
    assert s.get("/d/priv/whoami", headers=bearer(scaler)).status_code == 200
    events = [e["message"] for e in s.status("priv")["events"]]
    assert any("revoke endpoint key 'app' by token admin (admin): done" in m for m in events), events


def test_forwarded_headers_from_an_untrusted_peer_are_replaced(serve, data_plane):
    s = serve({"fw.yaml": deployment_yaml("fw")})
    forged = {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example",
              "Forwarded": "for=6.6.6.6;proto=https", "X-Real-IP": "6.6.6.6"}
    cold = s.get("/d/fw/echo", headers=forged)  # the activator (cold start), then the warm path
    warm = s.wait_for(lambda: (r := s.get("/d/fw/echo", headers=forged)) and (from_haproxy(r) or
                                                                            data_plane == "python") and r,
                      what="a warm request")
    for r in (cold, warm):
        seen = r.json()["headers"]
        assert seen["x-forwarded-for"] == "127.0.0.1"
        assert seen["x-forwarded-proto"] == "http"
        assert seen["x-forwarded-host"] == s.url.removeprefix("http://")
        assert "forwarded" not in seen and "x-real-ip" not in seen


def test_forwarded_headers_from_a_trusted_proxy_are_kept(serve, data_plane):
    s = serve({"fw.yaml": deployment_yaml("fw")}, "--trusted-proxy", "127.0.0.1/32")
    sent = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "api.example.com",
            "X-Real-IP": "203.0.113.9"}
    cold = s.get("/d/fw/echo", headers=sent)
    warm = s.wait_for(lambda: (r := s.get("/d/fw/echo", headers=sent)) and (from_haproxy(r) or
                                                                          data_plane == "python") and r,
                      what="a warm request")
    for r in (cold, warm):
        seen = r.json()["headers"]
        assert seen["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
        assert (seen["x-forwarded-proto"], seen["x-forwarded-host"]) == ("https", "api.example.com")
        assert seen["x-real-ip"] == "203.0.113.9"


@pytest.mark.parametrize("access,header,rule,expected", [
    ("public", None, None, None),
    ("public", None, "scale-out", None),
    ("private", None, None, KEY_REQUIRED),
    ("private", "Bearer nope", None, KEY_REQUIRED),
    ("private", "Basic abc", None, KEY_REQUIRED),
    ("private", "Bearer good", None, None),
    ("private", "Bearer good", "scale-out", KEY_FORBIDDEN),
    ("private", "Bearer scaler", "scale-out", None),
    ("private", "Bearer scaler", "round-robin", None),
])
def test_endpoint_check(access, header, rule, expected):
    from controller.auth import digest
    keys = {digest("good"): False, digest("scaler"): True}
    found = endpoint_check(access, keys, header, rule)
    assert (found.error if found else None) == expected
