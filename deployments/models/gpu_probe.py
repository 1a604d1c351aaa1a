#!/usr/bin/env python3
"""A small torch program that reports which GPU it sees, over HTTP.

  GET /health   200 once CUDA is initialised
  GET /gpu      {"cuda_visible_devices", "device_count", "devices": [{"name", "uuid", "memory_mb"}], "matmul_ok"}

Used to prove GPU pinning: an instance placed on one GPU must see exactly that GPU.
"""
from __future__ import annotations

import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


def describe() -> dict:
    devices = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        uuid = str(getattr(props, "uuid", ""))
        devices.append({"name": props.name, "uuid": uuid if uuid.startswith("GPU-") else f"GPU-{uuid}",
                        "memory_mb": props.total_memory // (1 << 20)})
    ok = False
    if devices:
        x = torch.randn(256, 256, device="cuda")
        ok = bool(torch.allclose(x @ torch.eye(256, device="cuda"), x))
    return {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "device_count": len(devices),
            "devices": devices, "matmul_ok": ok, "instance": os.environ.get("AUTODEPLOY_INSTANCE_ID")}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = json.dumps(describe() if self.path == "/gpu" else {"ok": True}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args: object) -> None:
        pass


if __name__ == "__main__":
    torch.cuda.init() if torch.cuda.is_available() else None
    ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
