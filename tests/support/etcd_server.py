"""A real etcd (Debian's etcd-server) for tests, on free loopback ports, data in a temp dir.

    with EtcdServer() as etcd:
        store = open_store(etcd.url)
        etcd.stop(); etcd.start()       # the store went away and came back, data intact

No process is left behind: `close()` (also on leaving the `with`, also when a test fails)
kills etcd and removes its data; an atexit hook covers servers nobody closed; and etcd is
started with PR_SET_PDEATHSIG so that the kernel kills it if the test process dies. (The
signal follows the *thread* that started etcd: start it from the main thread, as fixtures do.)
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

ETCD = "/usr/bin/etcd"
PR_SET_PDEATHSIG = 1

_running: set[EtcdServer] = set()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class EtcdServer:
    def __init__(self, start_timeout: float = 20.0, certs=None, password: str | None = None):
        """`certs` (tests.support.certs.Certificates): clients must come with TLS and a certificate
        of its CA (--client-cert-auth). `password`: etcd's authentication on, user root with it."""
        self.certs = certs
        self.password = password
        self.client_port = free_port()
        self.peer_port = free_port()
        # tmpfs when there is one: etcd fsyncs every commit, and the tests measure logic, not disks.
        self.data_root = tempfile.mkdtemp(prefix="netd-etcd-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"etcd://127.0.0.1:{self.client_port}"

    @property
    def scheme(self) -> str:
        return "https" if self.certs else "http"

    def _context(self):
        if not self.certs:
            return None
        import ssl

        context = ssl.create_default_context(cafile=self.certs.ca)
        context.load_cert_chain(*self.certs.client)
        return context

    def _call(self, path: str, body: dict, token: str | None = None) -> dict:
        request = urllib.request.Request(f"{self.scheme}://127.0.0.1:{self.client_port}{path}",
                                         json.dumps(body).encode(), headers={"Authorization": token} if token else {})
        with urllib.request.urlopen(request, timeout=5, context=self._context()) as reply:
            return json.load(reply)

    @property
    def log_path(self) -> str:
        return os.path.join(self.data_root, "etcd.log")

    def start(self) -> EtcdServer:
        """Start etcd (again, on the same data and ports) and wait until it answers."""
        if self.process is not None:
            return self
        client = f"{self.scheme}://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        command = [
            ETCD, "--name", "netd-test", "--data-dir", os.path.join(self.data_root, "data"),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"netd-test={peer}", "--initial-cluster-state", "new",
            # Short ticks: a quick election at start, and leases as short as 1 s.
            "--heartbeat-interval", "25", "--election-timeout", "250",
            "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn",
        ]
        if self.certs:
            cert, key = self.certs.server
            command += ["--client-cert-auth", "--trusted-ca-file", self.certs.ca, "--cert-file", cert, "--key-file", key]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                            preexec_fn=_die_with_parent)
        _running.add(self)
        self._wait_until_ready()
        if self.password and not getattr(self, "_auth_on", False):
            self._call("/v3/auth/user/add", {"name": "root", "password": self.password})
            self._call("/v3/auth/role/add", {"name": "root"})
            self._call("/v3/auth/user/grant", {"user": "root", "role": "root"})
            self._call("/v3/auth/enable", {})
            self._auth_on = True
        return self

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.process.returncode}: {self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.scheme}://127.0.0.1:{self.client_port}/health", timeout=1,
                                            context=self._context()) as reply:
                    if json.load(reply).get("health") == "true":
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"etcd did not answer within {self.start_timeout:.0f}s: {self._log_tail()}")

    def stop(self) -> None:
        """Stop etcd cleanly (SIGTERM; SIGKILL if it lingers). The data stays."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """Kill etcd at once, as a crash would. The data stays."""
        self._end(signal.SIGKILL)

    def _end(self, sig: int) -> None:
        if self.process is None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
        _running.discard(self)

    def close(self) -> None:
        """Kill etcd and remove its data."""
        self.kill()
        shutil.rmtree(self.data_root, ignore_errors=True)

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, errors="replace") as log:
                return log.read()[-2000:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> EtcdServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


@atexit.register
def _close_forgotten_servers() -> None:
    for server in list(_running):
        server.close()
