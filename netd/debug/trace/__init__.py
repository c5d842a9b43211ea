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

import logging
import secrets
import time

from netd.contract.errors import Conflict
from netd.debug.commands import DEFAULT_SIZE, DEFAULT_TIMEOUT
from netd.debug.trace.agent import RemoteRequests
from netd.debug.trace.diagnosis import build_report
from netd.debug.trace.local import ForwardWatch, HostPart
from netd.debug.trace.plan import READY_TIMEOUT, _number, make_probe, parse_proto, plan_trace

log = logging.getLogger(__name__)


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
