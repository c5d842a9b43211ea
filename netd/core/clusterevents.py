"""What the cluster tells the controller (ClusterListener, called from the cluster's threads): global networks
that appear or go, peers that join or leave, a store that comes back, dead hosts' endpoints reclaimed."""


import logging

from kvstore import StoreError
from netd.contract.model import (
    GLOBAL,
    Endpoint,
    Network,
)
from netd.core.keys import (
    ENDPOINTS,
)

log = logging.getLogger(__name__)



class ClusterEvents:
    """The Controller as the cluster's listener: global networks, peers, reclaimed hosts."""

    # --- the cluster's news (ClusterListener, called from the cluster's threads) -------------

    def global_network_changed(self, pair, deleted: bool) -> None:
        network = self._decode(Network.from_json, pair)
        if network is None:
            return
        with self.lock:
            if not deleted:
                if network.id not in self.networks:
                    log.info("global network %s appeared (%s)", network.name, network.driver)
                self.networks[network.id] = network
                return
            known = self.networks.pop(network.id, None)
            if known is not None and known.driver in self.drivers:
                log.info("global network %s was removed", known.name)
                try:
                    self.drivers[known.driver].delete_network(known)
                except Exception as e:  # noqa: BLE001
                    log.error("while removing global network %s here: %s", known.name, e)

    def peer_changed(self, endpoint: Endpoint, present: bool) -> None:
        """A remote endpoint of a global network appeared or went (or its host died)."""
        with self.lock:
            network = self.networks.get(endpoint.network_id)
            if network is None or network.driver not in self.drivers:
                return
            driver = self.drivers[network.driver]
            try:
                if present:
                    driver.peer_joined(network, endpoint)
                else:
                    driver.peer_left(network, endpoint)
            except Exception as e:  # noqa: BLE001 - one peer must not stop the others
                log.error("could not %s peer %s (%s on %s): %s", "program" if present else "unprogram",
                          endpoint.container_name, endpoint.address, endpoint.host, e)

    def store_reconnected(self) -> None:
        """The cluster store is back (or we just started): claim back this host's endpoints the
        cluster lost (netd.core.recovery), then free addresses this host took but never used,
        e.g. when the store went away in the middle of a `netd run`."""
        try:
            self.recover_own_endpoints()
        except Exception:  # noqa: BLE001 - tried again at the next reconnect and by the reconciler
            log.exception("could not claim back this host's endpoints")
        with self.lock:
            mine = self.endpoints.ids()
            ipam = self.ipam[GLOBAL]
            try:
                for pool in ipam.pools():
                    for allocation in ipam.allocations(pool.network_id):
                        if (allocation.kind == "endpoint" and allocation.host == self.host_key
                                and allocation.endpoint_id not in mine):
                            log.warning("freeing %s on %s: its endpoint never came to be", allocation.address,
                                        pool.network_name)
                            ipam.release(pool.network_id, allocation.address)
            except StoreError as e:
                log.warning("could not check this host's addresses in the cluster store: %s", e)

    def members_changed(self, addresses: list[str]) -> None:
        """VXLAN (and any driver's underlay UDP port) only from live members: netd's table drops
        the rest, counted (netd.kernel.firewall vxlan_guard)."""
        ports = sorted({p for d in self.drivers.values() for p in d.underlay_udp_ports})
        self.firewall.set_vxlan_guard(ports, addresses)

    def reclaim_endpoint(self, endpoint: Endpoint) -> None:
        network = self.networks.get(endpoint.network_id)
        if network is None:
            self.cluster_store.delete(f"{ENDPOINTS}{endpoint.network_id}/{endpoint.id}")
            return
        if endpoint.address:
            self._release_address(network, endpoint)
        self._unstore_endpoint(self.cluster_store, network, endpoint)

    def host_reclaimed(self, address: str) -> None:
        with self.lock:
            networks = [n for n in self.networks.values() if n.scope == GLOBAL and n.driver in self.drivers]
        for network in networks:
            try:
                self.drivers[network.driver].host_gone(network, address)
            except Exception as e:  # noqa: BLE001 - one network must not stop the others
                log.error("could not free what dead host %s held on %s: %s", address, network.name, e)

    def _release_address(self, network: Network, endpoint: Endpoint) -> None:
        if network.scope == GLOBAL:   # only if still ours: another host may hold it by now
            self.ipam[GLOBAL].release_owned(network.id, endpoint.address, endpoint.id)
        else:
            self.ipam[network.scope].release(network.id, endpoint.address)
