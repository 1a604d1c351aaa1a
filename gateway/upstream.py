"""A lean HTTP/1.1 client for the proxy's upstream side, with keep-alive pooling.

http.client parses every response's headers through the email package, which was the
largest single cost on the proxy's hot path; model servers speak plain HTTP/1.1, so a
small, strict client does it in a fraction of the time. Bodies stream both ways.
"""
from __future__ import annotations

import socket
import threading
import time
from collections import deque
from typing import Iterable, Iterator

CHUNK = 64 * 1024
SMALL_BODY = 64 * 1024  # request bodies up to this size are buffered, so a stale keep-alive can be retried
MAX_HEADER_LINE = 65536
MAX_HEADERS = 200
IDLE_PER_UPSTREAM = 64


class UpstreamConnectError(OSError):
    """Nothing reached the upstream: it refused or did not answer the connect."""


class UpstreamProtocolError(OSError):
    """The upstream sent something that is not HTTP/1.x, or closed mid-message."""


class UpstreamBadResponse(UpstreamProtocolError):
    """The upstream answered, but not in HTTP/1.x (bad status line, length, chunk size...):
    a protocol error, never retried."""


class UpstreamTimeout(OSError):
    """The upstream did not send its response headers within the request timeout."""


class UpstreamBadRequest(ValueError):
    """The request cannot be written in HTTP/1.1 as it stands (not one byte was sent)."""


class _Conn:
    __slots__ = ("sock", "rfile", "reused")

    def __init__(self, sock: socket.socket, buffered: bool = True) -> None:
        self.sock = sock
        # Unbuffered: an upgrade's answer head is read byte by byte, so the first bytes of
        # the new protocol that follow a 101 stay on the socket for the tunnel.
        self.rfile = sock.makefile("rb", buffering=CHUNK if buffered else 0)
        self.reused = False

    def close(self) -> None:
        try:
            self.rfile.close()
        finally:
            self.sock.close()


class UpstreamPool:
    """Idle keep-alive connections per (host, port), reused most-recent first."""

    def __init__(self, connect_timeout: float = 5.0, read_timeout: float | None = None) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: dict[tuple[str, int], deque[_Conn]] = {}
        self._lock = threading.Lock()

    def _checkout(self, key: tuple[str, int]) -> _Conn:
        with self._lock:
            idle = self._idle.get(key)
            if idle:
                conn = idle.pop()
                conn.reused = True
                return conn
        return self._fresh(key)

    def _checkin(self, key: tuple[str, int], conn: _Conn) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, deque())
            if len(idle) < IDLE_PER_UPSTREAM:
                idle.append(conn)
                return
        conn.close()

    def request(self, host: str, port: int, method: str, target: str, headers: list[tuple[str, str]],
                body: bytes | Iterable[bytes] | None = None, content_length: int | None = None,
                timeout: float | None = None) -> "UpstreamResponse":
        """Send one request; `body` is bytes (sent with Content-Length), an iterable of chunks
        (sent with Content-Length when `content_length` is given, else chunked), or None.

        `target` is the request target exactly as it goes on the wire. `timeout` bounds the
        time until the response headers are in (UpstreamTimeout); the body is not bounded."""
        key = (host, port)
        if any(c in target for c in " \r\n\t\0"):
            raise UpstreamBadRequest(f"request target {target[:80]!r} holds a space or control character")
        if body is not None and not isinstance(body, bytes) and content_length is not None \
                and content_length <= SMALL_BODY:
            body = b"".join(body)  # small: buffer it so a stale pooled connection can be retried
        head = [f"{method} {target} HTTP/1.1\r\nHost: {host}:{port}\r\n"]
        head += [f"{k}: {v}\r\n" for k, v in headers]
        if isinstance(body, bytes):
            head.append(f"Content-Length: {len(body)}\r\n")
        elif body is not None:
            head.append(f"Content-Length: {content_length}\r\n" if content_length is not None
                        else "Transfer-Encoding: chunked\r\n")
        head.append("\r\n")
        try:
            head_bytes = "".join(head).encode("latin-1")
        except UnicodeEncodeError as exc:
            raise UpstreamBadRequest(f"a header holds a character HTTP/1.1 cannot carry: {exc}") from None
        replayable = body is None or isinstance(body, bytes)
        deadline = None if timeout is None else time.monotonic() + timeout
        for attempt in (1, 2):
            conn = self._checkout(key) if (replayable and attempt == 1) else self._fresh(key)
            try:
                conn.sock.settimeout(timeout if timeout is not None else self.read_timeout)
                if replayable:
                    conn.sock.sendall(head_bytes + body if body else head_bytes)  # type: ignore[operator]
                else:
                    conn.sock.sendall(head_bytes)
                    _send_stream(conn.sock, body, chunked=content_length is None)  # type: ignore[arg-type]
                response = UpstreamResponse.read(self, key, conn, method, deadline)
                conn.sock.settimeout(self.read_timeout)  # the body streams at the instance's pace
                return response
            except socket.timeout:
                conn.close()
                raise UpstreamTimeout(f"no response headers from {host}:{port} within {timeout:g} s") from None
            except OSError as exc:  # UpstreamProtocolError included
                conn.close()
                # A pooled connection the upstream closed while idle fails at once: try a new one.
                if attempt == 1 and conn.reused and replayable and not isinstance(exc, UpstreamBadResponse):
                    continue
                raise
            except BaseException:
                conn.close()
                raise
        raise AssertionError("unreachable")

    def upgrade(self, host: str, port: int, method: str, target: str, headers: list[tuple[str, str]],
                timeout: float) -> "UpstreamResponse":
        """Send a bodiless upgrade request on a new connection (never pooled). On a 101 the
        caller takes the socket with `detach()`; any other answer is a normal response whose
        connection is closed after its body. `timeout` bounds the connect and each read/write."""
        if any(c in target for c in " \r\n\t\0"):
            raise UpstreamBadRequest(f"request target {target[:80]!r} holds a space or control character")
        head = [f"{method} {target} HTTP/1.1\r\nHost: {host}:{port}\r\n"]
        head += [f"{k}: {v}\r\n" for k, v in headers]
        head.append("\r\n")
        try:
            head_bytes = "".join(head).encode("latin-1")
        except UnicodeEncodeError as exc:
            raise UpstreamBadRequest(f"a header holds a character HTTP/1.1 cannot carry: {exc}") from None
        key = (host, port)
        conn = self._fresh(key, buffered=False)
        conn.sock.settimeout(timeout)
        try:
            conn.sock.sendall(head_bytes)
            resp = UpstreamResponse.read(self, key, conn, method, time.monotonic() + timeout)
        except socket.timeout:
            conn.close()
            raise UpstreamTimeout(f"no answer to the upgrade from {host}:{port} within {timeout:g} s") from None
        except BaseException:
            conn.close()
            raise
        if resp.status != 101:
            conn.rfile.close()
            conn.rfile = conn.sock.makefile("rb", buffering=CHUNK)  # the head was read exactly
            resp.no_reuse()
        return resp

    def _fresh(self, key: tuple[str, int], buffered: bool = True) -> _Conn:
        try:
            sock = socket.create_connection(key, timeout=self.connect_timeout)
        except OSError as exc:
            raise UpstreamConnectError(f"connect to {key[0]}:{key[1]} failed: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.read_timeout)
        return _Conn(sock, buffered)


def _send_stream(sock: socket.socket, body: Iterable[bytes], chunked: bool) -> None:
    for piece in body:
        if not piece:
            continue
        sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
    if chunked:
        sock.sendall(b"0\r\n\r\n")


class UpstreamResponse:
    __slots__ = ("status", "reason", "headers", "chunked", "length", "_pool", "_key", "_conn", "_keep",
                 "_done", "no_body")

    def __init__(self) -> None:
        self._done = False

    @classmethod
    def read(cls, pool: UpstreamPool, key: tuple[str, int], conn: _Conn, method: str,
             deadline: float | None = None) -> "UpstreamResponse":
        rfile = conn.rfile

        def line_in_time() -> bytes:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout("response headers took too long")
                conn.sock.settimeout(left)
            return rfile.readline(MAX_HEADER_LINE + 1)

        while True:
            line = line_in_time()
            if not line:
                raise UpstreamProtocolError("upstream closed the connection before answering")
            parts = line.split(None, 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not line.endswith(b"\n") \
                    or not (parts[1].isdigit() and len(parts[1]) == 3):
                raise UpstreamBadResponse(f"not an HTTP/1.x status line: {line[:80]!r}")
            status = int(parts[1])
            headers: list[tuple[str, str]] = []
            for _ in range(MAX_HEADERS + 1):
                h = line_in_time()
                if h in (b"\r\n", b"\n"):
                    break
                if not h:
                    raise UpstreamProtocolError("upstream closed the connection inside the response headers")
                if len(headers) == MAX_HEADERS or not h.endswith(b"\n"):
                    raise UpstreamBadResponse(f"response headers over {MAX_HEADERS} lines or "
                                              f"{MAX_HEADER_LINE} bytes a line")
                name, colon, value = h.partition(b":")
                if not colon or not name.strip() or name != name.strip():
                    raise UpstreamBadResponse(f"not an HTTP header line: {h[:80]!r}")
                headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
            if status >= 200 or status == 101:
                break  # 1xx informational responses (100 Continue) are skipped
        self = cls()
        self.status = status
        self.reason = parts[2].strip().decode("latin-1") if len(parts) > 2 else ""
        self.headers = headers
        lower = {k.lower(): v for k, v in headers}
        self.chunked = "chunked" in lower.get("transfer-encoding", "").lower()
        cl = lower.get("content-length")
        if cl is not None and not self.chunked and not cl.isdigit():
            raise UpstreamBadResponse(f"Content-Length {cl[:40]!r} is not a number of bytes")
        self.length = int(cl) if cl is not None and not self.chunked else None
        self.no_body = method == "HEAD" or status in (204, 304) or 100 <= status < 200
        close = "close" in lower.get("connection", "").lower() or parts[0] == b"HTTP/1.0"
        self._keep = not close and (self.no_body or self.chunked or self.length is not None)
        self._pool, self._key, self._conn = pool, key, conn
        return self

    def no_reuse(self) -> None:
        """Its connection is not handed back to the pool when the body is done."""
        self._keep = False

    def stream(self) -> Iterator[bytes]:
        """The body as it arrives (each chunk of a chunked body as soon as it is complete)."""
        rfile = self._conn.rfile
        try:
            if self.no_body:
                pass
            elif self.chunked:
                while True:
                    size_line = rfile.readline(MAX_HEADER_LINE)
                    if not size_line:
                        raise UpstreamProtocolError("upstream closed mid-chunk")
                    digits = size_line.split(b";", 1)[0].strip()
                    if not digits or len(digits) > 16 or digits.strip(b"0123456789abcdefABCDEF"):
                        raise UpstreamBadResponse(f"bad chunk size line {size_line[:40]!r}")
                    size = int(digits, 16)
                    if size == 0:
                        while rfile.readline(MAX_HEADER_LINE) not in (b"\r\n", b"\n", b""):
                            pass  # trailers are dropped (hop-by-hop for our purposes)
                        break
                    data = rfile.read(size)
                    if len(data) < size:
                        raise UpstreamProtocolError("upstream closed mid-chunk")
                    if rfile.readline(MAX_HEADER_LINE) not in (b"\r\n", b"\n"):
                        raise UpstreamBadResponse("a chunk is not followed by CRLF")
                    yield data
            elif self.length is not None:
                remaining = self.length
                while remaining:
                    data = rfile.read1(min(remaining, CHUNK))
                    if not data:
                        raise UpstreamProtocolError(f"upstream closed with {remaining} bytes unsent")
                    remaining -= len(data)
                    yield data
            else:
                while True:
                    data = rfile.read1(CHUNK)
                    if not data:
                        break
                    yield data
            self._done = True
        finally:
            self.release()

    def read_all(self) -> bytes:
        return b"".join(self.stream())

    def detach(self) -> socket.socket:
        """Hand the connection's socket to the caller (after a 101: the tunnel owns it now)."""
        conn, self._conn = self._conn, None
        assert conn is not None, "response already released"
        conn.rfile.close()  # the socket stays open: makefile objects only hold a reference
        return conn.sock

    def release(self) -> None:
        """Return the connection to the pool if the body was read to its end, else close it."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if (self._done or self.no_body) and self._keep:
            self._pool._checkin(self._key, conn)
        else:
            conn.close()
