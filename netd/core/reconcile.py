"""The Controller's reconciliation at start: after a `kill -9` at any point, nothing is orphaned.

Every operation writes its records in an order that a crash can cut anywhere (a name key before
its container, an address before its endpoint, a namespace before its record). At start, before
the data planes are restored, every kind of local state is checked against the records that
prove it is in use, and what nothing claims is removed:

- container name keys without their container; network name keys without their network;
- local endpoints whose container is gone (their address, their driver state);
- local IPAM: pools without a network, endpoint addresses without an endpoint;
- this host's own copies of global endpoints without a container (netd.core.recovery);
- namespaces in the run dir that no container owns (with any process still in them), and the
  run/data dirs of containers that do not exist.

Global state is reconciled when the cluster store answers (ClusterEvents.store_reconnected: the
addresses this host took but never used).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal

from kvstore import KVError
from netd.contract.model import LOCAL, Endpoint
from netd.core.keys import CONTAINER_NAMES, ENDPOINTS, NETWORK_NAMES
from runtime import namespaces

log = logging.getLogger(__name__)
CONTAINER_NETNS = re.compile(r"^[0-9a-f]{12}$")


class Reconcile:
    """The Controller's start-time sweep of what a crash may have left."""

    def _reconcile_local(self) -> None:
        removed = []
        removed += self._stale_names(CONTAINER_NAMES, set(self.containers), "container name")
        removed += self._stale_names(NETWORK_NAMES, set(self.networks), "network name")
        removed += self._orphan_local_endpoints()
        removed += self._orphan_local_addresses()
        removed += self._orphan_namespaces()
        removed += self._orphan_container_dirs()
        for line in removed:
            log.warning("after a crash: removed %s", line)

    def _stale_names(self, prefix: str, known: set[str], what: str) -> list[str]:
        pairs, _ = self.local_store.list(prefix)
        stale = [p for p in pairs if p.value not in known]
        for pair in stale:
            with contextlib.suppress(KVError):
                self.local_store.delete(pair.key, pair.version)
        return [f"{what} {p.key[len(prefix):]} (nothing holds it)" for p in stale]

    def _orphan_local_endpoints(self) -> list[str]:
        removed = []
        for endpoint in list(self.endpoints.all()):
            if endpoint.container_id in self.containers:
                continue
            network = self.networks.get(endpoint.network_id)
            if network is not None and network.scope != LOCAL:
                continue   # a global endpoint: recovery and the cluster's own sweep deal with it
            self.endpoints.remove(endpoint.id)
            if network is not None:
                self._forget_endpoint(network, endpoint)
            self.local_store.delete(f"{ENDPOINTS}{endpoint.network_id}/{endpoint.id}")
            removed.append(f"endpoint {endpoint.id[:12]} of a container that never came to be")
        return removed

    def _forget_endpoint(self, network, endpoint: Endpoint) -> None:
        impl = self.drivers.get(network.driver)
        if impl is not None:
            for step in (lambda: impl.leave(network, endpoint, sandbox_gone=True),
                         lambda: impl.delete_endpoint(network, endpoint)):
                try:
                    step()
                except Exception as e:  # noqa: BLE001 - free what can be freed
                    log.debug("cleaning endpoint %s: %s", endpoint.id[:12], e)
        if endpoint.address:
            with contextlib.suppress(Exception):
                self.ipam[LOCAL].release(network.id, endpoint.address)

    def _orphan_local_addresses(self) -> list[str]:
        removed = []
        ipam = self.ipam[LOCAL]
        mine = self.endpoints.ids()
        for pool in ipam.pools():
            if pool.network_id not in self.networks:
                ipam.release_pool(pool.network_id)
                removed.append(f"address pool {pool.subnet} of a network that never came to be")
                continue
            for allocation in ipam.allocations(pool.network_id):
                if allocation.kind == "endpoint" and allocation.endpoint_id not in mine:
                    ipam.release(pool.network_id, allocation.address)
                    removed.append(f"address {allocation.address} on {pool.network_name} (no endpoint holds it)")
        return removed

    def _orphan_namespaces(self) -> list[str]:
        directory = os.path.join(self.paths.run_dir, "netns")
        owned = {c.netns for c in self.containers.values() if c.netns}
        removed = []
        for entry in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
            path = os.path.join(directory, entry)
            if not CONTAINER_NETNS.match(entry) or path in owned:
                continue   # a driver's (ov-<VNI>) or a container's
            for pid in namespaces.pids_in_netns([path]):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            namespaces.delete_netns(path)
            removed.append(f"namespace {entry} and what ran in it (no container owns it)")
        return removed

    def _orphan_container_dirs(self) -> list[str]:
        removed = []
        for root in (os.path.join(self.paths.run_dir, "containers"), os.path.join(self.paths.data_dir, "containers")):
            for entry in sorted(os.listdir(root)) if os.path.isdir(root) else []:
                if entry not in self.containers:
                    shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
                    removed.append(f"directory {os.path.join(root, entry)}")
        return removed
