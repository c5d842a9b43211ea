"""The embedded DNS resolver: 127.0.0.11 inside every container, as Docker's.

For each container namespace the daemon opens a UDP socket bound to 127.0.0.11:53 *inside*
that namespace (a socket keeps the namespace it was created in), so no NAT rule is needed.
One thread serves all of them. A query is answered from the names netd knows for the
asking container (its networks' containers and aliases, cluster-wide on global networks);
anything else is forwarded to the host's resolvers, from the daemon's own namespace.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable

from runtime.etcfiles import EMBEDDED_DNS, read_resolv_conf
from runtime.namespaces import open_in_netns

log = logging.getLogger("netd.core.dns")

TYPE_A, TYPE_PTR, TYPE_AAAA = 1, 12, 28
CLASS_IN = 1
RCODE_SERVFAIL, RCODE_NXDOMAIN, RCODE_REFUSED = 2, 3, 5
ANSWER_TTL = 10          # short: containers come and go
FORWARD_TIMEOUT = 2.0
MAX_FORWARDS = 256               # queries forwarded upstream at once, for all containers
MAX_FORWARDS_PER_CONTAINER = 32  # ... and for one container

# (container id, name) -> addresses, or None when netd does not know the name
Lookup = Callable[[str, str], list[str] | None]
# (container id, address) -> the name netd knows for it ("web.mynet"), or None
ReverseLookup = Callable[[str, str], str | None]


def parse_question(packet: bytes) -> tuple[int, int, str, int, int]:
    """(id, flags, qname, qtype, offset after the question) of a query; ValueError if bad."""
    if len(packet) < 12:
        raise ValueError("short packet")
    ident, flags, qdcount = struct.unpack("!HHH", packet[:6])
    if qdcount != 1:
        raise ValueError("expected one question")
    labels, offset = [], 12
    while True:
        if offset >= len(packet):
            raise ValueError("truncated name")
        length = packet[offset]
        offset += 1
        if length == 0:
            break
        if length & 0xC0:
            raise ValueError("compressed name in question")
        labels.append(packet[offset:offset + length].decode("ascii", "replace"))
        offset += length
    if offset + 4 > len(packet):
        raise ValueError("truncated question")
    qtype, _qclass = struct.unpack("!HH", packet[offset:offset + 4])
    return ident, flags, ".".join(labels), qtype, offset + 4


def build_reply(query: bytes, question_end: int, addresses: list[str], rcode: int = 0,
                ptr_name: str | None = None) -> bytes:
    """A reply to `query` with A records for `addresses`, or one PTR record for `ptr_name`."""
    ident, flags = struct.unpack("!HH", query[:4])
    reply_flags = 0x8000 | (flags & 0x7900) | 0x0080 | rcode   # QR, opcode+RD kept, RA
    answers = [struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, ANSWER_TTL, 4) + socket.inet_aton(a)
               for a in addresses]
    if ptr_name:
        encoded = b"".join(bytes([len(label)]) + label.encode() for label in ptr_name.split(".") if label) + b"\0"
        answers.append(struct.pack("!HHHIH", 0xC00C, TYPE_PTR, CLASS_IN, ANSWER_TTL, len(encoded)) + encoded)
    header = struct.pack("!HHHHHH", ident, reply_flags, 1, len(answers), 0, 0)
    return header + query[12:question_end] + b"".join(answers)


def reverse_address(qname: str) -> str | None:
    """"4.3.2.1.in-addr.arpa" -> "1.2.3.4"; None for anything else."""
    labels = qname.rstrip(".").lower().split(".")
    if len(labels) != 6 or labels[4:] != ["in-addr", "arpa"] or not all(p.isdigit() for p in labels[:4]):
        return None
    return ".".join(reversed(labels[:4]))


class Resolver:
    def __init__(self, lookup: Lookup, reverse: ReverseLookup, resolv_conf: str = "/etc/resolv.conf"):
        self.lookup = lookup
        self.reverse = reverse
        self.upstreams = [ns for ns in read_resolv_conf(resolv_conf).nameservers if ns != EMBEDDED_DNS]
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._pending: list[Callable[[], None]] = []
        self._sockets: dict[str, socket.socket] = {}          # container id -> its listening socket
        self._forwards: dict[socket.socket, tuple] = {}       # upstream socket -> (client socket, addr, deadline, query, upstream index)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopped = False
        self._thread = threading.Thread(target=self._serve, name="dns", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        self._wake()
        self._thread.join(timeout=2)
        for sock in list(self._sockets.values()) + list(self._forwards):
            sock.close()

    # --- sandboxes (called from other threads) ---------------------------------------------

    def add_sandbox(self, container_id: str, netns: str) -> None:
        """Listen on 127.0.0.11:53 inside the container's namespace."""
        def make() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((EMBEDDED_DNS, 53))
            sock.setblocking(False)
            return sock

        sock = open_in_netns(netns, make)
        with self._lock:
            old = self._sockets.pop(container_id, None)
            self._sockets[container_id] = sock
            self._pending.append(lambda: self._swap(old, sock, container_id))
        self._wake()

    def remove_sandbox(self, container_id: str) -> None:
        with self._lock:
            sock = self._sockets.pop(container_id, None)
            if sock is not None:
                self._pending.append(lambda: self._swap(sock, None, container_id))
        self._wake()

    def _swap(self, old: socket.socket | None, new: socket.socket | None, container_id: str) -> None:
        if old is not None:
            self._selector.unregister(old)
            old.close()
        if new is not None:
            self._selector.register(new, selectors.EVENT_READ, ("client", container_id))

    def _wake(self) -> None:
        os.write(self._wake_w, b"x")

    # --- the loop ---------------------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stopped:
            for key, _ in self._selector.select(timeout=0.5):
                if key.data is None:
                    self._drain_wake()
                elif key.data[0] == "client":
                    self._guarded(self._on_query, key.fileobj, key.data[1])
                else:
                    self._guarded(self._on_upstream_reply, key.fileobj)
            self._guarded(self._expire_forwards)

    @staticmethod
    def _guarded(action, *args) -> None:
        try:
            action(*args)
        except Exception:  # noqa: BLE001 - one bad packet or gone container must not stop the resolver
            log.exception("dns: %s failed", getattr(action, "__name__", action))

    def _drain_wake(self) -> None:
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass
        with self._lock:
            pending, self._pending = self._pending, []
        for action in pending:
            self._guarded(action)

    def _on_query(self, sock: socket.socket, container_id: str) -> None:
        try:
            query, addr = sock.recvfrom(4096)
        except (BlockingIOError, OSError):
            return
        try:
            _ident, _flags, qname, qtype, end = parse_question(query)
        except ValueError:
            return
        if qtype == TYPE_PTR and (address := reverse_address(qname)):
            name = self.reverse(container_id, address)
            if name:
                _send(sock, build_reply(query, end, [], ptr_name=name), addr)
                return
        else:
            addresses = self.lookup(container_id, qname.rstrip(".").lower())
            if addresses is not None:
                records = addresses if qtype == TYPE_A else []   # known name: no AAAA, but not an error
                _send(sock, build_reply(query, end, records), addr)
                return
        in_flight = sum(1 for forward in self._forwards.values() if forward[0] is sock)
        if len(self._forwards) >= MAX_FORWARDS or in_flight >= MAX_FORWARDS_PER_CONTAINER:
            # Bounded: each forward holds a socket up to FORWARD_TIMEOUT; one chatty container
            # (or all of them) must not run the daemon out of descriptors. REFUSED: try later.
            _send(sock, build_reply(query, end, [], RCODE_REFUSED), addr)
            return
        self._forward(sock, addr, query, end, 0)

    def _forward(self, client: socket.socket, addr, query: bytes, end: int, index: int) -> None:
        if index >= len(self.upstreams):
            _send(client, build_reply(query, end, [], RCODE_SERVFAIL), addr)
            return
        upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        upstream.setblocking(False)
        try:
            upstream.connect((self.upstreams[index], 53))
            upstream.send(query)
        except OSError:
            upstream.close()
            self._forward(client, addr, query, end, index + 1)
            return
        self._forwards[upstream] = (client, addr, time.monotonic() + FORWARD_TIMEOUT, query, end, index)
        self._selector.register(upstream, selectors.EVENT_READ, ("upstream",))

    def _on_upstream_reply(self, upstream: socket.socket) -> None:
        client, addr, _deadline, query, end, index = self._forwards.pop(upstream)
        self._selector.unregister(upstream)
        try:
            reply = upstream.recv(65535)
        except OSError:
            upstream.close()
            self._forward(client, addr, query, end, index + 1)
            return
        upstream.close()
        _send(client, reply, addr)

    def _expire_forwards(self) -> None:
        now = time.monotonic()
        for upstream, (client, addr, deadline, query, end, index) in list(self._forwards.items()):
            if now > deadline:
                del self._forwards[upstream]
                self._selector.unregister(upstream)
                upstream.close()
                self._forward(client, addr, query, end, index + 1)


def _send(sock: socket.socket, data: bytes, addr) -> None:
    try:
        sock.sendto(data, addr)
    except OSError:
        pass  # the container went away meanwhile (its socket is closed): nobody to answer
