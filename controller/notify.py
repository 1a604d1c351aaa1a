"""Webhook deliveries for alerts: a background sender that never blocks the controller.

`send` only puts the delivery in a bounded queue (full: it is dropped and reported,
never waited for). One daemon thread POSTs the JSON with connect and read timeouts;
a failure (no connection, timeout, 5xx, 429) is retried after the backoff of
`controller.policy.alerts.webhook_retry_delay`, and the queue keeps moving meanwhile:
a retry waits in a heap by due time, so one dead receiver never holds up the others.
"""
from __future__ import annotations

import heapq
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests

from controller.policy.alerts import webhook_retry_delay

log = logging.getLogger("autodeploy.notify")

MAX_QUEUE = 1000
CONNECT_TIMEOUT_S = 2.0
READ_TIMEOUT_S = 5.0
MAX_BODY = 64 * 1024


@dataclass
class Delivery:
    url: str
    payload: dict[str, Any]
    deployment: str
    attempt: int = 0
    errors: list[str] = field(default_factory=list)


# (delivery, outcome): outcome is "delivered", "gave up" or "dropped"
ResultHook = Callable[[Delivery, str], None]


class WebhookSender:
    def __init__(self, on_result: ResultHook | None = None, max_queue: int = MAX_QUEUE,
                 timeout: tuple[float, float] = (CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
                 retry_delay: Callable[[int], float | None] = webhook_retry_delay) -> None:
        self.on_result = on_result
        self.max_queue = max_queue
        self.timeout = timeout
        self.retry_delay = retry_delay
        self._heap: list[tuple[float, int, Delivery]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._session = requests.Session()
        self.delivered = 0
        self.failed = 0
        self.dropped = 0

    def send(self, url: str, payload: dict[str, Any], deployment: str) -> bool:
        """Queue one POST; False (and a "dropped" result) when the queue is full or closed."""
        delivery = Delivery(url, payload, deployment)
        with self._cv:
            if self._closed or len(self._heap) >= self.max_queue:
                self.dropped += 1
                full = True
            else:
                full = False
                heapq.heappush(self._heap, (time.monotonic(), next(self._seq), delivery))
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
                    self._thread.start()
                self._cv.notify()
        if full:
            delivery.errors.append(f"queue full ({self.max_queue} deliveries waiting)")
            self._report(delivery, "dropped")
            return False
        return True

    def pending(self) -> int:
        with self._cv:
            return len(self._heap)

    def close(self, timeout: float = 2.0) -> None:
        """Stop after what is due within `timeout`; later retries are abandoned."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._heap and self._heap[0][0] <= time.monotonic() and time.monotonic() < deadline:
                self._cv.wait(0.05)
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()) + READ_TIMEOUT_S)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closed and (not self._heap or self._heap[0][0] > time.monotonic()):
                    wait = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cv.wait(wait)
                if self._closed:
                    return
                _, _, delivery = heapq.heappop(self._heap)
            self._attempt(delivery)
            with self._cv:
                self._cv.notify_all()  # close() waits for due deliveries

    def _attempt(self, delivery: Delivery) -> None:
        delivery.attempt += 1
        body = json.dumps(delivery.payload).encode()[:MAX_BODY]
        try:
            resp = self._session.post(delivery.url, data=body, timeout=self.timeout,
                                      headers={"Content-Type": "application/json",
                                               "User-Agent": "autodeploy-alerts"})
            resp.close()
            if resp.status_code < 300:
                self.delivered += 1
                self._report(delivery, "delivered")
                return
            error = f"HTTP {resp.status_code}"
            retryable = resp.status_code >= 500 or resp.status_code == 429
        except requests.RequestException as exc:
            error, retryable = f"{type(exc).__name__}: {exc}", True
        delivery.errors.append(error)
        delay = self.retry_delay(delivery.attempt) if retryable else None
        if delay is None:
            self.failed += 1
            self._report(delivery, "gave up")
            return
        with self._cv:
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), delivery))

    def _report(self, delivery: Delivery, outcome: str) -> None:
        if self.on_result is None:
            return
        try:
            self.on_result(delivery, outcome)
        except Exception:  # noqa: BLE001 - a broken hook must not stop deliveries; it is logged
            log.exception("webhook result hook failed")
