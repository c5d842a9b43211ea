"""Test hosts: a netd daemon in a network namespace of its own, with an "outside" beyond it.

    with NetdHost() as host:
        host.netd("network", "create", "web")
        host.netd("run", "-d", "--name", "a", "--network", "web", "sleep", "1000")
        host.netd("exec", "a", "ping", "-c1", "a")

The daemon sees its namespace as "the host": its bridges, nftables table and routes live
there, never in the machine's real namespace. The "outside" namespace stands for the
internet (198.51.100.1) and other machines: it routes back only to the host's uplink address,
so a container reaches it only through netd's NAT. Everything is removed on exit, also after a
failure: container processes, namespaces, mounts, temp dirs.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from runtime.namespaces import delete_netns, pids_in_netns

PYTHON = sys.executable
UPLINK_HOST = "203.0.113.2"      # the host's address on its uplink (TEST-NET-3)
UPLINK_OUTSIDE = "203.0.113.1"   # the outside router's address on the uplink
OUTSIDE_ADDRESS = "198.51.100.1"  # "the internet" (TEST-NET-2), behind the outside router


def run(argv: list[str], check: bool = True, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
    return result


class NetdHost:
    def __init__(self, prefix: str = "netdt", uplink: bool = True, daemon_args: tuple[str, ...] = ()):
        self.name = f"{prefix}-{secrets.token_hex(3)}"
        self.outside = f"{self.name}-out" if uplink else None
        self.tmp = tempfile.mkdtemp(prefix=f"{self.name}-")
        self.run_dir = os.path.join(self.tmp, "run")
        self.data_dir = os.path.join(self.tmp, "data")
        self.socket = os.path.join(self.run_dir, "netd.sock")
        self.daemon_args = list(daemon_args)
        self.daemon: subprocess.Popen | None = None
        self.daemon_log = os.path.join(self.tmp, "daemon.log")
        self.env = {**os.environ, "NETD_HOST": f"unix://{self.socket}"}

    # --- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> NetdHost:
        try:
            self.create_namespaces()
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def create_namespaces(self) -> None:
        run(["ip", "netns", "add", self.name])
        self.sh("ip link set lo up")
        if self.outside:
            run(["ip", "netns", "add", self.outside])
            out = ["ip", "netns", "exec", self.outside]
            run(["ip", "-n", self.name, "link", "add", "uplink", "type", "veth", "peer", "name", "downlink",
                 "netns", self.outside])
            self.sh(f"ip addr add {UPLINK_HOST}/24 dev uplink && ip link set uplink up && "
                    f"ip route add default via {UPLINK_OUTSIDE}")
            run(out + ["sh", "-c", f"ip link set lo up && ip addr add {OUTSIDE_ADDRESS}/32 dev lo && "
                       f"ip addr add {UPLINK_OUTSIDE}/24 dev downlink && ip link set downlink up"])

    def start(self, extra_args: tuple[str, ...] = ()) -> None:
        log = open(self.daemon_log, "a")  # noqa: SIM115 - the daemon owns it while it runs
        argv = ["nsenter", f"--net=/run/netns/{self.name}", PYTHON, "-m", "netd", "daemon",
                "--run-dir", self.run_dir, "--data-dir", self.data_dir, "--config-file", "/nonexistent",
                *self.daemon_args, *extra_args]
        self.daemon = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise AssertionError(f"netd daemon exited ({self.daemon.returncode}):\n{self.log_tail()}")
            if os.path.exists(self.socket) and self.cli("info", check=False).returncode == 0:
                return
            time.sleep(0.05)
        raise AssertionError(f"netd daemon did not answer within 20 s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.daemon and self.daemon.poll() is None:
            self.daemon.send_signal(sig)
            try:
                self.daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
        self.daemon = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.daemon_log) as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    # --- commands ---------------------------------------------------------------------------

    def cli(self, *args: str, check: bool = True, timeout: float = 60, input: str | None = None) -> subprocess.CompletedProcess:
        """Run `netd ARGS` as a user on this host would (the CLI in the host's namespace)."""
        argv = ["nsenter", f"--net=/run/netns/{self.name}", PYTHON, "-m", "netd", *args]
        return run(argv, check=check, timeout=timeout, env=self.env, input=input)

    def netd(self, *args: str, timeout: float = 60) -> str:
        """`netd ARGS`, which must succeed; its output, stripped."""
        return self.cli(*args, timeout=timeout).stdout.strip()

    def fails(self, *args: str) -> str:
        """`netd ARGS`, which must fail with a one-line message; the message."""
        result = self.cli(*args, check=False)
        assert result.returncode != 0, f"netd {' '.join(args)} should have failed: {result.stdout}"
        message = result.stderr.strip()
        assert message and "\n" not in message, f"expected one line of error, got: {message!r}"
        assert "Traceback" not in message
        return message

    def sh(self, command: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """A shell command in the host's namespace."""
        return run(["ip", "netns", "exec", self.name, "sh", "-c", command], check=check, timeout=timeout)

    def outside_sh(self, command: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return run(["ip", "netns", "exec", self.outside, "sh", "-c", command], check=check, timeout=timeout)

    def inspect(self, container: str) -> dict:
        import json
        return json.loads(self.netd("inspect", container))[0]

    def address(self, container: str, network: str | None = None) -> str:
        networks = self.inspect(container)["NetworkSettings"]["Networks"]
        settings = networks[network] if network else next(iter(networks.values()))
        return settings["IPAddress"]

    # --- cleanup ----------------------------------------------------------------------------

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            if self.daemon and self.daemon.poll() is None:
                ids = self.cli("ps", "-aq", check=False, timeout=20).stdout.split()
                if ids:
                    self.cli("rm", "-f", *ids, check=False, timeout=60)
        self.stop(signal.SIGKILL)
        self._kill_container_processes()
        netns_dir = os.path.join(self.run_dir, "netns")
        if os.path.isdir(netns_dir):
            for entry in os.listdir(netns_dir):
                delete_netns(os.path.join(netns_dir, entry))
        for ns in (self.outside, self.name):
            if ns:
                run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _kill_container_processes(self) -> None:
        """Whatever still runs in this host's namespaces: left by a crash or a failed test."""
        paths = [f"/run/netns/{self.name}"] + _netns_files(os.path.join(self.run_dir, "netns"))
        for pid in pids_in_netns(paths):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _netns_files(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        return []
    return [os.path.join(directory, e) for e in os.listdir(directory)]


@contextlib.contextmanager
def clustered_host(prefix: str = "netdt", certs=None):
    """A NetdHost whose daemon uses a real etcd, run inside the host's namespace (where the daemon
    reaches it on 127.0.0.1): (host, the store's URL). Both removed on exit. With `certs`
    (tests.support.certs), etcd wants client TLS and the daemon is given its certificates."""
    from runtime.namespaces import entered_netns
    from tests.support.etcd_server import EtcdServer

    host = NetdHost(prefix=prefix)
    etcd = None
    try:
        host.create_namespaces()
        with entered_netns(f"/run/netns/{host.name}"):
            etcd = EtcdServer(certs=certs)
        url = f"etcd://127.0.0.1:{etcd.client_port}"
        host.daemon_args = ["--cluster-store", url, "--cluster-advertise", UPLINK_HOST]
        if certs is not None:
            host.daemon_args += [a for k, v in certs.options().items() for a in ("--cluster-store-opt", f"{k}={v}")]
        host.start()
        host.etcd = etcd        # for tests that freeze it (SIGSTOP) or stop it
        yield host, url
    finally:
        if etcd is not None and etcd.process is not None:
            with contextlib.suppress(ProcessLookupError):
                etcd.process.send_signal(signal.SIGCONT)
        host.cleanup()
        if etcd is not None:
            etcd.close()
