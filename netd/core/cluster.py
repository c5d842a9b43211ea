"""This host's place in the cluster: membership under a TTL, live copies of the global
networks and endpoints, which peers are alive, and reclaiming what dead hosts held.

Keys in the cluster store:
  netd/hosts/<address>          this host, alive while its lease is renewed (TTL)
  netd/host-records/<address>   every host ever seen (so a dead one can be named)
  netd/networks/<id>            global networks        (written by the controller)
  netd/endpoints/<nid>/<eid>    endpoints on them      (written by the controller)

A host whose key stays gone past `reclaim_after` seconds is dead: one live host (the one with
the lowest address, so that they do not all do it) deletes its endpoints and frees their
addresses. Until then, its endpoints only stop counting as peers, so a daemon that restarts
within the grace period finds everything as it left it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from ipaddress import IPv4Address

from kvstore import KeyExists, KVPair, KVStore, LeaseKeeper, StoreError
from kvstore.mirror import Mirror
from netd.contract.driverapi import HostInfo
from netd.contract.errors import BadRequest, Conflict, NotFound
from netd.contract.model import Endpoint, now
from netd.core.keys import ENDPOINTS, HOST_RECORDS, HOSTS, NETWORKS

log = logging.getLogger("netd.core.cluster")


class ClusterListener:
    """What the controller hears from the cluster (called from the cluster's threads)."""

    def global_network_changed(self, pair: KVPair, deleted: bool) -> None: ...

    def peer_changed(self, endpoint: Endpoint, present: bool) -> None: ...

    def store_reconnected(self) -> None: ...

    def reclaim_endpoint(self, endpoint: Endpoint) -> None:
        """Delete a dead host's endpoint from the store and free its address and name."""

    def host_reclaimed(self, address: str) -> None:
        """A dead host's endpoints are gone: free what drivers held for that host."""

    def members_changed(self, addresses: list[str]) -> None:
        """The live members' underlay addresses changed (this host's included)."""


class Cluster:
    def __init__(self, store: KVStore, host: HostInfo, listener: ClusterListener,
                 ttl: float = 15.0, reclaim_after: float = 60.0):
        if not host.address:
            raise ValueError("a cluster member needs --cluster-advertise")
        self.store = store
        self.host = host
        self.listener = listener
        self.ttl = ttl
        self.reclaim_after = reclaim_after
        self.lease = None
        self._keeper: LeaseKeeper | None = None
        self._lost = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._missing_since: dict[str, float] = {}
        self._reclaimed: set[str] = set()             # dead hosts already reclaimed by this daemon
        self._peers: dict[str, Endpoint] = {}        # endpoint id -> remote endpoint counted as a peer
        self._endpoints: dict[str, dict[str, Endpoint]] = {}   # network id -> endpoint id -> endpoint (parsed once)
        self.hosts = Mirror(store, HOSTS, on_put=self._host_put, on_delete=self._host_deleted)
        self.networks = Mirror(store, NETWORKS,
                               on_put=lambda p: listener.global_network_changed(p, False),
                               on_delete=lambda p: listener.global_network_changed(p, True))
        self.endpoints = Mirror(store, ENDPOINTS, on_put=self._endpoint_put, on_delete=self._endpoint_deleted)
        self._threads = [
            threading.Thread(target=self._supervised, args=(self._keep_membership,), name="cluster-membership",
                             daemon=True),
            threading.Thread(target=self._supervised, args=(self._watch_for_dead_hosts,), name="cluster-reclaim",
                             daemon=True),
        ]
        self.restarts: dict[str, int] = {}

    @property
    def address(self) -> str:
        return self.host.address

    # --- lifecycle --------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Register this host, and load the cluster's hosts, networks and endpoints."""
        self._register()
        for mirror in (self.hosts, self.networks, self.endpoints):
            mirror.start()
        for mirror in (self.hosts, self.networks, self.endpoints):
            if not mirror.wait_synced(timeout):
                raise StoreError(f"the cluster store did not answer within {timeout:.0f}s")
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop following the cluster. The lease is left to lapse, not revoked: a daemon that
        restarts within the TTL keeps its place (its containers never stopped)."""
        self._stopping.set()
        self._lost.set()
        if self._keeper:
            self._keeper.stop()
        for mirror in (self.endpoints, self.networks, self.hosts):
            mirror.stop()

    def _register(self) -> None:
        """This host's key under a fresh lease, created only if absent: a live host with the same
        --cluster-advertise and another identity is refused (each would free the other's addresses).
        Our own key from before a restart (its old lease still running) is taken over."""
        info = json.dumps({"Name": self.host.name, "Address": self.address, "ID": self.host.id, "Since": now()})
        lease = self.store.grant_lease(self.ttl)
        key = HOSTS + self.address
        try:
            try:
                self.store.create(key, info, lease)
            except KeyExists:
                pair = self.store.get(key)
                holder = _json(pair.value) if pair is not None else {}
                if pair is not None and holder.get("ID") != self.host.id:
                    raise DuplicateHost(
                        f"host {holder.get('Name', '?')} (id {str(holder.get('ID', '?'))[:12]}) is alive in the cluster "
                        f"store with the address {self.address}: give every host its own --cluster-advertise") from None
                if pair is None:
                    self.store.create(key, info, lease)
                else:
                    self.store.update(key, info, pair.version, lease)
        except BaseException:
            with contextlib.suppress(StoreError):
                lease.revoke()
            raise
        self.store.put(HOST_RECORDS + self.address, info)
        self.lease = lease
        self._lost.clear()
        self._keeper = LeaseKeeper(lease, on_lost=self._lost.set).start()

    def _keep_membership(self) -> None:
        """Register again whenever the lease is lost (the store was away longer than the TTL)."""
        delay = 0.5
        while not self._stopping.is_set():
            self._lost.wait()
            if self._stopping.is_set():
                return
            try:
                self._register()
                log.info("registered again in the cluster store")
                delay = 0.5
                self.listener.store_reconnected()
            except Exception as e:  # noqa: BLE001 - a membership thread must never die
                log.warning("cannot register in the cluster store (%s); retrying", e)
                self._stopping.wait(delay)
                delay = min(delay * 2, 5.0)

    def _supervised(self, loop) -> None:
        """Run a background loop; should it ever end or raise before the cluster stops, log it and
        run it again (the count shows in `netd info`)."""
        name = threading.current_thread().name
        while not self._stopping.is_set():
            try:
                loop()
            except Exception:  # noqa: BLE001
                log.exception("%s failed; restarting it", name)
            if self._stopping.wait(1.0):
                return
            self.restarts[name] = self.restarts.get(name, 0) + 1

    def health(self) -> dict[str, str]:
        """Each background thread of the cluster: "ok", "restarted N times", or "stopped"."""
        out = {}
        for thread in self._threads:
            restarts = self.restarts.get(thread.name, 0)
            out[thread.name] = ("stopped" if not thread.is_alive() else
                                f"ok (restarted {restarts} times)" if restarts else "ok")
        for name, mirror in (("mirror hosts", self.hosts), ("mirror networks", self.networks),
                             ("mirror endpoints", self.endpoints)):
            out[name] = ("stopped" if not mirror.alive else "ok" if mirror.connected else "waiting for the store")
        return out

    # --- hosts ------------------------------------------------------------------------------

    def alive(self, address: str) -> bool:
        return self.hosts.get(HOSTS + address) is not None or address == self.address

    def host_list(self) -> list[dict]:
        """Every host the cluster has seen: name, address, alive, since when."""
        try:
            records, _ = self.store.list(HOST_RECORDS)
        except StoreError:
            records = [KVPair(k.replace(HOSTS, HOST_RECORDS), p.value, p.version) for k, p in self.hosts.items().items()]
        hosts = []
        for pair in records:
            try:
                record = json.loads(pair.value)
            except ValueError:
                log.error("ignoring corrupt host record %s", pair.key)
                continue
            address = pair.key[len(HOST_RECORDS):]
            record["Alive"] = self.alive(address)
            hosts.append(record)
        return sorted(hosts, key=lambda h: _address_key(h.get("Address", "")))

    def _host_put(self, pair: KVPair) -> None:
        address = pair.key[len(HOSTS):]
        with self._lock:
            self._missing_since.pop(address, None)
            self._reclaimed.discard(address)
        log.info("host %s is alive", address)
        self._refresh_peers(host=address)
        self._tell_members()

    def _host_deleted(self, pair: KVPair) -> None:
        address = pair.key[len(HOSTS):]
        if address == self.address:
            if not self._stopping.is_set():   # deleted by hand or by a reclaim: register again
                log.warning("this host's key was deleted from the cluster store: registering again")
                self._lost.set()
            return
        with self._lock:
            self._missing_since.setdefault(address, time.monotonic())
        log.warning("host %s stopped renewing its lease: its endpoints stop counting as peers", address)
        self._refresh_peers(host=address)
        self._tell_members()

    def members(self) -> list[str]:
        """Underlay addresses of the live members, this host's included."""
        return sorted({key[len(HOSTS):] for key in self.hosts.items()} | {self.address}, key=_address_key)

    def _tell_members(self) -> None:
        try:
            self.listener.members_changed(self.members())
        except Exception:  # noqa: BLE001 - the mirror's thread goes on
            log.exception("could not update the VXLAN members")

    # --- peers ------------------------------------------------------------------------------

    def endpoints_of(self, network_id: str) -> list[Endpoint]:
        """Every endpoint of a global network, on every host (alive or not)."""
        with self._lock:
            return list(self._endpoints.get(network_id, {}).values())

    def endpoints_of_host(self, address: str) -> list[Endpoint]:
        with self._lock:
            return [e for by_id in self._endpoints.values() for e in by_id.values() if e.host == address]

    def peers(self) -> list[Endpoint]:
        with self._lock:
            return list(self._peers.values())

    def _endpoint_put(self, pair: KVPair) -> None:
        endpoint = _endpoint(pair)
        if endpoint:
            with self._lock:
                self._endpoints.setdefault(endpoint.network_id, {})[endpoint.id] = endpoint
            self._update_peer(endpoint)

    def _endpoint_deleted(self, pair: KVPair) -> None:
        endpoint = _endpoint(pair)
        if endpoint is None:
            return
        with self._lock:
            by_id = self._endpoints.get(endpoint.network_id, {})
            by_id.pop(endpoint.id, None)
            if not by_id:
                self._endpoints.pop(endpoint.network_id, None)
            known = self._peers.pop(endpoint.id, None)
        if known is not None:
            self.listener.peer_changed(known, False)

    def _update_peer(self, endpoint: Endpoint) -> None:
        """Count a remote endpoint as a peer while its host is alive; tell the listener of
        every change."""
        if endpoint.host == self.address:
            return
        counts = self.alive(endpoint.host)
        with self._lock:
            known = self._peers.get(endpoint.id)
            if counts:
                self._peers[endpoint.id] = endpoint
            else:
                self._peers.pop(endpoint.id, None)
        if counts and known != endpoint:
            self.listener.peer_changed(endpoint, True)
        elif not counts and known is not None:
            self.listener.peer_changed(known, False)

    def _refresh_peers(self, host: str) -> None:
        for endpoint in self.endpoints_of_host(host):
            self._update_peer(endpoint)

    # --- dead hosts -------------------------------------------------------------------------

    def _watch_for_dead_hosts(self) -> None:
        while not self._stopping.wait(max(1.0, self.ttl / 2)):
            if self.reclaim_after <= 0:
                continue   # automatic reclaim off: `netd host rm` only
            try:
                self._reclaim_dead_hosts()
            except StoreError as e:
                log.debug("reclaim check skipped: %s", e)
            except Exception:  # noqa: BLE001 - the reclaim thread must never die
                log.exception("reclaim check failed; trying again next round")

    def _reclaim_dead_hosts(self) -> None:
        alive = {key[len(HOSTS):] for key in self.hosts.items()} | {self.address}
        if min(alive, key=_address_key) != self.address:
            return   # the live host with the lowest address does it
        records, _ = self.store.list(HOST_RECORDS)
        now_ = time.monotonic()
        for pair in records:
            address = pair.key[len(HOST_RECORDS):]
            if address in alive:
                continue
            with self._lock:
                since = self._missing_since.setdefault(address, now_)
            if now_ - since >= self.reclaim_after and address not in self._reclaimed:
                self.reclaim(address)

    def reclaim(self, address: str) -> int:
        """Delete a dead host's endpoints and free their addresses; how many were reclaimed."""
        count = 0
        for endpoint in self.endpoints_of_host(address):
            try:
                self.listener.reclaim_endpoint(endpoint)
                count += 1
            except StoreError as e:
                log.warning("could not reclaim endpoint %s of %s: %s", endpoint.id[:12], address, e)
        self.listener.host_reclaimed(address)
        with self._lock:
            self._reclaimed.add(address)
        # Its record goes too (the table stays bounded); a host that comes back and finds its
        # record gone knows it was reclaimed, and claims back what it can (netd.core.recovery).
        with contextlib.suppress(StoreError):
            self.store.delete(HOST_RECORDS + address)
        if count:
            log.warning("reclaimed %d endpoint(s) of dead host %s", count, address)
        return count


class DuplicateHost(Conflict):
    """Another live host registered this host's address."""


def remove_host(cluster: Cluster, address: str) -> int:
    """`netd host rm ADDRESS`: an operator says a host is gone for good: reclaim it now."""
    if address == cluster.address:
        raise BadRequest(f"{address} is this host: run `netd host rm` on another host of the cluster")
    if cluster.alive(address):
        raise Conflict(f"host {address} is alive (its lease is renewed): stop its daemon first")
    records, _ = cluster.store.list(HOST_RECORDS)
    if not any(p.key == HOST_RECORDS + address for p in records) and not cluster.endpoints_of_host(address):
        raise NotFound(f"no host {address} in the cluster")
    return cluster.reclaim(address)


def _json(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _endpoint(pair: KVPair) -> Endpoint | None:
    try:
        return Endpoint.from_json(pair.value)
    except (ValueError, TypeError, KeyError):
        log.error("ignoring corrupt endpoint at %s in the cluster store", pair.key)
        return None


def _address_key(address: str):
    try:
        return (0, int(IPv4Address(address)))
    except ValueError:
        return (1, address)
