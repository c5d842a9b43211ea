"""netd's packet filter, in netd's own nftables table: the rules of every network a driver puts behind it
(the bridge driver's networks, the overlay's transit link, hostgw's bridges), published ports, NAT.

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
import ipaddress
import json
import logging
import os
import re
import threading
from collections.abc import Iterator

import nftables

from netd.contract.errors import BadRequest, Conflict, Internal, NotFound
from netd.kernel.docker_user import DockerUser
from netd.kernel.firewall_elements import (
    _BRIDGE_RE,
    _NAME_RE,
    BR_NETFILTER,
    DOCKER_USER,
    DOCKER_USER_COMMENT,
    FAMILY,
    NETWORK_COMMENT,
    SKELETON,
    SKELETON_OBJECTS,
    HostFirewallReport,
    NetworkRules,
    NftablesError,
    PublishedPort,
    _check_port,
    _check_proto,
    _commented,
    _elem_comment,
    _elem_value,
    _find_command,
    _first_line,
    _normalize_host_ip,
    _overlaps,
    _port_key,
    _routed_element,
    _self_pair,
)
from runtime.namespaces import entered_netns

log = logging.getLogger(__name__)


# --- the firewall --------------------------------------------------------------------------------


class Firewall(DockerUser):
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

    def set_vxlan_guard(self, ports: list[int], members: list[str]) -> None:
        """Accept VXLAN (UDP `ports`) only from `members` (underlay addresses of live hosts);
        no ports: the guard is off."""
        for address in members:
            ipaddress.IPv4Address(address)
        t = self.table
        commands = [f"flush set ip {t} vxlan_ports", f"flush set ip {t} vxlan_members"]
        if ports:
            commands.append(f"add element ip {t} vxlan_ports {{ {', '.join(str(_check_port(p, 'VXLAN port')) for p in ports)} }}")
        if members:
            commands.append(f"add element ip {t} vxlan_members {{ {', '.join(sorted(set(members)))} }}")
        with self._lock:
            self._run_text("\n".join(commands) + "\n")

    def vxlan_refused(self) -> int:
        """Packets to the overlay's port from non-members, dropped so far."""
        with self._lock:
            items = self._list(f"chain ip {self.table} vxlan_guard") or []
        for item in items:
            for expression in item.get("rule", {}).get("expr", []):
                if "counter" in expression:
                    return int(expression["counter"].get("packets", 0))
        return 0

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
