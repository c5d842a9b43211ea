"""The `hostgw` driver: flannel's host-gw backend, on netd's cluster store.

    netd network create -d hostgw --subnet 10.244.0.0/16 [-o subnet_len=24] [-o lease_ttl=30] hg

A global network (it needs a cluster store). A host, with its first container on the network,
leases one part of it (a /24 by default) from the cluster store, makes a local bridge `hg-<id>`
holding the part's gateway (its first address), and routes every other host's part through that
host: `10.244.2.0/24 via 10.10.0.2 dev eth0 proto 110`. Containers are veths on the bridge with
addresses from their host's part; between hosts packets are routed as they are, unencapsulated.

Leases. `netd/hostgw/leases/<network id>/<a.b.c.d-len>` = {"PublicIP", "Host", "BackendType",
"Since"}, created only if absent and tied to a store lease of `lease_ttl` seconds (default 30)
that a LeaseKeeper renews at a third of it (flannel's `subnets/<...>` keys, with a short TTL). A
host takes the lowest part that no lease holds and no other host's container has an address in (a
dead host's containers keep their addresses until the cluster reclaims them, so its part is not
handed to another host in the meantime, flannel#1289). A restarted host first finds its own lease
(same PublicIP, the advertise address) and binds it to its new store lease, or else takes back the
part its containers' addresses are in. The host's last container leaving releases the lease, the
bridge and the routes. A daemon that stops (or dies) leaves its lease to lapse: a restart within
the TTL changes nothing, and after it the other hosts drop their routes to that host's part.

Addresses. The network's IPAM pool is the whole subnet; the controller asks this driver for the
host's `address_range()` before each allocation and IPAM gives out addresses within that part only
(netd.core.ipam `allocate(within=...)`: not its network, gateway or broadcast address). The part's
gateway is also held in IPAM (kind gateway, named "hostgw <part>"), so `netd ipam inspect` shows it.
A static --ip outside this host's part is refused. If the host's first container fails after the
part was leased for it (a bad --ip, say), the controller's undo calls `release_address_range()` and
the part is given back at once; a part left without containers any other way is given back by the
reconciler within two rounds.

Routes, reconciled. A thread compares the kernel with the leases every RECONCILE_INTERVAL seconds,
and at once when a lease changes: a missing route is added again (deleted by hand, or flushed by
the kernel when the interface toward the peer went down: flannel#1070, #1434), a route to a part
whose lease expired or was released is removed (flannel#2554). netd's routes carry protocol
RTPROT_HOSTGW (110), and only those are ever changed. The next hop must be directly connected:
host-gw needs the hosts on one L2 segment. A peer the kernel reaches only through a gateway gets no
route; `netd network inspect` shows why under Netd.Peers, and the log says it once per change.

NAT and filtering (netd.kernel.firewall, the bridge as a "routed" bridge): traffic leaving the network's
subnet is masqueraded; traffic to the other hosts' parts keeps the container's own address; the
network's traffic from other hosts may enter the bridge, nothing else unsolicited may.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from ipaddress import IPv4Address, IPv4Network

from drivers.hostgw.leases import Leases
from drivers.hostgw.parts import (
    BRIDGE_PREFIX,
    DEFAULT_LEASE_TTL,
    DEFAULT_SUBNET_LEN,
    LEASES,
    MAX_LEASE_TTL,
    MIN_LEASE_TTL,
    OPT_LEASE_TTL,
    OPT_SUBNET_LEN,
    RECONCILE_INTERVAL,
    Part,
    Peer,
)
from drivers.hostgw.routes import Routes
from kvstore import StoreError
from kvstore.mirror import Mirror
from netd.contract.driverapi import CapturePoint, Driver, DriverContext, Hop, JoinInfo
from netd.contract.errors import BadRequest
from netd.contract.model import GLOBAL, Endpoint, Network, parse_subnet
from netd.kernel import netlink
from netd.kernel.rtnl import Rtnl, configure_inside, free_inside_name, retire_named

log = logging.getLogger("netd.driver.hostgw")


class HostgwDriver(Leases, Routes, Driver):
    name = "hostgw"
    scope = GLOBAL
    scopes = (GLOBAL,)
    known_options = frozenset({OPT_SUBNET_LEN, OPT_LEASE_TTL})

    def __init__(self, ctx: DriverContext):
        super().__init__(ctx)
        self.interval = RECONCILE_INTERVAL
        self._lock = threading.RLock()                  # after ctx.lock, never before it
        self._parts: dict[str, Part] = {}               # network id -> this host's part
        self._peers: dict[str, dict[str, Peer]] = {}    # network id -> peer subnet -> route state
        self._said: dict[tuple[str, str], str] = {}     # (network id, peer subnet) -> last state logged
        self._routed: set[tuple[str, str]] = set()      # (network id, peer subnet) routed here before
        self._refused: set[tuple[str, str, str]] = set()   # leases not routed, and why (logged once)
        self._last_subnet: dict[str, IPv4Network] = {}  # network id -> the part this host held last
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._mirror: Mirror | None = None

    @property
    def host_key(self) -> str:
        return self.ctx.host.key

    # --- options ----------------------------------------------------------------------------

    @staticmethod
    def subnet_len(network: Network) -> int:
        text = network.options.get(OPT_SUBNET_LEN, str(DEFAULT_SUBNET_LEN))
        if not text.isdigit():
            raise BadRequest(f"invalid subnet_len {text!r}: give a prefix length such as 24")
        length = int(text)
        subnet = IPv4Network(network.ipam.subnet)
        if not subnet.prefixlen < length <= 30:
            default = " (the default)" if OPT_SUBNET_LEN not in network.options else ""
            if subnet.prefixlen >= 30:
                raise BadRequest(f"subnet {subnet} is too small to share between hosts: give a larger --subnet")
            raise BadRequest(f"subnet_len {length}{default} does not fit subnet {subnet}: give -o subnet_len=N with N "
                             f"from {subnet.prefixlen + 1} to 30 (each host leases one /N of the subnet)")
        return length

    @staticmethod
    def lease_ttl(network: Network) -> float:
        text = network.options.get(OPT_LEASE_TTL, str(DEFAULT_LEASE_TTL))
        try:
            ttl = float(text)
        except ValueError:
            ttl = -1.0
        if not MIN_LEASE_TTL <= ttl <= MAX_LEASE_TTL:
            raise BadRequest(f"invalid lease_ttl {text!r}: give seconds from {MIN_LEASE_TTL} to {MAX_LEASE_TTL}")
        return ttl

    def validate(self, network: Network) -> None:
        super().validate(network)
        if self.ctx.cluster_store is None:
            raise BadRequest("hostgw networks need a cluster store: start every daemon with "
                             "--cluster-store etcd://HOST:PORT --cluster-advertise IP")
        if network.scope != GLOBAL:
            raise BadRequest("hostgw networks are global (each host routes its part of one network): drop --scope local")
        ipam = network.ipam
        if ipam is None:
            raise BadRequest("hostgw needs --subnet, the network every host's part is carved from "
                             "(e.g. --subnet 10.244.0.0/16)")
        if ipam.gateway:
            raise BadRequest("--gateway does not apply to hostgw: each host's gateway is the first address of its part")
        if ipam.ip_range:
            raise BadRequest("--ip-range does not apply to hostgw: each host gives out the addresses of its own part")
        if network.internal:
            raise BadRequest("--internal does not apply to hostgw: its traffic is routed between hosts")
        subnet = parse_subnet(ipam.subnet)
        self.subnet_len(network)
        self.lease_ttl(network)
        for route in self._foreign_routes():
            if route.overlaps(subnet):
                raise BadRequest(f"subnet {subnet} overlaps {route}, which this host already routes: hostgw routes "
                                 "the subnet's parts between hosts, so it must not overlap the hosts' own networks")

    # --- networks ---------------------------------------------------------------------------

    def create_network(self, network: Network) -> None:
        """Nothing to make yet: a host leases its part with its first container there."""

    def delete_network(self, network: Network) -> None:
        """On every host: this host's part, if any, and what a crash may have left."""
        with self._lock:
            part = self._parts.pop(network.id, None)
            self._peers.pop(network.id, None)
        if part is not None:
            self._teardown(part)
        self._clean_leftovers(network)
        with contextlib.suppress(StoreError):
            self.ctx.cluster_store.delete_prefix(f"{LEASES}{network.id}/")
        self._wake.set()

    def restore(self, network: Network, endpoints: list[Endpoint]) -> None:
        if not endpoints:
            self._clean_leftovers(network)
            return
        length = self.subnet_len(network)
        held = IPv4Network(f"{endpoints[0].address}/{length}", strict=False)
        part = self._ensure_part(network, prefer=held)
        with self._lock:
            part.endpoints.update(e.id for e in endpoints)
        if part.subnet != held:
            part.problem = (f"this host's containers have addresses in {held}, but another host took that part "
                            f"while this one was away: they are unreachable from other hosts; restart them")
            log.error("hostgw network %s: %s", network.name, part.problem)
        with netlink.netns_socket(None) as ipr:
            bridge = netlink.link_index(ipr, part.bridge)
            for endpoint in endpoints:
                index = netlink.link_index(ipr, endpoint.host_ifname)
                if index is None:
                    log.warning("endpoint %s of %s lost its veth %s", endpoint.container_name, network.name,
                                endpoint.host_ifname)
                else:
                    ipr.link("set", index=index, master=bridge, state="up")

    def restore_done(self) -> None:
        """Remove bridges and routes of hostgw networks that are gone."""
        with self._lock:
            bridges = {part.bridge for part in self._parts.values()}
        with netlink.netns_socket(None) as ipr:
            for link in ipr.get_links():
                name = link.get_attr("IFLA_IFNAME") or ""
                if name.startswith(BRIDGE_PREFIX) and name not in bridges:
                    log.info("removing bridge %s: its hostgw network has no containers here", name)
                    netlink.delete_link(ipr, name)
        self.reconcile()

    def close(self) -> None:
        """Stop renewing and reconciling; leases lapse by themselves, routes and bridges stay."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._mirror is not None:
            self._mirror.stop()
        with self._lock:
            for part in self._parts.values():
                part.keeper.stop()

    # --- endpoints --------------------------------------------------------------------------

    def create_endpoint(self, network: Network, endpoint: Endpoint) -> None:
        part = self._ensure_part(network)
        if endpoint.address and IPv4Address(endpoint.address) not in part.subnet:
            raise BadRequest(f"address {endpoint.address} is outside {part.subnet}, this host's part of network "
                             f"{network.name}")
        endpoint.ipv4 = f"{endpoint.address}/{part.subnet.prefixlen}"
        endpoint.host_ifname = netlink.interface_name("vhg", endpoint.id)
        if not endpoint.mac:
            endpoint.mac = netlink.mac_from_ip(endpoint.address)
        with self._lock:
            part.endpoints.add(endpoint.id)

    def delete_endpoint(self, network: Network, endpoint: Endpoint) -> None:
        with self._lock:
            part = self._parts.get(network.id)
            if part is None:
                return
            part.endpoints.discard(endpoint.id)
            if part.endpoints:
                return
            del self._parts[network.id]
            self._peers.pop(network.id, None)
        self._teardown(part)

    def default_gateway(self, network: Network) -> str | None:
        """This host's part's gateway: every host routes its own containers."""
        part = self._parts.get(network.id)
        return part.gateway if part is not None else None

    def join(self, network: Network, endpoint: Endpoint, info: JoinInfo) -> None:
        part = self._ensure_part(network)
        gateway = part.gateway if info.set_default_route else None
        with Rtnl() as host:
            bridge = host.link_index(part.bridge)
            if bridge is None:   # deleted behind our back: make it again
                self._build(part)
                bridge = host.link_index(part.bridge)
            fd = os.open(info.netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                host.create_veth(endpoint.host_ifname, info.ifname, fd, endpoint.mac, bridge)
            finally:
                os.close(fd)
            try:
                if info.configure:
                    configure_inside(info.netns, info.ifname, endpoint.ipv4, gateway)
                endpoint.gateway = gateway or ""
            except Exception:
                retire_named(host, endpoint.host_ifname)
                raise

    def leave(self, network: Network, endpoint: Endpoint, sandbox_gone: bool = False) -> None:
        if not sandbox_gone:
            free_inside_name(endpoint.sandbox, endpoint.ifname)
        with Rtnl() as host:
            retire_named(host, endpoint.host_ifname)

    # --- netd capture / trace ---------------------------------------------------------------

    def capture_point(self, network: Network, kind: str, endpoint: Endpoint | None = None) -> CapturePoint | None:
        with self._lock:
            part = self._parts.get(network.id)
        if part is None:
            return None
        if kind == "bridge":
            return CapturePoint("bridge", part.bridge, None, f"{part.bridge} (bridge of {part.subnet})",
                                checks=("route",))
        if kind == "veth" and endpoint is not None and endpoint.host_ifname:
            return CapturePoint("veth", endpoint.host_ifname, None,
                                f"{endpoint.host_ifname} (veth of {endpoint.container_name})")
        return None

    def trace_path(self, network: Network, source: Endpoint, dest: Endpoint | None) -> list[Hop]:
        """container -> veth -> bridge -> (this host's route to the peer's part) -> underlay, and
        on the peer: underlay -> bridge -> veth -> container; packets go unencapsulated."""
        here = source.host
        start = [Hop(here, "container", source.id), Hop(here, "veth", source.id), Hop(here, "bridge")]
        if dest is None:
            return [*start, Hop(here, "uplink")]
        end = [Hop(dest.host, "veth", dest.id), Hop(dest.host, "container", dest.id)]
        if dest.host == here:
            return [*start, *end]
        return [*start, Hop(here, "underlay"), Hop(dest.host, "underlay"), Hop(dest.host, "bridge"), *end]

    # --- inspect ----------------------------------------------------------------------------

    def inspect(self, network: Network) -> dict:
        info: dict = {"SubnetLen": self.subnet_len(network), "LeaseTTL": self.lease_ttl(network)}
        with self._lock:
            part = self._parts.get(network.id)
        if part is not None:
            info.update({"Lease": str(part.subnet), "Gateway": part.gateway, "Bridge": part.bridge,
                         "LeaseState": part.problem or ("lapsed: taking it again" if part.lost else "held")})
        else:
            info["Lease"] = "none: this host leases a part with its first container on the network"
        try:
            leases = self._leases(network.id, self.ctx.cluster_store.list(f"{LEASES}{network.id}/")[0])
        except StoreError as e:
            info["Leases"] = f"unknown: {e}"
            return info
        info["Leases"] = [{"Subnet": str(s), "Host": i.get("Host", ""), "Address": i.get("PublicIP", "")}
                          for s, (_, i) in sorted(leases.items())]
        peers = []
        with netlink.netns_socket(None) as ipr:
            for subnet, (_, lease) in sorted(leases.items()):
                if part is not None and subnet == part.subnet or lease.get("PublicIP") == self.ctx.host.address:
                    continue
                peer = self._next_hop(ipr, str(subnet), lease.get("PublicIP", ""), lease.get("Host", ""))
                if part is None and peer.oif:
                    peer.route = f"none yet (no containers here); would go {peer.route}"
                peers.append({"Subnet": peer.subnet, "Host": peer.host, "Address": peer.address, "Route": peer.route})
        info["Peers"] = peers
        return info
