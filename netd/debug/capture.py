"""`netd capture`: sniff where a container network's packets are, without `nsenter ... tcpdump`.

Where the packets are. The CLI asks the daemon (GET /debug/capture-targets/TARGET) where it is:
a list of capture points, each an interface name and the path of the network namespace that holds
it (a container's namespace, an overlay's `ov-<VNI>`, or the daemon's own as /proc/PID/ns/net).
Drivers answer for their own devices (Driver.capture_point), so a new driver adds one method.

Where scapy runs, and why its caches do not matter. scapy reads the interface and route tables of
the namespace it is imported in, once. netd does not use those tables at all: for each capture point
the sniffer enters the point's namespace with setns(2) in the calling thread (runtime.namespaces.
entered_netns), opens a plain AF_PACKET socket there, and leaves; a packet socket stays bound to the
namespace it was created in, so one process can listen in a container, in an overlay's namespace
and on the host at once (which `netd trace` needs). The BPF filter is compiled by libpcap through
scapy (`compile_filter`, linktype Ethernet, no interface needed) and attached before the socket is
bound, so no unfiltered packet slips in. scapy then only dissects frames (netd.debug.packets), builds
probes, and writes pcap files: none of that depends on any namespace.

Who runs it. `netd capture` sniffs in the CLI process itself (it is root, and in a Mininet lab it
runs in the lab host's mount namespace, so the daemon's /run/netd paths resolve the same). The
daemon never imports scapy: for `netd trace` it starts this module as a small worker process
(`python -m netd.debug.capture`, JSON lines on stdin/stdout, see `worker_main`) that dies with it.

Stopping. Ctrl-C, -c COUNT or --timeout end the capture; the pcap file is written through scapy's
RawPcapWriter unbuffered, packet by packet, so it is complete whenever the capture stops.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from netd.contract.errors import BadRequest, NetdError, Unavailable

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
SO_ATTACH_FILTER = 26
SO_TIMESTAMPNS = 35
PACKET_OUTGOING = 4
ARPHRD_ETHER, ARPHRD_LOOPBACK = 1, 772
SNAPLEN = 65535
DLT_EN10MB = 1
IP_MTU_DISCOVER, IP_PMTUDISC_DO = 10, 2


@dataclass
class Point:
    """A capture point as the sniffer needs it (netd.contract.driverapi.CapturePoint, on the wire)."""

    netns: str
    ifname: str
    label: str
    filter: str = ""

    @classmethod
    def from_json(cls, data: dict) -> Point:
        return cls(data["Netns"], data["Interface"], data.get("Label") or data["Interface"], data.get("Filter") or "")


@dataclass
class Frame:
    time: float
    label: str
    direction: str          # "in" or "out" (as the interface sees it)
    data: bytes


# --- BPF ------------------------------------------------------------------------------------

def compile_filter(expression: str) -> bytes:
    """The classic BPF program of a tcpdump filter expression, as `struct sock_filter[]` bytes.
    Raises BadRequest with libpcap's message if the expression is wrong."""
    from netd.debug.packets import quiet_scapy

    quiet_scapy()
    try:
        from scapy.arch.common import compile_filter as scapy_compile
        from scapy.error import Scapy_Exception
    except ImportError:   # pragma: no cover - scapy is a dependency
        return _compile_with_tcpdump(expression)
    try:
        program = scapy_compile(expression, linktype=DLT_EN10MB)
    except ImportError:
        return _compile_with_tcpdump(expression)
    except Scapy_Exception as e:
        reason = str(e).split("(", 1)[-1].rstrip(")") if "(" in str(e) else str(e)
        raise BadRequest(f"invalid filter {expression!r}: {reason} (the syntax is tcpdump's, see pcap-filter(7))") from None
    size = ctypes.sizeof(program.bf_insns.contents) * program.bf_len
    return ctypes.string_at(program.bf_insns, size)


def _compile_with_tcpdump(expression: str) -> bytes:
    result = subprocess.run(["tcpdump", "-ddd", "-y", "EN10MB", expression], capture_output=True, text=True)
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "cannot compile"
        raise BadRequest(f"invalid filter {expression!r}: {reason}")
    lines = result.stdout.split("\n")
    count = int(lines[0])
    return b"".join(struct.pack("HBBI", *(int(x) for x in line.split())) for line in lines[1:count + 1])


def _attach_filter(sock: socket.socket, program: bytes) -> None:
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("HL", len(program) // 8, ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


# --- the sniffer ----------------------------------------------------------------------------

class Sniffer:
    """AF_PACKET sockets on interfaces in any namespaces, read together."""

    def __init__(self, points: list[Point], promiscuous: bool = True):
        self.points = points
        self.promiscuous = promiscuous
        self.sockets: dict[int, tuple[socket.socket, Point]] = {}
        self.failed: dict[str, str] = {}

    def open(self, tolerant: bool = False) -> Sniffer:
        """Open every point; `tolerant`: a point that cannot be opened (its interface or namespace
        is gone) is left out and its error kept in `self.failed`, the others are opened."""
        programs: dict[str, bytes] = {}
        try:
            for point in self.points:
                if point.filter and point.filter not in programs:
                    programs[point.filter] = compile_filter(point.filter)
                try:
                    sock = self._open_one(point, programs.get(point.filter))
                except (NetdError, OSError) as e:
                    if not tolerant:
                        raise
                    self.failed[point.label] = getattr(e, "message", None) or str(e)
                    continue
                self.sockets[sock.fileno()] = (sock, point)
        except BaseException:
            self.close()
            raise
        return self

    def _open_one(self, point: Point, program: bytes | None) -> socket.socket:
        from runtime.namespaces import entered_netns

        try:
            with entered_netns(point.netns):
                # Protocol 0: the socket receives nothing until bind(), after the filter is on.
                sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
                try:
                    if program:
                        _attach_filter(sock, program)
                    try:
                        index = socket.if_nametoindex(point.ifname)
                    except OSError:
                        raise NotFoundInNamespace(point) from None
                    if self.promiscuous:
                        mreq = struct.pack("iHH8s", index, PACKET_MR_PROMISC, 0, b"")
                        sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                    sock.bind((point.ifname, ETH_P_ALL))
                except BaseException:
                    sock.close()
                    raise
        except FileNotFoundError:
            raise Unavailable(f"{point.label}: its network namespace {point.netns} is gone") from None
        except PermissionError:
            raise BadRequest("packet capture needs root (it opens packet sockets in netd's namespaces)") from None
        return sock

    def frames(self, timeout: float | None = None, wake: int | None = None) -> Iterator[Frame]:
        """Frames as they come, until `timeout` seconds pass (None: forever) or the `wake` file
        descriptor becomes readable (then the iteration ends too, without reading it)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        watched = list(self.sockets) + ([wake] if wake is not None else [])
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            readable, _, _ = select.select(watched, [], [], left)
            if wake is not None and wake in readable:
                return
            for fd in readable:
                frame = self._receive(fd)
                if frame is not None:
                    yield frame

    def drain(self) -> Iterator[Frame]:
        """The frames already queued on the sockets, without waiting (after Ctrl-C: they were
        seen before the user stopped, so they belong in the output and the pcap)."""
        while self.sockets:
            readable, _, _ = select.select(list(self.sockets), [], [], 0)
            if not readable:
                return
            for fd in readable:
                frame = self._receive(fd)
                if frame is not None:
                    yield frame

    def _receive(self, fd: int) -> Frame | None:
        sock, point = self.sockets[fd]
        try:
            data, ancillary, _flags, address = sock.recvmsg(SNAPLEN, 64)
        except BlockingIOError:
            return None
        except OSError as e:   # the interface went away (ENETDOWN): stop listening to it
            self.sockets.pop(fd)
            sock.close()
            if not self.sockets:
                raise Unavailable(f"{point.label}: {e.strerror}; nothing left to capture on") from None
            return None
        if address[3] not in (ARPHRD_ETHER, ARPHRD_LOOPBACK):
            return None
        stamp = time.time()
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
                seconds, nanoseconds = struct.unpack("qq", value[:16])
                stamp = seconds + nanoseconds / 1e9
        return Frame(stamp, point.label, "out" if address[2] == PACKET_OUTGOING else "in", data)

    def close(self) -> None:
        for sock, _ in self.sockets.values():
            with contextlib.suppress(OSError):
                sock.close()
        self.sockets.clear()


class NotFoundInNamespace(BadRequest):
    def __init__(self, point: Point):
        super().__init__(f"interface {point.ifname} does not exist ({point.label})")


class PcapFile:
    """A pcap file (Ethernet) that is complete after every packet: scapy's RawPcapWriter, unbuffered."""

    def __init__(self, path: str):
        from netd.debug.packets import quiet_scapy

        quiet_scapy()
        from scapy.utils import RawPcapWriter

        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise BadRequest(f"cannot write {path}: directory {directory} does not exist")
        try:
            self.writer = RawPcapWriter(path, linktype=DLT_EN10MB, sync=True, snaplen=SNAPLEN)
            self.writer.write_header(None)
        except OSError as e:
            raise BadRequest(f"cannot write {path}: {e.strerror}") from None

    def write(self, frame: Frame) -> None:
        seconds = int(frame.time)
        self.writer.write_packet(frame.data, sec=seconds, usec=int((frame.time - seconds) * 1e6))

    def close(self) -> None:
        self.writer.close()


# --- `netd capture` (the CLI's side) --------------------------------------------------------

def cmd_capture(client, args) -> int:
    """Ask the daemon where TARGET is, sniff there, print a line per packet, write pcap."""
    from urllib.parse import quote

    from netd.debug import packets

    if args.count is not None and args.count < 1:
        raise BadRequest(f"invalid -c {args.count}: give a number of packets, 1 or more")
    if args.timeout is not None and args.timeout <= 0:
        raise BadRequest(f"invalid --timeout {args.timeout}: give a number of seconds above 0")
    if os.geteuid() != 0:
        raise BadRequest("netd capture needs root: it opens packet sockets in netd's namespaces (try sudo)")
    query = {"iface": args.interface} if args.interface else None
    target = client.request("GET", f"/debug/capture-targets/{quote(args.target, safe='')}", query=query)
    names = packets.Names.from_json(client.request("GET", "/debug/names"))
    expression = args.filter if args.filter is not None else target.get("Filter", "")
    # Lines name a container's interface "web:eth0", any other by its own name (br0, vxlan0, eth0).
    points = [Point(p["Netns"], p["Interface"], p["Label"] if p.get("Kind") == "container" else p["Interface"],
                    expression) for p in target["Points"]]
    described = ", ".join(p["Label"] for p in target["Points"])
    if expression:
        compile_filter(expression)   # a bad filter is one line of error, before anything is opened
    sniffer = Sniffer(points).open()
    pcap = None
    count = 0
    stop = Interrupts().install()
    try:
        pcap = PcapFile(args.write) if args.write else None
        print(f"capturing on {target['Description']}: {described}"
              + (f", filter {expression!r}" if expression else "")
              + (f", writing {args.write}" if args.write else "") + " (Ctrl-C to stop)", file=sys.stderr, flush=True)
        for frame in sniffer.frames(timeout=args.timeout, wake=stop.fd):
            count += 1
            show(frame, pcap, names, args.format)
            if args.count and count >= args.count:
                break
        if stop.interrupted and not (args.count and count >= args.count):
            # Frames queued before Ctrl-C were seen before the user stopped: they belong in the
            # output and the pcap.
            for frame in sniffer.drain():
                if args.count and count >= args.count:
                    break
                count += 1
                show(frame, pcap, names, args.format)
    finally:
        stop.ignore()
        sniffer.close()
        if pcap is not None:
            pcap.close()
    print(f"{count} packet{'s' if count != 1 else ''} captured", file=sys.stderr)
    return 0


class Interrupts:
    """Ctrl-C (and SIGTERM) end a capture between two packets, never while one is being
    received or written: the handler only notes the signal and wakes the sniffer's select()
    through a pipe, so no frame already taken off a socket is lost."""

    def __init__(self):
        self.interrupted = False
        self.fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)

    def install(self) -> Interrupts:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)
        return self

    def ignore(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)

    def _handle(self, signum, frame) -> None:
        self.interrupted = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._write_fd, b"x")


def show(frame: Frame, pcap: PcapFile | None, names, output: str) -> None:
    """One captured frame: into the pcap file, and a line (or a JSON object) on stdout."""
    from netd.debug import packets

    if pcap is not None:
        pcap.write(frame)
    summary = packets.dissect(frame.data)
    record = {"Time": frame.time, "Interface": frame.label, "Direction": frame.direction, "Packet": summary}
    if output == "json":
        print(json.dumps({**record, "Packet": packets.annotate(summary, names)}), flush=True)
    else:
        print(packets.format_line(record, names), flush=True)


# --- the worker (what the daemon runs for `netd trace`) -------------------------------------

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
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "netd.debug.capture"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
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
