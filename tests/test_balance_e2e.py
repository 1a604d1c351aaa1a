"""Load balancing end to end through a real `autodeploy serve` with two gunicorn workers:
least-connections, ip-hash behind a trusted proxy, sticky sessions, and route rules
overriding all of them. Assertions count which instance answered; none is timed."""
from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import requests

from conftest import deployment_yaml

RULE = "Deploy-Route-Rule"
TARGET = "Deploy-Route-Target"


def balanced(name: str, algorithm: str, sticky: bool = False) -> str:
    return deployment_yaml(name, health=None, extra_spec=f"""
        loadBalancer:
          algorithm: {algorithm}
          stickySessions: {'true' if sticky else 'false'}
          healthCheck: {{path: /health, intervalSeconds: 10, timeoutSeconds: 2}}
        """)


def scale_to(s, name: str, n: int) -> list[str]:
    ids = [s.get(f"/d/{name}/whoami", headers={RULE: "scale-out"}).headers[TARGET] for _ in range(n)]
    assert len(set(ids)) == n
    # Until HAProxy has every new server, some requests still take the activator's pick.
    s.wait_for(lambda: s.routing_settled(name, set(ids)), what="the data plane routes to every instance")
    return ids


def spread(s, name: str, clients: int, each: int) -> Counter:
    """`clients` concurrent clients, `each` requests apiece; which instance answered how often."""
    def client(_: int) -> list[str]:
        with requests.Session() as session:
            out = []
            for _ in range(each):
                r = session.get(s.url + f"/d/{name}/whoami", timeout=30)
                assert r.status_code == 200
                out.append(r.headers[TARGET])
            return out
    with ThreadPoolExecutor(clients) as pool:
        return Counter(t for ts in pool.map(client, range(clients)) for t in ts)


def test_least_connections_sends_little_to_a_slow_instance_while_round_robin_does_not(serve, data_plane):
    s = serve({"lc.yaml": balanced("lc", "least-connections"), "rr.yaml": balanced("rr", "round-robin")},
              "--workers", "2")
    for name in ("lc", "rr"):
        slow, *fast = scale_to(s, name, 3)
        assert s.get(f"/d/{name}/admin/delay?ms=400", headers={RULE: slow}).status_code == 200
        counts = spread(s, name, clients=8, each=15)
        total = sum(counts.values())
        assert total == 120
        if name == "lc":
            # In-flight counts are shared by both workers: the slow instance, always busy,
            # loses nearly every two-way comparison.
            assert counts[slow] < total * 0.1, counts
            assert all(counts[f] > 0 for f in fast), counts
        else:
            assert counts[slow] >= total // 3 - 8, counts  # its turn comes whatever it is doing


def test_ip_hash_pins_each_client_behind_a_trusted_proxy_to_one_instance(serve, data_plane):
    s = serve({"ip.yaml": balanced("ip", "ip-hash")}, "--trusted-proxy", "127.0.0.1/32")
    scale_to(s, "ip", 3)
    chosen = {}
    for i in range(12):
        client = f"203.0.113.{i + 10}"
        seen = {s.get("/d/ip/whoami", headers={"X-Forwarded-For": client}).headers[TARGET] for _ in range(5)}
        assert len(seen) == 1, (client, seen)
        chosen[client] = seen.pop()
    assert len(set(chosen.values())) > 1, chosen  # clients spread over the instances
    # A proxy chain: the right-most address no trusted proxy vouches for is the client.
    r = s.get("/d/ip/whoami", headers={"X-Forwarded-For": "198.51.100.1, 203.0.113.10"})
    assert r.headers[TARGET] == chosen["203.0.113.10"]


def test_ip_hash_ignores_forwarded_for_from_an_untrusted_peer(serve, data_plane):
    s = serve({"ip.yaml": balanced("ip", "ip-hash")})  # no --trusted-proxy: nobody is believed
    scale_to(s, "ip", 3)
    seen = {s.get("/d/ip/whoami", headers={"X-Forwarded-For": f"203.0.113.{i}"}).headers[TARGET]
            for i in range(12)}
    assert len(seen) == 1  # every request is from 127.0.0.1, whatever the header claims


def test_sticky_cookie_keeps_a_client_on_its_instance_and_repicks_when_it_is_gone(serve, data_plane):
    s = serve({"st.yaml": balanced("st", "round-robin", sticky=True)}, "--workers", "2")
    ids = scale_to(s, "st", 3)
    with requests.Session() as browser:
        first = browser.get(s.url + "/d/st/whoami")
        pinned = first.headers[TARGET]
        assert f"autodeploy-st={pinned}" in first.headers["Set-Cookie"]
        assert "Path=/d/st" in first.headers["Set-Cookie"]
        later = [browser.get(s.url + "/d/st/whoami") for _ in range(9)]
        assert {r.headers[TARGET] for r in later} == {pinned}
        assert not any("Set-Cookie" in r.headers for r in later)  # the cookie is set once
    # Without the cookie, round-robin goes on as usual.
    assert {s.get("/d/st/whoami").headers[TARGET] for _ in range(6)} == set(ids)
    # A cookie naming an instance that is not ready: a new pick and a new cookie.
    r = s.get("/d/st/whoami", cookies={"autodeploy-st": "zzzzzzzz"})
    assert r.status_code == 200 and r.headers[TARGET] in ids
    assert f"autodeploy-st={r.headers[TARGET]}" in r.headers["Set-Cookie"]


def test_route_rules_override_the_algorithm_and_the_sticky_cookie(serve, data_plane):
    s = serve({"ov.yaml": balanced("ov", "ip-hash", sticky=True)}, "--trusted-proxy", "127.0.0.1")
    ids = scale_to(s, "ov", 3)
    pinned = s.get("/d/ov/whoami").headers[TARGET]
    cookie = {"autodeploy-ov": pinned}
    other = next(i for i in ids if i != pinned)
    r = s.get("/d/ov/whoami", headers={RULE: other}, cookies=cookie)
    assert r.headers[TARGET] == other and r.json()["instance"] == other
    assert "Set-Cookie" not in r.headers  # a rule is a one-off: the client stays pinned where it was
    rotated = [s.get("/d/ov/whoami", headers={RULE: "round-robin"}, cookies=cookie).headers[TARGET]
               for _ in range(6)]
    assert set(rotated) == set(ids)
    randomly = {s.get("/d/ov/whoami", headers={RULE: "random", "X-Forwarded-For": "203.0.113.9"}).headers[TARGET]
                for _ in range(30)}
    assert len(randomly) > 1
    r = s.get("/d/ov/whoami", headers={RULE: "scale-out"}, cookies=cookie)
    assert r.status_code == 429 and r.json()["code"] == 1007  # maxReplicas 3 reached
