"""The diagnosis of `netd trace` without a daemon: plans, probes and what each hop saw built by hand
(in the shape HostPart.report and the remote agents give them), then build_report, diagnose and
format_report read them. No namespace, no capture, no root."""

from __future__ import annotations

from types import SimpleNamespace

from netd.contract.driverapi import Hop
from netd.contract.model import Endpoint, Network
from netd.debug.packets import Probe
from netd.debug.trace.diagnosis import build_report, diagnose
from netd.debug.trace.plan import Plan
from netd.debug.trace.report import format_report

HOST_A, HOST_B = "10.0.0.1", "10.0.0.2"
MAC_A, MAC_B = "02:42:ac:1d:47:02", "02:42:ac:1d:47:03"
SENT = 1000.0
CTL = SimpleNamespace(host_key=HOST_A)   # all build_report asks of the controller


def endpoint(name: str, address: str, mac: str, host: str) -> Endpoint:
    return Endpoint(id=f"ep-{name}", network_id="net1", container_id=f"c-{name}", container_name=name, host=host,
                    ifname="eth0", mac=mac, ipv4=f"{address}/24", sandbox=f"/run/netd/ns/{name}")


def bridge_plan(dest: bool = True) -> Plan:
    """a -> b on one host's bridge network (or a -> an address outside, through the host's uplink)."""
    network = Network(id="net1", name="front", driver="bridge")
    a = endpoint("a", "172.29.71.2", MAC_A, HOST_A)
    if dest:
        b = endpoint("b", "172.29.71.3", MAC_B, HOST_A)
        hops = [Hop(HOST_A, "container", a.id), Hop(HOST_A, "veth", a.id), Hop(HOST_A, "bridge"),
                Hop(HOST_A, "veth", b.id), Hop(HOST_A, "container", b.id)]
        return Plan(network, a, b, b.address, hops)
    hops = [Hop(HOST_A, "container", a.id), Hop(HOST_A, "veth", a.id), Hop(HOST_A, "bridge"), Hop(HOST_A, "uplink")]
    return Plan(network, a, None, "10.9.9.9", hops)


def overlay_plan() -> Plan:
    """a on HOST_A -> b on HOST_B over VXLAN: five hops on each host."""
    network = Network(id="net1", name="ol1", driver="overlay", scope="global", driver_state={"vni": 4097})
    a = endpoint("a", "10.200.0.2", MAC_A, HOST_A)
    b = endpoint("b", "10.200.0.3", MAC_B, HOST_B)
    hops = [Hop(HOST_A, "container", a.id), Hop(HOST_A, "veth", a.id), Hop(HOST_A, "bridge"), Hop(HOST_A, "vxlan"),
            Hop(HOST_A, "underlay"),
            Hop(HOST_B, "underlay"), Hop(HOST_B, "vxlan"), Hop(HOST_B, "bridge"), Hop(HOST_B, "veth", b.id),
            Hop(HOST_B, "container", b.id)]
    return Plan(network, a, b, b.address, hops)


def probe_for(plan: Plan, proto: str = "icmp", port: int = 0) -> Probe:
    return Probe(proto=proto, src=plan.source.address, dst=plan.address, icmp_id=77, icmp_seq=1, sport=45000,
                 dport=port, token="6e657464" + "00" * 6, size=84)


LABELS = {"container": "{name}:eth0", "veth": "veth-{name}", "bridge": "br0", "vxlan": "vxlan0", "underlay": "eth0",
          "uplink": "eth0"}


def record(role: str, ms: float, how: str, src: str, dst: str, direction: str = "in") -> dict:
    return {"Time": SENT + ms / 1000, "Direction": direction, "Role": role, "How": how,
            "Packet": {"Src": src, "Dst": dst}}


def seen(plan: Plan, probe: Probe, request: range, reply: range = range(0), facts: dict | None = None,
         reply_how: str = "echo reply") -> dict[int, dict]:
    """What HostPart.report gives: per hop (0-based) a label, its records, MTU, facts."""
    hops = {}
    for index, hop in enumerate(plan.hops):
        name = plan.source.container_name if hop.endpoint == plan.source.id else (
            plan.dest.container_name if plan.dest is not None else "")
        label = LABELS[hop.kind].format(name=name)
        records = []
        if index in request:
            records.append(record("request", 0.01 * (index + 1), "echo request", probe.src, probe.dst))
        if index in reply:
            records.append(record("reply", 1 - 0.01 * index, reply_how, probe.dst, probe.src))
        hops[index] = {"Label": label, "Kind": hop.kind, "Interface": label.split(":")[-1], "MTU": 1500,
                       "Records": records, "Dropped": {}, "Facts": (facts or {}).get(index, {})}
    return hops


def report(plan, probe, hops, counters=None, sent_at=SENT, send_error=None) -> dict:
    return build_report(CTL, plan, probe, hops, sent_at, send_error, 2.0, counters)


# --- delivered ------------------------------------------------------------------------------------

def test_delivered_every_hop_both_ways():
    plan = bridge_plan()
    probe = probe_for(plan)
    found = report(plan, probe, seen(plan, probe, request=range(5), reply=range(5)))
    assert (found["Result"], found["LostAfterHop"], found["Reasons"]) == ("ok", None, [])
    assert [h["Index"] for h in found["Hops"]] == [1, 2, 3, 4, 5]
    assert found["Hops"][0]["Request"]["Ms"] == 0.01 and found["Hops"][0]["Reply"]["Ms"] == 1.0
    text = format_report(found)
    assert text.startswith(f"trace a (172.29.71.2, host {HOST_A}) -> b (172.29.71.3, host {HOST_A})")
    assert "over network front (bridge), ICMP echo, 84 bytes" in text
    assert "answer back at a after 1.000 ms (echo reply): the path works" in text
    assert "HOP  HOST" in text and "b:eth0" in text
    assert "(times: since the probe was sent" not in text   # one host: one clock


def test_tcp_reset_is_an_answer():
    plan = bridge_plan()
    probe = probe_for(plan, "tcp", 4567)
    found = report(plan, probe, seen(plan, probe, request=range(5), reply=range(5), reply_how="RST (port closed)"))
    assert found["Result"] == "ok"
    assert found["Reasons"] == ["the answer is a TCP reset: nothing listens on port 4567 of 172.29.71.3"]
    assert "TCP SYN to port 4567" in format_report(found)


# --- lost between two hops ------------------------------------------------------------------------

def test_request_lost_at_a_vxlan_device_without_fdb_entry():
    plan = overlay_plan()
    probe = probe_for(plan)
    hops = seen(plan, probe, request=range(4), facts={3: {"FDB": {MAC_A: HOST_A, MAC_B: None}}})
    found = report(plan, probe, hops)
    assert (found["Result"], found["LostAfterHop"]) == ("request lost", 4)
    assert found["Hops"][3]["Kind"] == "vxlan" and found["Hops"][3]["Host"] == HOST_A
    assert len(found["Reasons"]) == 1 and found["Reasons"][0].startswith(
        f"no FDB entry for {MAC_B} (b) on vxlan0 on host {HOST_A}")
    assert "netd network inspect ol1" in found["Reasons"][0]
    text = format_report(found)
    assert "over network ol1 (overlay VNI 4097)" in text
    assert "(times: since the probe was sent, read on each host's own clock)" in text
    assert f"probe lost after hop 4 (vxlan0 on {HOST_A}), before hop 5 (eth0 on {HOST_A})" in text
    assert f"  - no FDB entry for {MAC_B}" in text


def test_reply_lost_on_the_way_back():
    """The answer is seen from the destination back to hop 7 (vxlan0 of HOST_B), not at hop 6."""
    plan = overlay_plan()
    probe = probe_for(plan)
    hops = seen(plan, probe, request=range(10), reply=range(6, 10), facts={6: {"FDB": {MAC_A: None, MAC_B: HOST_B}}})
    found = report(plan, probe, hops)
    assert (found["Result"], found["LostAfterHop"]) == ("reply lost", 7)
    assert found["Reasons"][0].startswith(f"no FDB entry for {MAC_A} (a) on vxlan0 on host {HOST_B}")
    assert f"answer lost after hop 7 (vxlan0 on {HOST_B}), before hop 6 (eth0 on {HOST_B})" in format_report(found)


def test_nothing_found_gives_way_to_the_firewall_counters():
    plan = bridge_plan()
    probe = probe_for(plan)
    hops = seen(plan, probe, request=range(3))
    result, lost, reasons = diagnose(plan, probe, report(plan, probe, hops)["Hops"], SENT, None)
    assert (result, lost) == ("request lost", 3)
    assert reasons == ["lost between hop 3 (br0) and hop 4 (veth-b); netd found no missing route or FDB entry "
                       "and no drop counter changed (a firewall rule is the likely cause)"]
    found = report(plan, probe, hops, counters={"request": {"first": 1, "last": 0}})
    assert len(found["Reasons"]) == 1
    assert found["Reasons"][0].startswith(f"firewall: the probe was dropped in the forward path of host {HOST_A} "
                                          "(1 packet(s) entered the forward hook, 0 left it)")


def test_the_probe_never_left_the_container_without_an_arp_answer():
    plan = bridge_plan(dest=False)
    plan.note = "no container netd knows of holds 172.29.71.200 on network front"
    probe = probe_for(plan)
    facts = {0: {"Routes": {probe.dst: {"Via": "eth0", "Gateway": "", "Type": 1}},
                 "Neighbours": {probe.dst: "FAILED"}}}
    found = report(plan, probe, seen(plan, probe, request=range(0), facts=facts))
    assert (found["Result"], found["LostAfterHop"]) == ("request lost", 0)
    assert found["Reasons"][0] == "a sent the probe but it never appeared on eth0"
    assert found["Reasons"][1].startswith("no ARP answer: a could not find the MAC of 10.9.9.9 (neighbour entry "
                                          "FAILED): no container netd knows of holds")
    text = format_report(found)
    assert "  note: no container netd knows of holds" in text
    assert f"probe lost before hop 1 (a:eth0 on {HOST_A}): the container did not send it out" in text


# --- refused with an ICMP error -------------------------------------------------------------------

def test_refused_with_an_icmp_error():
    plan = bridge_plan(dest=False)
    probe = probe_for(plan)
    hops = seen(plan, probe, request=range(3), reply=range(3),
                reply_how=f"unreachable (host) for {probe.src} > {probe.dst}")
    for row in hops.values():   # the gateway, not the destination, answers
        for r in row["Records"]:
            if r["Role"] == "reply":
                r["Packet"]["Src"] = "172.29.71.1"
    found = report(plan, probe, hops)
    assert (found["Result"], found["LostAfterHop"]) == ("refused", 3)
    assert found["Reasons"] == [f"172.29.71.1 answered with an ICMP error: unreachable (host) for {probe.src} > "
                                f"{probe.dst}"]   # and no "found nothing" guess
    text = format_report(found)
    assert text.startswith(f"trace a (172.29.71.2, host {HOST_A}) -> 10.9.9.9\n")
    assert f"the probe got as far as hop 3 (br0 on {HOST_A}); the answer was an ICMP error" in text


def test_port_unreachable_from_the_destination_means_it_got_there():
    plan = bridge_plan()
    probe = probe_for(plan, "udp", 4567)
    hops = seen(plan, probe, request=range(5), reply=range(5),
                reply_how=f"unreachable (port) for {probe.src} > {probe.dst}")
    found = report(plan, probe, hops)
    assert found["Result"] == "ok"
    assert found["Reasons"] == [f"the answer is ICMP port unreachable from {probe.dst}: nothing listens on UDP port "
                                f"4567 there"]


def test_too_big_to_send():
    plan = bridge_plan()
    probe = probe_for(plan)
    error = {"SendError": "Message too long", "Errno": 90}
    found = report(plan, probe, seen(plan, probe, request=range(0)), sent_at=None, send_error=error)
    assert (found["Result"], found["LostAfterHop"]) == ("not sent", None)
    assert found["Reasons"] == ["the container could not send the probe: Message too long",
                                "MTU: the probe (84 bytes, don't fragment) is larger than the MTU of eth0 in a (1500)"]
    assert "the probe was not sent" in format_report(found)


# --- a hop that could not be captured -------------------------------------------------------------

def test_a_hop_that_could_not_be_captured_does_not_fail_the_trace():
    plan = bridge_plan()
    probe = probe_for(plan)
    hops = seen(plan, probe, request=range(5), reply=range(5))
    hops[3] = {"Label": "veth-b", "Kind": "veth", "Interface": "veth-b", "Records": [],
               "Error": "cannot capture on veth-b: interface veth-b does not exist"}
    del hops[1]   # and one the host did not report at all
    found = report(plan, probe, hops)
    assert found["Result"] == "ok"
    assert found["Hops"][1]["Error"] == "not captured" and found["Hops"][1]["Label"] == "veth"
    assert found["Hops"][3]["Error"].startswith("cannot capture on veth-b")
    assert found["Hops"][3]["Request"] is None and found["Hops"][3]["Reply"] is None
    lines = format_report(found).splitlines()
    assert any(line.split()[:3] == ["2", HOST_A, "veth"] and line.endswith("-") for line in lines), lines
    assert any(line.split()[:3] == ["4", HOST_A, "veth-b"] for line in lines), lines


def test_a_host_that_did_not_answer_is_named():
    plan = overlay_plan()
    probe = probe_for(plan)
    hops = seen(plan, probe, request=range(5))
    error = f"host {HOST_B} did not answer the trace request within 20 s (is its netd daemon running, and as new as this one?)"
    for index in range(5, 10):
        hops[index] = {"Error": error, "Records": []}
    found = report(plan, probe, hops)
    assert (found["Result"], found["LostAfterHop"]) == ("request lost", 5)
    assert found["Reasons"][0] == f"hop 6 on host {HOST_B}: {error}"
    assert not any(r.startswith("lost between") for r in found["Reasons"])
    assert found["Reasons"][1] == (f"lost on the underlay between {HOST_A} and {HOST_B}: a link, a switch or a "
                                   "firewall in between (VXLAN needs UDP port 4789 open between the hosts)")
    text = format_report(found)
    assert f"underlay ({error})" in text   # no interface: the kind and why
    assert f"probe lost after hop 5 (eth0 on {HOST_A}), before hop 6 (underlay on {HOST_B})" in text
