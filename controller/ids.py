"""Instance ids: short lowercase words like the seed's `xykemlvy`."""
from __future__ import annotations

import secrets
import string


def new_instance_id(taken: set[str] | frozenset[str] = frozenset()) -> str:
    while True:
        candidate = "".join(secrets.choice(string.ascii_lowercase) for _ in range(8))
        if candidate not in taken:
            return candidate
