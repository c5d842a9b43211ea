"""VXLAN only from members: a host of the lab that is not a netd member (ext) sends a VXLAN frame
(scapy) carrying a ping to a container of an overlay; netd's table drops it (counted in `netd
info`), and the container never sees it. The same frame from a member is delivered."""

from __future__ import annotations

import json
import sys

from labs.lab import Lab
from labs.report import Report
from labs.scenarios import Scenario
from labs.scenarios.common import container_address, pings, unique, wait_for
from labs.scenarios.debug import finish, start_capture

SUBNET = "172.16.13.0/24"
INJECT = """
import sys
from scapy.all import IP, UDP, VXLAN, Ether, ICMP, Raw, send, conf
conf.verb = 0
target, vni, mac, dst, src = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
inner = Ether(dst=mac, src="02:42:de:ad:be:ef") / IP(src=src, dst=dst) / ICMP(id=4242, seq=1) / Raw(b"netd-guard")
send(IP(dst=target) / UDP(sport=4789, dport=4789) / VXLAN(vni=vni, flags=0x08) / inner, count=3, inter=0.2)
"""


def inject(lab: Lab, host: str, target: str, vni: int, mac: str, dst: str, src: str) -> None:
    command = f"{sys.executable} -c '{INJECT}' {target} {vni} {mac} {dst} {src}"
    result = lab.sh(host, command)
    if result.returncode != 0:
        raise RuntimeError(f"{host}: injecting VXLAN failed: {result.stderr.strip()}")


def seen(lab: Lab, host: str, container: str, sender: str, target: str, vni: int, mac: str, dst: str,
         src: str) -> tuple[bool, str]:
    capture = start_capture(lab, host, container, "-f", "icmp and icmp[4:2] == 4242", "-c", "1", "--timeout", "4")
    inject(lab, sender, target, vni, mac, dst, src)
    code, out, err = finish(capture)
    return bool(out.strip()), (out.strip() or err.strip())[:200]


def run(lab: Lab, report: Report, options: dict) -> None:
    first, second = lab.container_hosts[:2]
    net, a, b = unique("sec"), unique("seca"), unique("secb")
    lab.netd(first, "network", "create", "-d", "overlay", "--subnet", SUBNET, net)
    try:
        lab.netd(first, "run", "-d", "--name", a, "--network", net, "sleep", "100000")
        lab.netd(second, "run", "-d", "--name", b, "--network", net, "sleep", "100000")
        ok = wait_for(lambda: pings(lab, second, b, a)[0], timeout=15, interval=0.5)
        report.add("security", "members reach each other", b, a, ok, "ping over the overlay")
        vni = json.loads(lab.netd(first, "network", "inspect", net))[0]["Netd"]["VNI"]
        info = json.loads(lab.netd(first, "inspect", a))[0]["NetworkSettings"]["Networks"][net]
        mac, dst = info["MacAddress"], info["IPAddress"]
        src = container_address(lab, second, b, net)
        target = lab.addresses[first]
        before = json.loads(lab.netd(first, "info", "--format", "json")).get("VXLANRefused", 0)
        delivered, detail = seen(lab, first, a, "ext", target, vni, mac, dst, src)
        after = json.loads(lab.netd(first, "info", "--format", "json")).get("VXLANRefused", 0)
        report.add("security", "VXLAN from a non-member dropped", "ext", a, not delivered and after > before,
                   f"refused {after - before} packet(s); the container saw: {detail if delivered else 'nothing'}")
        delivered, detail = seen(lab, first, a, second, target, vni, mac, dst, src)
        report.add("security", "VXLAN from a member delivered", second, a, delivered, detail)
    finally:
        lab.try_netd(first, "rm", "-f", a)
        lab.try_netd(second, "rm", "-f", b)
        lab.try_netd(first, "network", "rm", net)


SCENARIO = Scenario("security", "VXLAN only from members: a non-member's frame is dropped, a member's delivered",
                    run, default_hosts=2, in_demo=False)
