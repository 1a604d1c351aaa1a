"""Dashboard login: who a token is, a signed session cookie, and CSRF tokens.

The dashboard asks one question of the token system: "what role does this token
have?" (`TokenVerifier.role_of`). Until the API's own tokens exist, operators list
tokens in `AUTODEPLOY_UI_TOKENS` (`operator=TOKEN,viewer=TOKEN`); only their SHA-256
hashes are kept in memory and compared in constant time.

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
from typing import Protocol

COOKIE = "autodeploy_ui"
SESSION_TTL_S = 12 * 3600
ROLES = ("viewer", "operator", "admin")
ACTION_ROLES = ("operator", "admin")


class TokenVerifier(Protocol):
    def role_of(self, token: str) -> str | None:
        """The token's role (viewer | operator | admin), or None for an unknown token."""


class EnvTokens:
    """Tokens from `AUTODEPLOY_UI_TOKENS`: `role=token` pairs separated by commas."""

    def __init__(self, spec: str) -> None:
        self.hashes: dict[str, str] = {}
        for item in (p.strip() for p in spec.split(",")):
            if not item:
                continue
            role, sep, token = item.partition("=")
            role = role.strip()
            if not sep or role not in ROLES or len(token.strip()) < 8:
                raise ValueError(f"AUTODEPLOY_UI_TOKENS entry {role or item!r}: write ROLE=TOKEN with ROLE one of "
                                 f"{', '.join(ROLES)} and a token of 8 characters or more")
            self.hashes[_sha(token.strip())] = role

    @classmethod
    def from_env(cls) -> "EnvTokens":
        return cls(os.environ.get("AUTODEPLOY_UI_TOKENS", ""))

    @property
    def configured(self) -> bool:
        return bool(self.hashes)

    def role_of(self, token: str) -> str | None:
        digest = _sha(token)
        found = None
        for known, role in self.hashes.items():  # every entry compared: no early exit on a match
            if hmac.compare_digest(known, digest):
                found = role
        return found


@dataclass(frozen=True)
class Session:
    role: str
    sid: str
    expires: float

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

    def issue(self, role: str, now: float) -> str:
        payload = json.dumps({"r": role, "e": int(now + self.ttl_s), "s": secrets.token_hex(12)},
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
        return Session(data["r"], data["s"], float(data["e"]))

    def csrf(self, session: Session) -> str:
        return hmac.new(self.secret, b"csrf:" + session.sid.encode(), hashlib.sha256).hexdigest()[:40]

    def csrf_ok(self, session: Session, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf(session), str(token))

    def _sign(self, payload: bytes) -> bytes:
        return hmac.new(self.secret, payload, hashlib.sha256).digest()


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
