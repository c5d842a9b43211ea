"""`netd trace SOURCE DEST`: send one probe and show every hop of its path that saw it.

The path. The source container's network driver names the hops (Driver.trace_path): for an
overlay, container eth0 -> its veth -> br0 -> vxlan0 -> underlay, then on the destination's
host underlay -> vxlan0 -> br0 -> veth -> container eth0; for a bridge, the two veths and the
bridge between; to an address outside, the bridge, the host's route and its uplink. Each host
resolves its own hops to an interface in a namespace (netd.debug.points.resolve_point, and the driver's
capture_point), so no host needs to know another's namespaces or interface names.

One run. On every host of the path a capture worker (netd.debug.capture, a short-lived process that
opens a packet socket per hop in the hop's namespace) starts listening with a BPF filter for the
probe's protocol (and VXLAN on the underlay). When all are ready, the source's worker sends the
probe from inside the source container (its own routing and ARP), and every worker reports only
packets that are the probe or its answer (netd.debug.packets.match_probe: ICMP id/seq and a random
token, TCP/UDP ports; VXLAN is looked into; NAT changes nothing that is matched). The trace ends
when the answer is back at the source container, or after --timeout.

Why it was lost. The hop where the probe (or the answer) was last seen and the first one where it
was not tell where; then netd looks at that place: the VXLAN device's FDB entry for the MAC it
must reach ("fdb"), the namespace's route to the address ("route"), the container's ARP entry for
its next hop ("neighbour"), the drop counters of each hop's interface (before and after), the
hop's MTU against the probe's size, and whether the other host took part at all.

Remote hosts: through the cluster store, not a new listener. The requesting daemon writes a
request under `netd/trace/requests/<host>/<id>`; each daemon watches its own prefix (a Mirror, as
for networks and endpoints), captures, and writes `netd/trace/results/<id>/<host>` ("Ready", then
the records); `netd/trace/stop/<id>` ends it early. Every key has a 60 s lease, so nothing is left
if a daemon dies mid-trace, and the requester deletes them when done. Why this and not a TCP port
with mutual TLS: the store is already the cluster's root of trust (whoever can write it can
program any host's FDB, that is redirect any container's traffic); a request adds no new power,
needs no new port open, no certificates to make, rotate and distribute, and works wherever the
cluster already works (secure the store, with etcd's client TLS, and trace is secured with it).
And a request is only data: a network id, hop kinds, endpoint ids of that network on that host,
and the probe's addresses, ports and ids. The receiving daemon resolves the hops with its own
state, builds the BPF filter itself, captures for at most MAX_SECONDS, reports only the headers
of packets that match the probe (plus, for its own hops, interface counters and whether it has a
route and FDB entry for the probe's two addresses and MACs), and serves MAX_CONCURRENT requests at
a time: a store writer learns no more than whether one given flow crosses a host for a few seconds.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field

from netd.contract.errors import BadRequest, Conflict, NetdError, NotFound
from netd.core import keys
from netd.debug.commands import DEFAULT_SIZE, DEFAULT_TIMEOUT
from netd.debug.packets import Probe

log = logging.getLogger("netd.debug.trace")

REQUESTS, RESULTS, STOPS = keys.TRACE_REQUESTS, keys.TRACE_RESULTS, keys.TRACE_STOPS
KEY_TTL = 60.0
MAX_SECONDS = 30.0                     # longest a remote capture runs
MAX_CONCURRENT = 4                     # remote traces served at once per host
READY_TIMEOUT = 20.0                   # starting the workers (Python + scapy) on a loaded host
HOP_KINDS = {"container", "veth", "bridge", "vxlan", "transit", "underlay", "uplink", "route", "parent"}
VXLAN_FILTER = "udp port 4789"
NOTHING_FOUND = "lost"


# --- the plan -------------------------------------------------------------------------------

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


# --- one host's part: workers, counters, facts ------------------------------------------------

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
        from netd.debug.capture import Worker

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


# --- the firewall: two counters around the forward hook ---------------------------------------

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


# --- running a trace (the source's host) ----------------------------------------------------

def run_trace(ctl, source: str, destination: str, proto: str = "icmp", size=None, timeout=None) -> dict:
    proto_name, port = parse_proto(proto)
    size = _number(size, DEFAULT_SIZE, "--size", 44, 9000) if proto_name != "tcp" else 60
    timeout = float(_number(timeout, DEFAULT_TIMEOUT, "--timeout", 0.1, 30))
    plan = plan_trace(ctl, source, destination)
    probe = make_probe(plan, proto_name, port, int(size))
    me = ctl.host_key
    endpoints = {e.id: e for e in (plan.source, plan.dest) if e is not None}
    local = [(i, h) for i, h in enumerate(plan.hops) if h.host == me]
    remote: dict[str, list[tuple[int, object]]] = {}
    for i, h in enumerate(plan.hops):
        if h.host != me:
            remote.setdefault(h.host, []).append((i, h))
    if remote and ctl.cluster is None:
        raise Conflict("the path crosses other hosts, but this daemon is not in a cluster")
    trace_id = secrets.token_hex(6)
    part = HostPart(ctl, plan.network, local, probe, endpoints, send_from=plan.source.sandbox,
                    seconds=timeout + READY_TIMEOUT + 10)
    macs = [e.mac for e in (plan.source, plan.dest) if e is not None and e.mac]
    addresses = [probe.dst, probe.src]
    remote_results: dict[str, dict] = {}
    requests = RemoteRequests(ctl, trace_id, plan, probe, remote, macs, timeout) if remote else None
    sent_at, send_error = None, None
    firewall = ForwardWatch(probe)
    counters: dict = {}
    try:
        firewall.start()
        part.start()
        if requests is not None:
            requests.post()
        part.wait_ready(READY_TIMEOUT)
        if requests is not None:
            requests.wait_ready(READY_TIMEOUT)
        part.worker.send()
        part.worker.wait_for(lambda records, events: any("Sent" in e or "SendError" in e for e in events), 5)
        for event in part.worker.events:
            if "Sent" in event:
                sent_at = event["Sent"]
            elif "SendError" in event:
                send_error = event
        if sent_at is not None:
            first = str(0)
            part.worker.wait_for(lambda records, events: any(
                r["Interface"] == first and r["Role"] == "reply" for r in records), timeout)
            time.sleep(0.2)   # answers still on their way through the hops behind the source
    finally:
        part.stop()
        counters = firewall.read()
        firewall.stop()
        if requests is not None:
            remote_results = requests.finish()
    hops = part.report(macs, addresses)
    for host, result in remote_results.items():
        for index, _hop in remote[host]:
            hops[index] = result.get("Hops", {}).get(str(index)) or {"Error": result.get("Error") or
                                                                     "no result", "Records": []}
    return build_report(ctl, plan, probe, hops, sent_at, send_error, timeout, counters)


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


class RemoteRequests:
    """The requester's side of the rendezvous in the cluster store (see the module docstring)."""

    def __init__(self, ctl, trace_id: str, plan: Plan, probe: Probe, remote: dict, macs: list[str],
                 timeout: float):
        self.ctl = ctl
        self.store = ctl.cluster_store
        self.id = trace_id
        self.plan = plan
        self.probe = probe
        self.remote = remote
        self.macs = macs
        self.timeout = timeout
        self.lease = None
        self.waiting: set[str] = set()
        self.failed: dict[str, str] = {}

    def post(self) -> None:
        self.lease = self.store.grant_lease(KEY_TTL)
        for host, hops in self.remote.items():
            if not self.ctl.cluster.alive(host):
                self.failed[host] = f"host {host} is not alive in the cluster (its daemon stopped renewing its lease)"
                continue
            request = {"Id": self.id, "From": self.ctl.host_key, "Network": self.plan.network.id,
                       "Hops": [{"Index": i, "Kind": h.kind, "Endpoint": h.endpoint} for i, h in hops],
                       "Probe": self.probe.to_json(), "MACs": self.macs,
                       "Seconds": min(MAX_SECONDS, self.timeout + READY_TIMEOUT + 5), "Created": time.time()}
            self.store.put(f"{REQUESTS}{host}/{self.id}", json.dumps(request), self.lease)
            self.waiting.add(host)

    def _result(self, host: str) -> dict | None:
        pair = self.store.get(f"{RESULTS}{self.id}/{host}")
        return json.loads(pair.value) if pair is not None else None

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = set(self.waiting)
        while pending and time.monotonic() < deadline:
            for host in list(pending):
                result = self._result(host)
                if result is not None:
                    pending.discard(host)
                    if result.get("Error"):
                        self.failed[host] = result["Error"]
                        self.waiting.discard(host)
            if pending:
                time.sleep(0.05)
        for host in pending:
            self.failed[host] = (f"host {host} did not answer the trace request within {timeout:.0f} s "
                                 "(is its netd daemon running, and as new as this one?)")
            self.waiting.discard(host)

    def finish(self) -> dict[str, dict]:
        results: dict[str, dict] = {host: {"Error": error} for host, error in self.failed.items()}
        try:
            self.store.put(f"{STOPS}{self.id}", "stop", self.lease)
            deadline = time.monotonic() + 10
            pending = set(self.waiting)
            while pending and time.monotonic() < deadline:
                for host in list(pending):
                    result = self._result(host)
                    if result is not None and result.get("Done"):
                        results[host] = result
                        pending.discard(host)
                if pending:
                    time.sleep(0.05)
            for host in pending:
                results[host] = {"Error": f"host {host} did not report what it saw"}
        finally:
            for host in self.remote:
                with contextlib.suppress(NetdError):
                    self.store.delete(f"{REQUESTS}{host}/{self.id}")
            with contextlib.suppress(NetdError):
                self.store.delete_prefix(f"{RESULTS}{self.id}/")
                self.store.delete(f"{STOPS}{self.id}")
            with contextlib.suppress(Exception):
                self.lease.revoke()
        return results


# --- the agent (every daemon in a cluster) ----------------------------------------------------

class TraceAgent:
    """Serves other hosts' trace requests for this host (see the module docstring)."""

    def __init__(self, ctl):
        self.ctl = ctl
        self.store = ctl.cluster_store
        self.prefix = f"{REQUESTS}{ctl.host_key}/"
        self.mirror = None
        self._active: set[str] = set()
        self._lock = threading.Lock()

    def start(self) -> TraceAgent:
        from kvstore.mirror import Mirror

        self.mirror = Mirror(self.store, self.prefix, on_put=self._on_request).start()
        return self

    def stop(self) -> None:
        if self.mirror is not None:
            self.mirror.stop()

    def _on_request(self, pair) -> None:
        trace_id = pair.key[len(self.prefix):]
        try:
            request = json.loads(pair.value)
            if not isinstance(request, dict) or request.get("Id") != trace_id:
                raise ValueError("malformed")
            if time.time() - float(request.get("Created", 0)) > KEY_TTL:
                return   # an old request that outlived its requester
        except (ValueError, TypeError):
            log.warning("ignoring a malformed trace request at %s", pair.key)
            return
        with self._lock:
            if trace_id in self._active:
                return
            if len(self._active) >= MAX_CONCURRENT:
                self._answer(trace_id, {"Done": True, "Error": f"host {self.ctl.host_key} is busy with "
                                        f"{MAX_CONCURRENT} traces already"})
                return
            self._active.add(trace_id)
        threading.Thread(target=self._serve, args=(trace_id, request), name=f"trace {trace_id}", daemon=True).start()

    def _answer(self, trace_id: str, result: dict, lease=None) -> None:
        with contextlib.suppress(NetdError):
            self.store.put(f"{RESULTS}{trace_id}/{self.ctl.host_key}", json.dumps(result), lease)

    def _serve(self, trace_id: str, request: dict) -> None:
        part = None
        lease = None
        try:
            lease = self.store.grant_lease(KEY_TTL)
            network, hops, probe, macs, seconds = self._validate(request)
            endpoints = {h.endpoint: self.ctl.local_endpoint(h.endpoint) for _, h in hops if h.endpoint}
            part = HostPart(self.ctl, network, hops, probe, endpoints, seconds=seconds + 5).start()
            part.wait_ready(READY_TIMEOUT)
            self._answer(trace_id, {"Ready": True}, lease)
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and self.store.get(f"{STOPS}{trace_id}") is None:
                time.sleep(0.05)
            time.sleep(0.05)
            part.stop()
            report = part.report(macs, [probe.dst, probe.src])
            self._answer(trace_id, {"Done": True, "Hops": {str(i): h for i, h in report.items()}}, lease)
        except NetdError as e:
            self._answer(trace_id, {"Done": True, "Error": f"on host {self.ctl.host_key}: {e.message}"}, lease)
        except Exception as e:  # noqa: BLE001 - the requester must hear something
            log.exception("trace %s failed", trace_id)
            self._answer(trace_id, {"Done": True, "Error": f"on host {self.ctl.host_key}: internal error: {e}"}, lease)
        finally:
            if part is not None:
                part.stop()
            with self._lock:
                self._active.discard(trace_id)

    def _validate(self, request: dict):
        """Only what this host can check itself: its networks, its endpoints, sane probe fields."""
        from netd.contract.driverapi import Hop

        network = self.ctl.network_by_id(str(request.get("Network")))
        if network is None or network.scope != "global":
            raise BadRequest("the trace names a network this host does not know")
        hops = []
        for item in request.get("Hops") or []:
            kind, endpoint = str(item.get("Kind")), str(item.get("Endpoint") or "")
            if kind not in HOP_KINDS:
                raise BadRequest(f"unknown hop kind {kind!r}")
            if endpoint:
                known = self.ctl.local_endpoint(endpoint)
                if known is None or known.network_id != network.id:
                    raise BadRequest(f"endpoint {endpoint[:12]} of network {network.name} is not on this host")
            hops.append((int(item["Index"]), Hop(self.ctl.host_key, kind, endpoint)))
        probe = Probe.from_json(request.get("Probe") or {})
        if probe.proto not in ("icmp", "tcp", "udp"):
            raise BadRequest(f"unknown probe protocol {probe.proto!r}")
        for address in (probe.src, probe.dst):
            ipaddress.IPv4Address(address)
        int(probe.token or "0", 16)
        if len(probe.token) > 64:
            raise BadRequest("probe token too long")
        macs = [str(m) for m in request.get("MACs") or []][:4]
        seconds = min(MAX_SECONDS, max(1.0, float(request.get("Seconds") or 10)))
        return network, hops, probe, macs, seconds


# --- the report ---------------------------------------------------------------------------------

def build_report(ctl, plan: Plan, probe: Probe, hops: dict[int, dict], sent_at, send_error, timeout: float,
                 counters: dict | None = None) -> dict:
    rows = []
    for index, hop in enumerate(plan.hops):
        info = hops.get(index) or {"Error": "not captured", "Records": []}
        request = _first(info.get("Records", []), "request")
        reply = _first(info.get("Records", []), "reply")
        rows.append({
            "Index": index + 1, "Host": hop.host, "Kind": hop.kind,
            "Label": info.get("Label") or hop.kind, "Interface": info.get("Interface", ""),
            "MTU": info.get("MTU"), "Error": info.get("Error", ""), "Dropped": info.get("Dropped", {}),
            "Request": _seen(request, sent_at), "Reply": _seen(reply, sent_at), "Facts": info.get("Facts", {}),
        })
    result, lost_at, reasons = diagnose(plan, probe, rows, sent_at, send_error)
    if result != "ok":
        firewall = _firewall_reasons(counters or {}, ctl.host_key)
        if firewall:   # a reason found: the "found nothing" guess goes
            reasons = firewall + [r for r in reasons if not r.startswith(NOTHING_FOUND)]
    dest = plan.dest
    report = {
        "Source": {"Container": plan.source.container_name, "Address": plan.source.address, "Host": plan.source.host,
                   "Interface": plan.source.ifname},
        "Destination": {"Container": dest.container_name if dest else "", "Address": plan.address,
                        "Host": dest.host if dest else ""},
        "Network": {"Name": plan.network.name, "Driver": plan.network.driver,
                    "VNI": plan.network.driver_state.get("vni")},
        "Probe": probe.to_json(),
        "Timeout": timeout,
        "Hops": rows,
        "Result": result,
        "LostAfterHop": lost_at,
        "Reasons": reasons,
        "Note": plan.note,
        "Firewall": counters or {},
    }
    for row in rows:
        if not row["Facts"]:
            del row["Facts"]
    return report


def _first(records: list[dict], role: str) -> dict | None:
    found = [r for r in records if r.get("Role") == role]
    return min(found, key=lambda r: r["Time"]) if found else None


def _seen(record: dict | None, sent_at) -> dict | None:
    if record is None:
        return None
    packet = record.get("Packet", {})
    inner = (packet.get("VXLAN") or {}).get("Inner") or packet
    return {"Time": record["Time"], "Ms": round((record["Time"] - sent_at) * 1000, 3) if sent_at else None,
            "Direction": record.get("Direction"), "How": record.get("How"),
            "Src": inner.get("Src"), "Dst": inner.get("Dst"),
            "VNI": (packet.get("VXLAN") or {}).get("VNI"), "Outer": f"{packet.get('Src')} > {packet.get('Dst')}"
            if packet.get("VXLAN") else ""}


def diagnose(plan: Plan, probe: Probe, rows: list[dict], sent_at, send_error) -> tuple[str, int | None, list[str]]:
    """(result, the last hop (1-based) that saw it, reasons). Results: "ok" (the answer came back),
    "refused" (the answer is an ICMP error), "request lost", "reply lost", "not sent"."""
    if send_error is not None:
        errno_name = {90: "EMSGSIZE", 101: "ENETUNREACH", 113: "EHOSTUNREACH", 1: "EPERM"}.get(send_error.get("Errno"))
        reasons = [f"the container could not send the probe: {send_error.get('SendError')}"]
        if errno_name == "EMSGSIZE":
            reasons.append(f"MTU: the probe ({probe.size} bytes, don't fragment) is larger than the MTU "
                           f"of {plan.source.ifname} in {plan.source.container_name} ({rows[0].get('MTU')})")
        elif errno_name in ("ENETUNREACH", "EHOSTUNREACH"):
            reasons.append(f"no route: {plan.source.container_name} has no route to {probe.dst}")
        elif errno_name == "EPERM":
            reasons.append("a firewall rule in the container's namespace refused to send it")
        return "not sent", None, reasons
    if sent_at is None:
        return "not sent", None, ["the capture worker did not send the probe"]
    last = len(rows) - 1
    request_seen = [r["Request"] is not None for r in rows]
    reply_seen = [r["Reply"] is not None for r in rows]
    reached = max((i for i, seen in enumerate(request_seen) if seen), default=-1)
    if reply_seen[0]:
        answer = rows[0]["Reply"]
        how = answer["How"] or ""
        if probe.proto == "tcp" and "RST" in how:
            return "ok", None, [f"the answer is a TCP reset: nothing listens on port {probe.dport} of {probe.dst}"]
        if not any(word in how for word in ("unreachable", "exceeded", "need to fragment")):
            return "ok", None, []
        if "(port)" in how and answer["Src"] == probe.dst:   # the destination itself: it got there
            return "ok", None, [f"the answer is ICMP port unreachable from {probe.dst}: nothing listens on "
                                f"{probe.proto.upper()} port {probe.dport} there"]
        reasons = [f"{answer['Src']} answered with an ICMP error: {how}"]
        if "need to fragment" in how:
            reasons.append(f"MTU: the probe ({probe.size} bytes, don't fragment) is larger than a link on the way")
        reasons += [r for r in _why(plan, probe, rows, reached, reached + 1, "request") if not r.startswith(NOTHING_FOUND)]
        return "refused", reached + 1 if reached >= 0 else 0, reasons
    # The request: the first hop that did not see it, after the last that did.
    if reached < last:
        reasons = _why(plan, probe, rows, reached, reached + 1, "request")
        return "request lost", reached + 1 if reached >= 0 else 0, reasons
    # The answer travels the hops backwards: last .. 0.
    answered = min((i for i, seen in enumerate(reply_seen) if seen), default=None)
    if answered is None:
        if plan.dest is None:
            return "reply lost", last + 1, [f"the probe left this host ({rows[last]['Label']}) but no answer came "
                                             f"back from {probe.dst}: the problem is beyond this host, or "
                                             f"{probe.dst} does not answer {probe.proto}"]
        reasons = [f"{plan.dest.container_name} got the probe but did not answer it"]
        reasons += _route_reasons(rows[last], probe.src, plan.dest.container_name)
        if probe.proto == "udp":
            reasons.append(f"nothing answers UDP port {probe.dport} there (UDP gives no answer unless "
                           "a program replies or the kernel sends port unreachable)")
        return "reply lost", last + 1, reasons
    reasons = _why(plan, probe, rows, answered, answered - 1, "reply")
    return "reply lost", answered + 1, reasons


def _why(plan: Plan, probe: Probe, rows: list[dict], seen: int, missed: int, direction: str) -> list[str]:
    """Reasons the probe (direction "request") or its answer ("reply") got from hop `seen` (or
    from the sender, seen == -1) but not to hop `missed` (0-based)."""
    reasons: list[str] = []
    target = probe.dst if direction == "request" else probe.src
    target_ep = plan.dest if direction == "request" else plan.source
    target_mac = target_ep.mac if target_ep is not None else ""
    target_name = target_ep.container_name if target_ep is not None else target
    nxt = rows[missed] if 0 <= missed < len(rows) else None
    cur = rows[seen] if seen >= 0 else None
    if cur is None:
        first = rows[0]
        reasons.append(f"{plan.source.container_name} sent the probe but it never appeared on "
                       f"{plan.source.ifname}")
        facts = first.get("Facts", {})
        route = (facts.get("Routes") or {}).get(target) or {}
        next_hop = route.get("Gateway") or target
        for address, state in (facts.get("Neighbours") or {}).items():
            if address == next_hop and state in ("INCOMPLETE", "FAILED", "none"):
                reasons.append(f"no ARP answer: {plan.source.container_name} could not find the MAC of {address} "
                               f"(neighbour entry {state})" + (f": {plan.note}" if plan.note else ""))
        reasons += _route_reasons(first, target, plan.source.container_name)
        return reasons
    if nxt is not None and nxt.get("Error"):
        reasons.append(f"hop {missed + 1} on host {nxt['Host']}: {nxt['Error']}")
    facts = cur.get("Facts") or {}
    fdb = facts.get("FDB") or {}
    if target_mac and target_mac in fdb and not fdb[target_mac]:
        reasons.append(f"no FDB entry for {target_mac} ({target_name}) on {cur['Label']} on host {cur['Host']}: "
                       "the VXLAN device does not know which host has that MAC, so it drops the frame "
                       f"(the peer entry from the cluster store is missing; `netd network inspect "
                       f"{plan.network.name}` lists the peers it should have)")
    elif target_mac and fdb.get(target_mac) and target_ep is not None and fdb[target_mac] != target_ep.host:
        reasons.append(f"the FDB entry for {target_mac} on {cur['Label']} points to {fdb[target_mac]}, but "
                       f"{target_name} is on host {target_ep.host}")
    reasons += _route_reasons(cur, target, f"host {cur['Host']}" if cur["Kind"] != "container" else target_name)
    for row in (cur, nxt):
        if row is not None and row.get("Dropped"):
            counters = ", ".join(f"{k} +{v}" for k, v in row["Dropped"].items())
            reasons.append(f"drop counters of {row['Label']} on host {row['Host']} went up during the trace: {counters}")
    if cur["Kind"] == "underlay" and nxt is not None and nxt["Kind"] == "vxlan" and not nxt.get("Error"):
        reasons.append(f"the VXLAN packet reached host {cur['Host']} but not its VXLAN device: a firewall there "
                       f"dropping UDP port 4789 (input), or a VNI other than {plan.network.driver_state.get('vni')}")
    if cur["Kind"] == "underlay" and nxt is not None and nxt["Kind"] == "underlay":
        reasons.append(f"lost on the underlay between {cur['Host']} and {nxt['Host']}: a link, a switch or a "
                       "firewall in between (VXLAN needs UDP port 4789 open between the hosts)")
    mtus = [r.get("MTU") for r in (cur, nxt) if r is not None and r.get("MTU")]
    overhead = 50 if nxt is not None and nxt["Kind"] == "underlay" else 0
    if mtus and probe.size + overhead > min(mtus):
        reasons.append(f"MTU: the probe is {probe.size} bytes" + (f" ({probe.size + overhead} with VXLAN)"
                                                                   if overhead else "")
                       + f", more than the MTU {min(mtus)} of {cur['Label'] if cur.get('MTU') == min(mtus) else nxt['Label']}")
    if not reasons:
        where = f"between hop {seen + 1} ({cur['Label']}) and hop {missed + 1}" + (
            f" ({nxt['Label']})" if nxt is not None else "")
        reasons.append(f"{NOTHING_FOUND} {where}; netd found no missing route or FDB entry and no drop counter "
                       "changed (a firewall rule is the likely cause)")
    return reasons


def _firewall_reasons(counters: dict, host: str) -> list[str]:
    reasons = []
    for what, name in (("request", "the probe"), ("reply", "the answer")):
        entered, left = counters.get(what, {}).get("first", 0), counters.get(what, {}).get("last", 0)
        if entered > left:
            reasons.append(f"firewall: {name} was dropped in the forward path of host {host} ({entered} packet(s) "
                           f"entered the forward hook, {left} left it): netd's isolation between networks or "
                           "--internal, or another program's rules (e.g. Docker's FORWARD policy DROP)")
    return reasons


def _route_reasons(row: dict, address: str, who: str) -> list[str]:
    route = ((row.get("Facts") or {}).get("Routes") or {}).get(address)
    if route and route.get("Error"):
        return [f"route: on {who}, the route to {address}: {route['Error']}"]
    return []


# --- the CLI ------------------------------------------------------------------------------------

def cmd_trace(client, args) -> int:
    parse_proto(args.proto)   # a bad --proto is refused before anything runs
    body = {"Source": args.source, "Destination": args.dest, "Proto": args.proto, "Size": args.size,
            "Timeout": args.timeout}
    report = client.request("POST", "/debug/trace", body)
    if args.format == "json":
        print(json.dumps(report, indent=4))
    else:
        print(format_report(report))
    return 0 if report["Result"] == "ok" else 1


def format_report(report: dict) -> str:
    src, dst, net, probe = report["Source"], report["Destination"], report["Network"], report["Probe"]
    what = {"icmp": "ICMP echo", "tcp": f"TCP SYN to port {probe['dport']}",
            "udp": f"UDP to port {probe['dport']}"}[probe["proto"]]
    dest = f"{dst['Container']} ({dst['Address']}, host {dst['Host']})" if dst["Container"] else dst["Address"]
    vni = f" VNI {net['VNI']}" if net.get("VNI") is not None else ""
    lines = [f"trace {src['Container']} ({src['Address']}, host {src['Host']}) -> {dest}",
             f"  over network {net['Name']} ({net['Driver']}{vni}), {what}, {probe['size']} bytes"]
    if report.get("Note"):
        lines.append(f"  note: {report['Note']}")
    if len({hop["Host"] for hop in report["Hops"]}) > 1:
        lines.append("  (times: since the probe was sent, read on each host's own clock)")
    lines.append("")
    rows = []
    for hop in report["Hops"]:
        rows.append([str(hop["Index"]), hop["Host"] or "-", hop["Label"] if not hop["Error"] or hop["Interface"]
                     else f"{hop['Kind']} ({hop['Error']})", _cell(hop["Request"]), _cell(hop["Reply"])])
    headers = ["HOP", "HOST", "WHERE", "PROBE", "ANSWER"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    for row in [headers, *rows]:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    lines.append("")
    result = report["Result"]
    if result == "ok":
        back = report["Hops"][0]["Reply"]
        lines.append(f"answer back at {src['Container']} after {back['Ms']:.3f} ms ({back['How']}): the path works")
    elif result == "not sent":
        lines.append("the probe was not sent")
    else:
        lines.append(_verdict(report))
    for reason in report["Reasons"]:
        lines.append(f"  - {reason}")
    return "\n".join(lines)


def _verdict(report: dict) -> str:
    """Where it stopped, in words: "probe lost after hop 4 (vxlan0 on 10.10.0.1), before hop 5 (...)"."""
    after, hops, result = report["LostAfterHop"] or 0, report["Hops"], report["Result"]

    def hop(number: int) -> str:
        return f"hop {number} ({hops[number - 1]['Label']} on {hops[number - 1]['Host']})"

    if result == "refused":
        where = f"got as far as {hop(after)}" if after else "never appeared on the way"
        return f"the probe {where}; the answer was an ICMP error"
    if result == "request lost":
        if after == 0:
            return f"probe lost before {hop(1)}: the container did not send it out"
        return f"probe lost after {hop(after)}" + (f", before {hop(after + 1)}" if after < len(hops) else "")
    if hops[after - 1]["Reply"] is None:
        return f"the probe reached {hop(after)}, but no answer came back"
    return f"answer lost after {hop(after)}" + (f", before {hop(after - 1)}" if after > 1 else "")


def _cell(seen: dict | None) -> str:
    if seen is None:
        return "-"
    text = f"{seen['Ms']:+.3f} ms {seen['Direction']}" if seen.get("Ms") is not None else seen["Direction"]
    if seen.get("VNI") is not None:
        text += f" vni {seen['VNI']}"
    return text

