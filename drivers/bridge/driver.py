"""The `bridge` driver: a Linux bridge per network on this host, a veth per endpoint.

Outbound traffic is masqueraded, published ports are DNATed, and different bridge
networks cannot reach each other; all of that lives in netd's own nftables table
(netd.kernel.firewall). `--internal` networks get no route out and no NAT.
"""

from __future__ import annotations

import contextlib
import errno
import os

from netd.contract.driverapi import CapturePoint, Driver, Hop, JoinInfo, option_flag
from netd.contract.errors import BadRequest, Conflict
from netd.contract.model import Endpoint, Network, PortBinding
from netd.kernel import netlink
from netd.kernel.rtnl import Rtnl, configure_inside, free_inside_name, retire_named

OPT_BRIDGE_NAME = "com.docker.network.bridge.name"
OPT_MTU = "com.docker.network.driver.mtu"
OPT_MASQUERADE = "com.docker.network.bridge.enable_ip_masquerade"
OPT_HOST_BINDING = "com.docker.network.bridge.host_binding_ipv4"

DEFAULT_BRIDGE = "netd0"
VETH_PREFIX = "vnd"        # host ends of the endpoints' veths   # the default `bridge` network's device, as docker0 is Docker's



class BridgeDriver(Driver):
    name = "bridge"
    known_options = frozenset({OPT_BRIDGE_NAME, OPT_MTU, OPT_MASQUERADE, OPT_HOST_BINDING})
    supports_ports = True

    def __init__(self, ctx):
        super().__init__(ctx)
        self._bridge_indexes: dict[str, int] = {}   # network id -> ifindex of its bridge here
        self._claimed: set[str] = set()             # veth host ends of the endpoints restored

    # --- network ----------------------------------------------------------------------------

    def validate(self, network: Network) -> None:
        super().validate(network)
        name = network.options.get(OPT_BRIDGE_NAME)
        if name is not None and (not name or len(name) > netlink.IFNAMSIZ or "/" in name or " " in name):
            raise BadRequest(f"invalid bridge name {name!r}: at most {netlink.IFNAMSIZ} characters, no '/' or spaces")
        if OPT_MTU in network.options:
            mtu = network.options[OPT_MTU]
            if not mtu.isdigit() or not 68 <= int(mtu) <= 65535:
                raise BadRequest(f"invalid MTU {mtu!r}: give a number from 68 to 65535")
        if OPT_MASQUERADE in network.options:
            option_flag(network.options[OPT_MASQUERADE], OPT_MASQUERADE)

    def bridge_name(self, network: Network) -> str:
        return network.driver_state.get("bridge") or network.options.get(OPT_BRIDGE_NAME) or (
            DEFAULT_BRIDGE if network.builtin else netlink.interface_name("netd-", network.id[:10])
        )

    def _mtu(self, network: Network) -> int | None:
        return int(network.options[OPT_MTU]) if OPT_MTU in network.options else None

    def _masquerade(self, network: Network) -> bool:
        return option_flag(network.options.get(OPT_MASQUERADE, "true"), OPT_MASQUERADE)

    def create_network(self, network: Network) -> None:
        bridge = self.bridge_name(network)
        with netlink.netns_socket(None) as ipr:
            if netlink.link_index(ipr, bridge) is not None:
                raise Conflict(f"interface {bridge} already exists on this host: choose another bridge name")
            network.driver_state["bridge"] = bridge
            try:
                self._build(ipr, network)
            except Exception:
                self._remove(ipr, network)
                raise

    def _build(self, ipr, network: Network) -> None:
        bridge = network.driver_state["bridge"]
        address = None
        if network.ipam and network.ipam.gateway:
            prefix = network.ipam.subnet.split("/")[1]
            address = f"{network.ipam.gateway}/{prefix}"
        self._bridge_indexes[network.id] = netlink.ensure_bridge(ipr, bridge, address, self._mtu(network))
        self.ctx.firewall.add_network(
            network.id, bridge, network.ipam.subnet if network.ipam else "",
            internal=network.internal, masquerade=self._masquerade(network),
        )

    def _remove(self, ipr, network: Network) -> None:
        self._bridge_indexes.pop(network.id, None)
        with contextlib.suppress(Exception):
            self.ctx.firewall.remove_network(network.id)
        netlink.delete_link(ipr, network.driver_state.get("bridge") or self.bridge_name(network))

    def delete_network(self, network: Network) -> None:
        with netlink.netns_socket(None) as ipr:
            self._remove(ipr, network)

    def restore(self, network: Network, endpoints: list[Endpoint]) -> None:
        self._claimed.update(e.host_ifname for e in endpoints if e.host_ifname)
        with netlink.netns_socket(None) as ipr:
            self._build(ipr, network)
            bridge = netlink.link_index(ipr, network.driver_state["bridge"])
            for endpoint in endpoints:
                index = netlink.link_index(ipr, endpoint.host_ifname)
                if index is None:
                    self.log.warning("endpoint %s of %s lost its veth %s", endpoint.container_name, network.name,
                                     endpoint.host_ifname)
                else:
                    ipr.link("set", index=index, master=bridge, state="up")

    def restore_done(self) -> None:
        """Veths of endpoints that never came to be (a kill -9 between the join and the endpoint's
        record): their host ends carry netd's prefix and no restored endpoint claims them. Deleting
        the host end takes the container's end with it."""
        with netlink.netns_socket(None) as ipr:
            for link in ipr.get_links():
                name = link.get_attr("IFLA_IFNAME") or ""
                if name.startswith(VETH_PREFIX) and name not in self._claimed:
                    self.log.warning("removing veth %s: no endpoint claims it (left by a crash)", name)
                    netlink.delete_link(ipr, name)
        self._claimed.clear()

    def inspect(self, network: Network) -> dict:
        return {"Bridge": network.driver_state.get("bridge", "")}

    # --- netd capture / trace ---------------------------------------------------------------

    def capture_point(self, network: Network, kind: str, endpoint: Endpoint | None = None) -> CapturePoint | None:
        bridge = network.driver_state.get("bridge") or self.bridge_name(network)
        if kind == "bridge":
            return CapturePoint("bridge", bridge, None, f"{bridge} (bridge)", checks=("route",))
        if kind == "veth" and endpoint is not None and endpoint.host_ifname:
            return CapturePoint("veth", endpoint.host_ifname, None,
                                f"{endpoint.host_ifname} (veth of {endpoint.container_name})")
        return None

    def trace_path(self, network: Network, source: Endpoint, dest: Endpoint | None) -> list[Hop]:
        """container -> its veth -> the bridge -> the other veth -> container; or, to an address
        outside, the bridge -> the host's routing (NAT) -> the uplink."""
        here = source.host
        start = [Hop(here, "container", source.id), Hop(here, "veth", source.id), Hop(here, "bridge")]
        if dest is None:
            return [*start, Hop(here, "uplink")]
        return [*start, Hop(here, "veth", dest.id), Hop(here, "container", dest.id)]

    # --- endpoints --------------------------------------------------------------------------

    def create_endpoint(self, network: Network, endpoint: Endpoint) -> None:
        endpoint.host_ifname = netlink.interface_name(VETH_PREFIX, endpoint.id)
        if not endpoint.mac:
            endpoint.mac = netlink.mac_from_ip(endpoint.address) if endpoint.address else netlink.random_mac()

    def join(self, network: Network, endpoint: Endpoint, info: JoinInfo) -> None:
        """The hot path of `network connect`: raw rtnetlink (netd.kernel.rtnl), six small requests."""
        gateway = self.default_gateway(network) if info.set_default_route else None
        with Rtnl() as host:
            fd = os.open(info.netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                self._create_veth(host, network, endpoint, info, fd)
            finally:
                os.close(fd)
            try:
                host.set_hairpin(host.link_index(endpoint.host_ifname))
                if info.configure:
                    configure_inside(info.netns, info.ifname, endpoint.ipv4, gateway)
                endpoint.gateway = gateway or ""
            except Exception:
                retire_named(host, endpoint.host_ifname)
                raise

    def _create_veth(self, host: Rtnl, network: Network, endpoint: Endpoint, info: JoinInfo, fd: int) -> None:
        bridge = self._bridge_indexes.get(network.id) or host.link_index(network.driver_state["bridge"])
        if bridge is None:
            raise OSError(errno.ENODEV, f"bridge {network.driver_state['bridge']} of network {network.name} is missing")
        try:
            host.create_veth(endpoint.host_ifname, info.ifname, fd, endpoint.mac, bridge, self._mtu(network))
        except OSError as e:
            if e.errno == errno.EXFULL:
                raise Conflict(f"network {network.name} is full on this host: a Linux bridge takes at most 1024 "
                               "ports; spread the containers over more networks") from None
            if e.errno not in (errno.ENODEV, errno.EINVAL) or network.id not in self._bridge_indexes:
                raise
            # the bridge was re-created behind our back (new index): look it up once more
            del self._bridge_indexes[network.id]
            self._create_veth(host, network, endpoint, info, fd)
            return
        self._bridge_indexes[network.id] = bridge

    def leave(self, network: Network, endpoint: Endpoint, sandbox_gone: bool = False) -> None:
        """Take the endpoint out at once; its veth is deleted in the background, in a batch."""
        if not sandbox_gone:
            free_inside_name(endpoint.sandbox, endpoint.ifname)
        with Rtnl() as host:
            retire_named(host, endpoint.host_ifname)

    # --- published ports --------------------------------------------------------------------

    def default_host_ip(self, network: Network) -> str:
        return network.options.get(OPT_HOST_BINDING, "")

    def publish_ports(self, network: Network, endpoint: Endpoint, ports: list[PortBinding]) -> None:
        done: list[PortBinding] = []
        try:
            for port in ports:
                self.ctx.firewall.add_port(
                    network.id, endpoint.address, port.proto, port.host_ip or None, port.host_port,
                    port.container_port, network.driver_state["bridge"],
                )
                done.append(port)
        except Exception:
            self.unpublish_ports(network, endpoint, done)
            raise

    def unpublish_ports(self, network: Network, endpoint: Endpoint, ports: list[PortBinding]) -> None:
        for port in ports:
            with contextlib.suppress(Exception):
                self.ctx.firewall.remove_port(port.proto, port.host_ip or None, port.host_port)
