"""Test images built on the local engine from local files: no registry is reachable
here or in CI, and nothing in the tests may pull."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import docker
import docker.errors
import pytest
import requests

BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static: one static binary, no libc needed
BUSYBOX_TAG = "autodeploy-test/busybox:1"
# The model stand-in: serves /www, whose /health and /index.html answer 200.
HTTPD_COMMAND = "busybox httpd -f -p ${PORT} -h /www"
_APPLETS = ("sh", "ash", "httpd", "sleep", "echo", "cat", "ls", "env", "printf", "true", "false",
            "test", "[", "wget", "kill", "ps", "mkdir", "rm", "seq", "head", "tail", "grep", "dd",
            "yes", "id", "hostname")
_DOCKERFILE = """\
FROM scratch
COPY rootfs /
ENV PATH=/bin
CMD ["/bin/sh", "-c", "exec httpd -f -p ${PORT:-8080} -h /www"]
"""


def docker_client_or_skip() -> docker.DockerClient:
    """A client for the local engine; skips without one, but fails under CI, where the
    Docker tests must run."""
    try:
        client = docker.from_env()
        client.ping()
    except (docker.errors.DockerException, requests.RequestException) as exc:
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        reason = (f"needs a Docker Engine: none answers at {where} ({exc}); "
                  "start one with `dockerd &`")
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so Docker tests must run: {reason}")
        pytest.skip(reason)
    return client


def busybox_image(client: docker.DockerClient, tag: str = BUSYBOX_TAG) -> str:
    """Build (once per tag) an image FROM scratch holding /bin/busybox, its applet
    links and /www; returns the tag."""
    try:
        client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    if not BUSYBOX.exists():
        pytest.fail(f"{BUSYBOX} is missing: install busybox-static (apt-get install busybox-static)")
    with tempfile.TemporaryDirectory(prefix="autodeploy-image-") as ctx:
        rootfs = Path(ctx) / "rootfs"
        (rootfs / "bin").mkdir(parents=True)
        (rootfs / "tmp").mkdir()
        shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
        for applet in _APPLETS:
            (rootfs / "bin" / applet).symlink_to("busybox")
        www = rootfs / "www"
        www.mkdir()
        (www / "index.html").write_text("<h1>autodeploy test model</h1>\n")
        (www / "health").write_text("ok\n")
        (Path(ctx) / "Dockerfile").write_text(_DOCKERFILE)
        client.images.build(path=ctx, tag=tag, rm=True, forcerm=True, pull=False)
    return tag
