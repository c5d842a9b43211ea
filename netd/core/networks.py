"""Networks: create, find, list, remove, prune; the warnings a driver has about one; IPAM queries."""


import contextlib
import json
import logging
import threading
from collections.abc import Callable
from ipaddress import IPv4Network

import drivers
from kvstore import KVError, StoreError, VersionConflict
from netd.contract.errors import BadRequest, Conflict, NotFound
from netd.contract.model import (
    GLOBAL,
    LOCAL,
    Endpoint,
    IPAMConfig,
    Network,
    check_name,
    new_id,
)
from netd.core.cluster import remove_host
from netd.core.ipam import Pool, parse_address
from netd.core.keys import (
    ENDPOINTS,
    LOCAL_SUBNETS,
    NETWORK_NAMES,
    NETWORKS,
)
from netd.core.state import BUILTIN_NETWORKS
from netd.core.undo import Undo
from netd.kernel import netlink
from netd.kernel.rtnl import flush_retired

log = logging.getLogger(__name__)



class Networks:
    """The Controller's networks: create, find, list, remove, prune; IPAM queries."""

    # --- networks ---------------------------------------------------------------------------

    def create_network(
        self,
        name: str,
        driver: str = "bridge",
        subnet: str | None = None,
        gateway: str | None = None,
        ip_range: str | None = None,
        aux_addresses: dict[str, str] | None = None,
        options: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
        internal: bool = False,
        scope: str | None = None,
        builtin: bool = False,
        network_id: str | None = None,
    ) -> Network:
        """`network_id`: the id to give it (netd's Docker plugin derives one from the subnet, so
        that every host's dockerd finds the same network)."""
        check_name("network", name)
        with self.lock:
            if driver not in self.drivers:
                raise drivers.unknown_driver(driver, self.drivers)
            if not builtin and name in BUILTIN_NETWORKS:
                raise Conflict(f"network {name} is a pre-defined network and cannot be created")
            if self._find_network(name) is not None:
                raise Conflict(f"network with name {name} already exists")
            impl = self.drivers[driver]
            if impl.namespace_mode and not builtin:
                raise BadRequest(f"only one instance of the {driver!r} network is allowed (it exists already)")
            scope = scope or impl.scope
            if scope not in (LOCAL, GLOBAL):
                raise BadRequest(f"invalid scope {scope!r}: use local or global")
            ipam_config = IPAMConfig(subnet, gateway, ip_range, dict(aux_addresses or {})) if subnet else None
            if not impl.has_addresses and (subnet or gateway or ip_range or aux_addresses):
                raise BadRequest(f"driver {driver} does not assign addresses: --subnet and friends do not apply")
            network = Network(
                id=network_id or new_id(), name=name, driver=driver, scope=scope, internal=internal, ipam=ipam_config,
                options=dict(options or {}), labels=dict(labels or {}), builtin=builtin,
            )
            impl.validate(network)
            store = self._store(scope)
            if scope == GLOBAL and subnet:
                self._check_local_subnets(IPv4Network(subnet, strict=False))
            if scope not in impl.scopes:   # e.g. a global bridge: other hosts would fail to build it
                raise BadRequest(f"driver {driver} makes {impl.scope} networks only: drop --scope {scope}")
            with Undo(after_rollback=flush_retired) as undo:
                store.create(NETWORK_NAMES + name, network.id)
                undo.push(store.delete, NETWORK_NAMES + name)
                if impl.has_addresses:
                    pool = self.ipam[scope].request_pool(
                        network.id, name, subnet, gateway, ip_range, aux_addresses,
                        avoid=self._subnets_to_avoid(scope),
                    )
                    undo.push(self.ipam[scope].release_pool, network.id)
                    network.ipam = IPAMConfig(pool.subnet, pool.gateway, pool.ip_range, pool.aux_addresses)
                impl.create_network(network)
                undo.push(impl.delete_network, network)
                store.create(NETWORKS + network.id, network.to_json())
            self.networks[network.id] = network
            self._advertise_local_subnet(network)
            log.info("created network %s (%s, %s)", name, driver, network.ipam.subnet if network.ipam else "no addresses")
            return network

    def _subnets_to_avoid(self, scope: str) -> list[IPv4Network]:
        """Default pools must not overlap the host's routes nor pools of the other scope."""
        avoid = []
        for cidr in netlink.host_routes():
            with contextlib.suppress(ValueError):
                avoid.append(IPv4Network(cidr, strict=False))
        if scope == GLOBAL:
            avoid.extend(IPv4Network(p.subnet) for p in self.ipam[LOCAL].pools())
            avoid.extend(subnet for subnet, _ in self._other_hosts_local_subnets())
        else:
            # The global pools are the global networks' subnets, which the cluster's mirror holds:
            # a local network is created without asking the cluster store (it may be away).
            avoid.extend(IPv4Network(n.ipam.subnet) for n in list(self.networks.values())
                         if n.scope == GLOBAL and n.ipam is not None)
        return avoid

    # --- local subnets, known cluster-wide ---------------------------------------------------
    # A global pool must not overlap any host's local network (its containers could not reach
    # the global network's addresses on that host): each host advertises its local subnets.

    def _advertise_local_subnet(self, network: Network, gone: bool = False) -> None:
        """In the background, in order: local work never waits on the cluster store."""
        if self.cluster_store is None or network.scope != LOCAL or network.ipam is None or network.builtin:
            return
        with self._advert_lock:
            self._adverts.append((network, gone))
            if self._advert_thread is None or not self._advert_thread.is_alive():
                self._advert_thread = threading.Thread(target=self._send_adverts, name="local-subnets", daemon=True)
                self._advert_thread.start()

    def _send_adverts(self) -> None:
        while True:
            with self._advert_lock:
                if not self._adverts:
                    return
                network, gone = self._adverts.pop(0)
            key = f"{LOCAL_SUBNETS}{self.host_key}/{network.id}"
            try:
                if gone:
                    self.cluster_store.delete(key)
                else:
                    self.cluster_store.put(key, json.dumps({"Name": network.name, "Subnet": network.ipam.subnet}))
            except KVError as e:   # best effort: advertised again at the next start
                log.warning("could not advertise local network %s in the cluster store: %s", network.name, e)

    def _other_hosts_local_subnets(self) -> list[tuple[IPv4Network, str]]:
        if self.cluster_store is None:
            return []
        pairs, _ = self.cluster_store.list(LOCAL_SUBNETS)
        found = []
        for pair in pairs:
            host = pair.key[len(LOCAL_SUBNETS):].split("/", 1)[0]
            try:
                value = json.loads(pair.value)
                found.append((IPv4Network(value["Subnet"]), f"local network {value['Name']} on host {host}"))
            except (ValueError, KeyError, TypeError):
                log.error("ignoring a bad value at %s in the cluster store", pair.key)
        return found

    def _check_local_subnets(self, subnet: IPv4Network) -> None:
        for other, what in self._other_hosts_local_subnets():
            if other.overlaps(subnet):
                raise Conflict(f"subnet {subnet} overlaps {what} ({other}): a global network must not "
                               "overlap any host's local network")

    def _find_network(self, ref: str) -> Network | None:
        networks = list(self.networks.values())
        by_name = [n for n in networks if n.name == ref]
        if by_name:
            return by_name[0]
        if ref in self.networks:
            return self.networks[ref]
        matches = [n for n in networks if n.id.startswith(ref)] if len(ref) >= 3 else []
        if len(matches) > 1:
            raise BadRequest(f"network id prefix {ref} is ambiguous: give more characters")
        return matches[0] if matches else None

    def get_network(self, ref: str) -> Network:
        """Reads take no lock (see Containers.get_container)."""
        network = self._find_network(ref)
        if network is None:
            raise NotFound(f"network {ref} not found")
        return network

    def list_networks(self) -> list[Network]:
        return sorted(list(self.networks.values()), key=lambda n: n.name)

    def network_endpoints(self, network: Network) -> list[Endpoint]:
        """Every endpoint of the network (on all hosts, for global networks)."""
        if network.scope == GLOBAL and self.cluster is not None:
            return self.cluster.endpoints_of(network.id)
        return self.endpoints.of_network(network.id)

    def remove_network(self, ref: str) -> None:
        with self.lock:
            network = self.get_network(ref)
            if network.builtin:
                raise Conflict(f"{network.name} is a pre-defined network and cannot be removed")
            endpoints = self.network_endpoints(network)
            if endpoints:
                if network.scope == GLOBAL:
                    by_host: dict[str, list[str]] = {}
                    for e in endpoints:
                        by_host.setdefault(e.host, []).append(e.container_name)
                    where = "; ".join(f"{h}: {', '.join(sorted(n))}" for h, n in sorted(by_host.items()))
                    raise Conflict(f"network {network.name} has active endpoints on hosts ({where}): "
                                   "disconnect or remove those containers first")
                names = ", ".join(sorted({e.container_name for e in endpoints}))
                raise Conflict(
                    f"network {network.name} has active endpoints ({names}): disconnect or remove those containers first"
                )
            impl = self.drivers[network.driver]
            if impl.has_addresses:
                lent = [a for a in self.ipam[network.scope].allocations(network.id) if a.kind == "cni"]
                if lent:
                    raise Conflict(f"network {network.name} lends {len(lent)} address(es) to CNI attachments "
                                   f"(netd as another plugin's IPAM, e.g. {lent[0].address}): remove those first")
            store = self._store(network.scope)
            if network.scope == GLOBAL:
                self._mark_removing(network)
            impl.delete_network(network)
            if impl.has_addresses:
                self.ipam[network.scope].release_pool(network.id)
            store.delete(NETWORK_NAMES + network.name)
            store.delete(NETWORKS + network.id)
            del self.networks[network.id]
            self._advertise_local_subnet(network, gone=True)
            impl.release_network(network)     # last: e.g. the VNI, once nothing can use it
            log.info("removed network %s", network.name)

    def _mark_removing(self, network: Network) -> None:
        """Phase one of removing a global network: mark it (compare-and-swap), so that no host
        stores a new endpoint on it (they check its version in the same transaction), then look
        for endpoints in the store itself, not in this host's copy. One found: unmark, refuse."""
        key = NETWORKS + network.id
        pair = self.cluster_store.get(key)
        if pair is None:
            raise NotFound(f"network {network.name} not found in the cluster store")
        marked = Network.from_json(pair.value)
        marked.removing = True
        try:
            marked_pair = self.cluster_store.update(key, marked.to_json(), pair.version)
        except VersionConflict:
            raise Conflict(f"network {network.name} changed while it was being removed: try again") from None
        endpoints, _ = self.cluster_store.list(f"{ENDPOINTS}{network.id}/")
        if endpoints:
            marked.removing = False
            with contextlib.suppress(VersionConflict):
                self.cluster_store.update(key, marked.to_json(), marked_pair.version)
            raise Conflict(f"network {network.name} has active endpoints ({len(endpoints)} in the cluster store): "
                           "disconnect or remove those containers first")

    def prune_networks(self, chosen: Callable[[Network], bool] = lambda _network: True) -> list[str]:
        removed = []
        with self.lock:
            for network in self.list_networks():
                if not network.builtin and chosen(network) and not self.network_endpoints(network):
                    try:
                        self.remove_network(network.id)
                    except Conflict as e:   # in use after all (another host's endpoint, a lent address)
                        log.info("prune keeps %s: %s", network.name, e)
                        continue
                    removed.append(network.name)
        return removed

    def network_warning(self, network: Network) -> str:
        """Something the user should know about a network that was created anyway."""
        impl = self.drivers.get(network.driver)
        return impl.network_warning(network) if impl is not None else ""

    # --- IPAM queries -----------------------------------------------------------------------

    def host_list(self) -> list[dict]:
        if self.cluster is None:
            return [{"Address": self.host.address, "Name": self.host.name, "ID": self.host.id, "Alive": True}]
        return self.cluster.host_list()

    def remove_host(self, address: str) -> int:
        if self.cluster is None:
            raise BadRequest("this daemon has no cluster store: there are no other hosts to remove")
        return remove_host(self.cluster, address)

    def ipam_pools(self) -> list[dict]:
        rows = []
        for scope, ipam in self.ipam.items():
            try:
                pools = [(pool, ipam.usage(pool)) for pool in ipam.pools()]
            except StoreError as e:   # the cluster store is away: the global networks as known here
                log.warning("ipam ls: the cluster store did not answer (%s): global usage unknown", e)
                pools = [(Pool(n.id, n.name, n.ipam.subnet, n.ipam.gateway, n.ipam.ip_range), None)
                         for n in list(self.networks.values()) if n.scope == scope and n.ipam is not None]
            for pool, usage in pools:
                size, used = usage or (pool.usable_hosts(), None)
                rows.append({"Network": pool.network_name, "NetworkID": pool.network_id, "Scope": scope,
                             "Subnet": pool.subnet, "IPRange": pool.ip_range or "", "Gateway": pool.gateway or "",
                             "Size": size, "Used": used if used is not None else "?",
                             "Free": size - used if used is not None else "?"})
        return sorted(rows, key=lambda r: r["Network"])

    def ipam_allocations(self, ref: str) -> list[dict]:
        network = self.get_network(ref)
        if network.ipam is None:
            raise BadRequest(f"network {network.name} has no address pool (driver {network.driver})")
        return [
            {"Address": a.address, "Kind": a.kind, "Endpoint": a.endpoint_id, "Container": a.container or a.name,
             "Host": a.host, "Since": a.since}
            for a in self.ipam[network.scope].allocations(network.id)
        ]

    def ipam_lookup(self, address: str) -> list[dict]:
        parse_address(address)
        results = []
        for scope, ipam in self.ipam.items():
            for pool, allocation in ipam.lookup(address):
                entry = {"Address": address, "Network": pool.network_name, "Scope": scope, "Subnet": pool.subnet,
                         "State": "free" if allocation is None else "in use"}
                if allocation is not None:
                    entry.update({"Kind": allocation.kind, "Container": allocation.container or allocation.name,
                                  "Endpoint": allocation.endpoint_id, "Host": allocation.host, "Since": allocation.since})
                results.append(entry)
        return results
