"""The webhook sender against real local HTTP servers: retries, backoff, bounded queue, never blocking."""
from __future__ import annotations

import time

from conftest import wait_until
from controller.notify import WebhookSender
from webhook_receiver import WebhookReceiver


def fast_retries(attempt: int) -> float | None:
    return None if attempt >= 4 else 0.05 * attempt


def test_failed_deliveries_are_retried_until_accepted():
    hook = WebhookReceiver(statuses=[500, 503])
    outcomes = []
    sender = WebhookSender(on_result=lambda d, o: outcomes.append((o, d.attempt, list(d.errors))),
                           retry_delay=fast_retries)
    try:
        assert sender.send(hook.url, {"status": "firing", "n": 1}, "dep")
        wait_until(lambda: outcomes, "delivery outcome", timeout=10)
        assert outcomes == [("delivered", 3, ["HTTP 500", "HTTP 503"])]
        assert hook.accepted() == [{"status": "firing", "n": 1}]
    finally:
        sender.close()
        hook.close()


def test_a_receiver_that_keeps_failing_is_given_up_and_a_4xx_is_not_retried():
    bad, gone = WebhookReceiver(statuses=[500] * 10), WebhookReceiver(statuses=[404])
    outcomes = []
    sender = WebhookSender(on_result=lambda d, o: outcomes.append((d.url, o, d.attempt)), retry_delay=fast_retries)
    try:
        sender.send(bad.url, {"x": 1}, "dep")
        sender.send(gone.url, {"x": 2}, "dep")
        wait_until(lambda: len(outcomes) == 2, "both outcomes", timeout=10)
        assert sorted(outcomes) == sorted([(bad.url, "gave up", 4), (gone.url, "gave up", 1)])
        assert bad.attempts == 4 and gone.attempts == 1
    finally:
        sender.close()
        bad.close()
        gone.close()


def test_unreachable_receiver_retries_without_holding_up_other_deliveries():
    good = WebhookReceiver()
    outcomes = []
    sender = WebhookSender(on_result=lambda d, o: outcomes.append((d.url, o)),
                           retry_delay=lambda a: None if a >= 3 else 0.5)
    dead = "http://127.0.0.1:9/hook"  # discard port: nothing listens
    try:
        sender.send(dead, {"x": 1}, "dep")
        sender.send(good.url, {"x": 2}, "dep")
        wait_until(lambda: (good.url, "delivered") in outcomes, "the good delivery", timeout=10)
        assert (dead, "gave up") not in outcomes  # still retrying the dead one: it waits in the heap
        wait_until(lambda: (dead, "gave up") in outcomes, "giving up on the dead receiver", timeout=10)
    finally:
        sender.close()
        good.close()


def test_send_never_waits_for_a_hanging_receiver_and_the_queue_is_bounded():
    slow = WebhookReceiver(hang_s=1.0)
    outcomes = []
    sender = WebhookSender(on_result=lambda d, o: outcomes.append(o), max_queue=3, timeout=(1.0, 0.3),
                           retry_delay=lambda a: None)
    try:
        began = time.monotonic()
        accepted = [sender.send(slow.url, {"i": i}, "dep") for i in range(10)]
        spent = time.monotonic() - began
        assert accepted.count(False) >= 6  # at most 3 waiting (+1 being sent) of 10
        assert outcomes.count("dropped") == accepted.count(False)
        print(f"10 sends to a hanging receiver returned in {spent * 1000:.2f} ms")
    finally:
        sender.close(timeout=0.1)
        slow.close()
