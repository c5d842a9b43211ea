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
import itertools
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from pyroute2.netlink.exceptions import NetlinkError

from kvstore import KeyExists, KVPair, Lease, LeaseKeeper, StoreError, VersionConflict
from kvstore.mirror import Mirror
from netd.contract.driverapi import CapturePoint, Driver, DriverContext, Hop, JoinInfo
from netd.contract.errors import BadRequest, Conflict
from netd.contract.model import GLOBAL, Endpoint, Network, now, parse_subnet
from netd.kernel import netlink
from netd.kernel.rtnl import IFF_UP, Rtnl, configure_inside, free_inside_name, retire_named

log = logging.getLogger("netd.driver.hostgw")

OPT_SUBNET_LEN = "subnet_len"
OPT_LEASE_TTL = "lease_ttl"
DEFAULT_SUBNET_LEN = 24
DEFAULT_LEASE_TTL = 30
MIN_LEASE_TTL, MAX_LEASE_TTL = 2, 86400
LEASES = "leases/"                  # in the driver's own folder of the cluster store
RTPROT_HOSTGW = 110            # "proto 110" in `ip route`: routes to other hosts' parts
BRIDGE_PREFIX = "hg-"
RECONCILE_INTERVAL = 2.0


def lease_key(network_id: str, subnet: IPv4Network) -> str:
    return f"{LEASES}{network_id}/{subnet.network_address}-{subnet.prefixlen}"


def key_subnet(key: str) -> IPv4Network | None:
    try:
        return IPv4Network(key.rsplit("/", 1)[1].replace("-", "/"))
    except ValueError:
        return None


def bridge_name(network: Network) -> str:
    return netlink.interface_name(BRIDGE_PREFIX, network.id)


def gateway_name(subnet: IPv4Network) -> str:
    return f"hostgw {subnet}"


@dataclass
class Part:
    """This host's part of one hostgw network: its lease, its bridge, its endpoints."""

    network: Network
    subnet: IPv4Network
    lease: Lease
    keeper: LeaseKeeper
    endpoints: set[str] = field(default_factory=set)
    lost: bool = False          # the store lease lapsed (the store was away too long): take it again
    problem: str = ""           # why this host's part is not in order, for inspect
    bridge_index: int = 0
    rounds: int = 0             # reconciliations so far
    since: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> str:
        return lease_key(self.network.id, self.subnet)

    @property
    def gateway(self) -> str:
        return str(self.subnet.network_address + 1)

    @property
    def bridge(self) -> str:
        return bridge_name(self.network)


@dataclass
class Peer:
    subnet: str
    address: str
    host: str
    route: str                  # "via 10.10.0.2 dev eth0", or why there is none
    oif: int = 0                # 0: not routed


class HostgwDriver(Driver):
    name = "hostgw"
    scope = GLOBAL
    known_options = frozenset({OPT_SUBNET_LEN, OPT_LEASE_TTL})

    def __init__(self, ctx: DriverContext):
        super().__init__(ctx)
        self.interval = RECONCILE_INTERVAL
        self._lock = threading.RLock()                  # after ctx.lock, never before it
        self._parts: dict[str, Part] = {}               # network id -> this host's part
        self._peers: dict[str, dict[str, Peer]] = {}    # network id -> peer subnet -> route state
        self._said: dict[tuple[str, str], str] = {}     # (network id, peer subnet) -> last state logged
        self._routed: set[tuple[str, str]] = set()      # (network id, peer subnet) routed here before
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

    # --- this host's part -------------------------------------------------------------------

    def address_range(self, network: Network) -> str | None:
        """This host's part of the network (leased now if this is its first container)."""
        return str(self._ensure_part(network).subnet)

    def release_address_range(self, network: Network) -> None:
        """The container that took the part did not come to be: give the part up again, unless
        other containers here use it."""
        with self._lock:
            part = self._parts.get(network.id)
            if part is None or part.endpoints:
                return
            del self._parts[network.id]
            self._peers.pop(network.id, None)
        self._teardown(part)

    def _ensure_part(self, network: Network, prefer: IPv4Network | None = None) -> Part:
        with self._lock:
            part = self._parts.get(network.id)
            if part is not None:
                part.network = network
                return part
            part = self._acquire(network, prefer or self._last_subnet.get(network.id))
            try:
                self._build(part)
            except Exception:
                self._teardown(part)
                raise
            self._parts[network.id] = part
            log.info("hostgw network %s: this host holds %s (bridge %s, gateway %s)", network.name, part.subnet,
                     part.bridge, part.gateway)
        self._start()
        self._wake.set()
        return part

    def _lease_value(self) -> str:
        return json.dumps({"PublicIP": self.ctx.host.address, "Host": self.ctx.host.name,
                           "BackendType": "host-gw", "Since": now()})

    def _acquire(self, network: Network, prefer: IPv4Network | None) -> Part:
        store = self.ctx.cluster_store
        lease = store.grant_lease(self.lease_ttl(network))
        try:
            subnet = self._take_subnet(network, lease, prefer)
        except BaseException:
            with contextlib.suppress(StoreError):
                lease.revoke()
            raise
        keeper = LeaseKeeper(lease, on_lost=lambda: self._lease_lost(network.id)).start()
        part = Part(network, subnet, lease, keeper)
        try:
            self.ctx.addresses.take(network, gateway_name(subnet), kind="gateway", address=part.gateway)
        except Exception:
            keeper.stop()
            self._release_lease(part)
            raise
        return part

    def _take_subnet(self, network: Network, lease: Lease, prefer: IPv4Network | None) -> IPv4Network:
        """Bind this host's lease to its part: the one it holds already (a restart), else the
        preferred one, else the lowest free one; each by compare-and-swap."""
        store = self.ctx.cluster_store
        whole, length = IPv4Network(network.ipam.subnet), self.subnet_len(network)
        value = self._lease_value()
        for _attempt in range(16):
            leases = self._leases(network.id, store.list(f"{LEASES}{network.id}/")[0])
            mine = [(subnet, pair) for subnet, (pair, info) in leases.items()
                    if info.get("PublicIP") == self.ctx.host.address]
            if mine:
                mine.sort(key=lambda item: item[0] != prefer)
                subnet, pair = mine[0]
                for _, extra in mine[1:]:   # two leases of one host (never made by netd): keep one
                    with contextlib.suppress(VersionConflict):
                        store.delete(extra.key, extra.version)
                try:
                    store.update(pair.key, value, pair.version, lease)
                    return subnet
                except VersionConflict:
                    continue
            busy = set(leases) | self._parts_in_use(network, length)
            foreign = self._foreign_routes(bridge_name(network))
            candidates = itertools.chain([prefer] if prefer else [], whole.subnets(new_prefix=length))
            for subnet in candidates:
                if subnet in busy or any(subnet.overlaps(route) for route in foreign):
                    continue
                try:
                    store.create(lease_key(network.id, subnet), value, lease)
                    return subnet
                except KeyExists:
                    busy.add(subnet)
            raise Conflict(f"no part of {whole} is free for this host: every /{length} is leased by another host, "
                           "holds another host's containers or overlaps a route here; use a larger --subnet "
                           "or a longer subnet_len")
        raise Conflict(f"could not lease a part of {whole}: the leases kept changing; try again")

    def _leases(self, network_id: str, pairs) -> dict[IPv4Network, tuple[KVPair, dict]]:
        found = {}
        for pair in pairs:
            if not pair.key.startswith(f"{LEASES}{network_id}/"):
                continue
            subnet = key_subnet(pair.key)
            try:
                info = json.loads(pair.value)
            except ValueError:
                info = None
            if subnet is None or not isinstance(info, dict):
                log.error("ignoring corrupt hostgw lease %s in the cluster store", pair.key)
                continue
            found[subnet] = (pair, info)
        return found

    def _parts_in_use(self, network: Network, length: int) -> set[IPv4Network]:
        """Parts where another host's containers still have addresses (a host that died keeps
        them until the cluster reclaims its endpoints)."""
        used = set()
        for allocation in self.ctx.addresses.held(network):
            if allocation.kind == "endpoint" and allocation.host != self.host_key:
                used.add(IPv4Network(f"{allocation.address}/{length}", strict=False))
        return used

    def host_gone(self, network: Network, address: str) -> None:
        """Free the gateway a dead host reserved for its part, so the part can be leased again."""
        for allocation in self.ctx.addresses.held(network):
            if allocation.kind == "gateway" and allocation.host == address and allocation.name.startswith("hostgw "):
                self.ctx.addresses.give_back(network, allocation.address, allocation.name)

    def _build(self, part: Part) -> None:
        """The bridge with the part's gateway, and its firewall rules. Idempotent (a restart)."""
        address = f"{part.gateway}/{part.subnet.prefixlen}"
        with netlink.netns_socket(None) as ipr:
            index = part.bridge_index = netlink.ensure_bridge(ipr, part.bridge, address)
            for addr in ipr.get_addr(index=index, family=socket.AF_INET):
                held = f"{addr.get_attr('IFA_ADDRESS')}/{addr['prefixlen']}"
                if held != address:   # a part this host held before
                    ipr.addr("del", index=index, address=addr.get_attr("IFA_ADDRESS"), prefixlen=addr["prefixlen"])
        self.ctx.firewall.add_network(part.network.id, part.bridge, str(part.subnet), internal=False,
                                      masquerade=True, routed=part.network.ipam.subnet)

    def _check_bridge(self, part: Part) -> None:
        """The bridge is there and up (one request), and every tenth round fully checked: if it was
        deleted or changed behind our back, make it again (its containers' veths went with it)."""
        part.rounds += 1
        with Rtnl() as rtnl:
            state = rtnl.link_state(part.bridge)
        if state is not None and state[1] & IFF_UP and state[0] == part.bridge_index and part.rounds % 10:
            return
        if state is None or state[0] != part.bridge_index:
            log.warning("hostgw network %s: bridge %s was %s; making it again", part.network.name, part.bridge,
                        "deleted" if state is None else "replaced")
        try:
            self._build(part)
        except Exception as e:  # noqa: BLE001 - reported, tried again next round
            log.error("hostgw network %s: cannot rebuild bridge %s: %s", part.network.name, part.bridge, e)

    def _teardown(self, part: Part) -> None:
        """Give the part up: lease, gateway, firewall rules, bridge, routes."""
        network = part.network
        part.keeper.stop()
        self._release_lease(part)
        with contextlib.suppress(StoreError):
            self.ctx.addresses.give_back(network, part.gateway, gateway_name(part.subnet))
        with contextlib.suppress(Exception):
            self.ctx.firewall.remove_network(network.id)
        with netlink.netns_socket(None) as ipr:
            netlink.delete_link(ipr, part.bridge)
            self._delete_routes(ipr, IPv4Network(network.ipam.subnet))
        self._last_subnet[network.id] = part.subnet
        log.info("hostgw network %s: this host gave up %s", network.name, part.subnet)

    def _release_lease(self, part: Part) -> None:
        store = self.ctx.cluster_store
        with contextlib.suppress(StoreError, VersionConflict):
            pair = store.get(part.key)
            if pair is not None and json.loads(pair.value).get("PublicIP") == self.ctx.host.address:
                store.delete(pair.key, pair.version)
        with contextlib.suppress(StoreError):
            part.lease.revoke()

    def _clean_leftovers(self, network: Network) -> None:
        """No containers here: no lease, bridge, rules or routes of this host may stay."""
        with self._lock:
            if network.id in self._parts:
                return
        store = self.ctx.cluster_store
        with contextlib.suppress(StoreError):
            for subnet, (pair, info) in self._leases(network.id, store.list(f"{LEASES}{network.id}/")[0]).items():
                if info.get("PublicIP") == self.ctx.host.address:
                    with contextlib.suppress(VersionConflict):
                        store.delete(pair.key, pair.version)
                    self.ctx.addresses.give_back(network, str(subnet.network_address + 1), gateway_name(subnet))
        with contextlib.suppress(Exception):
            self.ctx.firewall.remove_network(network.id)
        with netlink.netns_socket(None) as ipr:
            netlink.delete_link(ipr, bridge_name(network))
            if network.ipam is not None:
                self._delete_routes(ipr, IPv4Network(network.ipam.subnet))

    def _lease_lost(self, network_id: str) -> None:
        with self._lock:
            part = self._parts.get(network_id)
            if part is not None:
                part.lost = True
        log.warning("hostgw: the lease of this host's part of network %s lapsed; taking it again", network_id[:12])
        self._wake.set()

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

    # --- routes -----------------------------------------------------------------------------

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None or self._stopping.is_set():
                return
            self._mirror = Mirror(self.ctx.cluster_store, LEASES, on_put=lambda _: self._wake.set(),
                                  on_delete=lambda _: self._wake.set()).start()
            self._thread = threading.Thread(target=self._run, name="hostgw-routes", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                self.reconcile()
            except Exception:   # noqa: BLE001 - keep reconciling
                log.exception("hostgw: reconciling routes failed")

    def _lease_pairs(self) -> list[KVPair]:
        if self._mirror is not None and self._mirror.wait_synced(0) and self._mirror.connected:
            return list(self._mirror.items().values())
        return self.ctx.cluster_store.list(LEASES)[0]

    def reconcile(self) -> None:
        """Make the kernel match the leases: this host's part, and a route to every other part."""
        self._release_idle_parts()
        with self._lock:
            parts = list(self._parts.values())
        try:
            pairs = self._lease_pairs() if parts else []
        except StoreError as e:
            log.debug("hostgw: leases unknown (%s): routes stay as they are", e)
            return
        wanted: set[str] = set()
        with netlink.netns_socket(None) as ipr:
            routes = self._our_routes(ipr)
            for part in parts:
                wanted |= self._reconcile_part(ipr, part, pairs, routes)
            for dst in set(routes) - wanted:
                with contextlib.suppress(NetlinkError):
                    ipr.route("del", dst=dst, proto=RTPROT_HOSTGW)
                    log.info("hostgw: removed route %s via %s: its lease is gone", dst, routes[dst][0])
                self._routed = {(nid, subnet) for nid, subnet in self._routed if subnet != dst}

    def _release_idle_parts(self) -> None:
        """A part whose first container never came (its `netd run` failed after the lease was
        taken) is given up. Under the controller's lock: no endpoint can be on its way."""
        with self.ctx.lock, self._lock:
            idle = [p for p in self._parts.values()
                    if not p.endpoints and time.monotonic() - p.since > 2 * self.interval]
            for part in idle:
                del self._parts[part.network.id]
                self._peers.pop(part.network.id, None)
                self._teardown(part)

    def _reconcile_part(self, ipr, part: Part, pairs: list[KVPair], routes: dict[str, tuple[str, int]]) -> set[str]:
        network = part.network
        leases = self._leases(network.id, pairs)
        own = leases.get(part.subnet)
        if part.lost or own is None or own[1].get("PublicIP") != self.ctx.host.address:
            self._retake(part, own)
        self._check_bridge(part)
        peers: dict[str, Peer] = {}
        wanted = set()
        for subnet, (_pair, info) in sorted(leases.items()):
            address = info.get("PublicIP", "")
            if subnet == part.subnet or address == self.ctx.host.address:
                continue
            peer = self._next_hop(ipr, str(subnet), address, info.get("Host", ""))
            peers[str(subnet)] = peer
            self._say(network, peer)
            if not peer.oif:
                continue
            wanted.add(str(subnet))
            if routes.get(str(subnet)) != (address, peer.oif):
                try:
                    ipr.route("replace", dst=str(subnet), gateway=address, oif=peer.oif, proto=RTPROT_HOSTGW)
                except NetlinkError as e:
                    peer.route = f"not routed: the kernel refused the route ({os.strerror(e.code)})"
                    self._say(network, peer)
                    continue
                again = (network.id, str(subnet)) in self._routed
                self._routed.add((network.id, str(subnet)))
                log.info("hostgw network %s: route %s %s %s", network.name, subnet, peer.route,
                         "restored" if again else "added")
        with self._lock:
            self._peers[network.id] = peers
        return wanted

    def _retake(self, part: Part, own: tuple[KVPair, dict] | None) -> None:
        """This host's lease is missing from the store (it lapsed, or was deleted): take it again."""
        store = self.ctx.cluster_store
        if own is not None and own[1].get("PublicIP") != self.ctx.host.address:
            holder = f"{own[1].get('Host')} ({own[1].get('PublicIP')})"
            problem = (f"host {holder} holds {part.subnet} now (this host's lease lapsed while the store was away): "
                       "containers here are unreachable from other hosts")
            if part.problem != problem:
                part.problem = problem
                log.error("hostgw network %s: %s", part.network.name, problem)
            return
        try:
            if part.lost:
                part.keeper.stop()
                lease = store.grant_lease(self.lease_ttl(part.network))
                part.lease = lease
                part.keeper = LeaseKeeper(lease, on_lost=lambda: self._lease_lost(part.network.id)).start()
                part.lost = False
            try:
                store.create(part.key, self._lease_value(), part.lease)
            except KeyExists:
                return   # there again (the mirror was behind); checked next round
            part.problem = ""
            log.info("hostgw network %s: took %s again", part.network.name, part.subnet)
        except StoreError as e:
            log.debug("hostgw: cannot take %s again yet: %s", part.subnet, e)

    @staticmethod
    def _next_hop(ipr, subnet: str, address: str, host: str) -> Peer:
        """How the kernel reaches a peer: directly on an interface (routable), or not."""
        try:
            [route] = ipr.route("get", dst=address)
        except NetlinkError as e:
            return Peer(subnet, address, host, f"not routed: no route to {address} on this host ({os.strerror(e.code)})")
        except (ValueError, OSError) as e:
            return Peer(subnet, address, host, f"not routed: {e}")
        oif = route.get_attr("RTA_OIF") or 0
        ifname = _ifname(ipr, oif)
        gateway = route.get_attr("RTA_GATEWAY")
        if gateway:
            return Peer(subnet, address, host,
                        f"not routed: {address} is not on a directly connected network (this host reaches it "
                        f"through the router {gateway} on {ifname}); hostgw needs the hosts on one L2 segment: "
                        "use an overlay network across routers")
        return Peer(subnet, address, host, f"via {address} dev {ifname}", oif)

    def _say(self, network: Network, peer: Peer) -> None:
        """Log a peer's route state once per change: problems as warnings."""
        key = (network.id, peer.subnet)
        if self._said.get(key) == peer.route:
            return
        self._said[key] = peer.route
        if not peer.oif:
            log.warning("hostgw network %s: peer %s (%s, %s) %s", network.name, peer.subnet, peer.host, peer.address,
                        peer.route)

    @staticmethod
    def _our_routes(ipr) -> dict[str, tuple[str, int]]:
        """netd's hostgw routes in the main table: destination -> (gateway, interface)."""
        found = {}
        for route in ipr.get_routes(family=socket.AF_INET, table=254):
            if route["proto"] == RTPROT_HOSTGW and route.get_attr("RTA_DST"):
                dst = f"{route.get_attr('RTA_DST')}/{route['dst_len']}"
                found[dst] = (route.get_attr("RTA_GATEWAY") or "", route.get_attr("RTA_OIF") or 0)
        return found

    def _delete_routes(self, ipr, within: IPv4Network) -> None:
        for dst in self._our_routes(ipr):
            if IPv4Network(dst).subnet_of(within):
                with contextlib.suppress(NetlinkError):
                    ipr.route("del", dst=dst, proto=RTPROT_HOSTGW)

    @staticmethod
    def _foreign_routes(own_bridge: str | None = None) -> list[IPv4Network]:
        """Destinations this host routes, but for netd's hostgw routes and `own_bridge`'s."""
        found = []
        with netlink.netns_socket(None) as ipr:
            skip = netlink.link_index(ipr, own_bridge) if own_bridge else None
            for route in ipr.get_routes(family=socket.AF_INET, table=254):
                dst = route.get_attr("RTA_DST")
                if not dst or route["dst_len"] == 0 or route["proto"] == RTPROT_HOSTGW:
                    continue
                if skip is not None and route.get_attr("RTA_OIF") == skip:
                    continue
                found.append(IPv4Network(f"{dst}/{route['dst_len']}", strict=False))
        return found

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


def _ifname(ipr, index: int) -> str:
    with contextlib.suppress(NetlinkError, IndexError):
        return ipr.link("get", index=index)[0].get_attr("IFLA_IFNAME")
    return f"interface {index}"
