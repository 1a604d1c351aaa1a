"""How many clients change instance when ip-hash goes from 3 to 4 instances.

Compares, in one run over the same 100k client addresses:
  * the consistent-hash ring the gateway uses (controller.policy.balance.ip_hash),
  * naive modulo hashing (stable_hash(ip) % n), the usual first attempt,
  * the ideal: only the new instance's fair share, 1/4, moves.
Each moved client loses its sticky backend (a cold KV cache, a lost session).

Run: .venv/bin/python bench/bench_iphash.py
"""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

from controller.policy.balance import Candidate, ip_hash, stable_hash

KEYS = 100_000


def addresses(n: int) -> list[str]:
    # Consecutive addresses in 10.0.0.0/8: the worst case for a weak hash.
    return [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(n)]


def ring_pick(n: int) -> Callable[[str], str]:
    cands = [Candidate(f"inst-{i}", 0) for i in range(n)]
    return lambda ip: ip_hash(cands, ip)


def modulo_pick(n: int) -> Callable[[str], str]:
    return lambda ip: f"inst-{stable_hash(ip) % n}"


def measure(name: str, make: Callable[[int], Callable[[str], str]], keys: list[str]) -> dict:
    before, after = make(3), make(4)
    t0 = time.perf_counter()
    a = [before(k) for k in keys]
    t1 = time.perf_counter()
    b = [after(k) for k in keys]
    moved = sum(x != y for x, y in zip(a, b))
    shares = Counter(b)
    return {"name": name, "moved": moved / len(keys),
            "max_share": max(shares.values()) / len(keys), "min_share": min(shares.values()) / len(keys),
            "us_per_pick": (t1 - t0) / len(keys) * 1e6}


def main() -> None:
    keys = addresses(KEYS)
    ring = measure("consistent hash ring (100 vnodes)", ring_pick, keys)
    mod = measure("naive modulo (hash % n)", modulo_pick, keys)
    print(f"ip-hash key movement, 3 -> 4 instances, {KEYS:,} client addresses\n")
    print(f"{'method':<36}{'moved':>8}{'vs ideal':>10}{'share min..max at 4':>22}{'us/pick':>9}")
    print(f"{'ideal (only the new 1/4 moves)':<36}{0.25:>8.1%}{1.0:>9.2f}x{'25.0%..25.0%':>22}{'':>9}")
    for r in (ring, mod):
        spread = f"{r['min_share']:.1%}..{r['max_share']:.1%}"
        print(f"{r['name']:<36}{r['moved']:>8.1%}{r['moved'] / 0.25:>9.2f}x{spread:>22}"
              f"{r['us_per_pick']:>9.2f}")
    print(f"\nmodulo moves {mod['moved'] / ring['moved']:.1f}x as many clients as the ring.")


if __name__ == "__main__":
    main()
