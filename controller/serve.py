"""`autodeploy serve`: the controller, its IPC socket, the reconcile loop, the spec
watcher and the gunicorn gateway, in the foreground, shut down cleanly on SIGTERM/SIGINT."""
from __future__ import annotations

import ctypes
import importlib.util
import ipaddress
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from controller.auth import AuthService, AuthStore, HostPolicy, ensure_admin_token, is_loopback
from controller.core import Controller
from controller.secrets import Redactor, SecretSource, missing_secrets, pulumi_decrypter, redact_logs
from controller.drivers.base import Driver
from controller.errors import AutoDeployError
from controller.gpus import NvmlGpuSource, discover_inventory
from controller.health_checker import HealthChecker
from controller.ipc import IpcServer
from controller.sources import SOURCE_EVENTS, Source, SourceUpdate, SourceWatcher
from controller.sources.folder import FolderSource
from controller.nodes import NodePrices
from controller.stack import GitStackConfig, StackConfig, load_stack
from controller import statedir
from controller.statedir import StateDirBusy, StateDirLock
from controller.store import Store
from controller.usage import UsageSampler

log = logging.getLogger("autodeploy.serve")

TICK_S = 0.1


@dataclass
class ServeOptions:
    project_dir: Path
    stack: str
    deployments: Path | None
    state_dir: Path
    host: str | None
    port: int | None
    driver: str | None
    workers: int = 2
    threads: int = 64  # gthread workers only
    # gevent: each request is a greenlet, so thousands of held, hung or streaming requests
    # and slow clients cost memory, not a thread each (gthread: workers x threads at most).
    worker_class: str = "gevent"
    worker_connections: int = 4096
    queue_limit: int = 256
    queue_timeout: float = 300.0
    graceful_timeout: float = 30.0
    stop_timeout: float = 10.0
    trusted_proxies: tuple[str, ...] = ()  # X-Forwarded-For is believed only from these (CIDRs)
    # A git source instead of the folder (controller.sources.git); None: the stack's autodeploy:git.
    git_repo: str | None = None
    git_branch: str | None = None
    git_path: str | None = None
    git_interval: str | None = None
    data_plane: str | None = None  # haproxy | python; None: the stack's, else haproxy when installed
    insecure_no_auth: bool = False  # loopback binds only


def make_driver(name: str, opts: ServeOptions, stack: StackConfig, store: Store, inventory: Any = None,
                user_umask: int | None = None) -> Driver:
    if name == "local":
        from controller.drivers.local import LocalDriver
        return LocalDriver(opts.state_dir, opts.project_dir, umask=user_umask)
    if name == "docker":
        from controller.drivers.docker import DockerDriver
        from controller.nodes import write_nodes_file
        from controller.stack import effective_nodes
        # `autodeploy logs` reads which engine each node is from the state dir.
        write_nodes_file(opts.state_dir, effective_nodes(stack))
        return DockerDriver(base_url=stack.docker_host, nodes=stack.nodes or None, inventory=inventory,
                            owner=f"{socket.gethostname()}:{opts.state_dir.resolve()}",
                            on_event=lambda node, kind, msg: store.event(f"node:{node}", kind, msg))
    if name == "pulumi":
        from controller.drivers.pulumi import PulumiDriver
        # Stack updates carry many deployments at once: their events go under the stack's name.
        return PulumiDriver(project_dir=opts.project_dir, stack_name=stack.name,
                            on_event=lambda kind, msg: store.event(f"stack:{stack.name}", kind, msg))
    raise SystemExit(f"unknown driver {name!r}: use local, docker or pulumi")


def _socket_path(state_dir: Path) -> str:
    path = str(state_dir / "controller.sock")
    if len(path) < 100:  # AF_UNIX paths are limited to 108 bytes
        return path
    return os.path.join(tempfile.mkdtemp(prefix="autodeploy-"), "controller.sock")


def _networks(items: tuple[str, ...]) -> tuple[str, ...]:
    """Trusted proxy addresses or CIDRs, normalised; a bad one stops serve with what to fix."""
    out = []
    for item in items:
        try:
            out.append(str(ipaddress.ip_network(item.strip(), strict=False)))
        except ValueError as exc:
            raise SystemExit(f"trusted proxy {item!r} is not an IP address or CIDR ({exc}); "
                             "use e.g. --trusted-proxy 10.0.0.0/8") from exc
    return tuple(out)


def _choose_data_plane(requested: str | None) -> tuple[str, str]:
    from gateway.haproxy_plane import choose_data_plane, find_haproxy, haproxy_version
    binary = find_haproxy() if requested != "python" else None
    try:
        return choose_data_plane(requested, haproxy_version(binary), binary)
    except AutoDeployError as exc:
        raise SystemExit(f"error {exc.error.code}: {exc.message}") from None


def _haproxy_maxconn(wanted: int = 8192) -> int:
    """HAProxy needs about two descriptors per connection and refuses to start when the
    hard limit cannot give them: fit maxconn to this machine's limit."""
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return wanted
    return max(256, min(wanted, (hard - 200) // 2))


def _max_tunnels(worker_args: list[str]) -> int:
    """WebSocket tunnels per gateway worker: a tunnel holds a gthread thread, or one of a
    gevent worker's connections, for its whole life; a quarter stays for plain requests."""
    flag = "--threads" if "--threads" in worker_args else "--worker-connections"
    return max(1, int(worker_args[worker_args.index(flag) + 1]) * 3 // 4)


def _worker_args(o: ServeOptions) -> list[str]:
    if o.worker_class == "gevent" and importlib.util.find_spec("gevent") is None:
        # A venv made before gevent became a dependency: say so, serve on threads meanwhile.
        log.warning("gevent is not installed (run `bash scripts/bootstrap.sh` or `pip install -e .`): "
                    "gateway workers use gthread, %d threads each", o.threads)
        return ["--worker-class", "gthread", "--threads", str(o.threads)]
    if o.worker_class == "gevent":
        return ["--worker-class", "gateway.gevent_worker.GeventWorker", "--worker-connections",
                str(o.worker_connections)]
    return ["--worker-class", "gthread", "--threads", str(o.threads)]


def _die_with_parent() -> None:
    """Runs in the gunicorn child before exec: if serve is killed, the gateway goes too."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Server:
    def __init__(self, opts: ServeOptions) -> None:
        self.opts = opts
        self.stack = load_stack(opts.project_dir, opts.stack)
        self.deployments_dir = opts.deployments or (opts.project_dir / self.stack.deployments_dir)
        if opts.git_repo and opts.deployments:
            raise SystemExit("--git-repo and --deployments exclude each other: serve follows a git branch "
                             "or reads a folder")
        self.host = opts.host or self.stack.gateway_host
        self.port = opts.port or self.stack.gateway_port
        if opts.insecure_no_auth and not is_loopback(self.host):
            raise SystemExit(f"--insecure-no-auth is refused with --host {self.host}: without tokens anyone who "
                             "reaches the gateway could start, stop and delete GPU deployments. Bind 127.0.0.1, "
                             "or drop the flag and use tokens (`autodeploy token create`).")
        # First of all: one serve per state dir. A second one leaves here, touching nothing.
        self.lock = StateDirLock(opts.state_dir)
        try:
            self.lock.acquire()
        except StateDirBusy as exc:
            raise SystemExit(f"autodeploy serve: {exc}") from None
        self.user_umask = os.umask(statedir.SERVE_UMASK)  # files 0600, folders 0700 from here on
        statedir.secure(opts.state_dir)
        self.store, self.store_problem = Store.open_checked(opts.state_dir / "autodeploy.db")
        self.auth = AuthStore(opts.state_dir / "autodeploy.db")
        # Secret values: resolved for instances only; masked in events, IPC replies and serve's log.
        self.secrets = SecretSource(os.environ, self.stack.extra, self.stack.source,
                                    decrypt=pulumi_decrypter(self.stack, opts.project_dir))
        self.redactor = Redactor()
        self.store.redact = self.redactor
        redact_logs(self.redactor)
        self.admin_token_path, created = ensure_admin_token(opts.state_dir, self.auth)
        if created:
            log.info("wrote the first admin token to %s (mode 0600); the CLI on this machine uses it",
                     self.admin_token_path)
        self.inventory = discover_inventory(self.stack)
        self.driver_name = opts.driver or self.stack.driver
        self.driver = make_driver(self.driver_name, opts, self.stack, self.store, self.inventory, self.user_umask)
        self.controller = Controller(self.driver, self.store, inventory=self.inventory, prices=NodePrices(self.stack),
                                     queue_limit=opts.queue_limit, stop_timeout=opts.stop_timeout)
        self.controller.keys_for = self.auth.key_table
        self.auth.on_keys_changed = self.controller.routing_changed
        if hasattr(self.driver, "secrets"):
            self.driver.secrets = self.secrets.resolve
        self.ipc_path = _socket_path(opts.state_dir)
        self.counters_path = str(opts.state_dir / "counters.bin")
        self.inflight_path = str(opts.state_dir / "inflight.bin")
        self.prometheus_dir = opts.state_dir / "prometheus"
        self.trusted_proxies = _networks(opts.trusted_proxies or tuple(self.stack.trusted_proxies))
        self.health = HealthChecker(self.controller.fleet)
        self.nvml = NvmlGpuSource() if self.inventory.source == "nvml" else None
        self.usage = UsageSampler(self.controller.fleet, self.controller.traffic, self.nvml)
        self.stop = threading.Event()
        self.gunicorn: subprocess.Popen | None = None
        self.data_plane_name, self.data_plane_why = _choose_data_plane(opts.data_plane or self.stack.data_plane)
        self.tls_cert = self._tls_certificate()
        self.scheme = "https" if self.tls_cert else "http"
        self.plane = None  # gateway.haproxy_plane.HaproxyDataPlane in haproxy mode
        self.source = self._make_source()
        self.watcher = SourceWatcher(self.source, self._apply, events=self._source_events)
        self.controller.source = self.watcher

    def _load_args(self) -> dict:
        # The files that serve each name now keep it: a newcomer reusing one is the duplicate.
        owners = {name: rt.spec.source_file for name, rt in list(self.controller.deps.items()) if not rt.removed}
        local = self.driver_name == "local"
        return {"require_image": not local, "owners": owners, "local_gateway_port": self.port if local else None}

    def _make_source(self) -> Source:
        o, git = self.opts, self.stack.git
        if not o.git_repo and (git is None or o.deployments):
            return FolderSource(self.deployments_dir, self._load_args)
        from controller.sources.git import GitMirror, GitSource, check_options, mirror_dir
        from controller.sources.secrets import resolve_credential
        try:
            base = git if git is not None else GitStackConfig(repo=o.git_repo)
            # The command line wins over the stack config, key by key.
            cfg = base.overridden(o.git_repo, o.git_branch, o.git_path, o.git_interval)
            opts = check_options(cfg.repo, cfg.branch, cfg.path, cfg.interval,
                                 credential=resolve_credential(self.stack, cfg.credential, o.project_dir),
                                 username=cfg.username)
        except AutoDeployError as exc:
            raise SystemExit(f"error {exc.error.code}: {exc.message}") from None
        mirror = GitMirror(mirror_dir(self.opts.state_dir, opts), opts)
        return GitSource(opts, mirror, self._load_args,
                         on_event=lambda kind, msg: self.store.event(SOURCE_EVENTS, kind, msg))

    def _source_events(self) -> list[dict]:
        return [{"at": e.at, "kind": e.kind, "message": e.message}
                for e in self.store.events(SOURCE_EVENTS, limit=30)]

    def _apply(self, update: SourceUpdate) -> None:
        for warning in update.result.warnings:
            log.warning("spec warning: %s", warning)
        # A `{secret: KEY}` nobody can resolve is a FILE:LINE error: never an instance with an empty value.
        pulumi = self.driver_name == "pulumi"  # the Pulumi program resolves secrets from the stack alone
        missing = missing_secrets(update.result.deployments, self.secrets.stack_only() if pulumi else self.secrets,
                                  usable_encrypted=pulumi)
        if missing:
            update.result.errors.extend(missing)
            lacking = {(e.file, e.line) for e in missing}
            update.result.deployments[:] = [
                d for d in update.result.deployments
                if not any((d.source_file, d.secret_lines.get(n, d.source_line)) in lacking for n in d.secret_env)]
        self.redactor.set_values(self.secrets.values(update.result.deployments))
        self.controller.apply(update.result, commit=update.commit)

    def load(self) -> None:
        self.watcher.load_initial()

    def _describe_source(self) -> str:
        st = self.source.status()
        if st["kind"] == "git":
            return f"deployments from git {st['repo']} branch {st['branch']} path {st['path']}"
        return f"deployments in {self.deployments_dir}"

    def run(self) -> int:
        log.info("stack %s, driver %s, GPU inventory from %s, %s", self.stack.name,
                 self.driver_name, self.inventory.source, self._describe_source())
        log.info("data plane %s: %s", self.data_plane_name, self.data_plane_why)
        if self.data_plane_name == "python" or self._haproxy_master() is None:
            self._check_bind()  # before adopting anything: a port in use is a plain exit 1
        if self.store_problem is not None:
            log.error("%s", self.store_problem)
            self.store.event("serve", "store", self.store_problem)
        self.load()
        self.controller.adopt_stored()
        if self.opts.insecure_no_auth:
            log.warning("--insecure-no-auth: the API at http://%s:%s answers anyone on this machine as admin",
                        self.host, self.port)
        ipc = IpcServer(self.ipc_path, self.controller,
                        AuthService(self.auth, self.controller, self.opts.state_dir).handlers())
        ipc.redact = self.redactor.json_text
        ipc.start()
        self.health.start()
        self.usage.start()
        threads = [threading.Thread(target=self._loop, name="reconcile", daemon=True),
                   threading.Thread(target=self.watcher.run, args=(self.stop,), name="watch", daemon=True)]
        for t in threads:
            t.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())
        failed = False
        try:
            if self.data_plane_name == "haproxy":
                self.gunicorn = self._spawn_gateway("127.0.0.1", self._activator_port())
                try:
                    self._start_haproxy()
                except AutoDeployError as exc:
                    log.error("error %s: %s", exc.error.code, exc.message)
                    return 1
            else:
                self.gunicorn = self._spawn_gateway(self.host, self.port)
            if self._wait_ready():
                print(f"autodeploy ready: {self.scheme}://{self.host}:{self.port}/api/deployments "
                      f"(endpoints at /d/<name>/)", flush=True)
            while not self.stop.is_set():
                if self.gunicorn.poll() is not None:
                    log.error("gateway exited with code %s (is %s:%s free?)", self.gunicorn.returncode,
                              self.host, self.port)
                    failed = True
                    break
                self.stop.wait(0.2)
        finally:
            self._shutdown(ipc)
        return 1 if failed else 0

    def _tls_certificate(self) -> str:
        """autodeploy:tlsCertificate: HAProxy terminates TLS with it; python mode cannot."""
        configured = self.stack.tls_certificate
        if not configured:
            return ""
        path = Path(configured) if Path(configured).is_absolute() else self.opts.project_dir / configured
        if self.data_plane_name != "haproxy":
            raise SystemExit(f"{self.stack.source}: autodeploy:tlsCertificate is served by HAProxy, but the data "
                             f"plane is {self.data_plane_name}: use --data-plane haproxy, or terminate TLS in "
                             "front of the gateway and remove the key")
        if not path.is_file():
            raise SystemExit(f"{self.stack.source}: autodeploy:tlsCertificate {path} is not a file; it must be a "
                             "PEM with the certificate chain and the private key (HAProxy's `crt`)")
        return str(path.resolve())

    def _check_bind(self) -> None:
        """Exit non-zero, saying why, when the gateway's address cannot be listened on."""
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            family, _, _, _, addr = infos[0]
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(addr)
        except OSError as exc:
            self.auth.close()
            self.store.close()
            self.lock.release()
            raise SystemExit(f"autodeploy serve: cannot listen on {self.host}:{self.port}: "
                             f"{exc.strerror or exc}; stop what uses it or pass --port") from None

    def _activator_port(self) -> int:
        """The activator's internal port, kept across restarts so an adopted HAProxy still reaches it."""
        from controller.drivers.local import free_port
        path = self.opts.state_dir / "haproxy" / "activator.port"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            port = int(path.read_text())
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", port))
        except (OSError, ValueError):
            port = free_port()
            path.write_text(str(port))
        return port

    def _haproxy_master(self) -> int | None:
        """The HAProxy a previous serve left running on this state directory (it is adopted)."""
        if self.data_plane_name != "haproxy":
            return None
        from gateway.haproxy_plane import running_master
        return running_master(self.opts.state_dir)

    def _start_haproxy(self) -> None:
        from controller.ipc import IpcClient
        from gateway.haproxy_config import Settings
        from gateway.haproxy_plane import HaproxyDataPlane, find_haproxy
        binary = find_haproxy()
        assert binary is not None  # _choose_data_plane found it
        ipc = IpcClient(self.ipc_path)
        settings = Settings(bind_host=self.host, bind_port=self.port, activator_host="127.0.0.1",
                            activator_port=self._activator_port(), trusted_proxies=self.trusted_proxies,
                            tls_cert=self.tls_cert,
                            queue_timeout_s=self.opts.queue_timeout, maxconn=_haproxy_maxconn())
        # Warm requests never reach the gateway workers: the data plane counts them into the
        # same multiprocess Prometheus files (gateway/metrics.py), so /metrics keeps its fields.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(self.prometheus_dir)
        from gateway.metrics import GatewayMetrics
        self.plane = HaproxyDataPlane(binary, self.opts.state_dir, settings, ipc.request,
                                      metrics=GatewayMetrics())
        self.plane.start()

    def _spawn_gateway(self, host: str, port: int) -> subprocess.Popen:
        o = self.opts
        # Counters of a previous run would be added to this one's (gateway/metrics.py).
        shutil.rmtree(self.prometheus_dir, ignore_errors=True)
        self.prometheus_dir.mkdir(parents=True)
        for stale in (self.inflight_path, self.inflight_path + ".lock"):
            if os.path.exists(stale):
                os.unlink(stale)
        worker_args = _worker_args(o)
        cmd = [sys.executable, "-m", "gunicorn", "gateway.wsgi:app", "--bind", f"{host}:{port}",
               "-c", "python:gateway.gunicorn_conf",
               "--workers", str(o.workers), *worker_args,
               "--graceful-timeout", str(max(1, int(o.graceful_timeout))), "--keep-alive", "75",
               "--log-level", "warning", "--error-logfile", "-"]
        # Serve's secrets and tokens are not the gateway workers' business.
        inherited = {k: v for k, v in os.environ.items()
                     if not k.startswith("AUTODEPLOY_SECRET_") and k != "AUTODEPLOY_TOKEN"}
        env = dict(inherited, AUTODEPLOY_IPC=self.ipc_path, AUTODEPLOY_COUNTERS=self.counters_path,
                   AUTODEPLOY_QUEUE_TIMEOUT=str(o.queue_timeout), AUTODEPLOY_INFLIGHT=self.inflight_path,
                   AUTODEPLOY_TRUSTED_PROXIES=",".join(self.trusted_proxies),
                   AUTODEPLOY_AUTH="off" if o.insecure_no_auth else "on",
                   AUTODEPLOY_GATEWAY_HOSTS=HostPolicy.for_bind(self.host, self.port,
                                                                tuple(self.stack.gateway_hosts)).to_env(),
                   PROMETHEUS_MULTIPROC_DIR=str(self.prometheus_dir),
                   AUTODEPLOY_UI_SECRET=secrets.token_hex(32),  # dashboard sessions, shared by the workers
                   AUTODEPLOY_MAX_TUNNELS=str(_max_tunnels(worker_args)))
        if self.data_plane_name == "haproxy":  # the client address comes from HAProxy (gateway/wsgi.py)
            from gateway.haproxy_config import PEER_HEADER
            env["AUTODEPLOY_PEER_HEADER"] = PEER_HEADER
        return subprocess.Popen(cmd, env=env, cwd=str(o.project_dir), preexec_fn=_die_with_parent)

    def _wait_ready(self, timeout: float = 30.0) -> bool:
        url = f"{self.scheme}://{self.host}:{self.port}/healthz"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stop.is_set():
            if self.gunicorn is not None and self.gunicorn.poll() is not None:
                return False
            try:
                # Our own certificate may be self-signed: this only asks whether the gateway answers.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    answered = requests.get(url, timeout=1, verify=False).status_code == 200
                if answered:
                    return True
            except requests.RequestException:
                pass
            time.sleep(0.05)
        return False

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                self.controller.tick()
            except Exception:  # noqa: BLE001 - the loop must survive one bad pass; it is logged
                log.exception("reconcile pass failed")
            self.stop.wait(TICK_S)

    def _shutdown(self, ipc: IpcServer) -> None:
        log.info("shutting down: draining the gateway, then stopping instances")
        self.stop.set()
        if self.plane is not None:  # soft stop: HAProxy finishes in-flight requests first
            self.plane.close(stop_haproxy=True, timeout=self.opts.graceful_timeout)
        if self.gunicorn is not None and self.gunicorn.poll() is None:
            self.gunicorn.send_signal(signal.SIGTERM)
            try:
                self.gunicorn.wait(timeout=self.opts.graceful_timeout + 5)
            except subprocess.TimeoutExpired:
                self.gunicorn.kill()
                self.gunicorn.wait()
        self.health.stop()
        self.usage.stop()
        self.controller.shutdown()
        if self.nvml is not None:
            self.nvml.close()
        ipc.close()
        self.driver.close()
        self.auth.close()
        self.store.close()
        self.lock.release()
        log.info("stopped")
