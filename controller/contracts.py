"""Typed contracts between processes: the routing snapshot and the IPC messages.

The controller and the gateway workers are separate processes (gunicorn workers, the
HAProxy data plane's thread in serve) that talk JSON lines over a Unix socket
(`controller.ipc`). What they say is written here once, as frozen dataclasses, with
one encoder and one decoder used on both sides:

* `encode(msg) -> bytes`: one JSON line (a request carries its `op`);
* `decode(line) -> Request`: the request class is found by its `op`;
  `decode(line, ReplyClass) -> reply`: a reply, whose class the request names; an
  error reply (`encode_error`) raises its coded `AutoDeployError` again.

A line that is not JSON, names an unknown op, lacks a field without a default or
carries one of the wrong type is a coded BAD_REQUEST (1013), never a KeyError.

The routing snapshot (`Snapshot`: version -> `RouteEntry` per deployment, each with
its ready `Address`es) travels inside the `sync` reply; a worker decodes it once per
version and routes by attribute access from then on.

Plain data only: this module imports nothing but `controller.errors`, so the gateway
and the controller both import it without a cycle.
"""
from __future__ import annotations

import json
import sys
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from functools import cached_property
from typing import Any, Callable, ClassVar, Union

from controller import errors
from controller.errors import AutoDeployError

DEFAULT_REQUEST_TIMEOUT_S = 300.0  # spec.requestTimeout's default (schemas/deployment.schema.json)
DEFAULT_TUNNEL_TIMEOUT_S = 3600.0  # spec.tunnelTimeout's default
DEFAULT_TUNNEL_IDLE_TIMEOUT_S = 300.0  # spec.tunnelIdleTimeout's default


# ---------------------------------------------------------------------------- the routing snapshot
@dataclass(frozen=True, slots=True)
class Address:
    """A ready instance as the gateway reaches it."""
    id: str
    host: str
    port: int
    revision: int  # the numbered revision it serves (Deploy-Revision)
    deployment: str = ""
    slot: int = -1  # column in the shared in-flight counters


@dataclass(frozen=True, slots=True)
class Split:
    """A rollout's traffic split: the new revision's number and both sides' weights (percent)."""
    slot: int  # shared counter of the split sequence
    new_revision: int
    new_weight: float
    old_weight: float


@dataclass(frozen=True, slots=True)
class HealthProbe:
    """spec.loadBalancer.healthCheck, as the HAProxy data plane renders it."""
    path: str
    interval: float
    timeout: float
    fall: int = 3


@dataclass(frozen=True, slots=True)
class RouteEntry:
    """What a gateway routes one deployment by. Defaults are the schema's defaults."""
    state: str = "running"  # running | stopped
    algorithm: str = "round-robin"
    sticky: bool = False
    rr_slot: int = 0  # shared round-robin counter
    access: str = "public"  # public | private (endpoint keys)
    keys: dict[str, bool] = field(default_factory=dict)  # key hash -> may scale out (private only)
    revision: int = 0
    split: Split | None = None
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S
    ready: tuple[Address, ...] = ()
    health: HealthProbe | None = None
    protocol: str = "http"  # http | websocket | grpc
    tunnel_timeout: float = DEFAULT_TUNNEL_TIMEOUT_S
    tunnel_idle_timeout: float = DEFAULT_TUNNEL_IDLE_TIMEOUT_S

    @staticmethod
    def from_json(obj: Any) -> "RouteEntry":
        return _decode_object(RouteEntry, obj, "route entry")


@dataclass(frozen=True)
class Snapshot:
    """The routing table of one version: ready instances and routing settings per deployment."""
    version: int
    deployments: dict[str, RouteEntry]

    def to_json(self) -> dict[str, Any]:
        return self.wire

    @cached_property
    def wire(self) -> dict[str, Any]:
        """The wire form, built once per snapshot (the controller answers many syncs with one)."""
        return {"version": self.version, "deployments": {k: _to_json(v) for k, v in self.deployments.items()}}

    @staticmethod
    def from_json(obj: Any) -> "Snapshot":
        return _decode_object(Snapshot, obj, "snapshot")


EMPTY_SNAPSHOT = Snapshot(0, {})


# ---------------------------------------------------------------------------- IPC messages
class Request:
    """An IPC request; subclasses name their `op` and the class of their reply."""
    __slots__ = ()
    op: ClassVar[str]
    reply: ClassVar[type]


class Reply:
    """An IPC reply (an error travels as {"error": ..., "retry_after": ...} instead)."""
    __slots__ = ()
    whole: ClassVar[bool] = False  # the reply's one field `body` is the whole JSON object


@dataclass(frozen=True, slots=True)
class SyncReply(Reply):
    version: int
    snapshot: Snapshot | None = None  # only when the worker's version is not the controller's


@dataclass(frozen=True, slots=True)
class Sync(Request):
    """A worker's report (in-flight counts, activity, per-instance metrics); long-polls for a
    new snapshot for up to `wait` seconds when its version is current."""
    op: ClassVar[str] = "sync"
    reply: ClassVar[type] = SyncReply
    worker: int
    version: int
    inflight: dict[str, int] = field(default_factory=dict)
    activity: dict[str, list[float]] = field(default_factory=dict)  # id -> [last_done, served, errors]
    wait: float = 0.0
    metrics: dict[str, dict] | None = None  # id -> {"d", "n", "e", "h"}


@dataclass(frozen=True, slots=True)
class AcquireReply(Reply):
    instance: Address


@dataclass(frozen=True, slots=True)
class Acquire(Request):
    """Capacity for one request: blocks (cold start) up to `timeout` seconds."""
    op: ClassVar[str] = "acquire"
    reply: ClassVar[type] = AcquireReply
    deployment: str
    timeout: float
    rule: str | None = None  # Deploy-Route-Rule


@dataclass(frozen=True, slots=True)
class StatusReply(Reply):
    status: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Status(Request):
    op: ClassVar[str] = "status"
    reply: ClassVar[type] = StatusReply
    name: str | None = None  # one deployment (with events), or all


@dataclass(frozen=True, slots=True)
class Done(Reply):
    """A reply that carries nothing: the request was done."""


@dataclass(frozen=True, slots=True)
class Unreachable(Request):
    op: ClassVar[str] = "unreachable"
    reply: ClassVar[type] = Done
    instance: str


@dataclass(frozen=True, slots=True)
class FirstByteReply(Reply):
    recorded: bool


@dataclass(frozen=True, slots=True)
class FirstByte(Request):
    """The first response byte of a request that waited on this instance's start."""
    op: ClassVar[str] = "first_byte"
    reply: ClassVar[type] = FirstByteReply
    instance: str
    at: float


@dataclass(frozen=True, slots=True)
class EventsReply(Reply):
    events: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Events(Request):
    op: ClassVar[str] = "events"
    reply: ClassVar[type] = EventsReply
    name: str | None = None
    after: int = -1  # below 0: the latest `limit`
    limit: int = 200


@dataclass(frozen=True, slots=True)
class LogsReply(Reply):
    logs: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Logs(Request):
    op: ClassVar[str] = "logs"
    reply: ClassVar[type] = LogsReply
    name: str
    instance: str
    lines: int = 100


@dataclass(frozen=True, slots=True)
class ColdStartsReply(Reply):
    coldstarts: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ColdStarts(Request):
    op: ClassVar[str] = "coldstarts"
    reply: ClassVar[type] = ColdStartsReply


@dataclass(frozen=True, slots=True)
class ActionReply(Reply):
    result: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Action(Request):
    """scale / stop / start / delete / rollback and the read-only views (controller.operations)."""
    op: ClassVar[str] = "action"
    reply: ClassVar[type] = ActionReply
    name: str
    action: str
    args: dict[str, Any] = field(default_factory=dict)
    actor: str | None = None  # who asked (audited when it changes something)


@dataclass(frozen=True, slots=True)
class SourceReply(Reply):
    source: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Source(Request):
    """Where desired state comes from; `sync`: poll git now."""
    op: ClassVar[str] = "source"
    reply: ClassVar[type] = SourceReply
    sync: bool = False
    timeout: float = 60.0
    actor: str | None = None


@dataclass(frozen=True, slots=True)
class TokenOwner:
    """Who an API token belongs to (controller.auth.Principal's fields)."""
    name: str
    role: str  # viewer | operator | admin


@dataclass(frozen=True, slots=True)
class AuthReply(Reply):
    principal: TokenOwner | None = None  # None: unknown or revoked token


@dataclass(frozen=True, slots=True)
class Auth(Request):
    """Who holds the API token with this SHA-256."""
    op: ClassVar[str] = "auth"
    reply: ClassVar[type] = AuthReply
    hash: str


@dataclass(frozen=True, slots=True)
class Document(Reply):
    """A reply whose JSON object is shown as it is (token and key management)."""
    whole: ClassVar[bool] = True
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Tokens(Request):
    """API tokens: do = list | create | revoke."""
    op: ClassVar[str] = "tokens"
    reply: ClassVar[type] = Document
    do: str
    # name, role: as the HTTP body gave them; AuthStore checks them (its own message, audited)
    name: Any = None
    role: Any = None
    actor: str | None = None


@dataclass(frozen=True, slots=True)
class Keys(Request):
    """Endpoint keys of a deployment: do = list | create | revoke."""
    op: ClassVar[str] = "keys"
    reply: ClassVar[type] = Document
    do: str
    # as the HTTP body gave them; AuthService/AuthStore check them (their own message, audited)
    deployment: Any = None
    name: Any = None
    scale_out: Any = False
    actor: str | None = None


REQUESTS: dict[str, type] = {cls.op: cls for cls in (
    Sync, Acquire, Status, Unreachable, FirstByte, Events, Logs, ColdStarts, Action, Source, Auth, Tokens, Keys)}


# ---------------------------------------------------------------------------- the one encoder / decoder
def encode(msg: Any) -> bytes:
    """A request or a reply as one JSON line (with its newline)."""
    return json.dumps(to_json(msg), separators=(",", ":")).encode() + b"\n"


def encode_error(exc: AutoDeployError) -> bytes:
    """An error reply: the coded error and its Retry-After; `decode` of a reply raises it again."""
    return json.dumps({"error": exc.to_json(private=True), "retry_after": exc.retry_after},
                      separators=(",", ":")).encode() + b"\n"


def to_json(msg: Any) -> dict[str, Any]:
    """A message's JSON object (what `encode` writes)."""
    if isinstance(msg, Reply) and msg.whole:
        return dict(msg.body)  # type: ignore[attr-defined]
    obj = _to_json(msg)
    if isinstance(msg, Request):
        obj = {"op": msg.op, **obj}
    return obj


def decode(line: bytes | str | dict, kind: type | None = None) -> Any:
    """A request (kind None: found by its `op`) or a reply of class `kind`, from one JSON line
    (or its parsed object). Anything malformed raises BAD_REQUEST (1013)."""
    if isinstance(line, dict):
        obj: Any = line
    else:
        try:
            obj = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            raise AutoDeployError(errors.BAD_REQUEST, f"bad IPC message: not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise AutoDeployError(errors.BAD_REQUEST, f"bad IPC message: a JSON object expected, got {_kind(obj)}")
    if kind is None:
        op = obj.get("op")
        kind = REQUESTS.get(op) if isinstance(op, str) else None
        if kind is None:
            raise AutoDeployError(errors.BAD_REQUEST, f"bad IPC message: unknown op {op!r}")
        obj = {k: v for k, v in obj.items() if k != "op"}
        return _decode_object(kind, obj, kind.op)
    error = obj.get("error")
    if isinstance(error, dict) and "code" in error:
        retry = obj.get("retry_after")
        try:
            raise AutoDeployError.from_json(error, float(retry) if retry is not None else None)
        except (ValueError, TypeError):
            raise AutoDeployError(errors.BAD_REQUEST, f"bad IPC message: malformed error {error!r}") from None
    if getattr(kind, "whole", False):
        return kind(body=obj)
    return _decode_object(kind, obj, f"{kind.__name__}")


_SCALARS = frozenset({str, int, float, bool, type(None)})


def _to_json(value: Any) -> Any:
    t = type(value)
    if t in _SCALARS:
        return value
    if t is list or t is tuple:
        return [v if type(v) in _SCALARS else _to_json(v) for v in value]
    if t is dict:
        return {k: v if type(v) in _SCALARS else _to_json(v) for k, v in value.items()}
    if t is Snapshot:
        return value.wire  # built once per snapshot
    if is_dataclass(value):
        out = {}
        for f in _fields_of(t):
            v = getattr(value, f.name)
            if v is None and f.default is None:
                continue  # an absent optional field decodes to its default None
            out[f.name] = v if type(v) in _SCALARS else _to_json(v)
        return out
    return value


# A field's decoder: (value, where) -> converted value, raising BAD_REQUEST on a wrong type.
# `where` names the value for the message: a str, or (parent, key) pairs rendered only on
# an error (a str key is a field, `.key`; an int or a tuple `(key,)` an index, `[key]`).
Where = Any
Conv = Callable[[Any, Where], Any]
_FIELDS: dict[type, tuple] = {}
_PLANS: dict[type, tuple[tuple[str, Conv, Any, Any], ...]] = {}


def _fields_of(cls: type) -> tuple:
    got = _FIELDS.get(cls)
    if got is None:
        got = _FIELDS[cls] = fields(cls)
    return got


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _path(where: Where) -> str:
    if isinstance(where, str):
        return where
    parent, key = where
    if isinstance(key, str):
        return f"{_path(parent)}.{key}"
    return f"{_path(parent)}[{key[0]!r}]" if isinstance(key, tuple) else f"{_path(parent)}[{key}]"


def _bad(where: Where, want: str, value: Any) -> AutoDeployError:
    return AutoDeployError(errors.BAD_REQUEST, f"bad IPC message: {_path(where)} must be {want}, got {_kind(value)}")


def _plan(cls: type) -> tuple[tuple[str, Conv, Any, Any], ...]:
    plan = _PLANS.get(cls)
    if plan is None:
        hints = typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))
        plan = _PLANS[cls] = tuple((f.name, _converter(hints[f.name]), f.default, f.default_factory)
                                   for f in _fields_of(cls))
    return plan


def _decode_object(cls: type, obj: Any, where: Where) -> Any:
    if type(obj) is not dict:
        raise _bad(where, "an object", obj)
    kw = {}
    for name, conv, default, factory in _plan(cls):
        if name in obj:
            kw[name] = conv(obj[name], (where, name))
        elif default is MISSING and factory is MISSING:
            raise AutoDeployError(errors.BAD_REQUEST, f"bad IPC message: {_path((where, name))} is missing")
    return cls(**kw)


def _converter(tp: Any) -> Conv:
    """The decoder of one annotated type (built once per field)."""
    if tp is Any:
        return lambda v, where: v
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = _converter(args[0] if len(args) == 1 else Any)

        def optional(v: Any, where: Where) -> Any:
            return None if v is None else inner(v, where)
        return optional
    if tp is bool:
        def boolean(v: Any, where: Where) -> bool:
            if type(v) is not bool:
                raise _bad(where, "true or false", v)
            return v
        return boolean
    if tp is int:
        def integer(v: Any, where: Where) -> int:
            if type(v) is int:
                return v
            if type(v) is float and v.is_integer():
                return int(v)
            raise _bad(where, "an integer", v)
        return integer
    if tp is float:
        def number(v: Any, where: Where) -> float:
            t = type(v)
            if t is float:
                return v
            if t is int:
                return float(v)
            raise _bad(where, "a number", v)
        return number
    if tp is str:
        def string(v: Any, where: Where) -> str:
            if type(v) is not str:
                raise _bad(where, "a string", v)
            return v
        return string
    if tp is dict or origin is dict:
        args = typing.get_args(tp)
        value = _converter(args[1]) if len(args) == 2 and args[1] is not Any else None

        def mapping(v: Any, where: Where) -> dict:
            if type(v) is not dict:
                raise _bad(where, "an object", v)
            if value is None:
                return v
            return {k: value(x, (where, (k,))) for k, x in v.items()}
        return mapping
    if tp is list or origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        item = _converter(args[0]) if args and args[0] is not Any else None
        make = tuple if origin is tuple else list

        def sequence(v: Any, where: Where) -> Any:
            if type(v) is not list and type(v) is not tuple:
                raise _bad(where, "a list", v)
            return make(v) if item is None else make([item(x, (where, i)) for i, x in enumerate(v)])
        return sequence
    if isinstance(tp, type) and is_dataclass(tp):
        return lambda v, where: _decode_object(tp, v, where)
    raise TypeError(f"no IPC decoder for {tp!r}")  # a programming error in this module, found by its tests
