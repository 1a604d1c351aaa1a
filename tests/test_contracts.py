"""The typed contracts between the controller and the gateway (controller.contracts):
every message and the routing snapshot survive the one encoder/decoder; anything
malformed is a coded 1013, never a KeyError; the IPC client never waits forever."""
from __future__ import annotations

import json
import socket
import threading
import time
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller import contracts, errors
from controller.contracts import (REQUESTS, Acquire, AcquireReply, Address, Document, RouteEntry, Snapshot, Status,
                                  Sync, SyncReply, decode, encode, encode_error)
from controller.errors import AutoDeployError
from controller.ipc import IpcClient, IpcServer
from controller.secrets import MASK, Redactor
from test_controller import dep, make

REPLIES = sorted({cls.reply for cls in REQUESTS.values()}, key=lambda c: c.__name__)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=8)


def strategy(tp: Any) -> st.SearchStrategy:
    """Values of an annotated field type, as the contracts module declares them."""
    if tp is Any:
        return JSON
    origin = typing.get_origin(tp)
    if origin in (typing.Union, __import__("types").UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return st.none() | strategy(args[0])
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(-2**40, 2**40)
    if tp is float:
        return st.floats(allow_nan=False, allow_infinity=False)
    if tp is str:
        return st.text(max_size=12)
    if tp is dict or origin is dict:
        args = typing.get_args(tp)
        return st.dictionaries(st.text(max_size=8), strategy(args[1]) if args else JSON, max_size=3)
    if tp is list or origin is list:
        args = typing.get_args(tp)
        return st.lists(strategy(args[0]) if args else JSON, max_size=3)
    if origin is tuple:
        return st.lists(strategy(typing.get_args(tp)[0]), max_size=3).map(tuple)
    if is_dataclass(tp):
        return dataclass_strategy(tp)
    raise AssertionError(f"no strategy for {tp!r}")


def dataclass_strategy(cls: type) -> st.SearchStrategy:
    hints = typing.get_type_hints(cls, vars(contracts))
    return st.builds(cls, **{f.name: strategy(hints[f.name]) for f in fields(cls)})


def no_error_key(msg: Any) -> bool:
    # A whole-object reply whose body has an "error" object would read as an error reply.
    return not (isinstance(msg, Document) and isinstance(msg.body.get("error"), dict))


@pytest.mark.parametrize("cls", list(REQUESTS.values()), ids=lambda c: c.op)
def test_every_request_survives_encode_and_decode(cls):
    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(dataclass_strategy(cls))
    def round_trip(msg):
        line = encode(msg)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert json.loads(line)["op"] == cls.op
        assert decode(line) == msg
    round_trip()


@pytest.mark.parametrize("cls", REPLIES, ids=lambda c: c.__name__)
def test_every_reply_survives_encode_and_decode(cls):
    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(dataclass_strategy(cls).filter(no_error_key))
    def round_trip(msg):
        assert decode(encode(msg), cls) == msg
    round_trip()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dataclass_strategy(Snapshot))
def test_the_routing_snapshot_survives_its_wire_form(snap):
    assert Snapshot.from_json(json.loads(json.dumps(snap.to_json()))) == snap
    assert decode(encode(SyncReply(snap.version, snap)), SyncReply).snapshot == snap


def test_a_route_entry_missing_fields_takes_the_schema_defaults():
    entry = RouteEntry.from_json({"ready": [{"id": "i1", "host": "h", "port": 8000, "revision": 3}]})
    assert (entry.state, entry.algorithm, entry.request_timeout, entry.protocol) == ("running", "round-robin",
                                                                                     300.0, "http")
    assert entry.ready == (Address("i1", "h", 8000, 3),) and entry.ready[0].slot == -1


@pytest.mark.parametrize("line, says", [
    (b"", "not JSON"),
    (b"not json\n", "not JSON"),
    (b"\xff\xfe{}\n", "not JSON"),
    (b"[1, 2]\n", "a JSON object expected"),
    (b'{"deployment": "m"}\n', "unknown op None"),
    (b'{"op": 7}\n', "unknown op 7"),
    (b'{"op": "reboot"}\n', "unknown op 'reboot'"),
    (b'{"op": "acquire", "timeout": 5}\n', "acquire.deployment is missing"),
    (b'{"op": "acquire", "deployment": "m", "timeout": "5"}\n', "acquire.timeout must be a number, got str"),
    (b'{"op": "sync", "worker": true, "version": 1}\n', "sync.worker must be an integer, got bool"),
    (b'{"op": "sync", "worker": 1, "version": 1, "inflight": {"a": "x"}}\n', "sync.inflight['a'] must be an integer"),
    (b'{"op": "sync", "worker": 1, "version": 1, "activity": []}\n', "sync.activity must be an object, got list"),
    (b'{"op": "action", "name": "m", "action": "scale", "args": null}\n', "action.args must be an object, got null"),
    (b'{"op": "status", "name": 5}\n', "status.name must be a string, got int"),
    (b'{"op": "source", "sync": "yes"}\n', "source.sync must be true or false, got str"),
])
def test_a_malformed_request_is_a_coded_bad_request(line, says):
    with pytest.raises(AutoDeployError) as err:
        decode(line)
    assert err.value.error is errors.BAD_REQUEST and says in err.value.message


@pytest.mark.parametrize("reply, cls, says", [
    ({"version": 3, "snapshot": {"version": 3}}, SyncReply, "SyncReply.snapshot.deployments is missing"),
    ({"version": 3, "snapshot": {"version": 3, "deployments": {"m": {"ready": [{"id": "i"}]}}}}, SyncReply,
     "SyncReply.snapshot.deployments['m'].ready[0].host is missing"),
    ({"version": 3, "snapshot": {"version": 3, "deployments": {"m": {"split": {"slot": 1}}}}}, SyncReply,
     "split.new_revision is missing"),
    ({"instance": {"id": "i", "host": "h", "port": "80", "revision": 1}}, AcquireReply,
     "AcquireReply.instance.port must be an integer, got str"),
    ({}, AcquireReply, "AcquireReply.instance is missing"),
])
def test_a_malformed_reply_is_a_coded_bad_request(reply, cls, says):
    with pytest.raises(AutoDeployError) as err:
        decode(json.dumps(reply), cls)
    assert err.value.error is errors.BAD_REQUEST and says in err.value.message


def test_an_error_reply_raises_its_own_coded_error_with_retry_after():
    line = encode_error(AutoDeployError(errors.START_TIMEOUT, "no instance of m became ready", retry_after=5.0))
    with pytest.raises(AutoDeployError) as err:
        decode(line, AcquireReply)
    assert err.value.error is errors.START_TIMEOUT and err.value.retry_after == 5.0
    assert err.value.detail == "no instance of m became ready"


# ------------------------------------------------------------------ over a real Unix socket
@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Any, IpcServer, str]]:
    h = make(tmp_path)
    path = str(tmp_path / "ipc.sock")
    server = IpcServer(path, h.c)
    server.start()
    yield h, server, path
    server.close()
    h.c.shutdown()


def test_the_controller_answers_typed_requests_over_its_socket(served):
    h, _server, path = served
    h.apply(dep("m"))
    client = IpcClient(path, call_timeout=10)
    try:
        got = client.request(Acquire(deployment="m", timeout=5))
        assert isinstance(got, AcquireReply) and got.instance.id == h.recs("m")[0].id
        reply = client.request(Sync(worker=1, version=0))
        assert reply.version == h.c.version and reply.snapshot is not None
        entry = reply.snapshot.deployments["m"]
        assert [a.id for a in entry.ready] == [got.instance.id] and entry.ready[0].port == got.instance.port
        assert client.request(Sync(worker=1, version=reply.version)).snapshot is None  # current: no table
        assert client.request(Status(name="m")).status["name"] == "m"
        with pytest.raises(AutoDeployError) as err:
            client.request(Acquire(deployment="nope", timeout=1))
        assert err.value.error is errors.UNKNOWN_DEPLOYMENT
    finally:
        client.close()


def test_garbage_on_the_socket_gets_a_coded_answer_and_the_connection_goes_on(served):
    _h, _server, path = served
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        rfile = sock.makefile("rb")
        for line in (b"{{{\n", b'{"op": "reboot"}\n', b'{"op": "acquire"}\n', b'{"op": "tokens", "do": "list"}\n'):
            sock.sendall(line)
            answer = json.loads(rfile.readline())
            assert answer["error"]["code"] == errors.BAD_REQUEST.code, answer
        sock.sendall(encode(Status()))
        assert "deployments" in json.loads(rfile.readline())["status"]


def test_an_endless_line_gets_a_coded_answer_and_the_connection_is_closed(served, monkeypatch):
    import controller.ipc
    monkeypatch.setattr(controller.ipc, "MAX_LINE", 4096)
    _h, _server, path = served
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(b'{"op": "status", "name": "' + b"x" * 10_000)  # no end in sight
        rfile = sock.makefile("rb")
        answer = json.loads(rfile.readline())
        assert answer["error"]["code"] == errors.BAD_REQUEST.code and "4096 bytes" in answer["error"]["msg"], answer
        assert rfile.readline() == b""  # hung up: the rest of that line is not read as requests
    client = IpcClient(path, call_timeout=10)  # others are served as before
    try:
        assert "deployments" in client.request(Status()).status
    finally:
        client.close()


def test_a_masked_reply_still_ends_its_line(served):
    """serve masks secret values in every reply (Redactor.json_text re-dumps the JSON):
    the reply must still arrive as one line, or the gateway would wait for its deadline."""
    _h, server, path = served
    redactor = Redactor()
    redactor.set_values(["s3cr3t-value"])
    server.redact = redactor.json_text
    client = IpcClient(path, call_timeout=10)
    try:
        with pytest.raises(AutoDeployError) as err:
            client.request(Acquire(deployment="s3cr3t-value", timeout=1))
        assert err.value.error is errors.UNKNOWN_DEPLOYMENT and "s3cr3t-value" not in err.value.message
        assert MASK in err.value.message
        assert "deployments" in client.request(Status()).status  # the connection goes on
    finally:
        client.close()


class SilentServer:
    """A real Unix socket server that accepts and reads but never answers (a wedged controller)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.accepted: list[socket.socket] = []
        self.got = b""
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            self.got += data

    def close(self) -> None:
        self._stop.set()
        for c in self.accepted:
            c.close()
        self.sock.close()


@pytest.mark.parametrize("msg, expect_s", [
    (Status(), 0.3),  # an ordinary call: call_timeout
    (Acquire(deployment="m", timeout=0.2), 0.2 + 0.1),  # acquire: its own timeout plus the margin
    (Sync(worker=1, version=3, wait=0.1), 0.1 + 0.3),  # a long poll: its wait plus call_timeout
])
def test_a_controller_that_never_answers_costs_a_bounded_wait_and_a_1011(tmp_path, msg, expect_s):
    path = str(tmp_path / "silent.sock")
    server = SilentServer(path)
    client = IpcClient(path, call_timeout=0.3, wait_margin=0.1)
    try:
        assert client.read_timeout(msg) == pytest.approx(expect_s)
        for attempt in (1, 2):
            started = time.monotonic()
            with pytest.raises(AutoDeployError) as err:
                client.request(msg)
            waited = time.monotonic() - started
            assert err.value.error is errors.CONTROLLER_UNAVAILABLE and repr(msg.op) in err.value.message
            assert waited >= expect_s * 0.9  # it did wait for its deadline (never asserted as an upper bound)
            # The connection was dropped, not reused: a late answer cannot pair with the next call.
            wait_until_true(lambda: len(server.accepted) == attempt)
        assert server.got.count(b"\n") == 2  # sent once per call: a timed-out call is not retried
    finally:
        client.close()
        server.close()


def wait_until_true(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
