"""netd's packet filter: every rule the bridge driver needs, in netd's own nftables table.

What it does (Docker's bridge driver rules, re-done in nftables):

- outbound NAT: traffic from a network's bridge (its subnet) leaving by any other interface is
  masqueraded (not for `--internal` networks, nor with enable_ip_masquerade=false);
- published ports: DNAT of HOST_IP:HOST_PORT (any local address when no host IP is given) to
  CONTAINER_IP:PORT, for packets arriving from outside (prerouting) and from the host itself
  (output), 127.0.0.1 included: for that `route_localnet` is on for netd's bridges (only) and
  loopback-sourced traffic leaving by a bridge is masqueraded. A container reaching a published
  port of its own network through a host address (hairpin) works too (see postrouting below);
  with br_netfilter on, a container reaching its *own* published port also needs hairpin mode on
  its bridge port, which is the bridge driver's to set (Docker sets it as well);
- isolation: traffic between two different netd bridges is dropped, both ways; only published
  ports (DNATed traffic) may cross, as Docker with its userland proxy allows. Unsolicited traffic
  from outside into a bridge is dropped too (on a Docker host the FORWARD policy DROP does that
  for Docker's bridges);
- internal networks: nothing leaves or enters their bridge except within it;
- routed bridges (hostgw: the bridge holds this host's part of a network whose other parts other
  hosts route): traffic from the rest of the network may enter, and traffic to it is not
  masqueraded.

The whole ruleset, as `nft list table ip netd` shows it with one network and one published port::

    table ip netd {
        set bridges { type ifname; elements = { "br-a" comment "network 3f2a... 10.1.0.0/24" } }
        set same_bridge { type ifname . ifname; elements = { "br-a" . "br-a" } }
        set internal_bridges { type ifname }
        set masquerade_bridges { type ifname; elements = { "br-a" } }
        set routed { type ifname . ipv4_addr; flags interval }      # hostgw: "hg-b" . 10.244.0.0/16
        set published_containers { type ipv4_addr . ipv4_addr; elements = { 10.1.0.2 . 10.1.0.2 } }
        map ports_on_address { type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service }
        map ports_on_any_address { type inet_proto . inet_service : ipv4_addr . inet_service
                                   elements = { tcp . 8080 comment "network 3f2a..." : 10.1.0.2 . 80 } }
        chain published_ports {
            dnat ip to ip daddr . meta l4proto . th dport map @ports_on_address
            dnat ip to meta l4proto . th dport map @ports_on_any_address }
        chain prerouting { type nat hook prerouting priority dstnat; fib daddr type local jump published_ports }
        chain output { type nat hook output priority -100; fib daddr type local jump published_ports }
        chain postrouting { type nat hook postrouting priority srcnat;
            ip saddr 127.0.0.0/8 oifname @bridges masquerade
            iifname . oifname @same_bridge ct status dnat masquerade
            ip saddr . ip daddr @published_containers ct status dnat masquerade
            iifname . ip daddr @routed return
            iifname @masquerade_bridges iifname . oifname != @same_bridge masquerade }
        chain forward { type filter hook forward priority filter;
            iifname . oifname @same_bridge accept
            iifname @internal_bridges drop
            oifname @internal_bridges drop
            oifname @bridges ct state established,related accept
            oifname @bridges ct status dnat accept
            iifname != @bridges oifname . ip saddr @routed accept
            oifname @bridges drop }
        chain localnet_guard { type filter hook prerouting priority raw;
            iifname @bridges ip daddr 127.0.0.0/8 drop }
    }

The rules are fixed; a network is only elements of the sets (@bridges, @same_bridge, and
@internal_bridges or @masquerade_bridges), a published port one element of a map (and its
container one of @published_containers). So adding or removing a network or a port is one small
transaction through the in-process libnftables JSON API (well under a millisecond),
remove_network deletes exactly its own elements, and no rule handle is ever looked up. No per-network chains and (but for the tiny @routed) no interval sets, on purpose: libnftables 1.0.6
fetches every chain of the host and every element of every interval set into its cache on each
call (measured: 1000 networks as chains + an interval map made each call ~12 ms instead of ~0.5).
Masquerade therefore matches a network by its bridge rather than by `ip saddr SUBNET` (Docker's
`-s SUBNET ! -o BRIDGE`): the same packets for containers, and a container that spoofs another
source is masqueraded rather than let out as is. Everything is read back by setup(), so a
restarted daemon knows what is installed, and re-adding the same network or port is a no-op that
leaves the table byte-for-byte as it was.

Docker sets the iptables FORWARD policy to DROP and turns on br_netfilter (so even traffic between
two ports of one bridge passes FORWARD). netd never changes a policy or another program's chain;
it uses Docker's documented hook for other software instead: when the chain DOCKER-USER exists,
netd inserts `-i BRIDGE -j ACCEPT` and `-o BRIDGE -j ACCEPT` there for each of its bridges, with
the comment "netd" (and removes exactly those). An accept in DOCKER-USER only ends the iptables
FORWARD chain; netd's own drops (isolation, internal) still apply, since an nftables drop in any
base chain is final.

Namespaces: libnftables opens its netlink socket when its context is made, so a Firewall acts on
the network namespace of the thread that constructed it. Its sysctl writes and iptables commands
run in that same namespace (the calling thread enters it for them when needed), so a Firewall made
inside a test namespace can be used from any thread.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import logging
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import nftables

from netd.contract.errors import BadRequest, Conflict, Internal, NotFound
from runtime.namespaces import entered_netns

log = logging.getLogger("netd.kernel.firewall")

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
flush chain ip {t} published_ports
flush chain ip {t} prerouting
flush chain ip {t} output
flush chain ip {t} postrouting
flush chain ip {t} forward
flush chain ip {t} localnet_guard
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


# --- the firewall --------------------------------------------------------------------------------


class Firewall:
    def __init__(self, table: str = "netd"):
        if not _NAME_RE.match(table):
            raise BadRequest(f"invalid nftables table name {table!r}")
        self.table = table
        self._lock = threading.RLock()
        # The netlink socket is opened here, in the calling thread's network namespace; remember
        # that namespace for the sysctls and the iptables commands.
        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._netns_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._netns_ino = os.fstat(self._netns_fd).st_ino
        self._networks: dict[str, NetworkRules] = {}
        self._ports: dict[tuple[str, str | None, int], PublishedPort] = {}
        self._iptables: str | None = None          # path of the iptables command, if any
        self._iptables_backend = ""
        self._docker_user_bridges: set[str] = set()  # bridges whose DOCKER-USER accepts are in place
        self.report = HostFirewallReport("accept", False, False)
        self._docker_comment = DOCKER_USER_COMMENT if table == "netd" else f"{DOCKER_USER_COMMENT}-{table}"
        self._docker_rule_re = re.compile(
            rf'^-A {DOCKER_USER} -(?P<dir>[io]) (?P<bridge>\S+) -m comment --comment "?{re.escape(self._docker_comment)}"? '
            r'-j ACCEPT$')

    def close(self) -> None:
        """Release the nftables context and the namespace handle (the rules stay)."""
        with self._lock:
            if self._netns_fd >= 0:
                os.close(self._netns_fd)
                self._netns_fd = -1
            self._nft = None  # type: ignore[assignment]  # frees the libnftables context and its socket

    # --- start-up and shutdown ----------------------------------------------------------------

    def setup(self) -> HostFirewallReport:
        """Create netd's table, or after a restart re-write its fixed rules in one transaction (no
        gap, no duplicates, every network and port kept); read back what is installed; inspect
        the host; bring netd's DOCKER-USER rules up to date."""
        with self._lock:
            skeleton = SKELETON.format(t=self.table)
            try:
                self._run_text(skeleton)
            except NftablesError as e:
                # A table of another layout (an older netd): start afresh. The bridge driver's
                # restore() adds every network and port again.
                log.warning("re-creating nftables table %s %s: %s", FAMILY, self.table, e)
                self._delete_table()
                self._run_text(skeleton)
            strangers = self._load()
            if strangers:
                # Chains and sets netd no longer uses (a table of an older netd): remove them.
                log.info("removing %s from nftables table %s %s", ", ".join(" ".join(s) for s in strangers),
                         FAMILY, self.table)
                # Rules hold their sets, verdict maps their chains: flush chains, drop sets, drop chains.
                chains = [name for kind, name in strangers if kind == "chain"]
                self._run([{"flush": {"chain": self._obj(name)}} for name in chains]
                          + [{"delete": {kind: self._obj(name)}} for kind, name in strangers if kind != "chain"]
                          + [{"delete": {"chain": self._obj(name)}} for name in chains])
            self._iptables = _find_command("iptables")
            self._iptables_backend = self._detect_iptables_backend()
            self._inspect_host()
            self._sync_docker_user(full=True)
            return self.report

    def teardown(self) -> None:
        """Remove netd's table and netd's DOCKER-USER rules; nothing else."""
        with self._lock:
            bridges = {n.bridge for n in self._networks.values()}
            self._delete_table()
            self._networks.clear()
            self._ports.clear()
            if self._iptables is None:
                self._iptables = _find_command("iptables")
                self._iptables_backend = self._detect_iptables_backend()
            self.report.docker_user_chain = self._docker_user_exists()
            self._sync_docker_user(full=True)       # wants nothing now: removes every netd rule
            self._docker_user_bridges.clear()
            for bridge in bridges:
                self._set_route_localnet(bridge, False)

    # --- networks -----------------------------------------------------------------------------

    def add_network(self, network_id: str, bridge: str, subnet: str, *, internal: bool,
                    masquerade: bool = True, isolate: bool = True, routed: str = "") -> None:
        """Install a bridge network's rules. The same network again is a no-op; with other
        parameters its rules are replaced (one transaction).

        `isolate` must stay True: netd's bridge networks are always isolated from each other.
        `routed`: the CIDR of the whole network when this bridge holds only this host's part of it
        (hostgw): traffic from that CIDR may come in from other interfaces, and traffic to it
        leaves without masquerade.
        """
        if not isolate:
            raise BadRequest("netd bridge networks are always isolated from each other")
        if not network_id or not _NAME_RE.match(network_id):
            raise BadRequest(f"invalid network id {network_id!r}")
        if not _BRIDGE_RE.match(bridge):
            raise BadRequest(f"invalid bridge name {bridge!r}: at most 15 letters, digits, '_', '.' or '-'")
        if subnet:
            try:
                subnet = str(ipaddress.IPv4Network(subnet, strict=False))
            except ValueError:
                raise BadRequest(f"invalid subnet {subnet!r}: give an IPv4 CIDR such as 172.18.0.0/16") from None
        if routed:
            try:
                routed = str(ipaddress.IPv4Network(routed))
            except ValueError:
                raise BadRequest(f"invalid routed network {routed!r}: give an IPv4 CIDR such as 10.244.0.0/16") from None
            if internal:
                raise BadRequest("an internal network cannot be routed to other hosts")
        rules = NetworkRules(network_id, bridge, subnet, internal, masquerade and not internal, routed)
        with self._lock:
            old = self._networks.get(network_id)
            if old != rules:
                self._check_network_conflicts(rules)
                commands = self._network_removal(old, with_ports=False) if old else []
                self._run(commands + self._network_addition(rules))
                self._networks[network_id] = rules
                if old and old.bridge != bridge:
                    self._set_route_localnet(old.bridge, False)
                    self._remove_docker_user_rules([old.bridge])
            if not internal:
                self._set_route_localnet(bridge, True)
            if self.report.docker_user_chain and bridge not in self._docker_user_bridges:
                self._add_docker_user_rules([bridge])

    def remove_network(self, network_id: str) -> None:
        """Remove exactly the network's rules, its published ports included. Unknown: a no-op."""
        with self._lock:
            rules = self._networks.get(network_id)
            if rules is None:
                return
            try:
                self._run(self._network_removal(rules, with_ports=True))
            except NftablesError:
                # The table was changed behind netd's back: read it again, delete what is there.
                self._load()
                if network_id in self._networks:
                    self._run(self._network_removal(self._networks[network_id], with_ports=True))
            self._networks.pop(network_id, None)
            for key in [k for k, p in self._ports.items() if p.network_id == network_id]:
                del self._ports[key]
            self._set_route_localnet(rules.bridge, False)
            self._remove_docker_user_rules([rules.bridge])

    def networks(self) -> list[NetworkRules]:
        """The networks whose rules are installed (read back from the kernel by setup())."""
        with self._lock:
            return sorted(self._networks.values(), key=lambda n: n.network_id)

    # --- published ports ----------------------------------------------------------------------

    def add_port(self, network_id: str, container_ip: str, proto: str, host_ip: str | None, host_port: int,
                 container_port: int, bridge: str) -> None:
        """DNAT host_ip:host_port/proto (every local address if host_ip is None) to
        container_ip:container_port. The same mapping again is a no-op; a different one for a host
        port already published (on that address, or on every address) is a Conflict."""
        proto = _check_proto(proto)
        host_ip = _normalize_host_ip(host_ip)
        _check_port(host_port, "host port")
        _check_port(container_port, "container port")
        try:
            container_ip = str(ipaddress.IPv4Address(container_ip.split("/")[0]))
        except ValueError:
            raise BadRequest(f"invalid container address {container_ip!r}") from None
        port = PublishedPort(proto, host_ip, host_port, container_ip, container_port, network_id)
        with self._lock:
            network = self._networks.get(network_id)
            if network is None:
                raise NotFound(f"network {network_id[:12]} has no firewall rules on this host: add the network first")
            if network.bridge != bridge:
                raise BadRequest(f"network {network_id[:12]} uses bridge {network.bridge}, not {bridge}")
            if network.internal:
                raise BadRequest(f"network {network_id[:12]} is internal: its containers cannot publish ports")
            key = (proto, host_ip, host_port)
            if self._ports.get(key) == port:
                return
            clash = self._ports.get(key) or next(
                (p for (pr, ip, hp), p in self._ports.items()
                 if pr == proto and hp == host_port and (ip is None or host_ip is None)), None)
            if clash is not None:
                where = f"{host_ip}:" if host_ip else ""
                raise Conflict(f"port {where}{host_port}/{proto} is already published by {clash}")
            set_name, elem_key = _port_key(proto, host_ip, host_port)
            value = {"concat": [container_ip, container_port]}
            comment = f"{NETWORK_COMMENT} {network_id}"
            commands = [self._elements("add", set_name, [[_commented(elem_key, comment), value]])]
            if not any(p.container_ip == container_ip for p in self._ports.values()):
                commands.append(self._elements("add", "published_containers", [_self_pair(container_ip)]))
            self._run(commands)
            self._ports[key] = port

    def remove_port(self, proto: str, host_ip: str | None, host_port: int) -> None:
        """Remove a published port; one that is not published is a no-op."""
        proto = _check_proto(proto)
        host_ip = _normalize_host_ip(host_ip)
        key = (proto, host_ip, host_port)
        with self._lock:
            if key not in self._ports:
                return
            try:
                self._run(self._ports_removal([key]))
            except NftablesError:
                self._load()
                if key in self._ports:
                    self._run(self._ports_removal([key]))
            self._ports.pop(key, None)

    def published_ports(self) -> list[PublishedPort]:
        """Every published port installed (read back from the kernel by setup())."""
        with self._lock:
            return sorted(self._ports.values(), key=lambda p: (p.proto, p.host_ip or "", p.host_port))

    # --- Docker -------------------------------------------------------------------------------

    def reconcile_docker_user(self) -> None:
        """Re-check the host (FORWARD policies, DOCKER-USER, br_netfilter), updating self.report:
        if Docker started after netd, accept netd's bridges in its DOCKER-USER chain; if netd's
        rules there went missing (a firewall reload), put them back. Cheap when nothing changed:
        in-process nftables queries only, with the nf_tables iptables backend."""
        with self._lock:
            self._inspect_host()
            self._sync_docker_user(full=False)

    # --- internals: the table -----------------------------------------------------------------

    def _obj(self, name: str) -> dict:
        return {"family": FAMILY, "table": self.table, "name": name}

    def _elements(self, verb: str, set_name: str, elements: list) -> dict:
        return {verb: {"element": {**self._obj(set_name), "elem": elements}}}

    def _network_addition(self, n: NetworkRules) -> list[dict]:
        commands = [
            self._elements("add", "bridges", [_commented(n.bridge, n.comment)]),
            self._elements("add", "same_bridge", [{"concat": [n.bridge, n.bridge]}]),
        ]
        if n.internal:
            commands.append(self._elements("add", "internal_bridges", [n.bridge]))
        if n.masquerade:
            commands.append(self._elements("add", "masquerade_bridges", [n.bridge]))
        if n.routed:
            commands.append(self._elements("add", "routed", [_routed_element(n.bridge, n.routed)]))
        return commands

    def _network_removal(self, n: NetworkRules, with_ports: bool) -> list[dict]:
        commands = []
        if with_ports:
            commands += self._ports_removal([k for k, p in self._ports.items() if p.network_id == n.network_id])
        commands += [
            self._elements("delete", "bridges", [n.bridge]),
            self._elements("delete", "same_bridge", [{"concat": [n.bridge, n.bridge]}]),
        ]
        if n.internal:
            commands.append(self._elements("delete", "internal_bridges", [n.bridge]))
        if n.masquerade:
            commands.append(self._elements("delete", "masquerade_bridges", [n.bridge]))
        if n.routed:
            commands.append(self._elements("delete", "routed", [_routed_element(n.bridge, n.routed)]))
        return commands

    def _ports_removal(self, keys: list[tuple[str, str | None, int]]) -> list[dict]:
        """Delete these ports' elements, and their containers' from @published_containers when no
        other port of theirs stays."""
        commands = []
        for key in keys:
            set_name, elem_key = _port_key(*key)
            commands.append(self._elements("delete", set_name, [elem_key]))
        leaving = {self._ports[key].container_ip for key in keys}
        staying = {p.container_ip for k, p in self._ports.items() if k not in keys}
        for container_ip in sorted(leaving - staying):
            commands.append(self._elements("delete", "published_containers", [_self_pair(container_ip)]))
        return commands

    def _check_network_conflicts(self, n: NetworkRules) -> None:
        for other in self._networks.values():
            if other.network_id == n.network_id:
                continue
            if other.bridge == n.bridge:
                raise Conflict(f"bridge {n.bridge} already carries network {other.network_id[:12]}")
            if n.subnet and other.subnet and _overlaps(n.subnet, other.subnet):
                raise Conflict(f"subnet {n.subnet} overlaps {other.subnet} of network {other.network_id[:12]}")

    def _run(self, commands: list[dict]) -> None:
        """One libnftables call: one transaction, all or nothing."""
        rc, _, error = self._nft.json_cmd({"nftables": commands})
        if rc != 0:
            raise NftablesError(f"nftables table {FAMILY} {self.table}: {_first_line(error)}")

    def _run_text(self, commands: str) -> None:
        rc, _, error = self._nft.cmd(commands)
        if rc != 0:
            raise NftablesError(f"nftables table {FAMILY} {self.table}: {_first_line(error)}")

    def _list(self, what: str) -> list[dict] | None:
        """`nft -j list WHAT`, in-process; None if WHAT does not exist."""
        rc, output, _ = self._nft.cmd(f"list {what}")
        if rc != 0:
            return None
        return json.loads(output).get("nftables", []) if output else []

    def _delete_table(self) -> None:
        if self._list(f"table {FAMILY} {self.table}") is not None:
            self._run([{"delete": {"table": {"family": FAMILY, "name": self.table}}}])

    def _load(self) -> list[tuple[str, str]]:
        """Rebuild what netd knows from the table itself (after a restart, or a surprise).
        Returns the chains, sets and maps that are not part of SKELETON, as (kind, name)."""
        self._networks.clear()
        self._ports.clear()
        sets: dict[str, list] = {}
        strangers: list[tuple[str, str]] = []
        for obj in self._list(f"table {FAMILY} {self.table}") or []:
            for kind in ("chain", "set", "map"):
                if kind in obj and obj[kind].get("table") == self.table:
                    name = obj[kind]["name"]
                    if kind != "chain":
                        sets[name] = obj[kind].get("elem", [])
                    if (kind, name) not in SKELETON_OBJECTS:
                        strangers.append((kind, name))
        internal = {_elem_value(e) for e in sets.get("internal_bridges", [])}
        masquerade = {_elem_value(e) for e in sets.get("masquerade_bridges", [])}
        routed = {}
        for elem in sets.get("routed", []):
            with contextlib.suppress(KeyError, TypeError, ValueError):
                bridge, prefix = _elem_value(elem)["concat"]
                routed[bridge] = f"{prefix['prefix']['addr']}/{prefix['prefix']['len']}"
        for elem in sets.get("bridges", []):
            bridge, words = _elem_value(elem), _elem_comment(elem).split()
            if len(words) not in (2, 3) or words[0] != NETWORK_COMMENT:
                log.warning("nftables set %s bridges holds %s without its network: ignored", self.table, bridge)
                continue
            subnet = words[2] if len(words) == 3 else ""
            rules = NetworkRules(words[1], bridge, subnet, bridge in internal, bridge in masquerade,
                                 routed.get(bridge, ""))
            self._networks[rules.network_id] = rules
        for set_name in ("ports_on_address", "ports_on_any_address"):
            for key, value in sets.get(set_name, []):
                fields = _elem_value(key)["concat"]
                host_ip = fields[0] if set_name == "ports_on_address" else None
                proto, host_port = str(fields[-2]), int(fields[-1])
                container_ip, container_port = value["concat"]
                words = _elem_comment(key).split()
                network_id = words[1] if len(words) == 2 else ""
                port = PublishedPort(proto, host_ip, host_port, container_ip, int(container_port), network_id)
                self._ports[(proto, host_ip, host_port)] = port
        return strangers

    # --- internals: the host ------------------------------------------------------------------

    @contextlib.contextmanager
    def _in_netns(self) -> Iterator[None]:
        """Run the body in the firewall's namespace (the one its nftables socket lives in)."""
        if self._netns_fd < 0:
            raise Internal("the firewall was closed")
        if os.stat("/proc/thread-self/ns/net").st_ino == self._netns_ino:
            yield
            return
        with entered_netns(f"/proc/self/fd/{self._netns_fd}"):
            yield

    def _set_route_localnet(self, bridge: str, on: bool) -> None:
        path = f"/proc/sys/net/ipv4/conf/{bridge}/route_localnet"
        value = "1" if on else "0"
        with self._in_netns():
            try:
                with open(path) as f:
                    if f.read().strip() == value:
                        return
                with open(path, "w") as f:
                    f.write(value)
            except FileNotFoundError:
                if on:
                    log.warning("bridge %s does not exist: published ports on 127.0.0.1 will not reach it", bridge)

    def _inspect_host(self) -> None:
        """Fill self.report in place (the daemon shows the same object)."""
        drop_chains: list[str] = []
        for obj in self._list("chains") or []:
            chain = obj.get("chain")
            if (chain and chain.get("hook") == "forward" and chain.get("policy") == "drop"
                    and chain.get("family") in ("ip", "inet") and chain.get("table") != self.table):
                drop_chains.append(f"{chain['family']} {chain['table']} {chain['name']}")
        if self._iptables_backend == "legacy":
            forward = self._iptables_cmd(["-S", "FORWARD"])
            if forward and forward.returncode == 0 and "-P FORWARD DROP" in forward.stdout:
                drop_chains.insert(0, "iptables-legacy filter FORWARD")
        self.report.forward_policy = "drop" if drop_chains else "accept"
        self.report.forward_drop_chains = drop_chains
        self.report.docker_user_chain = self._docker_user_exists()
        self.report.iptables = self._iptables_backend
        with self._in_netns():
            try:
                with open(BR_NETFILTER) as f:
                    self.report.br_netfilter = f.read().strip() == "1"
            except OSError:
                self.report.br_netfilter = False

    # --- internals: DOCKER-USER ---------------------------------------------------------------
    #
    # netd changes DOCKER-USER with the iptables command rather than with libnftables: Docker
    # itself manages its chains with iptables, which is iptables-nft or iptables-legacy depending
    # on the host (with legacy the chain is not in nftables at all), and iptables-nft keeps the
    # comment as an xtables match that libnftables can neither write nor read back (nft warns
    # "table ip filter is managed by iptables-nft, do not touch!"). The iptables command writes
    # rules exactly as Docker and `iptables -S` expect, on either backend. It costs a process
    # (a few ms), and only on hosts with DOCKER-USER, only when a network comes or goes: ports
    # never need it, since "-o BRIDGE" covers DNATed traffic. The rules are inserted at the top,
    # before Docker's final "-j RETURN".

    def _detect_iptables_backend(self) -> str:
        if self._iptables is None:
            return ""
        version = self._iptables_cmd(["-V"])
        if version is None or version.returncode != 0:
            return ""
        return "nf_tables" if "nf_tables" in version.stdout else "legacy"

    def _iptables_cmd(self, args: list[str], stdin: str | None = None,
                      command: str | None = None) -> subprocess.CompletedProcess | None:
        program = command or self._iptables
        if program is None:
            return None
        with self._in_netns():
            try:
                return subprocess.run([program, *args], input=stdin, capture_output=True, text=True, timeout=30)
            except (OSError, subprocess.TimeoutExpired) as e:
                log.warning("%s %s failed: %s", program, " ".join(args), e)
                return None

    def _docker_user_exists(self) -> bool:
        if self._iptables_backend == "nf_tables" or not self._iptables:
            return self._list(f"chain ip filter {DOCKER_USER}") is not None
        result = self._iptables_cmd(["-S", DOCKER_USER])
        return result is not None and result.returncode == 0

    def _docker_user_rules(self) -> set[tuple[str, str]]:
        """netd's rules in DOCKER-USER as (direction "i"/"o", bridge)."""
        result = self._iptables_cmd(["-S", DOCKER_USER])
        if result is None or result.returncode != 0:
            return set()
        found = set()
        for line in result.stdout.splitlines():
            m = self._docker_rule_re.match(line.strip())
            if m:
                found.add((m["dir"], m["bridge"]))
        return found

    def _nft_docker_user_accepts(self) -> set[tuple[str, str]] | None:
        """(cheap) the commented accepts by interface in DOCKER-USER as nftables sees them, or None
        if that cannot tell (legacy backend)."""
        if self._iptables_backend != "nf_tables":
            return None
        objects = self._list(f"chain ip filter {DOCKER_USER}") or []
        found = set()
        for obj in objects:
            expr = obj.get("rule", {}).get("expr", [])
            if {"accept": None} not in expr or not any("xt" in e for e in expr):
                continue
            for e in expr:
                m = e.get("match", {})
                key = m.get("left", {}).get("meta", {}).get("key") if isinstance(m.get("left"), dict) else None
                if key in ("iifname", "oifname") and m.get("op") == "==" and isinstance(m.get("right"), str):
                    found.add((key[0], m["right"]))
        return found

    def _apply_docker_user(self, add: list[tuple[str, str]], delete: list[tuple[str, str]]) -> bool:
        if not add and not delete:
            return True
        lines = ["*filter"]
        rule = "-{} {} -m comment --comment " + self._docker_comment + " -j ACCEPT"
        lines += [f"-D {DOCKER_USER} " + rule.format(d, b) for d, b in delete]
        lines += [f"-I {DOCKER_USER} " + rule.format(d, b) for d, b in add]
        lines.append("COMMIT")
        # iptables -> iptables-restore, iptables-legacy -> iptables-legacy-restore: the same backend.
        restore = f"{self._iptables}-restore" if self._iptables else ""
        if not os.path.exists(restore):
            log.warning("could not update %s: %s not found", DOCKER_USER, restore or "iptables")
            return False
        result = self._iptables_cmd(["--noflush", "-w"], stdin="\n".join(lines) + "\n", command=restore)
        if result is None or result.returncode != 0:
            log.warning("could not update %s: %s", DOCKER_USER, result.stderr.strip() if result else "no iptables")
            return False
        return True

    def _add_docker_user_rules(self, bridges: list[str]) -> None:
        todo = [(d, b) for b in bridges for d in ("o", "i")]
        if self._apply_docker_user(todo, []):
            self._docker_user_bridges.update(bridges)
        else:
            self._sync_docker_user(full=True)

    def _remove_docker_user_rules(self, bridges: list[str]) -> None:
        mine = [b for b in bridges if b in self._docker_user_bridges]
        if not mine:
            return
        if not self._apply_docker_user([], [(d, b) for b in mine for d in ("o", "i")]):
            self._sync_docker_user(full=True)
        self._docker_user_bridges.difference_update(mine)

    def _sync_docker_user(self, full: bool) -> None:
        """Make netd's DOCKER-USER rules exactly one accept in and one out per netd bridge."""
        if not self.report.docker_user_chain:
            self._docker_user_bridges.clear()
            return
        bridges = {n.bridge for n in self._networks.values()}
        want = {(d, b) for b in bridges for d in ("i", "o")}
        if not full:
            seen = self._nft_docker_user_accepts()
            if seen is not None and want <= seen and bridges == self._docker_user_bridges:
                return
        have = self._docker_user_rules()
        if self._apply_docker_user(sorted(want - have), sorted(have - want)):
            self._docker_user_bridges = set(bridges)


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
