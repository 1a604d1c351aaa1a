"""How many WebSocket tunnels a python-mode gateway worker takes (controller/serve.py)."""
from controller.serve import _max_tunnels


def test_a_quarter_of_a_workers_connections_or_threads_stays_for_plain_requests():
    assert _max_tunnels(["--worker-class", "gateway.gevent_worker.GeventWorker", "--worker-connections", "4096"]) == 3072
    assert _max_tunnels(["--worker-class", "gthread", "--threads", "64"]) == 48
    assert _max_tunnels(["--worker-class", "gthread", "--threads", "1"]) == 1
