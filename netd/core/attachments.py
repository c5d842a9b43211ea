"""Endpoints: connecting a container to a network and disconnecting it (the CNM join/leave), their
store records and interface names."""


import contextlib
import json
import logging
from ipaddress import IPv4Network

from kvstore import Check, Create, Delete, KeyExists, KVStore, VersionConflict
from netd.contract.driverapi import JoinInfo
from netd.contract.errors import BadRequest, Conflict, NotFound
from netd.contract.model import (
    GLOBAL,
    Container,
    Endpoint,
    Network,
    check_name,
    new_id,
)
from netd.core.containers import refuse_external
from netd.core.keys import (
    CONTAINERS,
    ENDPOINTS,
    NETWORKS,
    OWN_ENDPOINTS,
    endpoint_name_key,
)
from netd.core.undo import Undo
from netd.kernel.rtnl import Rtnl, flush_retired

log = logging.getLogger(__name__)



class Attachments:
    """The Controller's endpoints: connect and disconnect (the CNM join and leave)."""

    # --- connect / disconnect ---------------------------------------------------------------

    def connect(self, network_ref: str, container_ref: str, ip: str | None = None, aliases: list[str] | None = None) -> Endpoint:
        with self.lock:
            network = self.get_network(network_ref)
            container = self.get_container(container_ref)
            refuse_external(container, "connected")
            if container.state != "running":
                raise Conflict(f"container {container.name} is not running")
            if container.network_mode == "host" or container.shares_netns_of:
                raise Conflict(f"container {container.name} shares another network namespace ({container.network_mode}): it cannot join other networks")
            if self.drivers[network.driver].namespace_mode:
                raise Conflict(f"container {container.name} cannot be connected to the {network.name} network after it started")
            if any(e.network_id == network.id for e in self._container_endpoints(container)):
                raise Conflict(f"container {container.name} is already connected to network {network.name}")
            if ip and network.builtin:
                raise BadRequest("--ip needs a user-defined network: create one with netd network create --subnet ...")
            with Undo(after_rollback=flush_retired) as undo:
                endpoint = self._connect(container, network, ip, aliases or [], undo)
                self._write_hosts(container)
                self.local_store.put(CONTAINERS + container.id, container.to_json())
            return endpoint

    def _connect(self, container: Container, network: Network, ip: str | None, aliases: list[str], undo: Undo,
                 ifname: str | None = None, adopt: bool = False, mac: str = "", configure: bool = True) -> Endpoint:
        """Create the endpoint, take its address, plumb it into the sandbox and store it.

        For a sandbox netd did not make: `ifname` the runtime's name for the interface, `adopt`
        an address the IPAM plugin handed out for it, `mac` the runtime's choice."""
        impl = self.drivers[network.driver]
        store = self._store(network.scope)
        for alias in aliases:
            check_name("alias", alias)
        endpoint = Endpoint(
            id=new_id(), network_id=network.id, container_id=container.id, container_name=container.name,
            host=self.host_key, aliases=list(aliases), sandbox=container.netns, mac=mac,
        )
        if impl.has_addresses:
            within = impl.address_range(network)   # hostgw: this host's part of the network
            undo.push(impl.release_address_range, network)
            address = self.ipam[network.scope].allocate(
                network.id, ip, within=within, adopt=adopt, endpoint_id=endpoint.id, container=container.name
            )
            undo.push(self.ipam[network.scope].release, network.id, address)
            endpoint.ipv4 = f"{address}/{IPv4Network(network.ipam.subnet).prefixlen}"
        impl.create_endpoint(network, endpoint)
        undo.push(impl.delete_endpoint, network, endpoint)
        if container.netns and not impl.namespace_mode:
            endpoint.ifname = ifname or self._next_ifname(container)
            set_default = impl.has_addresses and not network.internal and not any(
                e.gateway for e in self._container_endpoints(container)
            )
            impl.join(network, endpoint, JoinInfo(container.netns, endpoint.ifname, set_default, configure))
            undo.push(impl.leave, network, endpoint)
        self._store_endpoint(store, network, endpoint)
        undo.push(self._unstore_endpoint, store, network, endpoint)
        self.endpoints.add(endpoint)
        undo.push(self.endpoints.remove, endpoint.id)
        container.networks.append(network.id)
        undo.push(container.networks.remove, network.id)
        return endpoint

    def _store_endpoint(self, store: KVStore, network: Network, endpoint: Endpoint) -> None:
        """Write the endpoint; on a global network, with its container name reserved in the
        same transaction, so that a name is unique on the network across the cluster."""
        key = f"{ENDPOINTS}{network.id}/{endpoint.id}"
        if network.scope != GLOBAL:
            store.create(key, endpoint.to_json())
            return
        name_key = endpoint_name_key(network.id, endpoint.container_name)
        owner = json.dumps({"Host": endpoint.host, "Endpoint": endpoint.id})
        current = self.cluster.networks.get(NETWORKS + network.id) if self.cluster is not None else None
        known = self._decode(Network.from_json, current) if current is not None else None
        if known is None or known.removing:
            raise Conflict(f"network {network.name} is being removed")
        try:
            # Only while the network is as this host knows it: not marked for removal meanwhile.
            store.commit([Check(NETWORKS + network.id, current.version), Create(key, endpoint.to_json()),
                          Create(name_key, owner)])
            self.local_store.put(f"{OWN_ENDPOINTS}{network.id}/{endpoint.id}", endpoint.to_json())
        except KeyExists as e:
            if e.key != name_key:
                raise
            holder = store.get(name_key)
            where = f" on host {json.loads(holder.value).get('Host')}" if holder else ""
            raise Conflict(f"name {endpoint.container_name} is already used on network {network.name}{where}: "
                           "names are unique on a global network across the cluster") from None
        except VersionConflict as e:
            if e.key != NETWORKS + network.id:
                raise
            raise Conflict(f"network {network.name} changed meanwhile (it may be being removed): try again") from None

    def _unstore_endpoint(self, store: KVStore, network: Network, endpoint: Endpoint) -> None:
        """Remove the endpoint's keys — on a global network only those it still owns: after a
        long outage its name and address may belong to another host's container by now."""
        key = f"{ENDPOINTS}{network.id}/{endpoint.id}"
        if network.scope != GLOBAL:
            store.delete(key)
            return
        ops = [Delete(key)]
        name = store.get(endpoint_name_key(network.id, endpoint.container_name))
        if name is not None and json.loads(name.value).get("Endpoint") == endpoint.id:
            ops.append(Delete(name.key, name.version))
        with contextlib.suppress(VersionConflict):
            store.commit(ops)
        self.local_store.delete(f"{OWN_ENDPOINTS}{network.id}/{endpoint.id}")

    def _save_endpoint(self, network: Network, endpoint: Endpoint) -> None:
        """Write a changed endpoint where it lives (and this host's own copy of a global one)."""
        self._store(network.scope).put(f"{ENDPOINTS}{network.id}/{endpoint.id}", endpoint.to_json())
        if network.scope == GLOBAL:
            self.local_store.put(f"{OWN_ENDPOINTS}{network.id}/{endpoint.id}", endpoint.to_json())

    def _next_ifname(self, container: Container) -> str:
        used = {e.ifname for e in self._container_endpoints(container)}
        n = 0
        while f"eth{n}" in used:
            n += 1
        return f"eth{n}"

    def disconnect(self, network_ref: str, container_ref: str, force: bool = False) -> None:
        with self.lock:
            network = self.get_network(network_ref)
            container = self.get_container(container_ref)
            refuse_external(container, "disconnected")
            endpoint = next((e for e in self._container_endpoints(container) if e.network_id == network.id), None)
            if endpoint is None:
                raise NotFound(f"container {container.name} is not connected to network {network.name}")
            if self.drivers[network.driver].uses_host_namespace:
                raise Conflict(f"container {container.name} uses the host's network namespace and cannot be disconnected from it")
            self._disconnect_endpoint(container, network, endpoint, force=force)
            self._write_hosts(container)
            self.local_store.put(CONTAINERS + container.id, container.to_json())

    def _disconnect_endpoint(self, container: Container, network: Network, endpoint: Endpoint,
                             exiting: bool = False, force: bool = False) -> None:
        """`force` (`disconnect -f`): a driver that fails to undo its part is logged, and the
        endpoint, its address and its records are let go all the same."""
        impl = self.drivers[network.driver]
        if container.ports and impl.supports_ports:
            with contextlib.suppress(Exception):
                impl.unpublish_ports(network, endpoint, container.ports)
        try:
            impl.leave(network, endpoint, sandbox_gone=exiting)
            impl.delete_endpoint(network, endpoint)
        except Exception as e:
            if not force:
                raise
            log.warning("disconnect -f %s from %s: driver %s failed (%s); letting the endpoint go",
                        container.name, network.name, network.driver, e)
        if endpoint.address:
            self._release_address(network, endpoint)
        self._unstore_endpoint(self._store(network.scope), network, endpoint)
        self.endpoints.remove(endpoint.id)
        if network.id in container.networks:
            container.networks.remove(network.id)
        if endpoint.gateway and not exiting:
            self._move_default_route(container)

    def _move_default_route(self, container: Container) -> None:
        """The network that gave the default route left: take it from another one, if any."""
        for endpoint in self._container_endpoints(container):
            network = self.networks.get(endpoint.network_id)
            gateway = self.drivers[network.driver].default_gateway(network) if network else None
            if gateway:
                with Rtnl(container.netns) as inside:
                    inside.replace_default_route(gateway, inside.link_index(endpoint.ifname))
                endpoint.gateway = gateway
                self._save_endpoint(network, endpoint)
                return
