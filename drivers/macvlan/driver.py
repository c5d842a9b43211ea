"""The `macvlan` driver: each container gets a macvlan sub-interface of a host interface (the
parent), with a MAC address of its own, straight on the parent's L2 segment: no bridge, no NAT
and no host routing in the path.

    netd network create -d macvlan --subnet 10.0.0.0/24 --gateway 10.0.0.254 -o parent=eth0 macvlan_1

Options: `parent` (required), `macvlan_mode` = bridge (default) | private | vepa | passthru,
`host_access` = true | false (bridge mode only).

Scope. Local by default, as Docker's: the network and its address pool live on this host only.
With `--scope global` (needs a cluster store) the network appears on every host with the same id
and its pool is cluster-wide: an address is taken by create-if-absent in the cluster store, so two
hosts never hand out the same one (Docker's macvlan does, moby#49921). The parent must then have
the same name on every host that runs containers on the network (lab hosts: eth0).

Parents. One macvlan network per parent on a host, as in Docker: a claim key per parent,
created only if absent, in the local store for a local network and in the cluster store for a
global one (which uses that parent on every host). A missing, down or loopback parent is refused
before anything is made; a global network's parent is checked again on each host at its first
container there.

Endpoints. The sub-interface is created directly in the container's namespace, up, in one
rtnetlink request (netd.kernel.rtnl.create_macvlan); address and default route follow there. MAC: from
the address (02:42:a.b.c.d, as Docker) on a global network, whose addresses are unique; random on a
local one, so that two hosts whose separate pools give out the same address do not also put the
same MAC on the wire. passthru hands the parent (and its MAC) to one container at a time.

Host access (`-o host_access=true`). A parent never passes frames to its own macvlans, so a host
cannot reach its macvlan containers, nor they it. With host_access the host gets a shim: a macvlan
`mvh-<network id>` of its own on the parent, made with the host's first container on the network
and removed with its last, holding one address of the network's pool (in `netd ipam inspect` an aux
address named "host-access <host>"), plus a /32 route through it to each local container. The host
reaches its containers from the shim's address; they reach the host at any of its addresses. The
shim answers ARP only for the containers it routes to (arp_filter), so the rest of the segment
keeps seeing the parent's MAC for the host's own address.

Local networks, visible to the cluster. With a cluster store, a host advertises each of its local
macvlan networks at netd/macvlan/local-networks/<host>/<network id> (name, subnet, parent; no TTL:
the network exists while its host is down; re-written by restore()). `netd network create` warns
when another host has a local macvlan network on an overlapping subnet: two separate pools on one
segment give out the same addresses. The cure is `--scope global`, or a disjoint `--ip-range` per
host.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
from ipaddress import IPv4Network

from kvstore import KeyExists, KVStore, StoreError, VersionConflict
from netd.contract.driverapi import CapturePoint, Driver, DriverContext, Hop, JoinInfo, option_flag
from netd.contract.errors import BadRequest, Conflict
from netd.contract.model import GLOBAL, LOCAL, Endpoint, Network, now
from netd.kernel import netlink
from netd.kernel.rtnl import IFF_UP, Rtnl, configure_inside, free_inside_name

log = logging.getLogger("netd.driver.macvlan")

OPT_PARENT = "parent"
OPT_MODE = "macvlan_mode"
OPT_HOST_ACCESS = "host_access"
MODES = ("bridge", "private", "vepa", "passthru")
IFF_LOOPBACK = 0x8

CLAIMS = "parents/"                      # <parent> -> {"Network", "Name"}: local or cluster store
ADVERTS = "local-networks/"              # <host>/<network id> -> {"Name", "Subnet", "Parent", ...}
SHIM_PREFIX = "mvh-"



class MacvlanDriver(Driver):
    name = "macvlan"
    scope = LOCAL
    scopes = (LOCAL, GLOBAL)
    known_options = frozenset({OPT_PARENT, OPT_MODE, OPT_HOST_ACCESS})

    def __init__(self, ctx: DriverContext):
        super().__init__(ctx)
        self._local: dict[str, dict[str, str]] = {}    # network id -> endpoint id -> address, on this host
        self._shims: dict[str, tuple[str, str]] = {}   # network id -> (shim name, its address), built here

    @property
    def host_key(self) -> str:
        """How this host names itself in the stores (the controller's host key)."""
        return self.ctx.host.key

    # --- options ----------------------------------------------------------------------------

    @staticmethod
    def parent(network: Network) -> str:
        return network.options.get(OPT_PARENT, "")

    @staticmethod
    def mode(network: Network) -> str:
        return network.options.get(OPT_MODE, "bridge")

    @staticmethod
    def host_access(network: Network) -> bool:
        return option_flag(network.options.get(OPT_HOST_ACCESS, "false"), OPT_HOST_ACCESS)

    def validate(self, network: Network) -> None:
        super().validate(network)
        parent = self.parent(network)
        if not parent:
            raise BadRequest("macvlan networks need a parent interface: add -o parent=IFACE, the host interface "
                             "whose segment the containers join (e.g. -o parent=eth0)")
        if len(parent) > netlink.IFNAMSIZ or "/" in parent or " " in parent:
            raise BadRequest(f"invalid parent interface name {parent!r}: at most {netlink.IFNAMSIZ} characters, "
                             "no '/' or spaces")
        mode = self.mode(network)
        if mode not in MODES:
            raise BadRequest(f"invalid macvlan_mode {mode!r}: use bridge, private, vepa or passthru")
        if self.host_access(network) and mode != "bridge":
            raise BadRequest(f"host_access needs macvlan_mode=bridge: in {mode} mode the host's shim cannot reach "
                             "the containers")
        if network.internal:
            raise BadRequest("--internal does not apply to macvlan: its containers sit on the parent's segment")
        with Rtnl() as rtnl:
            self._parent_index(rtnl, parent)

    def _parent_index(self, rtnl: Rtnl, parent: str, network: Network | None = None) -> int:
        """The parent's index, if it is there, up, and not the loopback; else a clear error."""
        state = rtnl.link_state(parent)
        of = f" of macvlan network {network.name}" if network is not None else ""
        if state is None:
            raise BadRequest(f"parent interface {parent}{of} does not exist on this host: name one that "
                             "`ip link` shows, e.g. -o parent=eth0")
        index, flags = state
        if flags & IFF_LOOPBACK:
            raise BadRequest(f"parent interface {parent} is the loopback interface: name an Ethernet interface")
        if not flags & IFF_UP:
            raise BadRequest(f"parent interface {parent}{of} is down: bring it up first (ip link set {parent} up)")
        return index

    # --- parents: one macvlan network each, on a host ----------------------------------------

    def _claim_store(self, network: Network) -> KVStore:
        return self.ctx.cluster_store if network.scope == GLOBAL else self.ctx.local_store

    def _parent_holder(self, parent: str, network: Network) -> str | None:
        """The macvlan network (other than `network`) that already uses `parent` on this host,
        as words for an error message; None if there is none."""
        stores = [("", self.ctx.local_store)]
        if self.ctx.cluster_store is not None:
            stores.append((" (a global network)", self.ctx.cluster_store))
        for what, store in stores:
            try:
                pair = store.get(CLAIMS + parent)
            except StoreError as e:
                if network.scope == GLOBAL:
                    raise
                log.warning("could not check the cluster store for global macvlan networks on %s: %s", parent, e)
                continue
            if pair is not None:
                holder = json.loads(pair.value)
                if holder.get("Network") != network.id:
                    return f"{holder.get('Name')}{what}"
        if network.scope == GLOBAL and self.ctx.cluster_store is not None:
            # A global network uses the parent on every host: other hosts' local networks count.
            for pair in self.ctx.cluster_store.list(ADVERTS)[0]:
                info = _advert(pair)
                if info and info.get("Parent") == parent and not pair.key.startswith(f"{ADVERTS}{self.host_key}/"):
                    return f"{info.get('Name')} (a local network on host {info.get('Host')} {info.get('Address')})"
        return None

    def _claim(self, network: Network) -> None:
        parent = self.parent(network)
        holder = self._parent_holder(parent, network)
        if holder is None:
            try:
                self._claim_store(network).create(
                    CLAIMS + parent, json.dumps({"Network": network.id, "Name": network.name}))
                return
            except KeyExists:
                holder = self._parent_holder(parent, network)
                if holder is None:
                    return   # our own claim (restore)
        raise Conflict(f"parent interface {parent} already carries macvlan network {holder}: one macvlan network "
                       f"per parent on a host; use another parent (e.g. a VLAN sub-interface {parent}.10) "
                       "or remove that network")

    def _unclaim(self, network: Network) -> None:
        store = self._claim_store(network)
        if store is None:
            return
        with contextlib.suppress(StoreError, VersionConflict):
            pair = store.get(CLAIMS + self.parent(network))
            if pair is not None and json.loads(pair.value).get("Network") == network.id:
                store.delete(pair.key, pair.version)

    # --- advertising local networks to the cluster -------------------------------------------

    def _advert_key(self, network: Network) -> str:
        return f"{ADVERTS}{self.host_key}/{network.id}"

    def _advertise(self, network: Network) -> None:
        if self.ctx.cluster_store is None or network.scope == GLOBAL:
            return
        value = json.dumps({"Name": network.name, "Subnet": network.ipam.subnet if network.ipam else "",
                            "Parent": self.parent(network), "Host": self.ctx.host.name,
                            "Address": self.host_key, "Since": now()})
        try:
            self.ctx.cluster_store.put(self._advert_key(network), value)
        except StoreError as e:
            log.warning("could not advertise local macvlan network %s in the cluster store (%s): "
                        "other hosts will not be warned of its subnet until the next restart", network.name, e)

    def network_warning(self, network: Network) -> str:
        """Another host has a local macvlan network on an overlapping subnet: say so."""
        if self.ctx.cluster_store is None or network.ipam is None:
            return ""
        subnet = IPv4Network(network.ipam.subnet)
        try:
            pairs, _ = self.ctx.cluster_store.list(ADVERTS)
        except StoreError as e:
            return f"could not check the cluster store for other hosts' macvlan networks: {e}"
        clashes = []
        for pair in pairs:
            info = _advert(pair)
            if info is None or pair.key == self._advert_key(network):
                continue
            if pair.key.startswith(f"{ADVERTS}{self.host_key}/") and network.scope != GLOBAL:
                continue   # this host's own pools never overlap (IPAM refuses)
            with contextlib.suppress(ValueError):
                if IPv4Network(info.get("Subnet", "")).overlaps(subnet):
                    clashes.append(f"{info.get('Name')} on host {info.get('Host')} "
                                   f"({info.get('Address')}, {info.get('Subnet')})")
        if not clashes:
            return ""
        if network.scope == GLOBAL:
            return (f"local macvlan network {'; '.join(clashes)} overlaps this network's subnet {subnet}: that host "
                    "gives out addresses from a pool of its own, which may collide with this cluster-wide one")
        return (f"another host has a local macvlan network on an overlapping subnet: {'; '.join(clashes)}; each "
                "host's pool is its own, so both may give out the same address on one segment: use --scope global "
                "for one cluster-wide pool, or a disjoint --ip-range on each host")

    # --- networks ---------------------------------------------------------------------------

    def create_network(self, network: Network) -> None:
        self._claim(network)
        try:
            self._advertise(network)
        except Exception:
            self._unclaim(network)
            raise

    def delete_network(self, network: Network) -> None:
        """On every host for a global network: its shim here, if any; the claim and the
        advertisement, if they are still this network's."""
        self._local.pop(network.id, None)
        self._remove_shim(network)
        self._unclaim(network)
        if network.scope != GLOBAL and self.ctx.cluster_store is not None:
            with contextlib.suppress(StoreError):
                self.ctx.cluster_store.delete(self._advert_key(network))

    def restore(self, network: Network, endpoints: list[Endpoint]) -> None:
        self._local[network.id] = {e.id: e.address for e in endpoints}
        if network.scope != GLOBAL:
            try:
                self._claim(network)
            except Conflict as e:
                log.error("macvlan network %s: %s", network.name, e)
            self._advertise(network)
        if self.host_access(network) and endpoints:
            self._ensure_shim(network)
            for endpoint in endpoints:
                self._add_host_route(network, endpoint.address)
        else:
            self._remove_shim(network)

    def restore_done(self) -> None:
        """Remove shims of networks that are gone (removed while this daemon was down)."""
        mine = {name for name, _ in self._shims.values()}
        with netlink.netns_socket(None) as ipr:
            for link in ipr.get_links():
                name = link.get_attr("IFLA_IFNAME") or ""
                if name.startswith(SHIM_PREFIX) and name not in mine:
                    log.info("removing host-access shim %s: its network is gone", name)
                    netlink.delete_link(ipr, name)

    def inspect(self, network: Network) -> dict:
        info: dict = {"Parent": self.parent(network), "Mode": self.mode(network),
                      "EndpointsHere": len(self._local.get(network.id, {}))}
        if self.host_access(network):
            shim = self._shims.get(network.id)
            info["HostAccess"] = ({"Interface": shim[0], "Address": shim[1]} if shim
                                  else "none on this host yet: made with its first container here")
        return info

    # --- netd capture / trace ---------------------------------------------------------------

    def capture_point(self, network: Network, kind: str, endpoint: Endpoint | None = None) -> CapturePoint | None:
        if kind == "parent":
            parent = self.parent(network)
            return CapturePoint("parent", parent, None, f"{parent} (macvlan parent)", checks=("route",))
        return None

    def trace_path(self, network: Network, source: Endpoint, dest: Endpoint | None) -> list[Hop]:
        """container -> the parent's wire -> (the other host's parent) -> container. Between two
        containers of one host (bridge mode) the frame never reaches the parent: no hop between."""
        here = source.host
        if dest is None:
            return [Hop(here, "container", source.id), Hop(here, "parent")]
        if dest.host == here:
            return [Hop(here, "container", source.id), Hop(here, "container", dest.id)]
        return [Hop(here, "container", source.id), Hop(here, "parent"), Hop(dest.host, "parent"),
                Hop(dest.host, "container", dest.id)]

    # --- endpoints --------------------------------------------------------------------------

    def create_endpoint(self, network: Network, endpoint: Endpoint) -> None:
        endpoint.host_ifname = ""
        if self.mode(network) == "passthru":
            endpoint.mac = ""   # the parent's, known at join
        elif not endpoint.mac:
            endpoint.mac = (netlink.mac_from_ip(endpoint.address) if network.scope == GLOBAL and endpoint.address
                            else netlink.random_mac())

    def join(self, network: Network, endpoint: Endpoint, info: JoinInfo) -> None:
        parent, mode = self.parent(network), self.mode(network)
        if network.scope == GLOBAL:
            holder = self._parent_holder(parent, network)
            if holder is not None:
                raise Conflict(f"parent interface {parent} of macvlan network {network.name} already carries "
                               f"macvlan network {holder} on this host")
        address = endpoint.address
        gateway = self.default_gateway(network) if info.set_default_route else None
        with Rtnl() as host:
            parent_index = self._parent_index(host, parent, network)
            if mode == "passthru":
                endpoint.mac = _link_mac(parent)
            fd = os.open(info.netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                host.create_macvlan(info.ifname, parent_index, fd, mode, endpoint.mac if mode != "passthru" else None)
            except OSError as e:
                raise self._creation_error(e, network, endpoint) from None
            finally:
                os.close(fd)
        try:
            if info.configure:
                configure_inside(info.netns, info.ifname, endpoint.ipv4, gateway)
            endpoint.gateway = gateway or ""
            self._local.setdefault(network.id, {})[endpoint.id] = address
            if self.host_access(network):
                self._ensure_shim(network)
                self._add_host_route(network, address)
        except Exception:
            self._local.get(network.id, {}).pop(endpoint.id, None)
            with contextlib.suppress(OSError), Rtnl(info.netns) as inside:
                index = inside.link_index(info.ifname)
                if index is not None:
                    inside.delete_link(index)
            self._remove_shim_if_unused(network)
            raise

    def _creation_error(self, error: OSError, network: Network, endpoint: Endpoint) -> Exception:
        parent = self.parent(network)
        if self.mode(network) == "passthru" and error.errno in (errno.EINVAL, errno.EBUSY):
            return Conflict(f"parent interface {parent} already has a macvlan interface: macvlan_mode passthru gives "
                            "the parent to one container at a time")
        if error.errno == errno.EADDRINUSE:
            return Conflict(f"MAC address {endpoint.mac} is already in use on parent interface {parent}")
        return OSError(error.errno, f"cannot create the macvlan interface on {parent}: {error.strerror}")

    def leave(self, network: Network, endpoint: Endpoint, sandbox_gone: bool = False) -> None:
        self._local.get(network.id, {}).pop(endpoint.id, None)
        if self.host_access(network) and endpoint.address:
            self._delete_host_route(network, endpoint.address)
        if not sandbox_gone:
            free_inside_name(endpoint.sandbox, endpoint.ifname, retire=True)
        self._remove_shim_if_unused(network)

    # --- host access ------------------------------------------------------------------------

    def _shim_name(self, network: Network) -> str:
        return netlink.interface_name(SHIM_PREFIX, network.id)

    def _shim_address_name(self, host: str | None = None) -> str:
        return f"host-access {host or self.host_key}"

    def host_gone(self, network: Network, address: str) -> None:
        """Free a dead host's host-access shim address."""
        owner = self._shim_address_name(address)
        for allocation in self.ctx.addresses.held(network):
            if allocation.kind == "aux" and allocation.name == owner:
                self.ctx.addresses.give_back(network, allocation.address, owner)

    def _ensure_shim(self, network: Network) -> None:
        """The host's own macvlan on the parent, up, with its address from the network's pool."""
        name = self._shim_name(network)
        with netlink.netns_socket(None) as ipr:
            index = netlink.link_index(ipr, name)
            if index is None:
                with Rtnl() as rtnl:
                    parent_index = self._parent_index(rtnl, self.parent(network), network)
                ipr.link("add", ifname=name, kind="macvlan", link=parent_index, macvlan_mode="bridge")
                index = netlink.link_index(ipr, name)
            netlink.disable_ipv6(name)   # the host's shim: IPv4 only, no IPv6 chatter on the parent's LAN
            try:
                netlink.set_sysctl(f"/proc/sys/net/ipv4/conf/{name}/arp_filter", "1")
                address = self._shim_address(network)
                with contextlib.suppress(Exception):   # already there after a restart
                    ipr.addr("add", index=index, address=address, prefixlen=32)
                ipr.link("set", index=index, state="up")
            except Exception:
                netlink.delete_link(ipr, name)
                raise
        self._shims[network.id] = (name, address)

    def _shim_address(self, network: Network) -> str:
        owner = self._shim_address_name()
        for allocation in self.ctx.addresses.held(network):
            if allocation.kind == "aux" and allocation.name == owner:
                return allocation.address
        return self.ctx.addresses.take(network, owner)

    def _remove_shim_if_unused(self, network: Network) -> None:
        if not self._local.get(network.id):
            self._remove_shim(network)

    def _remove_shim(self, network: Network) -> None:
        shim = self._shims.pop(network.id, None)
        with netlink.netns_socket(None) as ipr:
            netlink.delete_link(ipr, self._shim_name(network))
        if shim is not None:
            with contextlib.suppress(StoreError):
                self.ctx.addresses.give_back(network, shim[1], self._shim_address_name())

    def _add_host_route(self, network: Network, address: str) -> None:
        name, _ = self._shims[network.id]
        with Rtnl() as rtnl:
            rtnl.replace_route(address, 32, rtnl.link_index(name))

    def _delete_host_route(self, network: Network, address: str) -> None:
        shim = self._shims.get(network.id)
        if shim is not None:
            with contextlib.suppress(OSError), Rtnl() as rtnl:
                rtnl.delete_route(address, 32)


def _advert(pair) -> dict | None:
    try:
        return json.loads(pair.value)
    except ValueError:
        log.error("ignoring corrupt macvlan advertisement at %s", pair.key)
        return None


def _link_mac(name: str) -> str:
    with netlink.netns_socket(None) as ipr:
        return ipr.link("get", index=netlink.link_index(ipr, name))[0].get_attr("IFLA_ADDRESS")
