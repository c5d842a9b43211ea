"""The `overlay` driver: one VXLAN network across every host of the cluster.

Per network and per host (built when the host's first endpoint joins, removed when its last
leaves), a namespace `ov-<VNI>` holds:

  br0      a bridge with the network's gateway address, MTU = underlay MTU - 50
  vxlan0   VNI of the network, UDP 4789, learning off, ARP proxy on; created from the
           daemon's namespace, so its UDP socket is on the underlay
  gw0      (not for --internal) a veth to the host, `ovh<VNI>` there: the network's way out,
           masqueraded by the host like a bridge network's, and isolated from other networks
           by the same firewall rules

Peers come from the cluster store, never from flooding or gossip: for every endpoint on
another live host, a permanent ARP entry (its IP -> MAC) and a forwarding entry (MAC -> that
host's address) on vxlan0. The VNI is allocated cluster-wide by create-if-absent.

The transit link between the namespace and the host is unnumbered in effect: the host end is
169.254.1.1/32 and the namespace end 169.254.1.2/32 on every overlay (routes name the device),
so no address pool is needed for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from ipaddress import IPv4Network

from kvstore import KeyExists
from netd.contract.driverapi import CapturePoint, Driver, DriverContext, Hop, JoinInfo
from netd.contract.errors import BadRequest, Conflict
from netd.contract.model import Endpoint, Network
from netd.kernel import netlink
from netd.kernel.rtnl import Rtnl, configure_inside, free_inside_name, retire_named
from runtime import namespaces

log = logging.getLogger("netd.driver.overlay")

VXLAN_PORT = 4789
VXLAN_OVERHEAD = 50
FIRST_VNI, LAST_VNI = 4096, (1 << 24) - 1
VNI_KEYS = "vni/"                 # in the driver's own folder of the cluster store
OPT_VNI = "com.docker.network.driver.overlay.vxlanid_list"
OPT_MTU = "com.docker.network.driver.mtu"
HOST_TRANSIT, NS_TRANSIT = "169.254.1.1", "169.254.1.2"


class Sandbox:
    """This host's part of one overlay network."""

    def __init__(self, network: Network, run_dir: str):
        self.vni = int(network.driver_state["vni"])
        self.netns = os.path.join(run_dir, "netns", f"ov-{self.vni}")
        self.host_transit = f"ovh{self.vni}"
        self.br_index = 0
        self.vxlan_index = 0
        self.mtu = 0


class OverlayDriver(Driver):
    name = "overlay"
    scope = "global"
    scopes = ("global",)
    underlay_udp_ports = (VXLAN_PORT,)
    known_options = frozenset({OPT_VNI, OPT_MTU})

    def __init__(self, ctx: DriverContext):
        super().__init__(ctx)
        self._sandboxes: dict[str, Sandbox] = {}                  # network id -> built here
        self._peers: dict[str, dict[str, Endpoint]] = {}          # network id -> endpoint id -> peer
        self._local_count: dict[str, int] = {}                    # network id -> endpoints here
        self._lock = threading.RLock()

    # --- network (the creating host) --------------------------------------------------------

    def validate(self, network: Network) -> None:
        super().validate(network)
        if self.ctx.cluster_store is None:
            raise BadRequest("overlay networks need a cluster store: start every daemon with "
                             "--cluster-store etcd://HOST:PORT --cluster-advertise IP")
        if network.scope != "global":
            raise BadRequest("overlay networks are global: drop --scope local")
        if OPT_VNI in network.options:
            vni = network.options[OPT_VNI]
            if not vni.isdigit() or not 1 <= int(vni) <= LAST_VNI:
                raise BadRequest(f"invalid VXLAN id {vni!r}: give a number from 1 to {LAST_VNI}")
        if OPT_MTU in network.options:
            mtu = network.options[OPT_MTU]
            if not mtu.isdigit() or not 576 <= int(mtu) <= 9000:
                raise BadRequest(f"invalid MTU {mtu!r}: give a number from 576 to 9000")

    def create_network(self, network: Network) -> None:
        """Reserve the network's VNI cluster-wide; the data plane comes with the first endpoint."""
        store = self.ctx.cluster_store
        if OPT_VNI in network.options:
            vni = int(network.options[OPT_VNI])
            try:
                store.create(f"{VNI_KEYS}{vni}", network.id)
            except KeyExists:
                raise Conflict(f"VXLAN id {vni} is already used by another overlay network") from None
        else:
            pairs, _ = store.list(VNI_KEYS)
            used = {int(p.key[len(VNI_KEYS):]) for p in pairs}
            vni = FIRST_VNI
            while True:
                while vni in used:
                    vni += 1
                try:
                    store.create(f"{VNI_KEYS}{vni}", network.id)
                    break
                except KeyExists:   # another host took it a moment ago
                    used.add(vni)
        network.driver_state["vni"] = vni

    def delete_network(self, network: Network) -> None:
        """Remove this host's part (if any). The VNI is freed by release_network, last."""
        with self._lock:
            sandbox = self._sandboxes.pop(network.id, None)
            self._peers.pop(network.id, None)
        if sandbox is not None:
            self._remove_sandbox(network, sandbox)

    def release_network(self, network: Network) -> None:
        vni = network.driver_state.get("vni")
        if vni is not None:
            pair = self.ctx.cluster_store.get(f"{VNI_KEYS}{vni}")
            if pair is not None and pair.value == network.id:
                self.ctx.cluster_store.delete(pair.key, pair.version)

    # --- this host's data plane -------------------------------------------------------------

    def _sandbox(self, network: Network) -> Sandbox:
        """The network's namespace on this host, built (or found after a restart) on demand."""
        with self._lock:
            sandbox = self._sandboxes.get(network.id)
            if sandbox is None:
                sandbox = Sandbox(network, self.ctx.run_dir)
                try:
                    self._build_sandbox(network, sandbox)
                except Exception:
                    self._remove_sandbox(network, sandbox)
                    raise
                self._sandboxes[network.id] = sandbox
                for peer in self._peers.get(network.id, {}).values():
                    self._program_peer(sandbox, peer)
            return sandbox

    def _underlay_mtu(self) -> int:
        """MTU of the interface holding this host's advertise address."""
        with netlink.netns_socket(None) as ipr:
            for addr in ipr.get_addr(family=2):
                if addr.get_attr("IFA_ADDRESS") == self.ctx.host.address:
                    return ipr.link("get", index=addr["index"])[0].get_attr("IFLA_MTU")
        return 1500

    def _build_sandbox(self, network: Network, sandbox: Sandbox) -> None:
        """Idempotent: after a restart it finds what the kernel kept and adds what is missing."""
        sandbox.mtu = int(network.options.get(OPT_MTU, 0)) or self._underlay_mtu() - VXLAN_OVERHEAD
        if not namespaces.is_netns(sandbox.netns):
            namespaces.create_netns(sandbox.netns)
        with namespaces.entered_netns(sandbox.netns):
            netlink.set_sysctl("net.ipv4.ip_forward", "1")
            netlink.quiet_namespace()   # br0, vxlan0 and the veth ends here: no IPv6 chatter
        prefix = IPv4Network(network.ipam.subnet).prefixlen
        with netlink.netns_socket(sandbox.netns) as inside:
            gateway = f"{network.ipam.gateway}/{prefix}" if network.ipam.gateway else None
            sandbox.br_index = netlink.ensure_bridge(inside, "br0", gateway, sandbox.mtu, netns=sandbox.netns)
            sandbox.vxlan_index = netlink.link_index(inside, "vxlan0") or 0
        if not sandbox.vxlan_index:
            self._create_vxlan(sandbox)
        with netlink.netns_socket(sandbox.netns) as inside:
            sandbox.vxlan_index = netlink.link_index(inside, "vxlan0")
            inside.link("set", index=sandbox.vxlan_index, master=sandbox.br_index, mtu=sandbox.mtu, state="up")
        if not network.internal:
            self._build_transit(network, sandbox)

    def _create_vxlan(self, sandbox: Sandbox) -> None:
        """Created from the daemon's namespace straight into the overlay's: its UDP socket stays
        on the underlay, the device lives with the bridge."""
        fd = os.open(sandbox.netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with netlink.netns_socket(None) as ipr:
                ipr.link("add", ifname="vxlan0", kind="vxlan", vxlan_id=sandbox.vni, vxlan_port=VXLAN_PORT,
                         vxlan_learning=0, vxlan_proxy=1, vxlan_local=self.ctx.host.address,
                         net_ns_fd=fd, mtu=sandbox.mtu)
        finally:
            os.close(fd)

    def _build_transit(self, network: Network, sandbox: Sandbox) -> None:
        fd = os.open(sandbox.netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with netlink.netns_socket(None) as ipr:
                if netlink.link_index(ipr, sandbox.host_transit) is None:
                    ipr.link("add", ifname=sandbox.host_transit, kind="veth", peer={"ifname": "gw0", "net_ns_fd": fd})
                index = netlink.link_index(ipr, sandbox.host_transit)
                netlink.disable_ipv6(sandbox.host_transit)   # the host's end, before it is up
                with contextlib.suppress(Exception):
                    ipr.addr("add", index=index, address=HOST_TRANSIT, prefixlen=32)
                ipr.link("set", index=index, state="up")
                ipr.route("replace", dst=network.ipam.subnet, gateway=NS_TRANSIT, oif=index, flags=4)  # RTNH_F_ONLINK
        finally:
            os.close(fd)
        with netlink.netns_socket(sandbox.netns) as inside:
            index = netlink.link_index(inside, "gw0")
            with contextlib.suppress(Exception):
                inside.addr("add", index=index, address=NS_TRANSIT, prefixlen=32)
            inside.link("set", index=index, state="up")
            inside.route("replace", dst="0.0.0.0/0", gateway=HOST_TRANSIT, oif=index, flags=4)
        # The host treats the transit end like a bridge: masquerade out, isolation from other networks.
        self.ctx.firewall.add_network(network.id, sandbox.host_transit, network.ipam.subnet,
                                      internal=False, masquerade=True)

    def _remove_sandbox(self, network: Network, sandbox: Sandbox) -> None:
        if not network.internal:
            with contextlib.suppress(Exception):
                self.ctx.firewall.remove_network(network.id)
            with contextlib.suppress(Exception), netlink.netns_socket(None) as ipr:
                netlink.delete_link(ipr, sandbox.host_transit)
        namespaces.delete_netns(sandbox.netns)   # takes br0, vxlan0 and gw0 with it

    def restore(self, network: Network, endpoints: list[Endpoint]) -> None:
        if endpoints:
            with self._lock:
                self._local_count[network.id] = len(endpoints)
            self._sandbox(network)
            log.info("overlay %s (VNI %s) restored with %d local endpoint(s)", network.name,
                     network.driver_state.get("vni"), len(endpoints))

    def restore_done(self) -> None:
        """Remove overlay namespaces no network claimed: their endpoints were reclaimed while
        this host was away, or their network was removed meanwhile."""
        netns_dir = os.path.join(self.ctx.run_dir, "netns")
        with self._lock:
            kept = {sandbox.netns for sandbox in self._sandboxes.values()}
        for entry in sorted(os.listdir(netns_dir)) if os.path.isdir(netns_dir) else []:
            path = os.path.join(netns_dir, entry)
            if entry.startswith("ov-") and path not in kept:
                log.info("removing %s: no local endpoint needs it any more", entry)
                transit = f"ovh{entry[len('ov-'):]}"
                for rules in self.ctx.firewall.networks():
                    if rules.bridge == transit:
                        self.ctx.firewall.remove_network(rules.network_id)
                with contextlib.suppress(Exception), netlink.netns_socket(None) as ipr:
                    netlink.delete_link(ipr, transit)
                namespaces.delete_netns(path)

    def inspect(self, network: Network) -> dict:
        sandbox = self._sandboxes.get(network.id)
        info = {"VNI": network.driver_state.get("vni")}
        if sandbox is not None:
            info.update({"Namespace": sandbox.netns, "VXLAN": "vxlan0", "MTU": sandbox.mtu,
                         "Peers": sorted(f"{p.address} {p.mac} via {p.host}"
                                         for p in self._peers.get(network.id, {}).values())})
        return info

    # --- netd capture / trace ---------------------------------------------------------------

    def capture_point(self, network: Network, kind: str, endpoint: Endpoint | None = None) -> CapturePoint | None:
        sandbox = self._sandboxes.get(network.id)
        if sandbox is None:
            return None
        where = os.path.basename(sandbox.netns)
        if kind == "bridge":
            return CapturePoint("bridge", "br0", sandbox.netns, f"br0 in {where}", checks=("route",))
        if kind == "vxlan":
            return CapturePoint("vxlan", "vxlan0", sandbox.netns, f"vxlan0 in {where}", vni=sandbox.vni,
                                checks=("fdb",))
        if kind == "veth" and endpoint is not None and endpoint.host_ifname:
            return CapturePoint("veth", endpoint.host_ifname, sandbox.netns,
                                f"{endpoint.host_ifname} in {where} (veth of {endpoint.container_name})")
        if kind == "transit" and not network.internal:
            return CapturePoint("transit", sandbox.host_transit, None, f"{sandbox.host_transit} (way out of {where})",
                                checks=("route",))
        return None

    def trace_path(self, network: Network, source: Endpoint, dest: Endpoint | None) -> list[Hop]:
        """container -> veth -> br0 -> vxlan0 -> underlay, across to the destination's host:
        underlay -> vxlan0 -> br0 -> veth -> container. On one host the bridge joins the two
        veths; to an address outside, br0 -> gw0/ovh<VNI> -> the host's routing -> uplink."""
        here = source.host
        start = [Hop(here, "container", source.id), Hop(here, "veth", source.id), Hop(here, "bridge")]
        if dest is None:
            return [*start, Hop(here, "transit"), Hop(here, "uplink")]
        end = [Hop(dest.host, "veth", dest.id), Hop(dest.host, "container", dest.id)]
        if dest.host == here:
            return [*start, *end]
        there = dest.host
        return [*start, Hop(here, "vxlan"), Hop(here, "underlay"),
                Hop(there, "underlay"), Hop(there, "vxlan"), Hop(there, "bridge"), *end]

    # --- endpoints --------------------------------------------------------------------------

    def create_endpoint(self, network: Network, endpoint: Endpoint) -> None:
        endpoint.host_ifname = netlink.interface_name("vno", endpoint.id)
        if not endpoint.mac:
            endpoint.mac = netlink.mac_from_ip(endpoint.address)

    def join(self, network: Network, endpoint: Endpoint, info: JoinInfo) -> None:
        sandbox = self._sandbox(network)
        gateway = self.default_gateway(network) if info.set_default_route else None
        try:
            with Rtnl(sandbox.netns) as inside:
                fd = os.open(info.netns, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    inside.create_veth(endpoint.host_ifname, info.ifname, fd, endpoint.mac, sandbox.br_index,
                                       sandbox.mtu)
                finally:
                    os.close(fd)
                try:
                    if info.configure:
                        configure_inside(info.netns, info.ifname, endpoint.ipv4, gateway)
                except Exception:
                    retire_named(inside, endpoint.host_ifname, sandbox.netns)
                    raise
        except Exception:
            self._remove_if_unused(network)
            raise
        endpoint.gateway = gateway or ""
        with self._lock:
            self._local_count[network.id] = self._local_count.get(network.id, 0) + 1

    def leave(self, network: Network, endpoint: Endpoint, sandbox_gone: bool = False) -> None:
        sandbox = self._sandboxes.get(network.id)
        if sandbox is None:
            return
        if not sandbox_gone:
            free_inside_name(endpoint.sandbox, endpoint.ifname)
        with contextlib.suppress(OSError), Rtnl(sandbox.netns) as inside:
            retire_named(inside, endpoint.host_ifname, sandbox.netns)
        with self._lock:
            self._local_count[network.id] = max(0, self._local_count.get(network.id, 1) - 1)
        self._remove_if_unused(network)

    def _remove_if_unused(self, network: Network) -> None:
        """The data plane goes with this host's last endpoint on the network."""
        with self._lock:
            if self._local_count.get(network.id, 0) > 0:
                return
            sandbox = self._sandboxes.pop(network.id, None)
        if sandbox is not None:
            self._remove_sandbox(network, sandbox)
            log.info("overlay %s: last local endpoint left, data plane removed", network.name)

    # --- peers ------------------------------------------------------------------------------

    def peer_joined(self, network: Network, endpoint: Endpoint) -> None:
        with self._lock:
            self._peers.setdefault(network.id, {})[endpoint.id] = endpoint
            sandbox = self._sandboxes.get(network.id)
        if sandbox is not None:
            self._program_peer(sandbox, endpoint)

    def peer_left(self, network: Network, endpoint: Endpoint) -> None:
        with self._lock:
            self._peers.get(network.id, {}).pop(endpoint.id, None)
            sandbox = self._sandboxes.get(network.id)
        if sandbox is not None and endpoint.address:
            with Rtnl(sandbox.netns) as inside:
                inside.delete_neighbour(sandbox.vxlan_index, endpoint.address)
                inside.delete_fdb(sandbox.vxlan_index, endpoint.mac, endpoint.host)

    def _program_peer(self, sandbox: Sandbox, endpoint: Endpoint) -> None:
        if not endpoint.address or not endpoint.mac:
            return
        with Rtnl(sandbox.netns) as inside:
            inside.replace_neighbour(sandbox.vxlan_index, endpoint.address, endpoint.mac)
            inside.replace_fdb(sandbox.vxlan_index, endpoint.mac, endpoint.host)

