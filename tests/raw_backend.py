#!/usr/bin/env python3
"""A deliberately misbehaving HTTP/1.1 instance for the proxy tests, on raw sockets.

Listens on $PORT. By path (after the gateway strips /d/<name>):
  /health            200 ok
  /hang              reads the request, never answers; records when the gateway closes it
  /closed-log        the lines the /hang connections logged (one "closed" per closed one)
  /bad-status        "HTTP/1.1 abc OK"
  /bad-length        Content-Length: -5
  /bad-chunk         chunked, with a chunk size that is not hex
  /cut-small         Content-Length 1000, sends 10 bytes, closes
  /cut-big           Content-Length 1000000, sends 100000 bytes, closes
  /cut-chunked       one chunk, then closes without the last chunk
  anything else      200 with body = repr of the raw request line, exactly as received
"""
from __future__ import annotations

import os
import socket
import threading

PORT = int(os.environ["PORT"])
CLOSED: list[str] = []


def respond(conn: socket.socket, status: bytes, headers: list[bytes], body: bytes) -> None:
    conn.sendall(status + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body)


def handle(conn: socket.socket) -> None:
    f = conn.makefile("rb")
    try:
        while True:
            line = f.readline(65536)
            if not line:
                return
            length = 0
            while True:
                h = f.readline(65536)
                if h in (b"\r\n", b"\n", b""):
                    break
                if h.lower().startswith(b"content-length:"):
                    length = int(h.split(b":", 1)[1])
            if length:
                f.read(length)
            target = line.split(b" ")[1] if line.count(b" ") >= 2 else b""
            path = target.split(b"?")[0]
            if path == b"/health":
                respond(conn, b"HTTP/1.1 200 OK", [b"Content-Length: 2"], b"ok")
            elif path == b"/hang":
                if f.read(1) == b"":  # blocks until the gateway gives up and closes
                    CLOSED.append("closed")
                return
            elif path == b"/closed-log":
                body = ("\n".join(CLOSED)).encode()
                respond(conn, b"HTTP/1.1 200 OK", [b"Content-Length: %d" % len(body)], body)
            elif path == b"/bad-status":
                respond(conn, b"HTTP/1.1 abc OK", [b"Content-Length: 2"], b"no")
            elif path == b"/bad-length":
                respond(conn, b"HTTP/1.1 200 OK", [b"Content-Length: -5"], b"no")
            elif path == b"/bad-chunk":
                respond(conn, b"HTTP/1.1 200 OK", [b"Transfer-Encoding: chunked"], b"2\r\nok\r\nzz\r\nbad\r\n")
                return
            elif path == b"/cut-small":
                respond(conn, b"HTTP/1.1 200 OK", [b"Content-Length: 1000"], b"x" * 10)
                return
            elif path == b"/cut-big":
                respond(conn, b"HTTP/1.1 200 OK", [b"Content-Length: 1000000"], b"x" * 100000)
                return
            elif path == b"/cut-chunked":
                respond(conn, b"HTTP/1.1 200 OK", [b"Transfer-Encoding: chunked"], b"5\r\nhello\r\n")
                return
            else:
                body = repr(line).encode()
                respond(conn, b"HTTP/1.1 200 OK", [b"Content-Length: %d" % len(body)], body)
    except OSError:
        return
    finally:
        f.close()
        conn.close()


def main() -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", PORT))
    srv.listen(128)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
