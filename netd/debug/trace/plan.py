"""A trace's plan: the hops a probe crosses, from the source container's driver, and the probe itself."""

from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass, field

from netd.contract.errors import BadRequest, Conflict, NotFound
from netd.core import keys
from netd.debug.packets import Probe

REQUESTS, RESULTS, STOPS = keys.TRACE_REQUESTS, keys.TRACE_RESULTS, keys.TRACE_STOPS


KEY_TTL = 60.0


MAX_SECONDS = 30.0                     # longest a remote capture runs


MAX_CONCURRENT = 4                     # remote traces served at once per host


READY_TIMEOUT = 20.0                   # starting the workers (Python + scapy) on a loaded host


HOP_KINDS = {"container", "veth", "bridge", "vxlan", "transit", "underlay", "uplink", "route", "parent"}


VXLAN_FILTER = "udp port 4789"


NOTHING_FOUND = "lost"


@dataclass
class Plan:
    network: object                 # netd.contract.model.Network
    source: object                  # netd.contract.model.Endpoint
    dest: object | None             # netd.contract.model.Endpoint, or None for an address
    address: str                    # the destination address
    hops: list = field(default_factory=list)   # netd.contract.driverapi.Hop
    note: str = ""


def parse_proto(spec: str) -> tuple[str, int]:
    name, _, port = (spec or "icmp").lower().partition(":")
    if name == "icmp" and not port:
        return "icmp", 0
    if name in ("tcp", "udp") and port.isdigit() and 0 < int(port) < 65536:
        return name, int(port)
    raise BadRequest(f"invalid --proto {spec!r}: use icmp, tcp:PORT or udp:PORT (PORT from 1 to 65535)")


def plan_trace(ctl, source: str, destination: str) -> Plan:
    from netd.debug.points import is_ipv4

    container = _source_container(ctl, source)
    if container.state != "running":
        raise Conflict(f"container {container.name} is not running: start it, or trace from another one")
    owner = ctl.netns_owner(container)
    endpoints = [e for e in ctl.container_endpoints(owner) if e.address and e.ifname]
    if not owner.netns:
        raise BadRequest(f"container {container.name} uses the host's network namespace: there is no container "
                         "path to trace (trace from a container on a netd network)")
    if not endpoints:
        raise BadRequest(f"container {container.name} has no network with addresses to trace from")
    networks = [(e, n) for e in endpoints if (n := ctl.network_by_id(e.network_id)) is not None]
    wanted = destination.lower()
    for endpoint, network in networks:
        for other in ctl.network_endpoints(network):
            if other.container_id == owner.id or not other.address:
                continue
            names = {other.container_name.lower(), *(a.lower() for a in other.aliases)}
            if wanted in names or (len(wanted) >= 3 and other.container_id.startswith(wanted)):
                return _plan(ctl, network, endpoint, other, other.address)
    if not is_ipv4(destination):
        where = ", ".join(n.name for _, n in networks)
        raise NotFound(f"{destination} is neither a container on the networks of {container.name} ({where}) "
                       "nor an IPv4 address")
    for endpoint, network in networks:
        for other in ctl.network_endpoints(network):
            if other.address == destination and other.container_id != owner.id:
                return _plan(ctl, network, endpoint, other, destination)
    for endpoint, network in networks:
        if network.ipam and ipaddress.IPv4Address(destination) in ipaddress.IPv4Network(network.ipam.subnet):
            plan = _plan(ctl, network, endpoint, None, destination)
            plan.hops = [h for h in plan.hops if h.kind not in ("transit", "uplink")]   # it stays on the network
            plan.note = f"no container netd knows of holds {destination} on network {network.name}"
            return plan
    endpoint, network = next(((e, n) for e, n in networks if e.gateway), networks[0])
    return _plan(ctl, network, endpoint, None, destination)


def _source_container(ctl, source: str):
    try:
        return ctl.get_container(source)
    except NotFound:
        if ctl.cluster is not None:
            for network in ctl.list_networks():
                if network.scope != "global":
                    continue
                for endpoint in ctl.network_endpoints(network):
                    if endpoint.container_name == source and endpoint.host != ctl.host_key:
                        raise BadRequest(f"container {source} runs on host {endpoint.host}: run netd trace there "
                                         "(the probe is sent by the source's host)") from None
        raise


def _plan(ctl, network, source, dest, address: str) -> Plan:
    driver = ctl.driver_of(network)
    if driver is None:
        raise BadRequest(f"network {network.name} uses driver {network.driver}, which this daemon does not have")
    return Plan(network, source, dest, address, driver.trace_path(network, source, dest))


def make_probe(plan: Plan, proto: str, port: int, size: int) -> Probe:
    token = b"netd".hex() + secrets.token_hex(6)
    return Probe(proto=proto, src=plan.source.address, dst=plan.address, icmp_id=secrets.randbelow(0xFFFF) + 1,
                 icmp_seq=1, sport=40000 + secrets.randbelow(20000), dport=port, token=token, size=size)


def probe_filter(probe: Probe, kind: str) -> str:
    plain = "icmp" if probe.proto == "icmp" else f"{probe.proto} port {probe.dport} or icmp"
    if kind == "underlay":   # wrapped in VXLAN (overlay) or as it is (hostgw, routed)
        return f"{VXLAN_FILTER} or {plain}"
    return plain


def _number(value, default, flag: str, low: float, high: float):
    if value is None:
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BadRequest(f"invalid {flag} {value!r}: give a number") from None
    if not low <= number <= high:
        raise BadRequest(f"invalid {flag} {value}: give a number from {low:g} to {high:g}")
    return number
