"""`netd daemon`: settings, stores, firewall, controller and the API socket, in that order.

Stopping the daemon (SIGTERM, Ctrl-C) leaves containers and their networking running, as
Docker's live-restore does; the next start finds and restores them.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import logging
import os
import resource
import signal
import socket
import sys
import threading
import uuid
from dataclasses import dataclass, field

from netd.api.errors import KNOWN, reported
from netd.contract.errors import BadRequest, NetdError

log = logging.getLogger("netd.api.daemon")

DEFAULT_RUN_DIR = "/run/netd"
DEFAULT_DATA_DIR = "/var/lib/netd"


@dataclass
class Settings:
    run_dir: str = DEFAULT_RUN_DIR
    data_dir: str = DEFAULT_DATA_DIR
    store: str | None = None
    cluster_store: str | None = None
    cluster_advertise: str | None = None
    cluster_store_opts: dict = field(default_factory=dict)   # kv.cacertfile, kv.certfile, ... (Docker's)
    host_ttl: float = 15.0
    reclaim_after: float = 3600.0   # a restart or a short partition never triggers it; `netd host rm` for a host gone for good
    debug: bool = False
    docker_plugins: bool = False      # serve dockerd's network and IPAM plugins (netd.api.docker_plugin)
    docker_plugin_dir: str = "/run/docker/plugins"

    @property
    def socket_path(self) -> str:
        return os.path.join(self.run_dir, "netd.sock")


def load_settings(args) -> Settings:
    """Flags win over /etc/netd/daemon.json (Docker's daemon.json keys), which win over defaults."""
    settings = Settings()
    path = getattr(args, "config_file", None)
    if path and os.path.exists(path):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise BadRequest(f"cannot read {path}: {e}") from None
        known = {"run-dir", "data-dir", "store", "cluster-store", "cluster-advertise", "host-ttl", "reclaim-after",
                 "debug", "cluster-store-opts", "docker-plugins", "docker-plugin-dir"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BadRequest(f"{path}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
        for key, value in data.items():
            setattr(settings, key.replace("-", "_"), value)
    for name in ("run_dir", "data_dir", "store", "cluster_store", "cluster_advertise", "host_ttl", "reclaim_after",
                 "docker_plugin_dir"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(settings, name, value)
    settings.debug = settings.debug or bool(getattr(args, "debug", False))
    settings.docker_plugins = bool(settings.docker_plugins or getattr(args, "docker_plugins", False)
                                   or getattr(args, "docker_plugin_dir", None))
    if not isinstance(settings.cluster_store_opts, dict):
        raise BadRequest("cluster-store-opts must be an object of KEY: VALUE (e.g. \"kv.cacertfile\": \"/path\")")
    for option in getattr(args, "cluster_store_opt", None) or []:
        key, sep, value = option.partition("=")
        if not sep:
            raise BadRequest(f"--cluster-store-opt {option!r}: give KEY=VALUE, e.g. kv.cacertfile=/etc/netd/ca.pem")
        settings.cluster_store_opts[key] = value
    if settings.cluster_advertise and not settings.cluster_store:
        raise BadRequest("--cluster-advertise needs --cluster-store")
    if settings.cluster_store and not settings.cluster_advertise:
        raise BadRequest("--cluster-store needs --cluster-advertise IP: the address other hosts reach this one at")
    if settings.cluster_advertise:
        try:
            ipaddress.IPv4Address(settings.cluster_advertise)
        except ValueError:
            raise BadRequest(f"--cluster-advertise {settings.cluster_advertise!r} is not an IPv4 address") from None
    return settings


def host_identity(data_dir: str) -> str:
    """A stable id for this host, kept in the data dir (survives restarts, not re-installs)."""
    path = os.path.join(data_dir, "host-id")
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        ident = uuid.uuid4().hex
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(ident + "\n")
        return ident


def _lock_dir(directory: str, what: str) -> int:
    """One daemon per run dir and per data dir (one identity, one database): hold an exclusive
    lock for the daemon's lifetime; the file names the holder's pid."""
    fd = os.open(os.path.join(directory, "netd.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise BadRequest(f"another netd daemon (pid {holder}) is already running with {what} {directory}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def raise_open_files_limit(wanted: int = 65536) -> int:
    """Every container costs the daemon a few descriptors (pidfd, DNS sockets, namespace fds):
    the default soft limit of 1024 runs out near 500 containers. Raise it as far as allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def run_daemon(args) -> int:
    try:
        settings = load_settings(args)
    except NetdError as e:
        print(f"netd daemon: {e}", file=sys.stderr)
        return 1
    logging.basicConfig(
        level=logging.DEBUG if settings.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if os.geteuid() != 0:
        print("netd daemon: must run as root (it creates namespaces, interfaces and firewall rules)", file=sys.stderr)
        return 1
    try:
        daemon = Daemon(settings)
        daemon.start()
    except KNOWN as e:
        e = reported(e)
        log.error("%s", e)
        print(f"netd daemon: {e}", file=sys.stderr)
        return 1
    daemon.serve()
    return 0


class Daemon:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.server = None
        self.controller = None
        self._stopping = threading.Event()

    def start(self) -> None:
        from kvstore import open_store
        from kvstore.security import StoreCredentials
        from netd.api.server import ApiServer
        from netd.contract.driverapi import HostInfo
        from netd.core.controller import Controller
        from netd.core.state import Paths
        from netd.kernel import netlink
        from netd.kernel.firewall import Firewall
        from runtime.process import Reaper

        s = self.settings
        for path in (s.run_dir, s.data_dir):
            os.makedirs(path, mode=0o711, exist_ok=True)
        # The data dir holds the database, the containers' records and logs: root only. (The run
        # dir stays 0711: the socket's own mode says who may use it.)
        os.chmod(s.data_dir, 0o700)
        self._lock_fds = [_lock_dir(s.run_dir, "run dir"), _lock_dir(s.data_dir, "data dir")]
        log.info("open files limit: %d", raise_open_files_limit())
        host = HostInfo(id=host_identity(s.data_dir), name=socket.gethostname(), address=s.cluster_advertise or "")

        # The cluster store first: if it cannot be reached, say so before touching anything.
        credentials = StoreCredentials.from_options(s.cluster_store_opts)
        self.cluster_store = open_store(s.cluster_store, credentials=credentials) if s.cluster_store else None
        if self.cluster_store is not None:
            self.cluster_store.revision()
        self.local_store = open_store(s.store or f"sqlite://{os.path.join(s.data_dir, 'netd.db')}")

        self.firewall = Firewall()
        self.firewall_report = self.firewall.setup()
        log.info("firewall: %s", self.firewall_report.summary())
        # Containers reach beyond their bridge only if this namespace routes: Docker does the same.
        netlink.set_sysctl("net.ipv4.ip_forward", "1")

        reaper = Reaper()
        reaper.start()
        self.controller = Controller(
            Paths(s.run_dir, s.data_dir), host, self.local_store, self.firewall,
            cluster_store=self.cluster_store, reaper=reaper, host_ttl=s.host_ttl, reclaim_after=s.reclaim_after,
        )
        self.controller.info_extra = self.info
        self.controller.start()
        if self.controller.cluster is not None:
            from netd.debug.trace.agent import (
                TraceAgent,  # serves other hosts' `netd trace` (through the store)
            )

            self.trace_agent = TraceAgent(self.controller).start()
        threading.Thread(target=self._maintain, name="maintenance", daemon=True).start()
        self.server = ApiServer(s.socket_path, self.controller)
        self.plugins = None
        if s.docker_plugins:
            from netd.api.docker_plugin import DockerPlugins
            self.plugins = DockerPlugins(self.controller, s.docker_plugin_dir)
            log.info("dockerd's plugins %s in %s", ", ".join(self.plugins.names), s.docker_plugin_dir)
        log.info("netd daemon ready on %s (run dir %s, data dir %s)", s.socket_path, s.run_dir, s.data_dir)

    def _maintain(self, interval: float = 10.0) -> None:
        """Keep what grows bounded: containers' logs rotated by size (runtime.logs); CNI
        attachments whose namespace went without a DEL let go."""
        from runtime.logs import rotate_if_large

        while not self._stopping.wait(interval):
            try:
                for container in self.controller.list_containers():
                    if rotate_if_large(self.controller.paths.log_file(container.id)):
                        log.info("rotated the log of %s", container.name)
                self.controller.cni.sweep()
            except Exception:  # noqa: BLE001 - the maintenance thread must not die
                log.exception("maintenance round failed")

    def info(self) -> dict:
        s = self.settings
        return {
            "Socket": s.socket_path,
            "RunDir": s.run_dir,
            "DataDir": s.data_dir,
            "Store": self.local_store.url,
            "ClusterStore": s.cluster_store or "",
            "ClusterAdvertise": s.cluster_advertise or "",
            "Firewall": self.firewall_report.summary(),
            "SocketAccess": self.server.access if self.server is not None else "",
            "DockerPlugins": (f"{', '.join(self.plugins.names)} in {s.docker_plugin_dir}"
                              if getattr(self, "plugins", None) is not None else ""),
        }

    def serve(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())
        try:
            self.server.serve_forever(poll_interval=0.2)
        finally:
            self._shutdown()

    def stop(self) -> None:
        if not self._stopping.is_set():
            self._stopping.set()
            threading.Thread(target=self.server.shutdown, daemon=True).start()

    def _shutdown(self) -> None:
        log.info("netd daemon stopping; containers keep running")
        self.server.server_close()
        if self.plugins is not None:
            self.plugins.close()
        if getattr(self, "trace_agent", None) is not None:
            self.trace_agent.stop()
        self.controller.close()
        self.local_store.close()
        if self.cluster_store:
            self.cluster_store.close()
