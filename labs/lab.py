"""A Mininet lab of netd hosts: one switch (or two subnets and a router), a KV host running
etcd, N container hosts each running its own `netd daemon`, and an `ext` host that stands for
the outside world.

    with Lab(hosts=3) as lab:
        lab.netd("h1", "network", "create", "-d", "overlay", "ol1")
        lab.netd("h2", "run", "-d", "--name", "web", "--network", "ol1", "sleep", "1000")

Switches are Linux bridges (no Open vSwitch here) inside their own network namespaces, so the
lab never meets the host's firewall: Docker's FORWARD=DROP lives in the root namespace only.
Every lab host has private /run/netd, /var/lib/netd and /etc/netd (Mininet's privateDirs).
The lab drives netd only through its CLI, as a user would, and cleans up after itself, also
after a failure or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from runtime.namespaces import pids_in_netns

NETD = [sys.executable, "-m", "netd"]
PRIVATE_DIRS = ["/run/netd", "/var/lib/netd", "/etc/netd"]
SUBNET = "10.10.0.{}/24"
KV_ADDRESS = "10.10.0.100"
EXT_ADDRESS = "10.10.0.254"
ETCD_PORT = 2379


class LabError(Exception):
    """A lab step failed; the message says which host, which command and what it printed."""


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


class Lab:
    def __init__(self, hosts: int = 3, cluster_store: bool = True, routed: bool = False,
                 daemon_args: tuple[str, ...] = (), name: str = "netd lab"):
        if hosts < 1:
            raise LabError("a lab needs at least one host")
        self.host_count = hosts
        self.cluster_store = cluster_store
        self.routed = routed
        self.daemon_args = list(daemon_args)
        self.name = name
        self.tmp = tempfile.mkdtemp(prefix="netd-lab-")
        self.net = None
        self.hosts: dict[str, object] = {}
        self.addresses: dict[str, str] = {}
        self.daemons: dict[str, subprocess.Popen] = {}
        self.etcd: subprocess.Popen | None = None

    # --- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        self._previous_sigterm = previous
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        signal.signal(signal.SIGTERM, self._previous_sigterm)

    def start(self) -> None:
        from mininet.log import setLogLevel
        from mininet.net import Mininet
        from mininet.nodelib import LinuxBridge

        setLogLevel("error")   # Mininet warns about bridge-nf-call: our switches have their own namespaces
        self.net = Mininet(topo=None, switch=LinuxBridge, controller=None, build=False,
                           autoSetMacs=False, waitConnected=False)
        if self.routed:
            self._build_routed()
        else:
            self._build_flat()
        self.net.build()
        self.net.start()
        if self.routed:
            self._configure_routes()
        for name in self.container_hosts:
            self.hosts[name].cmd(f"export PATH={os.path.dirname(sys.executable)}:$PATH")
        if self.cluster_store:
            self._start_etcd()
        for name in self.container_hosts:
            self.start_daemon(name)

    def _build_flat(self) -> None:
        switch = self.net.addSwitch("s1", inNamespace=True)
        for i in range(1, self.host_count + 1):
            self._add_host(f"h{i}", SUBNET.format(i), switch)
        self._add_host("kv", f"{KV_ADDRESS}/24", switch)
        self._add_host("ext", f"{EXT_ADDRESS}/24", switch)

    def _build_routed(self) -> None:
        """Two subnets joined by router r1: odd hosts in 10.10.1.0/24, even in 10.10.2.0/24."""
        left = self.net.addSwitch("s1", inNamespace=True)
        right = self.net.addSwitch("s2", inNamespace=True)
        router = self.net.addHost("r1", ip="10.10.1.254/24")
        self.hosts["r1"] = router
        self.net.addLink(router, left, intfName1="eth0")
        self.net.addLink(router, right, intfName1="eth1", params1={"ip": "10.10.2.254/24"})
        for i in range(1, self.host_count + 1):
            side, switch = (1, left) if i % 2 else (2, right)
            self._add_host(f"h{i}", f"10.10.{side}.{i}/24", switch)
        self._add_host("kv", "10.10.1.100/24", left)
        self._add_host("ext", "10.10.2.200/24", right)

    def _add_host(self, name: str, cidr: str, switch) -> None:
        private = PRIVATE_DIRS if name.startswith("h") else ["/var/lib/etcd"] if name == "kv" else []
        host = self.net.addHost(name, ip=cidr, privateDirs=private)
        self.net.addLink(host, switch, intfName1="eth0")
        self.hosts[name] = host
        self.addresses[name] = cidr.split("/")[0]

    def _configure_routes(self) -> None:
        self.hosts["r1"].cmd("sysctl -qw net.ipv4.ip_forward=1")
        for name, address in self.addresses.items():
            gateway = "10.10.1.254" if address.startswith("10.10.1.") else "10.10.2.254"
            self.hosts[name].cmd(f"ip route add default via {gateway}")

    @property
    def container_hosts(self) -> list[str]:
        return [f"h{i}" for i in range(1, self.host_count + 1)]

    @property
    def kv_address(self) -> str:
        return self.addresses["kv"]

    @property
    def ext_address(self) -> str:
        return self.addresses["ext"]

    def _start_etcd(self) -> None:
        kv = self.hosts["kv"]
        url = f"http://{self.kv_address}:{ETCD_PORT}"
        log = open(os.path.join(self.tmp, "etcd.log"), "a")  # noqa: SIM115 - etcd owns it
        self.etcd = kv.popen(
            ["etcd", "--name", "kv", "--data-dir", "/var/lib/etcd/netd-lab",
             "--listen-client-urls", f"{url},http://127.0.0.1:{ETCD_PORT}", "--advertise-client-urls", url,
             "--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
             "--initial-cluster", "kv=http://127.0.0.1:2380", "--logger", "zap", "--log-level", "error"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if "true" in kv.cmd(f"curl -s --max-time 1 http://127.0.0.1:{ETCD_PORT}/health"):
                return
            time.sleep(0.1)
        raise LabError(f"etcd did not start on the kv host: {self._tail('etcd.log')}")

    def stop_etcd(self) -> None:
        """The cluster store goes away (its data stays on the kv host)."""
        if self.etcd is not None and self.etcd.poll() is None:
            self.etcd.terminate()
            self.etcd.wait(timeout=10)

    def start_etcd(self) -> None:
        self._start_etcd()

    def start_daemon(self, name: str, extra_args: tuple[str, ...] = ()) -> None:
        host = self.hosts[name]
        args = list(self.daemon_args) + list(extra_args)
        if self.cluster_store:
            args += ["--cluster-store", f"etcd://{self.kv_address}:{ETCD_PORT}",
                     "--cluster-advertise", self.addresses[name]]
        log = open(os.path.join(self.tmp, f"{name}-daemon.log"), "a")  # noqa: SIM115
        self.daemons[name] = host.popen(NETD + ["daemon", *args], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.daemons[name].poll() is not None:
                raise LabError(f"netd daemon on {name} exited: {self._tail(f'{name}-daemon.log')}")
            if self.try_netd(name, "info").returncode == 0:
                return
            time.sleep(0.1)
        raise LabError(f"netd daemon on {name} did not answer: {self._tail(f'{name}-daemon.log')}")

    def stop_daemon(self, name: str, sig: int = signal.SIGTERM) -> None:
        daemon = self.daemons.pop(name, None)
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(sig)
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()

    def stop(self) -> None:
        """Remove everything: containers, daemons, etcd, Mininet, temp files. Never raises."""
        for name in list(self.daemons):
            with contextlib.suppress(Exception):
                ids = self.try_netd(name, "ps", "-aq").stdout.split()
                if ids:
                    self.try_netd(name, "rm", "-f", *ids)
        for name in list(self.daemons):
            with contextlib.suppress(Exception):
                self.stop_daemon(name)
        self._kill_leftovers()
        if self.etcd is not None and self.etcd.poll() is None:
            self.etcd.kill()
            self.etcd.wait()
        if self.net is not None:
            with contextlib.suppress(Exception):
                self.net.stop()
            self.net = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _kill_leftovers(self) -> None:
        """Container processes still running in a lab host's namespaces (after a crash)."""
        for name in self.container_hosts:
            self.kill_containers(name, host_namespace_too=True)

    def kill_containers(self, name: str, host_namespace_too: bool = False) -> None:
        """Kill every container process of a lab host, as if the machine had died (its daemon
        must already be stopped, or it would notice)."""
        host = self.hosts.get(name)
        if host is None or not getattr(host, "pid", None):
            return
        netns_dir = f"/proc/{host.pid}/root/run/netd/netns"
        paths = []
        with contextlib.suppress(OSError):
            paths = [os.path.join(netns_dir, e) for e in os.listdir(netns_dir) if not e.startswith("ov-")]
        if host_namespace_too:
            paths.append(f"/proc/{host.pid}/ns/net")
        shells = {getattr(h, "pid", None) for h in self.hosts.values()}
        for pid in pids_in_netns(paths):
            if pid not in shells:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

    # --- commands on hosts ------------------------------------------------------------------

    def try_netd(self, host: str, *args: str, timeout: float = 60) -> Result:
        return self.run(host, NETD + list(args), timeout=timeout)

    def netd(self, host: str, *args: str, timeout: float = 60) -> str:
        """`netd ARGS` on a lab host, as a user there would type it; its output."""
        result = self.try_netd(host, *args, timeout=timeout)
        if result.returncode != 0:
            raise LabError(f"{host}$ netd {' '.join(args)}: {result.stderr.strip() or result.stdout.strip()}")
        return result.stdout.strip()

    def run(self, host: str, argv: list[str], timeout: float = 60) -> Result:
        process = self.hosts[host].popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
            return Result(124, stdout, stderr + f"\ntimed out after {timeout}s")
        return Result(process.returncode, stdout, stderr)

    def sh(self, host: str, command: str, timeout: float = 60) -> Result:
        return self.run(host, ["sh", "-c", command], timeout=timeout)

    def daemon_log(self, host: str) -> str:
        try:
            with open(os.path.join(self.tmp, f"{host}-daemon.log")) as f:
                return f.read()
        except OSError:
            return ""

    def _tail(self, log: str, lines: int = 20) -> str:
        try:
            with open(os.path.join(self.tmp, log)) as f:
                return "".join(f.readlines()[-lines:]).strip()
        except OSError:
            return "(no log)"


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt
