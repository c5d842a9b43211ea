"""hostgw's routes: a route to every other live host's part via that host, reconciled by a thread
that follows the leases (a Mirror of the store) and checks the kernel every few seconds."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from ipaddress import IPv4Address, IPv4Network

from pyroute2.netlink.exceptions import NetlinkError

from drivers.hostgw.parts import LEASES, RTPROT_HOSTGW, Part, Peer
from kvstore import KeyExists, KVPair, LeaseKeeper, StoreError
from kvstore.mirror import Mirror
from netd.contract.model import Network
from netd.kernel import netlink

log = logging.getLogger("netd.driver.hostgw")


class Routes:
    """HostgwDriver's part: the routes to other hosts' parts, kept true by a reconcile loop."""

    # --- routes -----------------------------------------------------------------------------

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None or self._stopping.is_set():
                return
            self._mirror = Mirror(self.ctx.cluster_store, LEASES, on_put=lambda _: self._wake.set(),
                                  on_delete=lambda _: self._wake.set()).start()
            self._thread = threading.Thread(target=self._run, name="hostgw-routes", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                self.reconcile()
            except Exception:   # noqa: BLE001 - keep reconciling
                log.exception("hostgw: reconciling routes failed")

    def _lease_pairs(self) -> list[KVPair]:
        if self._mirror is not None and self._mirror.wait_synced(0) and self._mirror.connected:
            return list(self._mirror.items().values())
        return self.ctx.cluster_store.list(LEASES)[0]

    def reconcile(self) -> None:
        """Make the kernel match the leases: this host's part, and a route to every other part."""
        self._release_idle_parts()
        with self._lock:
            parts = list(self._parts.values())
        try:
            pairs = self._lease_pairs() if parts else []
        except StoreError as e:
            log.debug("hostgw: leases unknown (%s): routes stay as they are", e)
            return
        wanted: set[str] = set()
        with netlink.netns_socket(None) as ipr:
            routes = self._our_routes(ipr)
            for part in parts:
                wanted |= self._reconcile_part(ipr, part, pairs, routes)
            for dst in set(routes) - wanted:
                with contextlib.suppress(NetlinkError):
                    ipr.route("del", dst=dst, proto=RTPROT_HOSTGW)
                    log.info("hostgw: removed route %s via %s: its lease is gone", dst, routes[dst][0])
                self._routed = {(nid, subnet) for nid, subnet in self._routed if subnet != dst}

    def _release_idle_parts(self) -> None:
        """A part whose first container never came (its `netd run` failed after the lease was
        taken) is given up. Under the controller's lock: no endpoint can be on its way."""
        with self.ctx.lock, self._lock:
            idle = [p for p in self._parts.values()
                    if not p.endpoints and time.monotonic() - p.since > 2 * self.interval]
            for part in idle:
                del self._parts[part.network.id]
                self._peers.pop(part.network.id, None)
                self._teardown(part)

    def _reconcile_part(self, ipr, part: Part, pairs: list[KVPair], routes: dict[str, tuple[str, int]]) -> set[str]:
        network = part.network
        leases = self._leases(network.id, pairs)
        own = leases.get(part.subnet)
        leases = self._routable(network, part, leases)
        if part.lost or own is None or own[1].get("PublicIP") != self.ctx.host.address:
            self._retake(part, own)
        self._check_bridge(part)
        peers: dict[str, Peer] = {}
        wanted = set()
        for subnet, (_pair, info) in sorted(leases.items()):
            address = info.get("PublicIP", "")
            if subnet == part.subnet or address == self.ctx.host.address:
                continue
            peer = self._next_hop(ipr, str(subnet), address, info.get("Host", ""))
            peers[str(subnet)] = peer
            self._say(network, peer)
            if not peer.oif:
                continue
            wanted.add(str(subnet))
            if routes.get(str(subnet)) != (address, peer.oif):
                try:
                    ipr.route("replace", dst=str(subnet), gateway=address, oif=peer.oif, proto=RTPROT_HOSTGW)
                except NetlinkError as e:
                    peer.route = f"not routed: the kernel refused the route ({os.strerror(e.code)})"
                    self._say(network, peer)
                    continue
                again = (network.id, str(subnet)) in self._routed
                self._routed.add((network.id, str(subnet)))
                log.info("hostgw network %s: route %s %s %s", network.name, subnet, peer.route,
                         "restored" if again else "added")
        with self._lock:
            self._peers[network.id] = peers
        return wanted

    def _routable(self, network: Network, part: Part, leases: dict) -> dict:
        """The leases this host may route: store content is data, not orders. A lease must be a
        part of the network's subnet of its size, overlap no other lease, cover no route of this
        host, and name a live member's address; the rest is logged (once) and skipped."""
        whole, length = IPv4Network(network.ipam.subnet), self.subnet_len(network)
        members = set(self.ctx.members()) if self.ctx.members is not None else None
        host_routes = self._foreign_routes(part.bridge)
        ok = {}
        for subnet, (pair, info) in leases.items():
            if subnet == part.subnet:
                ok[subnet] = (pair, info)
                continue
            address = str(info.get("PublicIP", ""))
            why = ""
            if not subnet.subnet_of(whole) or subnet.prefixlen != length:
                why = f"it is not a /{length} part of {whole}"
            elif any(subnet.overlaps(other) for other in leases if other != subnet):
                why = "it overlaps another lease"
            elif any(subnet.overlaps(route) for route in host_routes):
                why = "it covers a route of this host"
            elif not _is_ipv4(address):
                why = f"its PublicIP {address!r} is not an IPv4 address"
            elif members is not None and address not in members:
                why = f"{address} is not a live member of the cluster"
            if why:
                if (network.id, str(subnet), why) not in self._refused:
                    self._refused.add((network.id, str(subnet), why))
                    log.warning("hostgw network %s: ignoring the lease of %s: %s", network.name, subnet, why)
                continue
            ok[subnet] = (pair, info)
        return ok

    def _retake(self, part: Part, own: tuple[KVPair, dict] | None) -> None:
        """This host's lease is missing from the store (it lapsed, or was deleted): take it again."""
        store = self.ctx.cluster_store
        if own is not None and own[1].get("PublicIP") != self.ctx.host.address:
            holder = f"{own[1].get('Host')} ({own[1].get('PublicIP')})"
            problem = (f"host {holder} holds {part.subnet} now (this host's lease lapsed while the store was away): "
                       "containers here are unreachable from other hosts")
            if part.problem != problem:
                part.problem = problem
                log.error("hostgw network %s: %s", part.network.name, problem)
            return
        try:
            if part.lost:
                part.keeper.stop()
                lease = store.grant_lease(self.lease_ttl(part.network))
                part.lease = lease
                part.keeper = LeaseKeeper(lease, on_lost=lambda: self._lease_lost(part.network.id)).start()
                part.lost = False
            try:
                store.create(part.key, self._lease_value(), part.lease)
            except KeyExists:
                return   # there again (the mirror was behind); checked next round
            part.problem = ""
            log.info("hostgw network %s: took %s again", part.network.name, part.subnet)
        except StoreError as e:
            log.debug("hostgw: cannot take %s again yet: %s", part.subnet, e)

    @staticmethod
    def _next_hop(ipr, subnet: str, address: str, host: str) -> Peer:
        """How the kernel reaches a peer: directly on an interface (routable), or not."""
        try:
            [route] = ipr.route("get", dst=address)
        except NetlinkError as e:
            return Peer(subnet, address, host, f"not routed: no route to {address} on this host ({os.strerror(e.code)})")
        except (ValueError, OSError) as e:
            return Peer(subnet, address, host, f"not routed: {e}")
        oif = route.get_attr("RTA_OIF") or 0
        ifname = _ifname(ipr, oif)
        gateway = route.get_attr("RTA_GATEWAY")
        if gateway:
            return Peer(subnet, address, host,
                        f"not routed: {address} is not on a directly connected network (this host reaches it "
                        f"through the router {gateway} on {ifname}); hostgw needs the hosts on one L2 segment: "
                        "use an overlay network across routers")
        return Peer(subnet, address, host, f"via {address} dev {ifname}", oif)

    def _say(self, network: Network, peer: Peer) -> None:
        """Log a peer's route state once per change: problems as warnings."""
        key = (network.id, peer.subnet)
        if self._said.get(key) == peer.route:
            return
        self._said[key] = peer.route
        if not peer.oif:
            log.warning("hostgw network %s: peer %s (%s, %s) %s", network.name, peer.subnet, peer.host, peer.address,
                        peer.route)

    @staticmethod
    def _our_routes(ipr) -> dict[str, tuple[str, int]]:
        """netd's hostgw routes in the main table: destination -> (gateway, interface)."""
        found = {}
        for route in ipr.get_routes(family=socket.AF_INET, table=254):
            if route["proto"] == RTPROT_HOSTGW and route.get_attr("RTA_DST"):
                dst = f"{route.get_attr('RTA_DST')}/{route['dst_len']}"
                found[dst] = (route.get_attr("RTA_GATEWAY") or "", route.get_attr("RTA_OIF") or 0)
        return found

    def _delete_routes(self, ipr, within: IPv4Network) -> None:
        for dst in self._our_routes(ipr):
            if IPv4Network(dst).subnet_of(within):
                with contextlib.suppress(NetlinkError):
                    ipr.route("del", dst=dst, proto=RTPROT_HOSTGW)

    @staticmethod
    def _foreign_routes(own_bridge: str | None = None) -> list[IPv4Network]:
        """Destinations this host routes, but for netd's hostgw routes and `own_bridge`'s."""
        found = []
        with netlink.netns_socket(None) as ipr:
            skip = netlink.link_index(ipr, own_bridge) if own_bridge else None
            for route in ipr.get_routes(family=socket.AF_INET, table=254):
                dst = route.get_attr("RTA_DST")
                if not dst or route["dst_len"] == 0 or route["proto"] == RTPROT_HOSTGW:
                    continue
                if skip is not None and route.get_attr("RTA_OIF") == skip:
                    continue
                found.append(IPv4Network(f"{dst}/{route['dst_len']}", strict=False))
        return found


def _ifname(ipr, index: int) -> str:
    with contextlib.suppress(NetlinkError, IndexError):
        return ipr.link("get", index=index)[0].get_attr("IFLA_IFNAME")
    return f"interface {index}"


def _is_ipv4(text: str) -> bool:
    try:
        IPv4Address(text)
        return True
    except ValueError:
        return False
