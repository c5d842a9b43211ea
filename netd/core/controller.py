"""The controller: CNM objects and their lifecycle (libnetwork's controller.go, in small).

It owns networks, endpoints and containers, keeps them in the stores, asks IPAM for
addresses, the drivers for data planes and the runtime for sandboxes and processes.
Every operation is all-or-nothing (netd.core.undo): a failure at any step undoes the steps
before it, so no veth, namespace, address or store key is left behind.

State lives in the stores; the controller keeps an in-memory copy for speed and takes
`self.lock` around every change.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import threading
from dataclasses import dataclass
from ipaddress import IPv4Network

import drivers
from kvstore import Create, Delete, KeyExists, KVStore, StoreError, VersionConflict
from kvstore.prefixed import PrefixedStore
from netd.contract.driverapi import Driver, DriverContext, HostInfo, JoinInfo
from netd.contract.errors import BadRequest, Conflict, NotFound
from netd.contract.model import (
    GLOBAL,
    LOCAL,
    Container,
    Endpoint,
    IPAMConfig,
    Network,
    PortBinding,
    check_name,
    new_id,
    now,
)
from netd.core.addresses import IpamAddressBook
from netd.core.cluster import Cluster
from netd.core.dns import Resolver
from netd.core.ipam import IPAM, parse_address
from netd.core.keys import (
    CONTAINER_NAMES,
    CONTAINERS,
    ENDPOINTS,
    NETWORK_NAMES,
    NETWORKS,
    driver_folder,
    endpoint_name_key,
)
from netd.core.names import random_name
from netd.core.undo import Undo
from netd.kernel import netlink
from netd.kernel.rtnl import Rtnl, flush_retired, stop_retirer
from runtime import etcfiles, namespaces, process
from runtime.errors import RuntimeFailure

log = logging.getLogger("netd.core.controller")


DEFAULT_BRIDGE_NETWORK = "bridge"
BUILTIN_NETWORKS = {"bridge": "bridge", "host": "host", "none": "null"}
STOP_TIMEOUT = 10.0


@dataclass
class Paths:
    run_dir: str
    data_dir: str

    def netns(self, container_id: str) -> str:
        return os.path.join(self.run_dir, "netns", container_id[:12])

    def container_run_dir(self, container_id: str) -> str:
        return os.path.join(self.run_dir, "containers", container_id)

    def container_data_dir(self, container_id: str) -> str:
        return os.path.join(self.data_dir, "containers", container_id)

    def log_file(self, container_id: str) -> str:
        return os.path.join(self.container_data_dir(container_id), "container.log")


class EndpointTable:
    """The endpoints on this host, findable by id, by container and by network in O(1): the
    attach path asks several times, and a host may hold thousands."""

    def __init__(self) -> None:
        self._by_id: dict[str, Endpoint] = {}
        self._by_container: dict[str, dict[str, Endpoint]] = {}
        self._by_network: dict[str, dict[str, Endpoint]] = {}

    def add(self, endpoint: Endpoint) -> None:
        self.remove(endpoint.id)
        self._by_id[endpoint.id] = endpoint
        self._by_container.setdefault(endpoint.container_id, {})[endpoint.id] = endpoint
        self._by_network.setdefault(endpoint.network_id, {})[endpoint.id] = endpoint

    def remove(self, endpoint_id: str) -> Endpoint | None:
        endpoint = self._by_id.pop(endpoint_id, None)
        if endpoint is not None:
            for index, key in ((self._by_container, endpoint.container_id), (self._by_network, endpoint.network_id)):
                index[key].pop(endpoint_id, None)
                if not index[key]:
                    del index[key]
        return endpoint

    def __contains__(self, endpoint_id: str) -> bool:
        return endpoint_id in self._by_id

    def __getitem__(self, endpoint_id: str) -> Endpoint:
        return self._by_id[endpoint_id]

    def get(self, endpoint_id: str) -> Endpoint | None:
        return self._by_id.get(endpoint_id)

    def ids(self) -> set[str]:
        return set(self._by_id)

    def of_container(self, container_id: str) -> list[Endpoint]:
        return list(self._by_container.get(container_id, {}).values())

    def of_network(self, network_id: str) -> list[Endpoint]:
        return list(self._by_network.get(network_id, {}).values())


class Controller:
    def __init__(
        self,
        paths: Paths,
        host: HostInfo,
        local_store: KVStore,
        firewall,
        cluster_store: KVStore | None = None,
        reaper: process.Reaper | None = None,
        resolv_conf: str = "/etc/resolv.conf",
        host_ttl: float = 15.0,
        reclaim_after: float = 60.0,
    ):
        self.paths = paths
        self.host = host
        self.local_store = local_store
        self.cluster_store = cluster_store
        self.firewall = firewall
        self.lock = threading.RLock()
        self.reaper = reaper or process.Reaper()
        self.host_resolv_conf = etcfiles.read_resolv_conf(resolv_conf)
        self.resolver = Resolver(self.resolve_name, self.resolve_address, resolv_conf)
        # How endpoints and allocations name this host: its advertise address in a cluster.
        self.host_key = host.key
        self.ipam = {LOCAL: IPAM(local_store, self.host_key, LOCAL)}
        self.cluster: Cluster | None = None
        if cluster_store is not None:
            self.ipam[GLOBAL] = IPAM(cluster_store, self.host_key, GLOBAL)
            self.cluster = Cluster(cluster_store, host, self, ttl=host_ttl, reclaim_after=reclaim_after)
        self.drivers: dict[str, Driver] = drivers.load_drivers(self._driver_context)
        self.networks: dict[str, Network] = {}
        self.endpoints = EndpointTable()                # endpoints on this host (any scope)
        self.containers: dict[str, Container] = {}
        self._container_names: dict[str, str] = {}     # name -> id
        self._port_reservations: dict[tuple[str, str, int], socket.socket] = {}
        self._exit_waiters: dict[str, threading.Event] = {}
        self._removal_held: set[str] = set()
        self.info_extra = None     # the daemon adds its own facts (socket, stores, firewall) to info()

    def _driver_context(self, name: str) -> DriverContext:
        """A driver's view of the daemon: its own folders of the stores, the address book."""
        folder = driver_folder(name)
        return DriverContext(self.host, PrefixedStore(self.local_store, folder),
                             PrefixedStore(self.cluster_store, folder) if self.cluster_store is not None else None,
                             self.firewall, self.paths.run_dir, self.lock, addresses=IpamAddressBook(self.ipam))

    # --- start-up and shutdown --------------------------------------------------------------

    def start(self) -> None:
        """Load state, restore data planes and containers, create the default networks."""
        for sub in ("netns", "containers"):
            os.makedirs(os.path.join(self.paths.run_dir, sub), exist_ok=True)
        os.makedirs(os.path.join(self.paths.data_dir, "containers"), exist_ok=True)
        with self.lock:
            self._load_local()
        if self.cluster is not None:
            # Outside the lock: the cluster's mirrors call back into the controller as they load.
            self.cluster.start()
        with self.lock:
            if self.cluster is not None:
                for endpoint in self.cluster.endpoints_of_host(self.host_key):
                    self.endpoints.add(endpoint)
            self.resolver.start()
            self._restore()
            self._ensure_builtin_networks()
        if self.cluster is not None:
            self.store_reconnected()

    def close(self) -> None:
        """Stop serving; containers and their networking keep running (restored on restart)."""
        if self.cluster is not None:
            self.cluster.stop()
        self.resolver.stop()
        for driver in self.drivers.values():
            driver.close()
        stop_retirer()
        for sock in self._port_reservations.values():
            sock.close()

    def _load_local(self) -> None:
        """Local networks, endpoints and containers; the global ones come from the cluster."""
        pairs, _ = self.local_store.list(NETWORKS)
        for pair in pairs:
            network = self._decode(Network.from_json, pair)
            if network:
                self.networks[network.id] = network
        pairs, _ = self.local_store.list(ENDPOINTS)
        for pair in pairs:
            endpoint = self._decode(Endpoint.from_json, pair)
            if endpoint:
                self.endpoints.add(endpoint)
        pairs, _ = self.local_store.list(CONTAINERS)
        for pair in pairs:
            container = self._decode(Container.from_json, pair)
            if container:
                self.containers[container.id] = container
                self._container_names[container.name] = container.id

    @staticmethod
    def _decode(parse, pair):
        try:
            return parse(pair.value)
        except (ValueError, TypeError, KeyError) as e:
            log.error("ignoring corrupt value at %s in the store: %s", pair.key, e)
            return None

    def _restore(self) -> None:
        for network in self.networks.values():
            endpoints = self.endpoints.of_network(network.id)
            try:
                self.drivers[network.driver].restore(network, endpoints)
            except Exception as e:  # noqa: BLE001 - one broken network must not stop the others
                log.error("could not restore network %s: %s", network.name, e)
        for driver in self.drivers.values():
            try:
                driver.restore_done()
            except Exception as e:  # noqa: BLE001
                log.error("driver %s could not clean up after restoring: %s", driver.name, e)
        for container in list(self.containers.values()):
            if container.state != "running":
                continue
            if process.is_running(container.pid, container.start_time):
                self._watch_exit(container)
                if container.netns and not container.shares_netns_of:
                    with contextlib.suppress(OSError):
                        self.resolver.add_sandbox(container.id, container.netns)
                self._reserve_ports(container, container.ports, restoring=True)
                self._program_ports(container, container.ports)
            else:
                log.info("container %s exited while the daemon was down", container.name)
                self._on_exit(container.id, None)

    def _ensure_builtin_networks(self) -> None:
        for name, driver in BUILTIN_NETWORKS.items():
            if self._find_network(name) is not None:
                continue
            self.create_network(name=name, driver=driver, builtin=True)

    # --- stores -----------------------------------------------------------------------------

    def _store(self, scope: str) -> KVStore:
        if scope == GLOBAL:
            if self.cluster_store is None:
                raise BadRequest("global networks need a cluster store: start the daemon with --cluster-store etcd://HOST:PORT")
            return self.cluster_store
        return self.local_store

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
        """The cluster store is back (or we just started): free addresses this host took but
        never used, e.g. when the store went away in the middle of a `netd run`."""
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
    ) -> Network:
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
                id=new_id(), name=name, driver=driver, scope=scope, internal=internal, ipam=ipam_config,
                options=dict(options or {}), labels=dict(labels or {}), builtin=builtin,
            )
            impl.validate(network)
            store = self._store(scope)
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
            log.info("created network %s (%s, %s)", name, driver, network.ipam.subnet if network.ipam else "no addresses")
            return network

    def _subnets_to_avoid(self, scope: str) -> list[IPv4Network]:
        """Default pools must not overlap the host's routes nor pools of the other scope."""
        avoid = []
        for cidr in netlink.host_routes():
            with contextlib.suppress(ValueError):
                avoid.append(IPv4Network(cidr, strict=False))
        for other_scope, ipam in self.ipam.items():
            if other_scope != scope:
                avoid.extend(IPv4Network(p.subnet) for p in ipam.pools())
        return avoid

    def _find_network(self, ref: str) -> Network | None:
        by_name = [n for n in self.networks.values() if n.name == ref]
        if by_name:
            return by_name[0]
        if ref in self.networks:
            return self.networks[ref]
        matches = [n for n in self.networks.values() if n.id.startswith(ref)] if len(ref) >= 3 else []
        if len(matches) > 1:
            raise BadRequest(f"network id prefix {ref} is ambiguous: give more characters")
        return matches[0] if matches else None

    def get_network(self, ref: str) -> Network:
        with self.lock:
            network = self._find_network(ref)
            if network is None:
                raise NotFound(f"network {ref} not found")
            return network

    def list_networks(self) -> list[Network]:
        with self.lock:
            return sorted(self.networks.values(), key=lambda n: n.name)

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
            store = self._store(network.scope)
            self.drivers[network.driver].delete_network(network)
            if network.driver in self.drivers and self.drivers[network.driver].has_addresses:
                self.ipam[network.scope].release_pool(network.id)
            store.delete(NETWORKS + network.id)
            store.delete(NETWORK_NAMES + network.name)
            del self.networks[network.id]
            log.info("removed network %s", network.name)

    def prune_networks(self) -> list[str]:
        removed = []
        with self.lock:
            for network in self.list_networks():
                if not network.builtin and not self.network_endpoints(network):
                    self.remove_network(network.id)
                    removed.append(network.name)
        return removed

    # --- containers: run --------------------------------------------------------------------

    def run(
        self,
        cmd: list[str],
        name: str | None = None,
        hostname: str | None = None,
        network: str = DEFAULT_BRIDGE_NETWORK,
        ip: str | None = None,
        aliases: list[str] | None = None,
        ports: list[PortBinding] | None = None,
        publish_all: bool = False,
        expose: list[str] | None = None,
        rootfs: str | None = None,
        env: dict[str, str] | None = None,
        detach: bool = False,
        auto_remove: bool = False,
        hold_removal: bool = False,
    ) -> Container:
        """Create and start a container. `hold_removal` keeps an --rm container's record
        after it exits until release_removal(), so a foreground client gets all its output."""
        if not cmd:
            raise BadRequest("no command given: netd run [OPTIONS] [--] CMD [ARG...]")
        if rootfs is not None and not os.path.isdir(rootfs):
            raise BadRequest(f"--rootfs {rootfs}: no such directory")
        ports = list(ports or [])
        with self.lock:
            if name is None:
                name = self._unused_name()
            check_name("container", name)
            if self._find_container(name, exact_name=True) is not None:
                raise Conflict(f"container name {name} is already in use: remove it or choose another --name")
            container_id = new_id()
            container = Container(
                id=container_id, name=name, cmd=list(cmd), hostname=hostname or container_id[:12],
                network_mode=network, rootfs=rootfs, env=dict(env or {}), detach=detach,
                auto_remove=auto_remove, ports=ports, publish_all=publish_all, exposed=list(expose or []),
            )
            mode_network, shared = self._resolve_network_mode(container, ip, ports, publish_all)
            with Undo(after_rollback=flush_retired) as undo:
                self.local_store.create(CONTAINER_NAMES + name, container_id)
                undo.push(self.local_store.delete, CONTAINER_NAMES + name)
                self._make_sandbox(container, mode_network, shared, undo)
                if mode_network is not None:
                    self._connect(container, mode_network, ip, aliases or [], undo)
                    if ports or publish_all:
                        self._publish(container, mode_network, undo)
                self._write_etc_files(container)
                self._start_process(container, shared, undo)
                self.local_store.create(CONTAINERS + container_id, container.to_json())
            self.containers[container_id] = container
            self._container_names[name] = container_id
            if hold_removal:
                self._removal_held.add(container_id)
            self._watch_exit(container)
            log.info("started container %s (%s)", name, container.short_id)
            return container

    def _unused_name(self) -> str:
        for _ in range(100):
            name = random_name()
            if self._find_container(name, exact_name=True) is None:
                return name
        return f"{random_name()}_{new_id()[:6]}"

    def _resolve_network_mode(self, container, ip, ports, publish_all) -> tuple[Network | None, Container | None]:
        """The network to join (None for container: mode) and the container whose namespace
        is shared, after checking the mode's rules."""
        mode = container.network_mode
        if mode.startswith("container:"):
            target = self._find_container(mode.split(":", 1)[1])
            if target is None:
                raise NotFound(f"container {mode.split(':', 1)[1]} not found (in --network {mode})")
            if target.state != "running":
                raise Conflict(f"cannot join the network namespace of container {target.name}: it is not running")
            if ports or publish_all:
                raise BadRequest("conflicting options: ports cannot be published in container: network mode (publish them on the other container)")
            if ip:
                raise BadRequest("conflicting options: --ip cannot be used in container: network mode")
            root = self._find_container(target.shares_netns_of) if target.shares_netns_of else target
            container.network_mode = f"container:{target.id}"
            container.netns = root.netns if root else target.netns
            return None, target
        network = self.get_network(mode)
        if self.drivers[network.driver].namespace_mode and (ports or publish_all):
            raise BadRequest(f"conflicting options: ports cannot be published with --network {network.name}")
        if self.drivers[network.driver].namespace_mode and ip:
            raise BadRequest(f"conflicting options: --ip cannot be used with --network {network.name}")
        if ip and network.builtin:
            raise BadRequest("--ip needs a user-defined network: create one with netd network create --subnet ...")
        if (ports or publish_all) and not self.drivers[network.driver].supports_ports:
            raise BadRequest(f"driver {network.driver} cannot publish ports")
        container.network_mode = network.name
        return network, None

    def _make_sandbox(self, container: Container, network: Network | None, shared: Container | None, undo: Undo) -> None:
        run_dir = self.paths.container_run_dir(container.id)
        data_dir = self.paths.container_data_dir(container.id)
        os.makedirs(run_dir, exist_ok=True)
        undo.push(shutil.rmtree, run_dir, True)
        os.makedirs(data_dir, exist_ok=True)
        undo.push(shutil.rmtree, data_dir, True)
        if shared is not None or (network is not None and self.drivers[network.driver].uses_host_namespace):
            return
        container.netns = self.paths.netns(container.id)
        namespaces.create_netns(container.netns)
        undo.push(namespaces.delete_netns, container.netns)
        with namespaces.entered_netns(container.netns):
            # netd's networks are IPv4: without this every interface joining the container runs
            # IPv6 autoconfiguration (DAD, MLD), which made attach 2-3x slower at 1000 endpoints.
            for scope in ("all", "default"):
                netlink.set_sysctl(f"net/ipv6/conf/{scope}/disable_ipv6", "1")
        self.resolver.add_sandbox(container.id, container.netns)
        undo.push(self.resolver.remove_sandbox, container.id)

    def _write_etc_files(self, container: Container) -> None:
        run_dir = self.paths.container_run_dir(container.id)
        owner = self._netns_owner(container)
        if owner is not container:
            # container: mode shares the other container's view, as Docker does
            for fname in ("hosts", "resolv.conf"):
                shutil.copyfile(os.path.join(self.paths.container_run_dir(owner.id), fname), os.path.join(run_dir, fname))
        else:
            self._write_hosts(container)
            if container.netns:
                resolv = etcfiles.embedded_resolv_conf(self.host_resolv_conf)
            else:
                resolv = self.host_resolv_conf
            etcfiles.write_in_place(os.path.join(run_dir, "resolv.conf"), resolv.render())
        etcfiles.write_in_place(os.path.join(run_dir, "hostname"), container.hostname + "\n")

    def _write_hosts(self, container: Container) -> None:
        if container.network_mode == "host":
            with open("/etc/hosts") as f:
                content = f.read()
        else:
            addresses = [e.address for e in self._container_endpoints(container) if e.address]
            content = etcfiles.render_hosts(container.hostname, addresses)
        etcfiles.write_in_place(os.path.join(self.paths.container_run_dir(container.id), "hosts"), content)

    def _start_process(self, container: Container, shared: Container | None, undo: Undo) -> None:
        run_dir = self.paths.container_run_dir(container.id)
        spec = process.ProcessSpec(
            cmd=container.cmd,
            netns_path=container.netns or None,
            hostname=None if container.network_mode == "host" else container.hostname,
            etc_files={
                "/etc/hosts": os.path.join(run_dir, "hosts"),
                "/etc/resolv.conf": os.path.join(run_dir, "resolv.conf"),
                "/etc/hostname": os.path.join(run_dir, "hostname"),
            },
            rootfs=container.rootfs,
            env=container.env,
            log_path=self.paths.log_file(container.id),
        )
        try:
            handle = process.spawn(spec)
        except RuntimeFailure:
            raise
        except (OSError, RuntimeError, ValueError) as e:
            raise BadRequest(f"cannot start {container.cmd[0]}: {e}") from None
        undo.push(process.kill, handle)
        container.pid, container.start_time = handle.pid, handle.start_time
        container.state = "running"
        container.started_at = now()

    # --- containers: exit, stop, remove -----------------------------------------------------

    def _watch_exit(self, container: Container) -> None:
        self._exit_waiters.setdefault(container.id, threading.Event())
        self.reaper.on_exit(container.pid, lambda _pid, code, cid=container.id: self._on_exit(cid, code))

    def _on_exit(self, container_id: str, exit_code: int | None) -> None:
        """The container's process ended: tear down its networking, keep its record."""
        with self.lock:
            container = self.containers.get(container_id)
            if container is None or container.state == "exited":
                return
            container.state = "exited"
            container.exit_code = exit_code
            container.finished_at = now()
            self._teardown_networking(container)
            if container.auto_remove and container_id not in self._removal_held:
                self._delete_container(container)
            else:
                self.local_store.put(CONTAINERS + container.id, container.to_json())
        waiter = self._exit_waiters.pop(container_id, None)
        if waiter:
            waiter.set()
        log.info("container %s exited (%s)", container.name, "unknown code" if exit_code is None else exit_code)

    def _teardown_networking(self, container: Container) -> None:
        for endpoint in reversed(self._container_endpoints(container)):
            network = self.networks.get(endpoint.network_id)
            if network is not None:
                try:
                    self._disconnect_endpoint(container, network, endpoint, exiting=True)
                except Exception as e:  # noqa: BLE001 - free what can be freed
                    log.error("while tearing down %s on %s: %s", container.name, network.name, e)
        self._release_port_reservations(container)
        self.resolver.remove_sandbox(container.id)
        if container.netns and not container.shares_netns_of:
            namespaces.delete_netns(container.netns)

    def release_removal(self, container_id: str) -> None:
        with self.lock:
            self._removal_held.discard(container_id)
            container = self.containers.get(container_id)
            if container is not None and container.auto_remove and container.state == "exited":
                self._delete_container(container)

    def wait(self, ref: str, timeout: float | None = None) -> Container:
        container = self.get_container(ref)
        waiter = self._exit_waiters.get(container.id)
        if waiter is not None and container.state == "running":
            waiter.wait(timeout)
        return self.containers.get(container.id, container)

    def stop(self, ref: str, timeout: float = STOP_TIMEOUT) -> Container:
        container = self.get_container(ref)
        if container.state == "running":
            process.stop(process.ProcessHandle(container.pid, container.start_time), timeout)
            self.wait(container.id, timeout=5)
        return container

    def remove(self, ref: str, force: bool = False) -> Container:
        with self.lock:
            container = self.get_container(ref)
            dependants = [c.name for c in self.containers.values()
                          if c.shares_netns_of == container.id and c.state == "running"]
            if dependants:
                raise Conflict(f"container {container.name} shares its network with running {', '.join(dependants)}: remove those first")
            if container.state == "running" and not force:
                raise Conflict(f"container {container.name} is running: stop it first or use netd rm -f")
        if container.state == "running":
            process.kill(process.ProcessHandle(container.pid, container.start_time))
            self.wait(container.id, timeout=5)
        with self.lock:
            if container.id in self.containers:
                if container.state == "running":  # no exit notice came: tear down ourselves
                    self._on_exit(container.id, None)
                if container.id in self.containers:
                    self._delete_container(container)
        return container

    def _delete_container(self, container: Container) -> None:
        self.local_store.delete(CONTAINERS + container.id)
        self.local_store.delete(CONTAINER_NAMES + container.name)
        shutil.rmtree(self.paths.container_run_dir(container.id), ignore_errors=True)
        shutil.rmtree(self.paths.container_data_dir(container.id), ignore_errors=True)
        self.containers.pop(container.id, None)
        if self._container_names.get(container.name) == container.id:
            del self._container_names[container.name]

    # --- containers: queries ----------------------------------------------------------------

    def _find_container(self, ref: str | None, exact_name: bool = False) -> Container | None:
        if not ref:
            return None
        by_name = self._container_names.get(ref)
        if by_name is not None:
            return self.containers[by_name]
        if exact_name:
            return None
        if ref in self.containers:
            return self.containers[ref]
        matches = [c for c in self.containers.values() if c.id.startswith(ref)] if len(ref) >= 3 else []
        if len(matches) > 1:
            raise BadRequest(f"container id prefix {ref} is ambiguous: give more characters")
        return matches[0] if matches else None

    def get_container(self, ref: str) -> Container:
        with self.lock:
            container = self._find_container(ref)
            if container is None:
                raise NotFound(f"no such container: {ref}")
            return container

    def list_containers(self, all_states: bool = False) -> list[Container]:
        with self.lock:
            found = [c for c in self.containers.values() if all_states or c.state == "running"]
        return sorted(found, key=lambda c: (c.created, c.id), reverse=True)

    def _container_endpoints(self, container: Container) -> list[Endpoint]:
        found = self.endpoints.of_container(container.id)
        order = {nid: i for i, nid in enumerate(container.networks)}
        return sorted(found, key=lambda e: order.get(e.network_id, len(order)))

    def container_endpoints(self, container: Container) -> list[Endpoint]:
        with self.lock:
            return self._container_endpoints(container)

    def _netns_owner(self, container: Container) -> Container:
        if container.shares_netns_of:
            return self.containers.get(container.shares_netns_of, container)
        return container

    def netns_owner(self, container: Container) -> Container:
        """The container whose namespace `container` runs in (itself, or the one it shares)."""
        with self.lock:
            return self._netns_owner(container)

    def local_endpoint(self, endpoint_id: str) -> Endpoint | None:
        """An endpoint on this host, by id."""
        with self.lock:
            return self.endpoints.get(endpoint_id)

    def container_by_id(self, container_id: str) -> Container | None:
        with self.lock:
            return self.containers.get(container_id)

    def network_by_id(self, network_id: str) -> Network | None:
        with self.lock:
            return self.networks.get(network_id)

    def driver_of(self, network: Network) -> Driver | None:
        """The network's driver, None if this daemon does not have it."""
        return self.drivers.get(network.driver)

    # --- connect / disconnect ---------------------------------------------------------------

    def connect(self, network_ref: str, container_ref: str, ip: str | None = None, aliases: list[str] | None = None) -> Endpoint:
        with self.lock:
            network = self.get_network(network_ref)
            container = self.get_container(container_ref)
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

    def _connect(self, container: Container, network: Network, ip: str | None, aliases: list[str], undo: Undo) -> Endpoint:
        """Create the endpoint, take its address, plumb it into the sandbox and store it."""
        impl = self.drivers[network.driver]
        store = self._store(network.scope)
        for alias in aliases:
            check_name("alias", alias)
        endpoint = Endpoint(
            id=new_id(), network_id=network.id, container_id=container.id, container_name=container.name,
            host=self.host_key, aliases=list(aliases), sandbox=container.netns,
        )
        if impl.has_addresses:
            within = impl.address_range(network)   # hostgw: this host's part of the network
            undo.push(impl.release_address_range, network)
            address = self.ipam[network.scope].allocate(
                network.id, ip, within=within, endpoint_id=endpoint.id, container=container.name
            )
            undo.push(self.ipam[network.scope].release, network.id, address)
            endpoint.ipv4 = f"{address}/{IPv4Network(network.ipam.subnet).prefixlen}"
        impl.create_endpoint(network, endpoint)
        undo.push(impl.delete_endpoint, network, endpoint)
        if container.netns and not impl.namespace_mode:
            endpoint.ifname = self._next_ifname(container)
            set_default = impl.has_addresses and not network.internal and not any(
                e.gateway for e in self._container_endpoints(container)
            )
            impl.join(network, endpoint, JoinInfo(container.netns, endpoint.ifname, set_default))
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
        try:
            store.commit([Create(key, endpoint.to_json()), Create(name_key, owner)])
        except KeyExists as e:
            if e.key != name_key:
                raise
            holder = store.get(name_key)
            where = f" on host {json.loads(holder.value).get('Host')}" if holder else ""
            raise Conflict(f"name {endpoint.container_name} is already used on network {network.name}{where}: "
                           "names are unique on a global network across the cluster") from None

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
            endpoint = next((e for e in self._container_endpoints(container) if e.network_id == network.id), None)
            if endpoint is None:
                raise NotFound(f"container {container.name} is not connected to network {network.name}")
            if self.drivers[network.driver].uses_host_namespace:
                raise Conflict(f"container {container.name} uses the host's network namespace and cannot be disconnected from it")
            self._disconnect_endpoint(container, network, endpoint)
            self._write_hosts(container)
            self.local_store.put(CONTAINERS + container.id, container.to_json())

    def _disconnect_endpoint(self, container: Container, network: Network, endpoint: Endpoint, exiting: bool = False) -> None:
        impl = self.drivers[network.driver]
        if container.ports and impl.supports_ports:
            with contextlib.suppress(Exception):
                impl.unpublish_ports(network, endpoint, container.ports)
        impl.leave(network, endpoint, sandbox_gone=exiting)
        impl.delete_endpoint(network, endpoint)
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
                self._store(network.scope).put(f"{ENDPOINTS}{network.id}/{endpoint.id}", endpoint.to_json())
                return

    # --- published ports --------------------------------------------------------------------

    def _publish(self, container: Container, network: Network, undo: Undo) -> None:
        impl = self.drivers[network.driver]
        ports = list(container.ports)
        if container.publish_all:
            listed = {(p.container_port, p.proto) for p in ports}
            for spec in container.exposed:
                port, proto = parse_port_proto(spec)
                if (port, proto) not in listed:
                    ports.append(PortBinding(port, proto))
        for port in ports:
            if not port.host_ip:
                port.host_ip = impl.default_host_ip(network)
        self._reserve_ports(container, ports)
        undo.push(self._release_port_reservations, container)
        container.ports = ports
        endpoint = next(e for e in self._container_endpoints(container) if e.network_id == network.id)
        impl.publish_ports(network, endpoint, ports)
        undo.push(impl.unpublish_ports, network, endpoint, ports)

    def _program_ports(self, container: Container, ports: list[PortBinding]) -> None:
        """Re-install a running container's port rules (after a restart)."""
        for endpoint in self._container_endpoints(container):
            network = self.networks.get(endpoint.network_id)
            if network and self.drivers[network.driver].supports_ports and ports:
                try:
                    self.drivers[network.driver].publish_ports(network, endpoint, ports)
                except Exception as e:  # noqa: BLE001
                    log.error("could not restore published ports of %s: %s", container.name, e)
                return

    def _reserve_ports(self, container: Container, ports: list[PortBinding], restoring: bool = False) -> None:
        """Hold each published host port with a bound socket, as Docker's proxy does: no other
        program can take it, and a port already in use is refused up front."""
        taken: list[tuple[str, str, int]] = []
        try:
            for port in ports:
                key = (port.proto, port.host_ip, port.host_port)
                if port.host_port and key in self._port_reservations and not restoring:
                    holder = self._port_holder(port)
                    raise Conflict(f"port {port.host_port}/{port.proto} is already published by container {holder}")
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM if port.proto == "tcp" else socket.SOCK_DGRAM)
                try:
                    sock.bind((port.host_ip or "0.0.0.0", port.host_port))
                except OSError as e:
                    sock.close()
                    if restoring:
                        log.warning("port %s/%s could not be reserved again: %s", port.host_port, port.proto, e)
                        continue
                    where = f"{port.host_ip}:" if port.host_ip else ""
                    raise Conflict(f"port {where}{port.host_port}/{port.proto} is already in use on the host: {e.strerror}") from None
                port.host_port = sock.getsockname()[1]
                key = (port.proto, port.host_ip, port.host_port)
                self._port_reservations[key] = sock
                taken.append(key)
        except Exception:
            for key in taken:
                self._port_reservations.pop(key).close()
            raise

    def _port_holder(self, port: PortBinding) -> str:
        for c in self.containers.values():
            if any((p.proto, p.host_ip, p.host_port) == (port.proto, port.host_ip, port.host_port) for p in c.ports):
                return c.name
        return "another container"

    def _release_port_reservations(self, container: Container) -> None:
        for port in container.ports:
            sock = self._port_reservations.pop((port.proto, port.host_ip, port.host_port), None)
            if sock is not None:
                sock.close()

    # --- name resolution --------------------------------------------------------------------

    def _resolvable_networks(self, asker: Container) -> list[Network]:
        """Networks whose names the container sees: its user-defined ones (as Docker)."""
        networks = [self.networks[e.network_id] for e in self._container_endpoints(asker)
                    if e.network_id in self.networks]
        return [n for n in networks if not n.builtin and n.ipam]

    def resolve_name(self, container_id: str, name: str) -> list[str] | None:
        """Addresses of `name` as seen by container_id (None: not a name netd knows).

        A name may be a container name, an alias or a short container id; `name.network`
        picks one network.
        """
        with self.lock:
            asker = self.containers.get(container_id)
            if asker is None:
                return None
            networks = self._resolvable_networks(asker)
            wanted, only = name, None
            for network in networks:
                suffix = "." + network.name.lower()
                if name.endswith(suffix):
                    wanted, only = name[: -len(suffix)], network.id
            found: list[str] = []
            for network in networks:
                if only and network.id != only:
                    continue
                for endpoint in self.network_endpoints(network):
                    names = {endpoint.container_name.lower(), endpoint.container_id[:12]}
                    names.update(a.lower() for a in endpoint.aliases)
                    if wanted in names and endpoint.address and endpoint.address not in found:
                        found.append(endpoint.address)
            return found or None

    def resolve_address(self, container_id: str, address: str) -> str | None:
        """The name of the container holding `address` on one of the asker's networks, as
        `name.network` (Docker's PTR answer)."""
        with self.lock:
            asker = self.containers.get(container_id)
            if asker is None:
                return None
            for network in self._resolvable_networks(asker):
                for endpoint in self.network_endpoints(network):
                    if endpoint.address == address:
                        return f"{endpoint.container_name}.{network.name}"
            return None

    # --- information ------------------------------------------------------------------------

    def info(self) -> dict:
        from netd.contract import VERSION as __version__

        hosts = self.cluster.host_list() if self.cluster is not None else []
        with self.lock:
            running = sum(1 for c in self.containers.values() if c.state == "running")
            info = {
                "Name": self.host.name,
                "ID": self.host.id,
                "ServerVersion": __version__,
                "Containers": len(self.containers),
                "ContainersRunning": running,
                "Networks": len(self.networks),
                "Drivers": sorted(self.drivers),
            }
            if self.cluster is not None:
                info["ClusterHosts"] = [
                    f"{h.get('Address')} ({h.get('Name')}): {'alive' if h['Alive'] else 'dead'}" for h in hosts
                ]
        if self.info_extra is not None:
            info.update(self.info_extra())
        return info

    def network_warning(self, network: Network) -> str:
        """Something the user should know about a network that was created anyway."""
        impl = self.drivers.get(network.driver)
        return impl.network_warning(network) if impl is not None else ""

    # --- IPAM queries -----------------------------------------------------------------------

    def ipam_pools(self) -> list[dict]:
        rows = []
        for scope, ipam in self.ipam.items():
            for pool in ipam.pools():
                size, used = ipam.usage(pool)
                rows.append({"Network": pool.network_name, "NetworkID": pool.network_id, "Scope": scope,
                             "Subnet": pool.subnet, "IPRange": pool.ip_range or "", "Gateway": pool.gateway or "",
                             "Size": size, "Used": used, "Free": size - used})
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



def parse_port_proto(spec: str) -> tuple[int, str]:
    port, _, proto = spec.partition("/")
    proto = proto or "tcp"
    if proto not in ("tcp", "udp") or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadRequest(f"invalid port {spec!r}: expected PORT[/tcp|/udp] with PORT from 1 to 65535")
    return int(port), proto
