"""Sandboxes netd did not make: dockerd's (netd as its network plugin) and a CNI runtime's.

Each is a Container record with `external` set ("docker", "cni") and no process: the network
namespace belongs to the runtime. Its endpoints take the same path as those of netd's own
containers (drivers, IPAM, stores, names on global networks), so `netd network inspect`, `ipam`,
`capture` and `trace` see them; the runtime alone says when they come and go.
"""

from __future__ import annotations

import hashlib
import logging
import os

from netd.contract.errors import BadRequest, Conflict, NotFound
from netd.contract.model import Container, Endpoint, PortBinding, check_name, now
from netd.core.keys import CONTAINER_NAMES, CONTAINERS, ENDPOINTS
from netd.core.undo import Undo
from netd.kernel.rtnl import flush_retired

log = logging.getLogger("netd.external")


def external_id(kind: str, key: str) -> str:
    """The record id of runtime `kind`'s sandbox `key`: the same for every call about it."""
    return hashlib.sha256(f"{kind}:{key}".encode()).hexdigest()


class External:
    """The Controller's side of sandboxes other runtimes own."""

    def external_container(self, kind: str, key: str) -> Container | None:
        return self.containers.get(external_id(kind, key))

    def attach_external(self, kind: str, key: str, netns: str, network_ref: str, *, name: str = "",
                        ifname: str | None = None, ip: str | None = None, adopt: bool = False,
                        mac: str = "", configure: bool = True) -> Endpoint:
        """Join runtime `kind`'s sandbox `key` (its namespace at `netns`) to a network; with
        `configure` False, only make its interface there (the runtime sets address and routes)."""
        with self.lock:
            network = self.get_network(network_ref)
            impl = self.drivers[network.driver]
            if impl.namespace_mode:
                raise BadRequest(f"network {network.name} ({network.driver}) is a choice of namespace: "
                                 f"a {kind} sandbox cannot join it")
            cid = external_id(kind, key)
            container = self.containers.get(cid)
            if container is not None and any(e.network_id == network.id for e in self._container_endpoints(container)):
                raise Conflict(f"{container.name} is already attached to network {network.name}")
            new = container is None
            if new:
                name = name or f"{kind}-{key[:12]}"
                check_name("container", name)
                if name in self._container_names:
                    raise Conflict(f"container name {name} is already in use")
                container = Container(id=cid, name=name, cmd=[], hostname=name, network_mode=network.name,
                                      state="running", netns=netns, external=kind, started_at=now())
            with Undo(after_rollback=flush_retired) as undo:
                if new:
                    self.local_store.create(CONTAINER_NAMES + container.name, cid)
                    undo.push(self.local_store.delete, CONTAINER_NAMES + container.name)
                endpoint = self._connect(container, network, ip, [], undo, ifname=ifname, adopt=adopt, mac=mac,
                                         configure=configure)
                self.local_store.put(CONTAINERS + cid, container.to_json())
            self.containers[cid] = container
            self._container_names[container.name] = cid
            log.info("%s sandbox %s joined %s as %s", kind, key[:12], network.name, endpoint.ipv4 or endpoint.id[:12])
            return endpoint

    def relocate_external(self, kind: str, key: str, netns: str, ifname: str = "") -> None:
        """The runtime moved the sandbox's interfaces to its own namespace (dockerd does, after
        netd made them): record where they are now."""
        with self.lock:
            container = self.external_container(kind, key)
            if container is None:
                return
            container.netns = netns
            self.local_store.put(CONTAINERS + container.id, container.to_json())
            for endpoint in self._container_endpoints(container):
                endpoint.sandbox = netns
                endpoint.ifname = ifname or endpoint.ifname
                network = self.networks.get(endpoint.network_id)
                if network is not None:
                    self._save_endpoint(network, endpoint)

    def detach_external(self, kind: str, key: str, network_ref: str | None = None, sandbox_gone: bool | None = None) -> bool:
        """Take the sandbox off `network_ref` (every network: None); its record goes with its last
        endpoint. Idempotent: False when there was nothing to detach."""
        with self.lock:
            container = self.external_container(kind, key)
            if container is None:
                return False
            wanted = self._find_network(network_ref) if network_ref else None
            if network_ref and wanted is None:
                return False
            if sandbox_gone is None:
                sandbox_gone = not container.netns or not os.path.exists(container.netns)
            detached = False
            for endpoint in reversed(self._container_endpoints(container)):
                if wanted is not None and endpoint.network_id != wanted.id:
                    continue
                detached = True
                network = self.networks.get(endpoint.network_id)
                if network is None:   # removed meanwhile: only the record is left
                    self.endpoints.remove(endpoint.id)
                    self.local_store.delete(f"{ENDPOINTS}{endpoint.network_id}/{endpoint.id}")
                    if endpoint.network_id in container.networks:
                        container.networks.remove(endpoint.network_id)
                    continue
                self._disconnect_endpoint(container, network, endpoint, exiting=sandbox_gone, force=True)
            if not self._container_endpoints(container):
                self.local_store.delete(CONTAINERS + container.id)
                self.local_store.delete(CONTAINER_NAMES + container.name)
                self.containers.pop(container.id, None)
                if self._container_names.get(container.name) == container.id:
                    del self._container_names[container.name]
            else:
                self.local_store.put(CONTAINERS + container.id, container.to_json())
            return detached

    def publish_external(self, kind: str, key: str, ports: list[PortBinding]) -> list[PortBinding]:
        """Publish host ports to the sandbox's (first) endpoint; returns them with the host ports
        chosen for those asked as 0."""
        with self.lock:
            container = self.external_container(kind, key)
            endpoints = self._container_endpoints(container) if container is not None else []
            if not endpoints:
                raise NotFound(f"no {kind} sandbox {key[:12]} on this host")
            network = self.networks[endpoints[0].network_id]
            if not self.drivers[network.driver].supports_ports:
                raise BadRequest(f"network {network.name} ({network.driver}) does not publish ports")
            with Undo() as undo:
                container.ports = list(ports)
                undo.push(setattr, container, "ports", [])
                self._publish(container, network, undo)
                self.local_store.put(CONTAINERS + container.id, container.to_json())
            return container.ports

    def unpublish_external(self, kind: str, key: str) -> None:
        with self.lock:
            container = self.external_container(kind, key)
            if container is None or not container.ports:
                return
            for endpoint in self._container_endpoints(container):
                network = self.networks.get(endpoint.network_id)
                if network is not None and self.drivers[network.driver].supports_ports:
                    self.drivers[network.driver].unpublish_ports(network, endpoint, container.ports)
            self._release_port_reservations(container)
            container.ports = []
            self.local_store.put(CONTAINERS + container.id, container.to_json())
