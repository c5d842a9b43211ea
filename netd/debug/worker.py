"""The capture worker the daemon starts for `netd trace` (`python -m netd.debug.worker`): JSON lines
on stdin/stdout, dies with its parent. The daemon itself never imports scapy."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from netd.contract.errors import NetdError, Unavailable
from netd.debug.sniffer import Point, Sniffer

IP_MTU_DISCOVER, IP_PMTUDISC_DO = 10, 2


class Worker:
    """A capture worker process, as the daemon sees it: JSON lines in and out.

    The daemon never imports scapy nor enters a namespace for a long time; it starts
    `python -m netd.debug.capture` with a spec, waits for "Ready", tells it to "Send" the probe, and
    "Stop"s it. Records arrive on a reader thread; the worker dies with the daemon.
    """

    def __init__(self, spec: dict):
        self.spec = spec
        self.records: list[dict] = []
        self.events: list[dict] = []
        self.ready = threading.Event()
        self.finished = threading.Event()
        self.error: str | None = None
        self.failed: dict[str, str] = {}     # capture point label -> why it could not be opened
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.process: subprocess.Popen | None = None

    def start(self) -> Worker:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the checkout
        env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "netd.debug.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._stderr, text=True, env=env, close_fds=True,
        )
        self._tell(self.spec)
        threading.Thread(target=self._read, name="capture-worker", daemon=True).start()
        return self

    def _tell(self, message: dict) -> None:
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            with self._changed:
                if "Record" in message:
                    self.records.append(message["Record"])
                elif "Ready" in message:
                    self.failed = message.get("Failed") or {}
                    self.ready.set()
                elif "Error" in message:
                    self.error = message["Error"]
                    self.ready.set()
                else:
                    self.events.append(message)
                self._changed.notify_all()
        self.process.wait()
        if self.error is None and not self.ready.is_set():
            self._stderr.seek(0)
            stderr = self._stderr.read().strip().splitlines()
            self.error = f"capture worker exited: {stderr[-1] if stderr else self.process.returncode}"
        self._stderr.close()
        with self._changed:
            self.ready.set()
            self.finished.set()
            self._changed.notify_all()

    def wait_ready(self, timeout: float) -> None:
        if not self.ready.wait(timeout):
            self.stop()
            raise Unavailable(f"the capture worker did not start within {timeout:.0f} s")
        if self.error:
            raise NetdError(self.error)

    def send(self) -> None:
        self._tell({"Send": True})

    def wait_for(self, condition, timeout: float) -> bool:
        """Wait until condition(records, events) holds, or the timeout passes."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not condition(self.records, self.events):
                left = deadline - time.monotonic()
                if left <= 0 or self.finished.is_set():
                    return condition(self.records, self.events)
                self._changed.wait(left)
            return True

    def stop(self, timeout: float = 5.0) -> None:
        if self.process is None:
            return
        self._tell({"Stop": True})
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        if not self.finished.wait(timeout):
            self.process.kill()
            self.finished.wait(timeout)


def worker_main() -> int:
    """`python -m netd.debug.capture`: read a spec line, capture, report matching probe packets.

    Spec: {"Points": [{"Netns", "Interface", "Label", "Filter"}], "Probe": {...} or null,
    "Send": {"Netns": path} or null, "Seconds": max lifetime}. Then "Send" and "Stop" lines.
    Output: {"Ready": ...}, {"Record": {...}}, {"Sent": time} / {"SendError": message}, {"Done"}.
    """
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the daemon's Ctrl-C is the daemon's to handle
    from netd.debug import packets

    def say(message: dict) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    commands = _Lines(sys.stdin.fileno())
    try:
        spec = commands.first()
        points = [Point.from_json(p) for p in spec.get("Points", [])]
        probe = packets.Probe.from_json(spec["Probe"]) if spec.get("Probe") else None
        seconds = min(float(spec.get("Seconds") or 10), 60.0)
        sender = ProbeSender(probe, spec["Send"]["Netns"]) if spec.get("Send") and probe else None
        sniffer = Sniffer(points).open(tolerant=True)
    except NetdError as e:
        say({"Error": e.message})
        return 1
    except Exception as e:  # noqa: BLE001 - reported to the daemon as one line
        say({"Error": f"{type(e).__name__}: {e}"})
        return 1
    say({"Ready": True, "Failed": sniffer.failed})
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            for frame in sniffer.frames(timeout=max(0.0, deadline - time.monotonic()), wake=commands.fd):
                summary = packets.dissect(frame.data)
                found = packets.match_probe(summary, probe) if probe else ("packet", "")
                if found:
                    say({"Record": {"Time": frame.time, "Interface": frame.label, "Direction": frame.direction,
                                    "Role": found[0], "How": found[1], "Packet": summary}})
            if time.monotonic() >= deadline:
                break
            received = commands.read()
            if received is None:
                break
            stop = False
            for command in received:
                if command.get("Send") and sender is not None:
                    try:
                        say({"Sent": sender.send()})
                    except OSError as e:
                        say({"SendError": e.strerror or str(e), "Errno": e.errno})
                if command.get("Stop"):
                    stop = True
            if stop:
                break
    except NetdError as e:   # every interface went away: report what was seen
        say({"Lost": e.message})
    finally:
        sniffer.close()
        if sender is not None:
            sender.close()
    say({"Done": True})
    return 0


class _Lines:
    """JSON lines from a pipe, read with os.read (no hidden buffer between select and read)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buffer = b""

    def first(self) -> dict:
        while b"\n" not in self.buffer:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                break
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line or b"{}")

    def read(self) -> list[dict] | None:
        """The complete lines now readable; None at end of input."""
        chunk = os.read(self.fd, 65536)
        if not chunk:
            return None
        self.buffer += chunk
        lines = []
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            if line.strip():
                lines.append(json.loads(line))
        return lines


class ProbeSender:
    """Sends a `netd trace` probe from inside a container's namespace, through the container's
    own routing and ARP (kernel sockets, made in that namespace): ICMP echo built by scapy and
    sent on a raw socket with DF set, a TCP SYN by connect(), a UDP datagram by sendto()."""

    def __init__(self, probe, netns: str):
        from runtime.namespaces import entered_netns

        self.probe = probe
        with entered_netns(netns):
            if probe.proto == "icmp":
                self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            elif probe.proto == "tcp":
                self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            else:
                self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            if probe.proto != "icmp":
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                self.sock.bind((probe.src, probe.sport))
            self.sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)   # don't fragment
            self.sock.setblocking(False)

    def send(self) -> float:
        from netd.debug import packets

        probe = self.probe
        if probe.proto == "icmp":
            message = packets.build_icmp_probe(probe)
            sent = time.time()
            self.sock.sendto(message, (probe.dst, 0))
        elif probe.proto == "tcp":
            sent = time.time()
            with contextlib.suppress(BlockingIOError):
                self.sock.connect((probe.dst, probe.dport))
        else:
            token = bytes.fromhex(probe.token)
            message = token + b"\0" * max(0, probe.size - 28 - len(token))
            sent = time.time()
            self.sock.sendto(message, (probe.dst, probe.dport))
        return sent

    def close(self) -> None:
        self.sock.close()


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: the worker goes when the daemon goes, whatever happens to it."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)   # PR_SET_PDEATHSIG
        if os.getppid() == 1:
            os._exit(1)


if __name__ == "__main__":
    sys.exit(worker_main())
