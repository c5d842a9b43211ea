"""The daemon's side of `netd capture` and `netd trace`: where things are on this host.

- `capture_target(ctl, "web" | "network:NAME" | "vxlan:NAME" | "underlay", iface)`: the capture
  points (namespace path + interface) of what the user named, for the CLI to sniff on;
- `resolve_point(ctl, kind, network, endpoint)`: one hop of a trace on this host ("container",
  "underlay", "uplink" here, the rest by the network's driver: Driver.capture_point);
- `names(ctl)`: address, MAC and VNI -> the container, network or host netd knows by it.

Namespace paths are what the CLI (and the capture worker) open: a container's pinned namespace,
an overlay's `ov-<VNI>`, or the daemon's own as /proc/<daemon pid>/ns/net, which any root process
of the same PID namespace can enter. Nothing here imports scapy.
"""

from __future__ import annotations

import ipaddress
import os

from netd.contract.driverapi import CapturePoint
from netd.contract.errors import BadRequest, Conflict, NotFound
from netd.contract.model import Container, Endpoint, Network
from netd.kernel import netlink

UNDERLAY_FILTER = "udp port 4789"
TARGET_KINDS = "CONTAINER, network:NAME, vxlan:NAME or underlay"


def own_netns() -> str:
    """The daemon's network namespace, as a path other processes can open."""
    return f"/proc/{os.getpid()}/ns/net"


def point_json(point: CapturePoint) -> dict:
    return {"Kind": point.kind, "Netns": point.netns or own_netns(), "Interface": point.ifname,
            "Label": point.label or point.ifname, "VNI": point.vni, "Checks": list(point.checks)}


# --- capture targets --------------------------------------------------------------------------

def capture_target(ctl, target: str, iface: str | None = None) -> dict:
    kind, sep, name = target.partition(":")
    if not target:
        raise BadRequest(f"no capture target: give {TARGET_KINDS}")
    if target == "underlay":
        points = [underlay_point(ctl)]
        description, default_filter = f"the underlay of host {ctl.host.address}", UNDERLAY_FILTER
    elif sep and kind in ("network", "vxlan"):
        if not name:
            raise BadRequest(f"{kind}: needs a network name, e.g. {kind}:ol1")
        network = ctl.get_network(name)
        points = [_network_point(ctl, network, "bridge" if kind == "network" else "vxlan")]
        description = f"network {network.name}" if kind == "network" else f"the VXLAN device of {network.name}"
        default_filter = ""
    elif sep:
        raise BadRequest(f"unknown capture target {target!r}: give {TARGET_KINDS}")
    else:
        container = ctl.get_container(target)
        points = container_points(ctl, container)
        description, default_filter = f"container {container.name}", ""
    if iface:
        chosen = [p for p in points if p.ifname == iface]
        if not chosen:
            have = ", ".join(p.ifname for p in points)
            raise BadRequest(f"{description} has no interface {iface} (it has: {have})")
        points = chosen
    return {"Target": target, "Description": description, "Filter": default_filter,
            "Points": [point_json(p) for p in points]}


def underlay_point(ctl) -> CapturePoint:
    address = ctl.host.address
    if not address:
        raise BadRequest("underlay: this daemon is not in a cluster (no --cluster-advertise address), so it has "
                         "no underlay; capture on a container or network:NAME instead")
    ifname = _interface_with_address(address)
    if ifname is None:
        raise NotFound(f"underlay: no interface of this host holds the advertise address {address}")
    return CapturePoint("underlay", ifname, None, f"{ifname} (underlay {address})")


def uplink_point(destination: str) -> CapturePoint:
    """The interface this host's routing sends `destination` out of."""
    with netlink.netns_socket(None) as ipr:
        try:
            routes = ipr.route("get", dst=destination)
        except Exception:  # noqa: BLE001 - no route: unreachable
            routes = []
        index = routes[0].get_attr("RTA_OIF") if routes else None
        if index is None:
            return CapturePoint("uplink", "", None, f"no route to {destination} on this host")
        ifname = ipr.link("get", index=index)[0].get_attr("IFLA_IFNAME")
    return CapturePoint("uplink", ifname, None, f"{ifname} (this host's route to {destination})",
                        checks=("route",))


def _interface_with_address(address: str) -> str | None:
    with netlink.netns_socket(None) as ipr:
        for addr in ipr.get_addr(family=2):
            if addr.get_attr("IFA_ADDRESS") == address:
                return ipr.link("get", index=addr["index"])[0].get_attr("IFLA_IFNAME")
    return None


def _network_point(ctl, network: Network, kind: str) -> CapturePoint:
    driver = ctl.driver_of(network)
    point = driver.capture_point(network, kind) if driver else None
    if point is not None:
        return point
    if kind == "vxlan" and network.driver != "overlay":
        raise BadRequest(f"network {network.name} uses driver {network.driver}: only overlay networks have a "
                         "VXLAN device (try network:" + network.name + ")")
    if network.scope == "global":
        raise Conflict(f"network {network.name} has no {kind} on this host yet: it is built when the first "
                       "container on this host joins the network")
    raise BadRequest(f"network {network.name} (driver {network.driver}) has no {kind} to capture on; "
                     "capture on one of its containers instead")


def container_points(ctl, container: Container) -> list[CapturePoint]:
    if container.state != "running":
        raise Conflict(f"container {container.name} is not running")
    owner = ctl.netns_owner(container)
    if not owner.netns:
        raise BadRequest(f"container {container.name} uses the host's network namespace: its packets are the "
                         "host's, capture them with tcpdump on the host's interfaces")
    endpoints = [e for e in ctl.container_endpoints(owner) if e.ifname]
    ifnames = [e.ifname for e in endpoints] or ["lo"]
    return [CapturePoint("container", ifname, owner.netns, f"{container.name}:{ifname}") for ifname in ifnames]


def resolve_point(ctl, kind: str, network: Network, endpoint: Endpoint | None = None,
                  destination: str = "") -> CapturePoint | None:
    """One trace hop on this host, or None if this host has no such thing."""
    if kind == "container":
        if endpoint is None or not endpoint.sandbox or not endpoint.ifname:
            return None
        return CapturePoint("container", endpoint.ifname, endpoint.sandbox,
                            f"{endpoint.container_name}:{endpoint.ifname}", checks=("route", "neighbour"))
    if kind == "underlay":
        return underlay_point(ctl)
    if kind == "uplink":
        return uplink_point(destination)
    driver = ctl.driver_of(network)
    return driver.capture_point(network, kind, endpoint) if driver else None


# --- names ------------------------------------------------------------------------------------

def names(ctl) -> dict:
    """Address / MAC / VNI -> what netd calls it, for the lines `netd capture` prints."""
    addresses: dict[str, str] = {}
    macs: dict[str, str] = {}
    vnis: dict[str, str] = {}
    for network in ctl.list_networks():
        if network.ipam and network.ipam.gateway:
            addresses.setdefault(network.ipam.gateway, f"{network.name} gateway")
        if network.driver_state.get("vni") is not None:
            vnis[str(network.driver_state["vni"])] = network.name
        try:
            endpoints = ctl.network_endpoints(network)
        except Exception:  # noqa: BLE001 - names are a nicety; a store hiccup must not stop a capture
            endpoints = []
        for endpoint in endpoints:
            if endpoint.address:
                addresses[endpoint.address] = endpoint.container_name
            if endpoint.mac:
                macs[endpoint.mac] = endpoint.container_name
    if ctl.cluster is not None:
        try:
            hosts = ctl.cluster.host_list()
        except Exception:  # noqa: BLE001
            hosts = []
        unique = len({h.get("Name") for h in hosts}) == len(hosts)
        for host in hosts:
            address = host.get("Address")
            if address:
                addresses.setdefault(address, f"host {host.get('Name')}" if unique else "netd host")
    if ctl.host.address:
        addresses[ctl.host.address] = "this host"
    return {"Addresses": addresses, "MACs": macs, "VNIs": vnis}


def is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
        return True
    except ValueError:
        return False
