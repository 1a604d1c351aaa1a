"""Dashboard login: who a token is, a signed session cookie, and CSRF tokens.

The dashboard asks one question of the token system: "who is this token?"
(`ControlTokens.principal`): the API's own tokens (`controller.auth`, `autodeploy token
create`), looked up by their SHA-256 hash like the API does; the token itself never
leaves this process.

A session is a cookie `autodeploy_ui` = base64(JSON {role, expiry, session id}) + "." +
HMAC-SHA256 over it with the gateway's secret (`AUTODEPLOY_UI_SECRET`, made fresh by
every `autodeploy serve` and shared by its workers), HttpOnly, SameSite=Strict, Path=/ui.
Actions carry a CSRF token: HMAC(secret, "csrf:" + session id), checked in constant time.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from typing import Any, Protocol

from controller.auth import MAX_CREDENTIAL, digest
from controller.contracts import Auth

COOKIE = "autodeploy_ui"
SESSION_TTL_S = 12 * 3600
ROLES = ("viewer", "operator", "admin")
ACTION_ROLES = ("operator", "admin")


class TokenVerifier(Protocol):
    def principal(self, token: str) -> tuple[str, str] | None:
        """(name, role) of the token (role: viewer | operator | admin), or None for an unknown token."""


class ControlTokens:
    """The API's own tokens (controller.auth): the controller answers who a token's hash is."""

    def __init__(self, control: Any) -> None:
        self.control = control

    def principal(self, token: str) -> tuple[str, str] | None:
        """(name, role) of a known token, else None."""
        if not token or len(token) > MAX_CREDENTIAL:
            return None
        found = self.control.request(Auth(hash=digest(token))).principal
        return (found.name, found.role) if found is not None else None

    def role_of(self, token: str) -> str | None:
        found = self.principal(token)
        return found[1] if found else None


@dataclass(frozen=True)
class Session:
    role: str
    sid: str
    expires: float
    name: str = "anonymous"  # the token's name, for the audit trail of actions

    def describe(self) -> str:
        return f"token {self.name} ({self.role}) via the dashboard"

    @property
    def can_act(self) -> bool:
        return self.role in ACTION_ROLES


class Sessions:
    def __init__(self, secret: bytes, ttl_s: float = SESSION_TTL_S) -> None:
        if len(secret) < 16:
            raise ValueError("the session secret must be at least 16 bytes")
        self.secret = secret
        self.ttl_s = ttl_s

    @classmethod
    def from_env(cls) -> "Sessions":
        secret = os.environ.get("AUTODEPLOY_UI_SECRET")
        # Without serve's shared secret (the app used alone), one process signs and checks its own cookies.
        return cls(secret.encode() if secret else secrets.token_bytes(32))

    def issue(self, role: str, now: float, name: str = "anonymous") -> str:
        payload = json.dumps({"r": role, "e": int(now + self.ttl_s), "s": secrets.token_hex(12), "n": name[:64]},
                             separators=(",", ":")).encode()
        return _b64(payload) + "." + _b64(self._sign(payload))

    def read(self, cookie: str | None, now: float) -> Session | None:
        if not cookie or "." not in cookie or len(cookie) > 512:
            return None
        body, _, mac = cookie.partition(".")
        try:
            payload = _unb64(body)
            ok = hmac.compare_digest(_unb64(mac), self._sign(payload))
            data = json.loads(payload) if ok else None
        except (ValueError, TypeError):
            return None
        if not isinstance(data, dict) or data.get("r") not in ROLES or not isinstance(data.get("e"), int) \
                or not isinstance(data.get("s"), str):
            return None
        if data["e"] <= now:
            return None
        return Session(data["r"], data["s"], float(data["e"]), str(data.get("n", "anonymous")))

    def csrf(self, session: Session) -> str:
        return hmac.new(self.secret, b"csrf:" + session.sid.encode(), hashlib.sha256).hexdigest()[:40]

    def csrf_ok(self, session: Session, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf(session), str(token))

    def _sign(self, payload: bytes) -> bytes:
        return hmac.new(self.secret, payload, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
