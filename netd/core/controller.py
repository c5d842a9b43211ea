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
import logging
import os
import socket
import threading

import drivers
from kvstore import KVStore
from kvstore.prefixed import PrefixedStore
from netd.contract.driverapi import Driver, DriverContext, HostInfo
from netd.contract.errors import BadRequest
from netd.contract.model import (
    GLOBAL,
    LOCAL,
    Container,
    Endpoint,
    Network,
)
from netd.core.addresses import IpamAddressBook
from netd.core.attachments import Attachments
from netd.core.cluster import Cluster
from netd.core.clusterevents import ClusterEvents
from netd.core.cni import CniSide
from netd.core.containers import Containers
from netd.core.dns import Resolver
from netd.core.external import External
from netd.core.ipam import IPAM
from netd.core.keys import (
    CONTAINERS,
    ENDPOINTS,
    NETWORKS,
    driver_folder,
)
from netd.core.networks import Networks
from netd.core.ports import Ports
from netd.core.reconcile import Reconcile
from netd.core.recovery import Recovery
from netd.core.resolution import Resolution
from netd.core.state import BUILTIN_NETWORKS, EndpointTable, Paths
from netd.kernel.rtnl import stop_retirer
from runtime import etcfiles, process

log = logging.getLogger("netd.core.controller")


class Controller(Networks, Containers, Attachments, External, Ports, Resolution, ClusterEvents, Recovery, Reconcile):
    """The daemon's core. Its concerns live in the classes it is made of, one module each."""

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
        self._adverts: list = []                        # local subnets to advertise (Networks)
        self._advert_lock = threading.Lock()
        self._advert_thread: threading.Thread | None = None
        self.info_extra = None     # the daemon adds its own facts (socket, stores, firewall) to info()
        self.cni = CniSide(self)   # what a CNI runtime's calls mean (netd as a CNI plugin)

    def _driver_context(self, name: str) -> DriverContext:
        """A driver's view of the daemon: its own folders of the stores, the address book."""
        folder = driver_folder(name)
        return DriverContext(self.host, PrefixedStore(self.local_store, folder),
                             PrefixedStore(self.cluster_store, folder) if self.cluster_store is not None else None,
                             self.firewall, self.paths.run_dir, self.lock, addresses=IpamAddressBook(self.ipam),
                             members=self._members if self.cluster_store is not None else None)

    def _members(self) -> list[str]:
        return self.cluster.members() if self.cluster is not None else [self.host.key]

    # --- start-up and shutdown --------------------------------------------------------------

    def start(self) -> None:
        """Load state, restore data planes and containers, create the default networks."""
        for sub in ("netns", "containers"):
            os.makedirs(os.path.join(self.paths.run_dir, sub), exist_ok=True)
        os.makedirs(os.path.join(self.paths.data_dir, "containers"), exist_ok=True)
        with self.lock:
            self._load_local()
            self._reconcile_local()
        if self.cluster is not None:
            # Outside the lock: the cluster's mirrors call back into the controller as they load.
            self.cluster.start()
            self.members_changed(self.cluster.members())
        with self.lock:
            if self.cluster is not None:
                in_cluster = set()
                for endpoint in self.cluster.endpoints_of_host(self.host_key):
                    self.endpoints.add(endpoint)
                    in_cluster.add(endpoint.id)
                self._load_own_global_endpoints(in_cluster)
            self.resolver.start()
            self._restore()
            self.cni.sweep()
            self._ensure_builtin_networks()
            for network in list(self.networks.values()):   # this host's local subnets, known cluster-wide
                self._advertise_local_subnet(network)
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
            if container.external:
                continue   # no process: its runtime says when it goes (CNI's gone ones: CniSide.sweep)
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

    # --- information ------------------------------------------------------------------------

    def info(self) -> dict:
        from netd.contract import VERSION as __version__

        hosts = self.cluster.host_list() if self.cluster is not None else []
        containers = list(self.containers.values())   # no lock: `netd info` answers during a long operation
        info = {
            "Name": self.host.name,
            "ID": self.host.id,
            "ServerVersion": __version__,
            "Containers": len(containers),
            "ContainersRunning": sum(1 for c in containers if c.state == "running"),
            "Networks": len(self.networks),
            "Drivers": sorted(self.drivers),
        }
        if self.cluster is not None:
            info["ClusterHosts"] = [
                f"{h.get('Address')} ({h.get('Name')}): {'alive' if h['Alive'] else 'dead'}" for h in hosts
            ]
            info["Health"] = self.cluster.health()
            info["VXLANRefused"] = self.firewall.vxlan_refused()
        if self.info_extra is not None:
            info.update(self.info_extra())
        return info

