"""Bounds around WebSocket tunnels: how many a python-mode gateway worker takes
(controller/serve.py), how long a drain waits for one (controller/core.py)."""
from controller.serve import _max_tunnels


def test_a_quarter_of_a_workers_connections_or_threads_stays_for_plain_requests():
    assert _max_tunnels(["--worker-class", "gateway.gevent_worker.GeventWorker", "--worker-connections", "4096"]) == 3072
    assert _max_tunnels(["--worker-class", "gthread", "--threads", "64"]) == 48
    assert _max_tunnels(["--worker-class", "gthread", "--threads", "1"]) == 1


def test_a_drain_waits_for_an_open_tunnel_up_to_tunnel_timeout_and_never_less_than_30s():
    from controller.core import DRAIN_TIMEOUT_S, drain_timeout_s
    from controller.spec import Deployment

    def spec(tunnel: float) -> Deployment:
        return Deployment(name="ws", model_id="m", model_version="1", command="x", port=1, tunnel_timeout_s=tunnel)
    assert drain_timeout_s(spec(3600.0)) == 3600.0
    assert drain_timeout_s(spec(5.0)) == DRAIN_TIMEOUT_S == 30.0
