"""hostgw's leases: this host's part of a network's subnet, taken from the cluster store under a TTL
lease when its first container comes, kept while it has containers, validated when read (inside the
subnet, not overlapping, not covering a host route), given back when idle."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import socket
from ipaddress import IPv4Network

from drivers.hostgw.parts import LEASES, Part, bridge_name, gateway_name, key_subnet, lease_key
from kvstore import KeyExists, KVPair, Lease, LeaseKeeper, StoreError, VersionConflict
from netd.contract.errors import Conflict
from netd.contract.model import Network, now
from netd.kernel import netlink
from netd.kernel.rtnl import IFF_UP, Rtnl

log = logging.getLogger("netd.driver.hostgw")


class Leases:
    """HostgwDriver's part: this host's part of each network, leased in the cluster store."""

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
