"""Why a probe was lost: the report of every hop, and the reasons (pure logic, tested alone)."""

from __future__ import annotations

from netd.debug.packets import Probe
from netd.debug.trace.plan import NOTHING_FOUND, Plan


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
