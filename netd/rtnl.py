"""A small raw rtnetlink client for the endpoint hot path (attach and detach).

pyroute2 serves everything else; here its message encoding and decoding cost more than the
kernel's work (about 0.5-0.8 ms per request, measured), and an attach takes half a dozen
requests. These few messages are built with `struct` and only the acknowledgement (or the
interface index) is read back, which brings an attach from ~8 ms of netlink to ~1.5 ms.

Messages: veth pair with the peer created straight in a container namespace (named, addressed,
up, enslaved), interface index by name, link up/down/group/rename, bridge-port hairpin, IPv4
address, default route, and deletion of a whole interface group in one request (the kernel then
waits for one RCU grace period for all of them instead of one per interface).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading

from runtime.namespaces import open_in_netns

NETLINK_ROUTE = 0
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_SETLINK = 16, 17, 18, 19
RTM_NEWADDR, RTM_NEWROUTE = 20, 24
NLM_F_REQUEST, NLM_F_ACK, NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x100, 0x200, 0x400
NLA_F_NESTED = 0x8000

IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_MASTER = 1, 3, 4, 10
IFLA_PROTINFO, IFLA_LINKINFO, IFLA_GROUP, IFLA_NET_NS_FD, IFLA_EXT_MASK = 12, 18, 27, 28, 29
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
VETH_INFO_PEER = 1
IFLA_BRPORT_MODE = 4          # hairpin
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY = 1, 4, 5
RTEXT_FILTER_SKIP_STATS = 1 << 3
IFF_UP = 0x1
AF_BRIDGE = 7
RT_TABLE_MAIN, RTPROT_STATIC, RT_SCOPE_UNIVERSE, RTN_UNICAST = 254, 4, 0, 1

NLMSGHDR = struct.Struct("=IHHII")
IFINFOMSG = struct.Struct("=BxHiII")
IFADDRMSG = struct.Struct("=BBBBi")
RTMSG = struct.Struct("=BBBBBBBBI")


def attr(kind: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("=HH", length, kind) + data + b"\0" * ((4 - length % 4) % 4)


def nested(kind: int, *attrs: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(attrs))


def u32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=I", value))


def name_attr(name: str) -> bytes:
    return attr(IFLA_IFNAME, name.encode() + b"\0")


def mac_bytes(mac: str) -> bytes:
    return bytes(int(part, 16) for part in mac.split(":"))


def ifinfo(index: int = 0, flags: int = 0, change: int = 0, family: int = socket.AF_UNSPEC) -> bytes:
    return IFINFOMSG.pack(family, 0, index, flags, change)


class Rtnl:
    """One rtnetlink socket, in the namespace where it was opened. Not thread-safe: use one per
    thread, or hold a lock (the controller does)."""

    def __init__(self, netns: str | None = None):
        make = lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)  # noqa: E731
        self.sock = open_in_netns(netns, make) if netns else make()
        self.sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def request(self, msg_type: int, flags: int, payload: bytes) -> list[bytes]:
        """Send one request; return the payloads of the replies (empty for a plain ack).
        A kernel error becomes OSError with its errno."""
        self._seq += 1
        seq = self._seq
        self.sock.send(NLMSGHDR.pack(NLMSGHDR.size + len(payload), msg_type, flags | NLM_F_REQUEST, seq, 0) + payload)
        replies = []
        while True:
            data = self.sock.recv(65536)
            offset = 0
            while offset < len(data):
                length, kind, _flags, reply_seq, _pid = NLMSGHDR.unpack_from(data, offset)
                body = data[offset + NLMSGHDR.size: offset + length]
                offset += (length + 3) & ~3
                if reply_seq != seq:
                    continue
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", body)[0]
                    if code:
                        raise OSError(code, os.strerror(code))
                    return replies
                if kind == NLMSG_DONE:
                    return replies
                replies.append(body)
                if not flags & NLM_F_ACK:
                    return replies

    # --- links ------------------------------------------------------------------------------

    def link_index(self, name: str) -> int | None:
        try:
            [reply] = self.request(RTM_GETLINK, 0, ifinfo() + name_attr(name) + u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS))
        except OSError as e:
            if e.errno == errno.ENODEV:
                return None
            raise
        return IFINFOMSG.unpack_from(reply)[2]

    def create_veth(self, name: str, peer_name: str, peer_netns_fd: int, mac: str, master: int | None = None,
                    mtu: int | None = None) -> None:
        """A veth pair: `name` here, up and enslaved to `master`; `peer_name` created directly in
        the namespace of `peer_netns_fd` with MAC `mac`, still down (the kernel cannot open a veth
        end before its pair is complete: ENOTCONN)."""
        peer_attrs = [name_attr(peer_name), u32(IFLA_NET_NS_FD, peer_netns_fd), attr(IFLA_ADDRESS, mac_bytes(mac))]
        attrs = [name_attr(name)]
        if mtu:
            peer_attrs.append(u32(IFLA_MTU, mtu))
            attrs.append(u32(IFLA_MTU, mtu))
        if master is not None:
            attrs.append(u32(IFLA_MASTER, master))
        peer = ifinfo() + b"".join(peer_attrs)
        attrs.append(nested(IFLA_LINKINFO, attr(IFLA_INFO_KIND, b"veth\0"),
                            nested(IFLA_INFO_DATA, attr(VETH_INFO_PEER, peer))))
        self.request(RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
                     ifinfo(flags=IFF_UP, change=IFF_UP) + b"".join(attrs))

    def set_link(self, index: int, up: bool | None = None, group: int | None = None, name: str | None = None) -> None:
        attrs = b""
        if group is not None:
            attrs += u32(IFLA_GROUP, group)
        if name is not None:
            attrs += name_attr(name)
        flags, change = (0, 0) if up is None else (IFF_UP if up else 0, IFF_UP)
        self.request(RTM_SETLINK, NLM_F_ACK, ifinfo(index, flags, change) + attrs)

    def set_hairpin(self, index: int) -> None:
        self.request(RTM_SETLINK, NLM_F_ACK,
                     ifinfo(index, family=AF_BRIDGE) + nested(IFLA_PROTINFO, attr(IFLA_BRPORT_MODE, b"\1")))

    def delete_link(self, index: int) -> None:
        self.request(RTM_DELLINK, NLM_F_ACK, ifinfo(index))

    def delete_group(self, group: int) -> None:
        """Delete every interface of `group` in this namespace, in one batch."""
        try:
            self.request(RTM_DELLINK, NLM_F_ACK, ifinfo() + u32(IFLA_GROUP, group))
        except OSError as e:
            if e.errno != errno.ENODEV:   # the group is empty
                raise

    # --- addresses and routes ---------------------------------------------------------------

    def add_address(self, index: int, address: str, prefixlen: int) -> None:
        packed = socket.inet_aton(address)
        self.request(RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
                     IFADDRMSG.pack(socket.AF_INET, prefixlen, 0, RT_SCOPE_UNIVERSE, index)
                     + attr(IFA_LOCAL, packed) + attr(IFA_ADDRESS, packed))

    def replace_default_route(self, gateway: str, oif: int) -> None:
        self.request(RTM_NEWROUTE, NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
                     RTMSG.pack(socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_STATIC, RT_SCOPE_UNIVERSE, RTN_UNICAST, 0)
                     + attr(RTA_GATEWAY, socket.inet_aton(gateway)) + u32(RTA_OIF, oif))


class LinkRetirer:
    """Deletes retired interfaces in batches, off the request path.

    Deleting a network device waits for an RCU grace period (~20 ms here, measured), once per
    request. A retired interface is already down and out of its container's way; it is put in
    a group of netd's own, and a background thread deletes the whole group in one request.
    """

    GROUP = 0x6E6464   # "ndd": netd's retired interfaces

    def __init__(self, delay: float = 0.05):
        self.delay = delay
        self._wake = threading.Event()
        self._stopped = False
        self._rtnl = Rtnl()
        self._thread = threading.Thread(target=self._run, name="link-retirer", daemon=True)
        self._thread.start()

    def retire(self, rtnl: Rtnl, index: int) -> None:
        """Take interface `index` (in rtnl's namespace, the daemon's) down into the group."""
        rtnl.set_link(index, up=False, group=self.GROUP)
        self._wake.set()

    def flush(self) -> None:
        self._rtnl.delete_group(self.GROUP)

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=5)
        self.flush()

    def _run(self) -> None:
        while not self._stopped:
            self._wake.wait()
            self._wake.clear()
            if self._stopped:
                return
            self._stopped or threading.Event().wait(self.delay)   # gather what comes in meanwhile
            try:
                self.flush()
            except OSError:
                pass  # retried with the next batch
