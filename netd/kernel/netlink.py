"""Netlink helpers on pyroute2 for the drivers: bridges, veths, addresses, routes.

Sockets for a container's namespace are opened by entering the namespace in the calling
thread (setns) rather than with pyroute2's `netns=` (which forks a helper per call, ~20 ms):
a netlink socket stays bound to the namespace it was created in.
"""

from __future__ import annotations

import contextlib
import errno
import secrets
from collections.abc import Iterator

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from runtime.namespaces import entered_netns, open_in_netns

IFNAMSIZ = 15


def random_mac() -> str:
    """A locally administered unicast MAC (02:xx:...) as Docker and the kernel use."""
    octets = bytearray(secrets.token_bytes(6))
    octets[0] = (octets[0] & 0xFE) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


def mac_from_ip(address: str) -> str:
    """Docker's deterministic MAC for an IPv4 address: 02:42 followed by the address."""
    a, b, c, d = (int(x) for x in address.split("."))
    return f"02:42:{a:02x}:{b:02x}:{c:02x}:{d:02x}"


@contextlib.contextmanager
def netns_socket(netns: str | None) -> Iterator[IPRoute]:
    """An IPRoute socket in `netns` (None: the daemon's own namespace), closed afterwards."""
    ipr = open_in_netns(netns, IPRoute) if netns else IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def link_index(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def ensure_bridge(ipr: IPRoute, name: str, address: str | None, mtu: int | None = None,
                  netns: str | None = None) -> int:
    """A Linux bridge `name` that is up with `address` (CIDR) on it; made if missing. `netns`:
    the namespace `ipr` works in (None: the daemon's own).

    Idempotent, so a restart after a crash finds and keeps what is there ("file exists" is
    not an error when it is our own bridge).
    """
    index = link_index(ipr, name)
    if index is None:
        kwargs = {"mtu": mtu} if mtu else {}
        # No multicast snooping: a snooping bridge joins the all-snoopers group (224.0.0.106) and
        # sends IGMP reports for it; netd's networks carry no multicast it would need to track.
        ipr.link("add", ifname=name, kind="bridge", br_mcast_snooping=0, **kwargs)
        index = link_index(ipr, name)
    elif link_kind(ipr, index) != "bridge":
        raise OSError(errno.EEXIST, f"interface {name} exists and is not a bridge")
    else:   # a bridge an older netd made: the same settings (a no-op when already so)
        ipr.link("set", index=index, kind="bridge", br_mcast_snooping=0)
    with entered_netns(netns) if netns else contextlib.nullcontext():
        disable_ipv6(name)   # before it is up: no router solicitation, MLD report or DAD from it
    if address:
        ip, prefix = address.split("/")
        with contextlib.suppress(NetlinkError):  # already there after a restart
            ipr.addr("add", index=index, address=ip, prefixlen=int(prefix))
    ipr.link("set", index=index, state="up")
    return index


def link_kind(ipr: IPRoute, index: int) -> str | None:
    link = ipr.link("get", index=index)[0]
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info else None


def delete_link(ipr: IPRoute, ifname: str) -> bool:
    """Delete an interface if it exists; True if it was there."""
    index = link_index(ipr, ifname)
    if index is None:
        return False
    try:
        ipr.link("del", index=index)
    except NetlinkError as e:
        if e.code != errno.ENODEV:
            raise
    return True


def host_routes() -> list[str]:
    """The IPv4 destinations the daemon's namespace routes (not default), as CIDRs."""
    routes = []
    with netns_socket(None) as ipr:
        for route in ipr.get_routes(family=2, table=254):
            dst = route.get_attr("RTA_DST")
            if dst and route["dst_len"] > 0:
                routes.append(f"{dst}/{route['dst_len']}")
        for addr in ipr.get_addr(family=2):
            if addr.get_attr("IFA_ADDRESS") and not addr.get_attr("IFA_ADDRESS").startswith("127."):
                routes.append(f"{addr.get_attr('IFA_ADDRESS')}/{addr['prefixlen']}")
    return routes


def disable_ipv6(ifname: str) -> None:
    """IPv6 off on one interface of the current namespace (netd's networks are IPv4 only): it
    sends no router solicitation, MLD report, DAD or link-local traffic. Quiet on a kernel
    without IPv6."""
    with contextlib.suppress(FileNotFoundError):
        set_sysctl(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", "1")


def quiet_namespace() -> None:
    """IPv6 off for every interface made in (or moved into) the current namespace from now on,
    and for those already there: a container's or an overlay's namespace."""
    for scope in ("all", "default"):
        with contextlib.suppress(FileNotFoundError):
            set_sysctl(f"/proc/sys/net/ipv6/conf/{scope}/disable_ipv6", "1")


def set_sysctl(path: str, value: str) -> None:
    """Write /proc/sys/<path> (dots or slashes); only if it differs, to stay a quiet guest."""
    if path.startswith("/"):
        full = path
    elif "/" in path:
        full = "/proc/sys/" + path           # "net/ipv4/conf/eth0.10/rp_filter": names may hold dots
    else:
        full = "/proc/sys/" + path.replace(".", "/")
    with open(full) as f:
        if f.read().strip() == value:
            return
    with open(full, "w") as f:
        f.write(value)


def interface_name(prefix: str, ident: str) -> str:
    """A kernel-legal interface name (at most 15 characters) from a prefix and an id."""
    return (prefix + ident)[:IFNAMSIZ]
