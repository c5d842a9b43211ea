"""This host's part of a trace: capture workers on its hops, and the facts of each hop (links, routes, neighbours, drops)."""

from __future__ import annotations

import contextlib
import json
import logging
import secrets

from netd.contract.errors import NetdError
from netd.debug.packets import Probe
from netd.debug.trace.plan import MAX_SECONDS, probe_filter

log = logging.getLogger(__name__)


class HostPart:
    """The hops of one trace on this host: their capture points, a worker, counters, facts."""

    def __init__(self, ctl, network, hops: list[tuple[int, object]], probe: Probe, endpoints: dict,
                 send_from: str | None = None, seconds: float = MAX_SECONDS):
        from netd.debug import points as debug

        self.ctl = ctl
        self.probe = probe
        self.endpoints = endpoints       # endpoint id -> Endpoint (those the hops name)
        self.points: dict[int, object] = {}
        self.errors: dict[int, str] = {}
        for index, hop in hops:
            try:
                point = debug.resolve_point(ctl, hop.kind, network, endpoints.get(hop.endpoint), probe.dst)
            except NetdError as e:
                self.errors[index] = e.message
                continue
            if point is None or not point.ifname:
                self.errors[index] = (point.label if point is not None else
                                      f"this host has no {hop.kind} of network {network.name}")
                continue
            self.points[index] = point
        self.spec = {
            "Points": [{**debug.point_json(p), "Label": str(i), "Filter": probe_filter(probe, p.kind)}
                       for i, p in self.points.items()],
            "Probe": probe.to_json(),
            "Send": {"Netns": send_from} if send_from else None,
            "Seconds": seconds,
        }
        self.worker = None
        self.before: dict[int, dict] = {}

    def start(self):
        from netd.debug.worker import Worker

        self.before = {i: link_facts(p) for i, p in self.points.items()}
        if self.points or self.spec["Send"]:
            self.worker = Worker(self.spec).start()
        return self

    def wait_ready(self, timeout: float) -> None:
        if self.worker is not None:
            self.worker.wait_ready(timeout)

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()

    def report(self, macs: list[str], addresses: list[str]) -> dict[int, dict]:
        """Per hop: label, records, counter changes, MTU, facts for the checks the point asks for."""
        records = self.worker.records if self.worker is not None else []
        failed = self.worker.failed if self.worker is not None else {}
        hops: dict[int, dict] = {}
        for index, point in self.points.items():
            if str(index) in failed:
                hops[index] = {"Label": point.label, "Kind": point.kind, "Interface": point.ifname, "Records": [],
                               "Error": f"cannot capture on {point.label}: {failed[str(index)]}"}
                continue
            after = link_facts(point)
            before = self.before.get(index, {})
            hop = {"Label": point.label, "Kind": point.kind, "Interface": point.ifname, "MTU": after.get("MTU"),
                   "Records": [r for r in records if r["Interface"] == str(index)],
                   "Dropped": {k: after[k] - before[k] for k in ("rx_dropped", "tx_dropped", "rx_errors", "tx_errors")
                               if k in after and k in before and after[k] > before[k]},
                   "Facts": point_facts(point, macs, addresses)}
            if not after.get("Exists", True):
                hop["Error"] = f"{point.ifname} is gone"
            hops[index] = hop
        for index, error in self.errors.items():
            hops[index] = {"Error": error, "Records": []}
        return hops


def link_facts(point) -> dict:
    """MTU and drop counters of a capture point's interface (netlink, in its namespace)."""
    from netd.kernel import netlink

    try:
        with netlink.netns_socket(point.netns) as ipr:
            index = netlink.link_index(ipr, point.ifname)
            if index is None:
                return {"Exists": False}
            link = ipr.link("get", index=index)[0]
            stats = link.get_attr("IFLA_STATS64") or {}
            facts = {"MTU": link.get_attr("IFLA_MTU"), "Exists": True}
            for key in ("rx_dropped", "tx_dropped", "rx_errors", "tx_errors"):
                value = stats.get(key) if hasattr(stats, "get") else None
                if value is not None:
                    facts[key] = value
            return facts
    except OSError:
        return {"Exists": False}


def point_facts(point, macs: list[str], addresses: list[str]) -> dict:
    """What the point's checks find: FDB entries for `macs`, routes and ARP entries for `addresses`."""
    from netd.kernel import netlink

    facts: dict = {}
    if not point.checks:
        return facts
    try:
        with netlink.netns_socket(point.netns) as ipr:
            if "fdb" in point.checks:
                index = netlink.link_index(ipr, point.ifname)
                known = {}
                for entry in ipr.get_neighbours(family=7):   # AF_BRIDGE: the device's FDB
                    if entry["ifindex"] == index and entry.get_attr("NDA_LLADDR"):
                        known[entry.get_attr("NDA_LLADDR").lower()] = entry.get_attr("NDA_DST") or ""
                facts["FDB"] = {mac: known.get(mac.lower()) for mac in macs if mac}
            if "route" in point.checks or "neighbour" in point.checks:
                routes = {}
                for address in addresses:
                    routes[address] = _route(ipr, address)
                facts["Routes"] = routes
            if "neighbour" in point.checks:
                neighbours = {}
                for address, route in facts["Routes"].items():
                    hop = route.get("Gateway") or address
                    if route.get("Via") and route.get("Type") == 1:   # unicast, not this namespace's own address
                        neighbours[hop] = _neighbour_state(ipr, hop)
                facts["Neighbours"] = neighbours
    except OSError as e:
        facts["Error"] = e.strerror or str(e)
    return facts


def _route(ipr, address: str) -> dict:
    try:
        found = ipr.route("get", dst=address)
    except Exception as e:  # noqa: BLE001 - pyroute2's NetlinkError: what the route says, by errno
        code = getattr(e, "code", None)
        return {"Error": ROUTE_ERRORS.get(code, f"no route ({getattr(e, 'args', [None, e])[-1]})")}
    if not found:
        return {"Error": "no route"}
    route = found[0]
    oif = route.get_attr("RTA_OIF")
    via = ""
    if oif is not None:
        with contextlib.suppress(Exception):
            via = ipr.link("get", index=oif)[0].get_attr("IFLA_IFNAME")
    return {"Via": via, "Gateway": route.get_attr("RTA_GATEWAY") or "", "Type": route["type"]}


# `ip route get` fails with these when the matching route is not a unicast one
ROUTE_ERRORS = {22: "a blackhole route drops it", 113: "an unreachable route refuses it",
                13: "a prohibit route refuses it", 101: "no route (network unreachable)"}


NUD_STATES = {0x01: "INCOMPLETE", 0x02: "REACHABLE", 0x04: "STALE", 0x08: "DELAY", 0x10: "PROBE", 0x20: "FAILED",
              0x40: "NOARP", 0x80: "PERMANENT"}


def _neighbour_state(ipr, address: str) -> str:
    for entry in ipr.get_neighbours(family=2):
        if entry.get_attr("NDA_DST") == address:
            return NUD_STATES.get(entry["state"], str(entry["state"]))
    return "none"


class ForwardWatch:
    """Did a firewall drop the probe in this host's forward path? A throw-away nftables table with
    two chains on the forward hook, the first (priority -400) and the last (400) of all, each
    counting the probe's packets (and the answer's) and accepting them. Packets that entered
    the hook but never reached the last chain were dropped by a rule in between: netd's own
    (isolation, --internal) or another program's (Docker's FORWARD policy DROP, say). Bridged
    traffic passes here too when br_netfilter is on. The table goes when the trace ends."""

    def __init__(self, probe: Probe):
        self.table = f"netd_trace_{secrets.token_hex(4)}"
        self.probe = probe
        self.nft = None

    def start(self) -> ForwardWatch:
        import nftables

        p, t = self.probe, self.table
        proto = {"icmp": "icmp", "tcp": "tcp", "udp": "udp"}[p.proto]
        commands = [f"add table ip {t}"]
        for chain, priority in (("first", -400), ("last", 400)):
            commands.append(f"add chain ip {t} {chain} {{ type filter hook forward priority {priority}; "
                            "policy accept; }")
            commands.append(f'add rule ip {t} {chain} ip daddr {p.dst} meta l4proto {proto} counter comment "request"')
            commands.append(f'add rule ip {t} {chain} ip saddr {p.dst} ip daddr {p.src} counter comment "reply"')
        self.nft = nftables.Nftables()
        self.nft.set_json_output(True)
        code, _, error = self.nft.cmd("\n".join(commands))
        if code != 0:
            log.warning("trace: no firewall counters (%s)", error.strip())
            self.nft = None
        return self

    def read(self) -> dict[str, dict[str, int]]:
        """{"request": {"first": n, "last": m}, "reply": {...}}; empty if unavailable."""
        if self.nft is None:
            return {}
        code, output, _ = self.nft.cmd(f"list table ip {self.table}")
        if code != 0:
            return {}
        counts: dict[str, dict[str, int]] = {}
        for item in json.loads(output).get("nftables", []):
            rule = item.get("rule")
            if not rule:
                continue
            packets = next((e["counter"]["packets"] for e in rule.get("expr", []) if "counter" in e), 0)
            counts.setdefault(rule.get("comment", ""), {})[rule["chain"]] = packets
        return counts

    def stop(self) -> None:
        if self.nft is not None:
            self.nft.cmd(f"delete table ip {self.table}")
            self.nft = None
