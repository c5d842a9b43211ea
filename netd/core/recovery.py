"""The Controller's promise after a partition or a reclaim: no address twice among running containers.

This host keeps a copy of its endpoints on global networks in the local store (keys.OWN_ENDPOINTS).
When it (re)joins the cluster — at start, or when it registers again after losing its lease — every
such endpoint whose record the cluster no longer has (another host reclaimed this one, or the
store lost it) is claimed back:

- its address is still free: it is taken again, under the same endpoint; nothing changes inside;
- another container holds it now: the endpoint is renumbered (a free address of the pool; the
  container's interface, its DNS names and /etc/hosts follow; the MAC stays); the note says so;
- that fails too (the pool is full, the store went away again): the interface is taken down
  ("quarantined"), so the container never answers on an address it does not hold.

The note shows in `netd ps` (STATUS) and `netd inspect` (NetworkSettings.Networks.*.Note), and the log.
"""

from __future__ import annotations

import logging

from kvstore import KeyExists, KVError
from netd.contract.errors import Conflict
from netd.contract.model import GLOBAL, Endpoint, Network
from netd.core.keys import CONTAINERS, ENDPOINTS, OWN_ENDPOINTS
from netd.kernel import netlink

log = logging.getLogger(__name__)


class Recovery:
    """The Controller's claim-back of its global endpoints after a reclaim or a lost store."""

    def _own_global_endpoints(self) -> list[Endpoint]:
        pairs, _ = self.local_store.list(OWN_ENDPOINTS)
        return [e for e in (self._decode(Endpoint.from_json, p) for p in pairs) if e is not None]

    def _load_own_global_endpoints(self, in_cluster: set[str]) -> list[Endpoint]:
        """At start: this host's global endpoints the cluster does not know (any more). Those of
        containers this host still has go back in the table (so restore keeps their data plane);
        the rest are forgotten."""
        missing = []
        for endpoint in self._own_global_endpoints():
            if endpoint.id in in_cluster:
                continue
            if endpoint.container_id in self.containers:
                self.endpoints.add(endpoint)
                missing.append(endpoint)
            else:
                self.local_store.delete(f"{OWN_ENDPOINTS}{endpoint.network_id}/{endpoint.id}")
        return missing

    def recover_own_endpoints(self) -> int:
        """Claim back every endpoint of this host on a global network that the cluster store
        lacks; how many were missing. Safe to call at any time (each step is compare-and-swap)."""
        if self.cluster is None:
            return 0
        with self.lock:
            mine = [(e, self.networks.get(e.network_id)) for e in self.endpoints.all()]
        missing = 0
        for endpoint, network in mine:
            if network is None or network.scope != GLOBAL:
                continue
            try:
                if self.cluster_store.get(f"{ENDPOINTS}{network.id}/{endpoint.id}") is not None:
                    continue
            except KVError as e:
                log.warning("cannot check endpoint %s in the cluster store: %s", endpoint.id[:12], e)
                return missing
            missing += 1
            with self.lock:
                self._claim_back(network, endpoint)
        return missing

    def _claim_back(self, network: Network, endpoint: Endpoint) -> None:
        container = self.containers.get(endpoint.container_id)
        if container is None or container.state != "running":
            return
        ipam = self.ipam[GLOBAL]
        try:
            if endpoint.address:
                holder = next((a for p, a in ipam.lookup(endpoint.address) if p.network_id == network.id), None)
                if holder is None:
                    ipam.allocate(network.id, endpoint.address, endpoint_id=endpoint.id, container=container.name)
                    log.warning("%s on %s: claimed back %s (this host was reclaimed, or the store lost it)",
                                container.name, network.name, endpoint.address)
                elif holder.endpoint_id != endpoint.id:
                    self._renumber(network, endpoint, holder)
            self._store_claimed(network, endpoint)
        except Exception as e:  # noqa: BLE001 - whatever failed, the container must not keep a contested address
            self._quarantine(network, endpoint, str(e))
        self._save_endpoint_locally(network, endpoint)
        self._write_hosts(container)
        self.local_store.put(CONTAINERS + container.id, container.to_json())

    def _renumber(self, network: Network, endpoint: Endpoint, holder) -> None:
        impl = self.drivers[network.driver]
        old, prefix = endpoint.address, endpoint.ipv4.split("/")[1]
        new = self.ipam[GLOBAL].allocate(network.id, None, within=impl.address_range(network),
                                         endpoint_id=endpoint.id, container=endpoint.container_name)
        # A MAC made from the address (02:42:a.b.c.d, as Docker's) follows it: the new holder of the
        # old address has the old MAC, and one MAC on two hosts confuses every bridge and FDB.
        follows = endpoint.mac == netlink.mac_from_ip(old)
        try:
            with netlink.netns_socket(endpoint.sandbox) as ipr:
                index = netlink.link_index(ipr, endpoint.ifname)
                if follows:
                    ipr.link("set", index=index, state="down")
                    ipr.link("set", index=index, address=netlink.mac_from_ip(new))
                    ipr.link("set", index=index, state="up")
                # The old one first: deleting a primary address takes the secondaries with it.
                ipr.addr("del", index=index, address=old, prefixlen=int(prefix))
                ipr.addr("add", index=index, address=new, prefixlen=int(prefix))
                if endpoint.gateway:
                    ipr.route("replace", dst="0.0.0.0/0", gateway=endpoint.gateway, oif=index)
        except Exception:
            self.ipam[GLOBAL].release_owned(network.id, new, endpoint.id)
            raise
        endpoint.ipv4 = f"{new}/{prefix}"
        if follows:
            endpoint.mac = netlink.mac_from_ip(new)
        endpoint.note = (f"renumbered from {old}: while this host was away, {old} went to "
                         f"{holder.container or 'another container'} on host {holder.host or '?'}")
        log.warning("%s on %s: %s", endpoint.container_name, network.name, endpoint.note)

    def _store_claimed(self, network: Network, endpoint: Endpoint) -> None:
        """The endpoint's record again, with its name if the name is still free on the network."""
        try:
            self._store_endpoint(self.cluster_store, network, endpoint)
        except Conflict as e:   # the name went to another host's container meanwhile
            endpoint.note = "; ".join(filter(None, [endpoint.note, str(e)]))
            try:
                self.cluster_store.create(f"{ENDPOINTS}{network.id}/{endpoint.id}", endpoint.to_json())
            except KeyExists:
                pass
        except KeyExists:
            pass

    def _quarantine(self, network: Network, endpoint: Endpoint, why: str) -> None:
        """The container must not answer on an address it may not hold: its interface goes down."""
        endpoint.note = f"quarantined: could not claim {endpoint.address} back ({why}); interface down"
        log.error("%s on %s: %s", endpoint.container_name, network.name, endpoint.note)
        try:
            with netlink.netns_socket(endpoint.sandbox) as ipr:
                index = netlink.link_index(ipr, endpoint.ifname)
                if index is not None:
                    ipr.link("set", index=index, state="down")
        except Exception as e:  # noqa: BLE001
            log.error("could not take %s of %s down: %s", endpoint.ifname, endpoint.container_name, e)

    def _save_endpoint_locally(self, network: Network, endpoint: Endpoint) -> None:
        self.local_store.put(f"{OWN_ENDPOINTS}{network.id}/{endpoint.id}", endpoint.to_json())
