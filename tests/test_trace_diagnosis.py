"""The pure diagnosis of `netd trace` (netd.debug.trace.diagnosis), tested alone: hand-made hop
rows in, the verdict, the hop it was lost after, and the reasons out."""

from netd.contract.model import Endpoint, Network
from netd.debug.packets import Probe
from netd.debug.trace.diagnosis import diagnose
from netd.debug.trace.plan import Plan

SENT = 100.0


def endpoint(name: str, address: str, host: str, mac: str) -> Endpoint:
    return Endpoint(id=name * 4, network_id="n1", container_id=name, container_name=name, host=host,
                    ifname="eth0", mac=mac, ipv4=f"{address}/24")


SOURCE = endpoint("a", "10.0.0.2", "h1", "02:42:0a:00:00:02")
DEST = endpoint("b", "10.0.0.3", "h2", "02:42:0a:00:00:03")
PROBE = Probe("icmp", "10.0.0.2", "10.0.0.3", icmp_id=7, icmp_seq=1, size=84)


def plan() -> Plan:
    network = Network(id="n1", name="ol1", driver="overlay", scope="global", driver_state={"vni": 4096})
    return Plan(network, SOURCE, DEST, DEST.address, [])


def seen(how: str = "echo", src: str = "10.0.0.2", dst: str = "10.0.0.3") -> dict:
    return {"Time": SENT + 0.001, "Ms": 1.0, "Direction": "out", "How": how, "Src": src, "Dst": dst, "VNI": None,
            "Outer": ""}


def row(index: int, kind: str, host: str, request: bool, reply: bool, **extra) -> dict:
    return {"Hop": index, "Kind": kind, "Host": host, "Label": f"{kind}@{host}", "Request": seen() if request else None,
            "Reply": seen("echo reply", "10.0.0.3", "10.0.0.2") if reply else None, "Facts": {}, **extra}


PATH = [("container", "h1"), ("vxlan", "h1"), ("underlay", "h1"), ("underlay", "h2"), ("vxlan", "h2"),
        ("container", "h2")]


def rows(request_until: int, reply_from: int | None = None) -> list[dict]:
    """The request seen by hops 0..request_until; the reply, travelling back, by hops last..reply_from."""
    return [row(i, kind, host, i <= request_until, reply_from is not None and i >= reply_from)
            for i, (kind, host) in enumerate(PATH)]


def test_the_answer_came_back():
    assert diagnose(plan(), PROBE, rows(5, 0), SENT, None) == ("ok", None, [])


def test_request_lost_on_the_underlay_names_the_two_hosts():
    result, lost_after, reasons = diagnose(plan(), PROBE, rows(2), SENT, None)
    assert (result, lost_after) == ("request lost", 3)
    assert any("lost on the underlay between h1 and h2" in r for r in reasons), reasons


def test_missing_fdb_entry_is_the_reason():
    hops = rows(1)
    hops[1]["Facts"] = {"FDB": {DEST.mac: ""}}
    result, lost_after, reasons = diagnose(plan(), PROBE, hops, SENT, None)
    assert (result, lost_after) == ("request lost", 2)
    assert any(f"no FDB entry for {DEST.mac} (b)" in r for r in reasons), reasons


def test_reply_lost_on_the_way_back():
    result, lost_after, reasons = diagnose(plan(), PROBE, rows(5, 3), SENT, None)
    assert (result, lost_after) == ("reply lost", 4)   # hop 4 (the h2 underlay) saw the reply, hop 3 did not
    assert any("lost on the underlay between h2 and h1" in r for r in reasons), reasons


def test_icmp_error_is_refused():
    hops = rows(2)
    hops[0]["Reply"] = seen("destination unreachable (host)", "10.0.0.1", "10.0.0.2")
    result, _, reasons = diagnose(plan(), PROBE, hops, SENT, None)
    assert result == "refused"
    assert reasons[0].startswith("10.0.0.1 answered with an ICMP error")


def test_probe_too_big_to_send():
    hops = rows(-1)
    hops[0]["MTU"] = 1450
    result, lost_after, reasons = diagnose(plan(), PROBE, hops, SENT, {"Errno": 90, "SendError": "Message too long"})
    assert (result, lost_after) == ("not sent", None)
    assert any(r.startswith("MTU:") for r in reasons), reasons


def test_a_hop_that_could_not_be_captured_is_named():
    hops = rows(2)
    hops[3]["Error"] = "this host has no underlay of network ol1"
    _, _, reasons = diagnose(plan(), PROBE, hops, SENT, None)
    assert any("hop 4 on host h2: this host has no underlay" in r for r in reasons), reasons
