"""The gateway's gunicorn worker: gevent (a greenlet per connection), so thousands of
held, hung or streaming requests and slow clients cost memory rather than a thread each.

One change to gunicorn's own gevent worker: on a graceful stop (SIGTERM) it closes the
connections that sit idle between keep-alive requests. gunicorn waits for every
connection's greenlet, and an idle one only wakes at the keep-alive timeout, so without
this a stop would last `--keep-alive` seconds whenever a client kept a connection open.
Reading is shut down (nothing is sent), so the client sees an ordinary keep-alive close.
"""
from __future__ import annotations

import socket
from contextlib import contextmanager
from typing import Any, Iterator

import gevent
from gunicorn.workers.ggevent import GeventWorker as _GeventWorker


class GeventWorker(_GeventWorker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._clients: dict[Any, socket.socket] = {}  # greenlet -> its connection
        self._idle: set[Any] = set()  # greenlets waiting for the next request

    def handle(self, listener: Any, client: socket.socket, addr: Any) -> None:
        g = gevent.getcurrent()
        self._clients[g] = client
        try:
            super().handle(listener, client, addr)
        finally:
            self._clients.pop(g, None)
            self._idle.discard(g)

    @contextmanager
    def timeout_ctx(self) -> Iterator[None]:
        # gunicorn reads each request head inside this: the connection is idle until it arrives.
        g = gevent.getcurrent()
        self._idle.add(g)
        try:
            with gevent.Timeout(self.cfg.keepalive, False):
                yield
        finally:
            self._idle.discard(g)

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        gevent.spawn(self._close_idle)

    def _close_idle(self) -> None:
        for g in list(self._idle):
            client = self._clients.get(g)
            if client is None:
                continue
            try:
                client.shutdown(socket.SHUT_RD)
            except OSError:
                pass
