"""Packet sockets in any namespace, with a BPF filter attached before bind; frames and pcap files.

A packet socket stays bound to the namespace it was made in: the sniffer enters each capture point's
namespace with setns(2) in the calling thread, opens the socket there, and leaves, so one process
listens in containers, overlay namespaces and on the host at once."""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

from netd.contract.errors import BadRequest, NetdError, Unavailable

ARPHRD_ETHER, ARPHRD_LOOPBACK = 1, 772
DLT_EN10MB = 1


ETH_P_ALL = 0x0003


SOL_PACKET = 263


PACKET_ADD_MEMBERSHIP = 1


PACKET_MR_PROMISC = 1


SO_ATTACH_FILTER = 26


SO_TIMESTAMPNS = 35


PACKET_OUTGOING = 4


SNAPLEN = 65535


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
