"""The pieces of netd's nftables table: the skeleton, the records of networks and published ports,
what was found on the host, and the small pure helpers that build elements."""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
import shutil
from dataclasses import dataclass, field
from typing import Any

from netd.contract.errors import BadRequest, Internal

log = logging.getLogger(__name__)

FAMILY = "ip"
PROTOCOLS = ("tcp", "udp", "sctp")
DOCKER_USER = "DOCKER-USER"
DOCKER_USER_COMMENT = "netd"      # with another table name (a second daemon): "netd-TABLE"
BR_NETFILTER = "/proc/sys/net/bridge/bridge-nf-call-iptables"
NETWORK_COMMENT = "network"        # element comments: "network <id> [<subnet>]"

# The table's fixed part, in nft syntax; setup() runs it as one transaction (so a restart replaces
# the rules without a moment without them, and keeps every element). Text, not JSON, because the
# JSON parser of libnftables 1.0.6 (Debian 12) cannot express two things here: a map whose values
# are concatenations (it silently makes a plain set) and a NAT statement taking address . port from
# such a map (it crashes with SIGSEGV). Everything per network and per port, where names and
# addresses come from users, goes through the JSON API.
SKELETON = """\
add table ip {t}
add set ip {t} bridges {{ type ifname; }}
add set ip {t} same_bridge {{ type ifname . ifname; }}
add set ip {t} internal_bridges {{ type ifname; }}
add set ip {t} masquerade_bridges {{ type ifname; }}
add set ip {t} routed {{ type ifname . ipv4_addr; flags interval; }}
add set ip {t} published_containers {{ type ipv4_addr . ipv4_addr; }}
add map ip {t} ports_on_address {{ type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service; }}
add map ip {t} ports_on_any_address {{ type inet_proto . inet_service : ipv4_addr . inet_service; }}
add chain ip {t} published_ports
add chain ip {t} prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}
add chain ip {t} output {{ type nat hook output priority -100; policy accept; }}
add chain ip {t} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}
add chain ip {t} forward {{ type filter hook forward priority filter; policy accept; }}
add chain ip {t} localnet_guard {{ type filter hook prerouting priority raw; policy accept; }}
add set ip {t} vxlan_ports {{ type inet_service; }}
add set ip {t} vxlan_members {{ type ipv4_addr; }}
add chain ip {t} vxlan_guard {{ type filter hook input priority filter; policy accept; }}
flush chain ip {t} published_ports
flush chain ip {t} prerouting
flush chain ip {t} output
flush chain ip {t} postrouting
flush chain ip {t} forward
flush chain ip {t} localnet_guard
flush chain ip {t} vxlan_guard
add rule ip {t} published_ports dnat ip to ip daddr . meta l4proto . th dport map @ports_on_address
add rule ip {t} published_ports dnat ip to meta l4proto . th dport map @ports_on_any_address
add rule ip {t} prerouting fib daddr type local jump published_ports
add rule ip {t} output fib daddr type local jump published_ports
add rule ip {t} postrouting ip saddr 127.0.0.0/8 oifname @bridges masquerade
add rule ip {t} postrouting iifname . oifname @same_bridge ct status dnat masquerade
add rule ip {t} postrouting ip saddr . ip daddr @published_containers ct status dnat masquerade
add rule ip {t} postrouting iifname . ip daddr @routed return
add rule ip {t} postrouting iifname @masquerade_bridges iifname . oifname != @same_bridge masquerade
add rule ip {t} forward iifname . oifname @same_bridge accept
add rule ip {t} forward iifname @internal_bridges drop
add rule ip {t} forward oifname @internal_bridges drop
add rule ip {t} forward oifname @bridges ct state established,related accept
add rule ip {t} forward oifname @bridges ct status dnat accept
add rule ip {t} forward iifname != @bridges oifname . ip saddr @routed accept
add rule ip {t} forward oifname @bridges drop
add rule ip {t} localnet_guard iifname @bridges ip daddr 127.0.0.0/8 drop
add rule ip {t} vxlan_guard udp dport @vxlan_ports ip saddr != @vxlan_members counter drop
"""
# Why each rule is there:
# - published_ports: reached only for packets to one of the host's own addresses (Docker:
#   -m addrtype --dst-type LOCAL), from outside and from containers (prerouting) and from the host
#   itself (output, 127.0.0.1 included). A port on one host address first, then any address.
# - postrouting: (1) a DNATed 127.0.0.1 connection keeps its loopback source, which
#   route_localnet lets out by the bridge: masquerade it so the container can answer; (2) hairpin:
#   a container reaching a published port of its own bridge by a host address, routed back into
#   the bridge, is masqueraded so the answer comes back through the host; (3) the same for a
#   container reaching its own published port when br_netfilter is on: br_netfilter then bridges
#   the DNATed packet straight back (the bridge port needs hairpin mode, Docker sets it too) and
#   shows it to postrouting without an input interface, so it is matched by address, as Docker's
#   `-s C -d C -j MASQUERADE` does: @published_containers holds "C . C" for each container with a
#   published port (otherwise the container would drop an answer from its own address); other
#   containers of that bridge need nothing then, br_netfilter un-NATs their answers on the
#   bridge; (4) outbound NAT, except to the network a routed bridge belongs to (@routed: the
#   other hosts' parts of a hostgw network are reached with the container's own address).
# - forward: within one bridge, accept (br_netfilter shows bridged traffic here); internal
#   bridges: nothing out, nothing in; into any netd bridge only replies and published ports
#   (DNATed): that is the isolation between netd bridges, one rule for all of them with @bridges,
#   and keeps unsolicited traffic from outside away from containers. A routed bridge (@routed,
#   "bridge . CIDR") also takes traffic from the rest of its network: hostgw's containers on other
#   hosts, routed here by their hosts, and nobody else (not other bridges, not the hosts themselves).
#   @routed is the one interval set: it holds one element per hostgw network on this host, so
#   libnftables' per-call cache of interval elements stays tiny.
# - vxlan_guard: the overlay's UDP port (@vxlan_ports, empty until a cluster member turns the
#   guard on, so other programs' VXLAN is never touched) only from the underlay addresses of live
#   members (@vxlan_members); the rest is counted and dropped before it reaches a vxlan device.
# - localnet_guard: route_localnet would also let a container send to the host's 127.0.0.1
#   services through its bridge (CVE-2020-8558): drop that before conntrack and NAT (priority
#   raw). Replies of masqueraded 127.0.0.1 connections still carry the bridge address there.

SKELETON_OBJECTS = set(re.findall(r"^add (chain|set|map) ip \{t\} (\S+)", SKELETON, re.MULTILINE))

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_BRIDGE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")   # no '+': iptables would read it as a wildcard


# --- what netd found, and what it installed ------------------------------------------------------


@dataclass
class HostFirewallReport:
    """What netd found at start-up (and at each reconcile_docker_user), shown by `netd info`."""

    forward_policy: str                  # "accept" / "drop": the iptables/nft filter FORWARD policy
    docker_user_chain: bool              # Docker's DOCKER-USER chain exists
    br_netfilter: bool                   # bridge-nf-call-iptables == 1: bridged traffic passes FORWARD
    # Every forward base chain (any program's) whose policy is drop, e.g. ["ip filter FORWARD"].
    forward_drop_chains: list[str] = field(default_factory=list)
    iptables: str = ""                   # the iptables command's backend: "nf_tables", "legacy", "" (none)

    def summary(self) -> str:
        bridged = " Bridged traffic passes netfilter (br_netfilter)." if self.br_netfilter else ""
        if self.forward_policy != "drop":
            return "FORWARD policy is ACCEPT: netd's own table decides what its bridges forward." + bridged
        iptables_chains = ("ip filter FORWARD", "iptables-legacy filter FORWARD")
        others = [c for c in self.forward_drop_chains if c not in iptables_chains]
        if self.docker_user_chain and not others:
            return ("FORWARD policy is DROP (Docker); netd accepts its bridges' traffic in DOCKER-USER "
                    "(rules with the comment \"netd\"); isolation and internal networks are still "
                    "enforced by netd's own table." + bridged)
        if self.docker_user_chain:
            return ("FORWARD policy is DROP (Docker); netd accepts its bridges' traffic in DOCKER-USER, "
                    f"but {', '.join(others)} also drops forwarded traffic by default: netd networks cannot "
                    "forward until that firewall accepts traffic in and out of netd's bridges." + bridged)
        chains = ", ".join(self.forward_drop_chains)
        return (f"FORWARD policy is DROP ({chains}) and there is no DOCKER-USER chain: netd networks "
                "cannot forward; accept traffic in and out of netd's bridges in that firewall "
                "(with iptables: iptables -I FORWARD -i BRIDGE -j ACCEPT, and the same with -o BRIDGE) "
                "or set its policy to ACCEPT; if Docker starts later, netd uses its DOCKER-USER chain."
                + bridged)


@dataclass(frozen=True)
class PublishedPort:
    proto: str
    host_ip: str | None                  # None: every local address
    host_port: int
    container_ip: str
    container_port: int
    network_id: str

    def __str__(self) -> str:
        return f"{self.host_ip or '0.0.0.0'}:{self.host_port}->{self.container_ip}:{self.container_port}/{self.proto}"


@dataclass(frozen=True)
class NetworkRules:
    """What netd installed for one network."""

    network_id: str
    bridge: str
    subnet: str                          # "" if the network has none
    internal: bool
    masquerade: bool
    routed: str = ""                     # CIDR of the whole network this bridge routes to and from (hostgw)

    @property
    def comment(self) -> str:
        return " ".join(filter(None, (NETWORK_COMMENT, self.network_id, self.subnet)))


class NftablesError(Internal):
    pass


# --- helpers -------------------------------------------------------------------------------------


def _commented(value: Any, comment: str) -> dict:
    return {"elem": {"val": value, "comment": comment}}


def _routed_element(bridge: str, cidr: str) -> dict:
    address, length = cidr.split("/")
    return {"concat": [bridge, {"prefix": {"addr": address, "len": int(length)}}]}


def _self_pair(address: str) -> dict:
    return {"concat": [address, address]}


def _port_key(proto: str, host_ip: str | None, host_port: int) -> tuple[str, dict]:
    if host_ip is None:
        return "ports_on_any_address", {"concat": [proto, host_port]}
    return "ports_on_address", {"concat": [host_ip, proto, host_port]}


def _normalize_host_ip(host_ip: str | None) -> str | None:
    if host_ip in (None, "", "0.0.0.0"):
        return None
    try:
        return str(ipaddress.IPv4Address(host_ip))
    except ValueError:
        raise BadRequest(f"invalid host IP {host_ip!r} for a published port: give an IPv4 address") from None


def _check_proto(proto: str) -> str:
    proto = proto.lower()
    if proto not in PROTOCOLS:
        raise BadRequest(f"invalid protocol {proto!r} for a published port: give one of {', '.join(PROTOCOLS)}")
    return proto


def _check_port(port: int, what: str) -> int:
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise BadRequest(f"invalid {what} {port!r}: give a number from 1 to 65535")
    return port


@functools.lru_cache(maxsize=4096)
def _ipv4_range(cidr: str) -> tuple[int, int]:
    net = ipaddress.IPv4Network(cidr)
    return int(net.network_address), int(net.broadcast_address)


def _overlaps(a: str, b: str) -> bool:
    (a_first, a_last), (b_first, b_last) = _ipv4_range(a), _ipv4_range(b)
    return a_first <= b_last and b_first <= a_last


def _elem_value(elem: Any) -> Any:
    return elem["elem"]["val"] if isinstance(elem, dict) and "elem" in elem else elem


def _elem_comment(elem: Any) -> str:
    return elem["elem"].get("comment", "") if isinstance(elem, dict) and "elem" in elem else ""


def _first_line(error: str | None) -> str:
    return next((line.strip() for line in (error or "").splitlines() if line.strip()), "unknown error")


def _find_command(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
