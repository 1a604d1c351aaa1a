"""Access control: API tokens with roles, endpoint keys per deployment (hashes only).

A token or key is a random string shown once; only its SHA-256 is stored, in the
state dir's SQLite database (mode 0600). `serve` writes the first admin token to
`<state-dir>/admin.token` (0600) so that the CLI on the same machine can use it.

Who may do what is decided by pure functions here (`required_role`, `allowed`);
the gateway asks them, the controller keeps the tables and writes the audit events.
"""
from __future__ import annotations

import hashlib
import os
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from controller import errors
from controller.contracts import Action, Auth, AuthReply, Document, Keys, Reply, Source, TokenOwner, Tokens
from controller.errors import AutoDeployError

ROLES = ("viewer", "operator", "admin")
_RANK = {r: i for i, r in enumerate(ROLES)}
TOKEN_PREFIX = "adt_"
KEY_PREFIX = "adk_"
ADMIN_TOKEN_FILE = "admin.token"
BOOTSTRAP_NAME = "admin"
MAX_CREDENTIAL = 256  # longer Authorization values are refused without hashing them
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")

# Deployment actions by the role they need (controller.operations' names).
OPERATOR_ACTIONS = frozenset({"scale", "stop", "start", "rollback"})
ADMIN_ACTIONS = frozenset({"delete"})

SCHEMA = """
CREATE TABLE IF NOT EXISTS api_tokens (
  name TEXT PRIMARY KEY, role TEXT NOT NULL, hash TEXT NOT NULL UNIQUE, created_at REAL NOT NULL,
  last_used REAL
);
CREATE TABLE IF NOT EXISTS endpoint_keys (
  deployment TEXT NOT NULL, name TEXT NOT NULL, hash TEXT NOT NULL UNIQUE, scale_out INTEGER NOT NULL,
  created_at REAL NOT NULL, PRIMARY KEY (deployment, name)
);
"""


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def bearer(header: str | None) -> str | None:
    """The credential of an `Authorization: Bearer X` header, or None (absent, other scheme,
    empty or oversized)."""
    if not header or len(header) > MAX_CREDENTIAL + 7:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value or " " in value:
        return None
    return value


@dataclass(frozen=True)
class Principal:
    name: str
    role: str

    def describe(self) -> str:
        return f"token {self.name} ({self.role})"


def required_role(method: str, path: str) -> str:
    """The least role a request to the control API needs. Unknown paths need admin, so a
    route added later is closed until it is named here."""
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["metrics"]:
        return "viewer"
    if parts[:1] != ["api"]:
        return "admin"
    rest = parts[1:]
    if rest[:1] in (["tokens"], ["keys"]):
        return "admin"
    if method in ("GET", "HEAD"):
        return "viewer"
    if rest == ["git", "sync"]:
        return "operator"  # poll the followed branch now: applies what git already says
    if rest[:1] == ["deployments"] and len(rest) == 3:
        action = rest[2]
        if action in OPERATOR_ACTIONS:
            return "operator"
        if action in ADMIN_ACTIONS:
            return "admin"
        return "operator"  # an unknown action then answers 1019 to someone allowed to act
    return "admin"


@dataclass(frozen=True)
class Refusal:
    error: errors.ErrorCode
    detail: str


SCALE_OUT_RULE = "scale-out"


def endpoint_check(access: str, keys: dict[str, bool], authorization: str | None,
                   rule: str | None) -> Refusal | None:
    """May this request use the deployment's endpoint? `keys`: key hash -> may scale out.
    Public deployments are open (their Authorization header is the instance's business)."""
    if access != "private":
        return None
    key = bearer(authorization)
    if key is None:
        return Refusal(errors.KEY_REQUIRED, "this deployment is private; send Authorization: Bearer <key>")
    may_scale_out = keys.get(digest(key))
    if may_scale_out is None:
        return Refusal(errors.KEY_REQUIRED, "unknown or revoked key for this deployment")
    if rule is not None and rule.strip().lower() == SCALE_OUT_RULE and not may_scale_out:
        return Refusal(errors.KEY_FORBIDDEN, "this key may not use Deploy-Route-Rule: scale-out "
                       "(it starts instances); use a key created with --scale-out")
    return None


def allowed(role: str, needed: str) -> bool:
    return _RANK.get(role, -1) >= _RANK[needed]


def check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise AutoDeployError(errors.BAD_REQUEST, f"{what} name must be 1-63 letters, digits, '.', '_' or '-' "
                              f"starting with a letter or digit, got {name!r}")
    return name


class AuthStore:
    """Token and key hashes in `<state-dir>/autodeploy.db`. Thread-safe; `on_keys_changed`
    runs after a key is added or revoked (the controller pushes a new routing snapshot)."""

    def __init__(self, db_path: Path, clock: Callable[[], float] = time.time) -> None:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        self.path = db_path
        self.clock = clock
        self.on_keys_changed: Callable[[], None] = lambda: None
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(db_path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)
        restrict(db_path)
        self._keys_cache: dict[str, dict[str, bool]] | None = None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _q(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ------------------------------------------------------------------ tokens
    def create_token(self, name: Any, role: Any, secret: str | None = None) -> str:
        check_name(name, "token")
        if role not in ROLES:
            raise AutoDeployError(errors.BAD_REQUEST, f"role must be one of {', '.join(ROLES)}, got {role!r}")
        token = secret or new_secret(TOKEN_PREFIX)
        try:
            self._q("INSERT INTO api_tokens (name, role, hash, created_at) VALUES (?,?,?,?)",
                    (name, role, digest(token), self.clock()))
        except sqlite3.IntegrityError:
            raise AutoDeployError(errors.NAME_TAKEN, f"a token named {name!r} exists; revoke it first or "
                                  "choose another name") from None
        return token

    def tokens(self) -> list[dict]:
        rows = self._q("SELECT name, role, created_at, last_used FROM api_tokens ORDER BY created_at, name")
        return [{"name": r[0], "role": r[1], "created_at": r[2], "last_used": r[3]} for r in rows]

    def revoke_token(self, name: Any) -> None:
        with self._lock:
            gone = self._db.execute("DELETE FROM api_tokens WHERE name=?", (name,)).rowcount
        if not gone:
            raise AutoDeployError(errors.CREDENTIAL_NOT_FOUND, f"no token named {name!r} (`autodeploy token list`)")

    def authenticate(self, token_hash: str) -> Principal | None:
        rows = self._q("SELECT name, role FROM api_tokens WHERE hash=?", (token_hash,))
        if not rows:
            return None
        self._q("UPDATE api_tokens SET last_used=? WHERE hash=?", (self.clock(), token_hash))
        return Principal(rows[0][0], rows[0][1])

    def token_name(self, token_hash: str) -> str | None:
        rows = self._q("SELECT name FROM api_tokens WHERE hash=?", (token_hash,))
        return rows[0][0] if rows else None

    def has_token(self, name: str) -> bool:
        return bool(self._q("SELECT 1 FROM api_tokens WHERE name=?", (name,)))

    # ------------------------------------------------------------------ endpoint keys
    def create_key(self, deployment: Any, name: Any, scale_out: bool) -> str:
        check_name(deployment, "deployment")
        check_name(name, "key")
        key = new_secret(KEY_PREFIX)
        try:
            self._q("INSERT INTO endpoint_keys VALUES (?,?,?,?,?)",
                    (deployment, name, digest(key), 1 if scale_out else 0, self.clock()))
        except sqlite3.IntegrityError:
            raise AutoDeployError(errors.NAME_TAKEN, f"{deployment} already has a key named {name!r}; revoke it "
                                  "first or choose another name") from None
        self._keys_changed()
        return key

    def keys(self, deployment: str | None = None) -> list[dict]:
        sql = "SELECT deployment, name, scale_out, created_at FROM endpoint_keys"
        rows = self._q(sql + (" WHERE deployment=?" if deployment else "") + " ORDER BY deployment, name",
                       (deployment,) if deployment else ())
        return [{"deployment": r[0], "name": r[1], "scale_out": bool(r[2]), "created_at": r[3]} for r in rows]

    def revoke_key(self, deployment: Any, name: Any) -> None:
        with self._lock:
            gone = self._db.execute("DELETE FROM endpoint_keys WHERE deployment=? AND name=?",
                                    (deployment, name)).rowcount
        if not gone:
            raise AutoDeployError(errors.CREDENTIAL_NOT_FOUND, f"{deployment} has no key named {name!r} "
                                  "(`autodeploy key list`)")
        self._keys_changed()

    def key_table(self, deployment: str) -> dict[str, bool]:
        """key hash -> may use `Deploy-Route-Rule: scale-out`, for the routing snapshot."""
        if self._keys_cache is None:
            table: dict[str, dict[str, bool]] = {}
            for dep, h, scale_out in self._q("SELECT deployment, hash, scale_out FROM endpoint_keys"):
                table.setdefault(dep, {})[h] = bool(scale_out)
            self._keys_cache = table
        return dict(self._keys_cache.get(deployment, {}))

    def _keys_changed(self) -> None:
        self._keys_cache = None
        self.on_keys_changed()


def restrict(path: Path) -> None:
    """Owner-only access to the database and its WAL files (they hold the hashes)."""
    for p in (path, Path(str(path) + "-wal"), Path(str(path) + "-shm")):
        if p.exists():
            os.chmod(p, 0o600)


def write_secret_file(path: Path, value: str) -> None:
    """Create `path` with mode 0600 from the start (never world-readable for an instant)."""
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")


def ensure_admin_token(state_dir: Path, store: AuthStore) -> tuple[Path, bool]:
    """`<state-dir>/admin.token` and whether it was just created. An existing file whose hash
    the database lost (state restored, database deleted) is registered again."""
    path = state_dir / ADMIN_TOKEN_FILE
    if path.exists():
        os.chmod(path, 0o600)
        token = path.read_text().strip()
        if token and store.authenticate(digest(token)) is None:
            name = BOOTSTRAP_NAME if not store.has_token(BOOTSTRAP_NAME) else f"{BOOTSTRAP_NAME}-{int(time.time())}"
            store.create_token(name, "admin", secret=token)
        return path, False
    token = store.create_token(BOOTSTRAP_NAME, "admin") if not store.has_token(BOOTSTRAP_NAME) else \
        store.create_token(f"{BOOTSTRAP_NAME}-{int(time.time())}", "admin")
    write_secret_file(path, token)
    return path, True


def read_token_file(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        return None


class AuthService:
    """The controller's side: answers the gateway's `auth`, `tokens` and `keys` IPC calls and
    writes an audit event for every mutating call, naming the token that made it."""

    AUDIT_DEPLOYMENT = "auth"  # events about tokens and keys are filed under this name

    def __init__(self, store: AuthStore, controller: Any, state_dir: Path) -> None:
        self.store = store
        self.controller = controller
        self.state_dir = state_dir

    def handlers(self) -> dict[str, Callable[[Any, Callable[[Any], Reply]], Reply]]:
        return {"auth": self.auth, "tokens": self.tokens, "keys": self.keys, "action": self.audit_op,
                "source": self.audit_op}

    def _audit(self, deployment: str, actor: str, what: str, outcome: str) -> None:
        self.controller.store.event(deployment, "audit", f"{what} by {actor}: {outcome}")

    def _audited(self, deployment: str, actor: str, what: str, fn: Callable[[], Reply]) -> Reply:
        try:
            result = fn()
        except AutoDeployError as exc:
            self._audit(deployment, actor, what, f"refused ({exc.error.code} {exc.error.msg})")
            raise
        self._audit(deployment, actor, what, "done")
        return result

    def auth(self, req: Auth, _builtin: Any = None) -> AuthReply:
        p = self.store.authenticate(req.hash)
        return AuthReply(None if p is None else TokenOwner(p.name, p.role))

    def audit_op(self, req: Action | Source, builtin: Callable[[Any], Reply]) -> Reply:
        """A deployment action or a git sync, audited when it changes something and the
        gateway says who asked (`actor`)."""
        actor = req.actor
        if isinstance(req, Action):
            if actor is None or req.args.get("read_only"):
                return builtin(req)
            shown = ", ".join(f"{k}={v!r}" for k, v in sorted(req.args.items()))
            return self._audited(req.name, actor, f"{req.action}({shown})", lambda: builtin(req))
        if actor is None or not req.sync:
            return builtin(req)
        return self._audited("git", actor, "git sync", lambda: builtin(req))

    def tokens(self, req: Tokens, _builtin: Any = None) -> Document:
        do, actor = req.do, req.actor or "unknown"
        if do == "list":
            return Document({"tokens": self.store.tokens()})
        if do == "create":
            return self._audited(self.AUDIT_DEPLOYMENT, actor, f"create token {req.name!r} role {req.role!r}",
                                 lambda: Document({"name": req.name, "role": req.role,
                                                   "token": self.store.create_token(req.name, req.role)}))
        if do == "revoke":
            return self._audited(self.AUDIT_DEPLOYMENT, actor, f"revoke token {req.name!r}",
                                 lambda: Document(self._revoke_token(req.name)))
        raise AutoDeployError(errors.BAD_REQUEST, f"unknown token operation {do!r}")

    def _revoke_token(self, name: Any) -> dict:
        path = self.state_dir / ADMIN_TOKEN_FILE
        token = read_token_file(path)
        bootstrap = token is not None and self._name_of(digest(token)) == name
        self.store.revoke_token(name)
        if bootstrap:
            # Otherwise the next start would register the file's token again.
            path.unlink(missing_ok=True)
        return {"message": f"token {name} revoked" + (f"; {path} removed" if bootstrap else "")}

    def _name_of(self, token_hash: str) -> str | None:
        return self.store.token_name(token_hash)

    def keys(self, req: Keys, _builtin: Any = None) -> Document:
        do, actor = req.do, req.actor or "unknown"
        dep = req.deployment
        if do == "list":
            return Document({"keys": self.store.keys(dep if isinstance(dep, str) and dep else None)})
        if do == "create":
            scale_out = req.scale_out
            if not isinstance(scale_out, bool):
                raise AutoDeployError(errors.BAD_REQUEST, f"scale_out must be true or false, got {scale_out!r}")

            name = req.name or f"key-{secrets.token_hex(3)}"

            def create() -> Document:
                self.controller.status(dep)  # 1001 for a deployment that does not exist
                return Document({"deployment": dep, "name": name, "scale_out": scale_out,
                                 "key": self.store.create_key(dep, name, scale_out)})
            return self._audited(str(dep), actor, f"create endpoint key {name!r}"
                                 + (" with scale-out" if scale_out else ""), create)
        if do == "revoke":
            return self._audited(str(dep), actor, f"revoke endpoint key {req.name!r}",
                                 lambda: (self.store.revoke_key(dep, req.name),
                                          Document({"message": f"key {req.name} of {dep} revoked"}))[1])
        raise AutoDeployError(errors.BAD_REQUEST, f"unknown key operation {do!r}")


# ---------------------------------------------------------------------- Host and Origin
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
WILDCARD_BINDS = ("0.0.0.0", "::", "[::]", "")


def is_loopback(host: str) -> bool:
    import ipaddress
    h = host.strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _split_host(value: str, default_port: int) -> tuple[str, int] | None:
    value = value.strip().lower()
    if not value or any(c in value for c in "/@ \t"):
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[:end + 1], value[end + 1:]
    else:
        host, _, port_text = value.partition(":")
        rest = ":" + port_text if port_text or value.endswith(":") else ""
    if rest:
        if not rest.startswith(":") or not rest[1:].isdigit():
            return None
        return host, int(rest[1:])
    return host, default_port


def _is_ip_literal(host: str) -> bool:
    import ipaddress
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


@dataclass(frozen=True)
class HostPolicy:
    """Which `Host` (and `Origin`) values the control API answers: the configured gateway
    address, loopback names when it listens on loopback, and the names in
    `autodeploy:gatewayHosts`. On a wildcard bind any IP literal is accepted too: DNS
    rebinding needs a domain name, and domain names must be listed."""
    port: int
    names: tuple[str, ...] = ()  # "host" (any port) or "host:port"
    wildcard: bool = False

    @classmethod
    def for_bind(cls, bind_host: str, port: int, extra: tuple[str, ...] = ()) -> "HostPolicy":
        names = [n.strip().lower() for n in extra if n.strip()]  # without a port: any port (a proxy in front)
        own = [f"{n}:{port}" for n in LOOPBACK_NAMES]
        if bind_host in WILDCARD_BINDS:
            return cls(port, tuple(names + own), wildcard=True)
        host = f"[{bind_host}]" if ":" in bind_host and not bind_host.startswith("[") else bind_host
        names.append(f"{host.lower()}:{port}")
        if is_loopback(bind_host):
            names += own
        return cls(port, tuple(names))

    def to_env(self) -> str:
        return ("*," if self.wildcard else "") + f"{self.port}," + ",".join(self.names)

    @classmethod
    def from_env(cls, value: str) -> "HostPolicy":
        parts = [p for p in value.split(",") if p]
        wildcard = bool(parts) and parts[0] == "*"
        if wildcard:
            parts = parts[1:]
        return cls(int(parts[0]), tuple(parts[1:]), wildcard)

    def host_ok(self, host: str | None, default_port: int = 80) -> bool:
        parsed = _split_host(host or "", default_port)
        if parsed is None:
            return False
        name, port = parsed
        for entry in self.names:
            e = _split_host(entry, -1)
            if e is None:
                continue
            if e[0] == name and e[1] in (-1, port):
                return True
        return self.wildcard and port == self.port and _is_ip_literal(name)

    def origin_ok(self, origin: str) -> bool:
        scheme, sep, rest = origin.strip().partition("://")
        if not sep or scheme.lower() not in ("http", "https") or not rest:
            return False  # includes "null" (sandboxed frames, file:// pages)
        return self.host_ok(rest, 443 if scheme.lower() == "https" else 80)
