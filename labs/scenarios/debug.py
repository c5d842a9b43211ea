"""Debugging a container network with `netd capture` and `netd trace`, across two hosts.

On an overlay: a capture on a container while it pings a container on another host holds the
ICMP echo and its reply (checked in the pcap with tcpdump); a capture of the underlay shows VXLAN
with the network's VNI and the two containers inside; `netd trace` follows a probe through every
hop of both hosts. Then the path is broken on purpose, once on each side (an FDB entry deleted
from the VXLAN device, as if the peer had never been programmed), and `netd trace` must name the
hop where the probe, or its answer, stops, and the missing FDB entry as the reason. Then, where
the drivers exist, the same trace on hostgw (and a blackhole route found at the bridge's hop) and
on a global macvlan network.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

from labs.lab import NETD, Lab, LabError
from labs.report import Report
from labs.scenarios import Scenario
from labs.scenarios.common import container_address, pings, unique, wait_for

SUBNET = "172.16.9.0/24"


def run(lab: Lab, report: Report, options: dict) -> None:
    if len(lab.container_hosts) < 2:
        report.add("debug", "scenario ran", "-", "-", False, "the debug scenario needs two hosts (--hosts 2)")
        return
    first, second = lab.container_hosts[:2]
    net, a, b = unique("dbg"), unique("dbga"), unique("dbgb")
    lab.netd(first, "network", "create", "-d", "overlay", "--subnet", SUBNET, net)
    try:
        lab.netd(first, "run", "-d", "--name", a, "--network", net, "sleep", "100000")
        lab.netd(second, "run", "-d", "--name", b, "--network", net, "sleep", "100000")
        address_b = container_address(lab, second, b, net)
        address_a = container_address(lab, first, a, net)
        ready = wait_for(lambda: pings(lab, first, a, b)[0], timeout=15, interval=0.5)
        report.add("debug", "overlay up", a, b, ready, "ping by name before debugging")
        vni = json.loads(lab.netd(first, "network", "inspect", net))[0]["Netd"]["VNI"]
        check_capture_pcap(lab, report, first, a, b, address_b)
        check_quiet_capture(lab, report, first, second, a, net)
        check_underlay(lab, report, first, a, b, vni, address_a, address_b)
        check_vxlan_device(lab, report, second, a, b, net, address_a)
        check_trace_ok(lab, report, first, a, b)
        check_broken_fdb(lab, report, first, second, a, b, vni, net)
    finally:
        lab.try_netd(first, "rm", "-f", a)
        lab.try_netd(second, "rm", "-f", b)
        lab.try_netd(first, "network", "rm", net)
    check_other_drivers(lab, report, first, second)


def two_containers(lab: Lab, first: str, second: str, net: str, prefix: str) -> tuple[str, str]:
    a, b = unique(prefix), unique(prefix)
    for host in (first, second):
        wait_for(lambda h=host: lab.try_netd(h, "network", "inspect", net).returncode == 0, timeout=10)
    lab.netd(first, "run", "-d", "--name", a, "--network", net, "sleep", "100000")
    lab.netd(second, "run", "-d", "--name", b, "--network", net, "sleep", "100000")
    wait_for(lambda: pings(lab, first, a, container_address(lab, second, b, net))[0], timeout=15, interval=0.5)
    return a, b


def check_other_drivers(lab: Lab, report: Report, first: str, second: str) -> None:
    """hostgw (routed, unwrapped) and global macvlan (the parent's wire): the same trace, their own
    hops; on hostgw a blackhole route for the destination is found at the bridge's hop."""
    drivers = json.loads(lab.netd(first, "info", "--format", "json")).get("Drivers", [])
    if "hostgw" in drivers:
        net = unique("dbghg")
        lab.netd(first, "network", "create", "-d", "hostgw", "--subnet", "10.246.0.0/16", net)
        a = b = ""
        try:
            a, b = two_containers(lab, first, second, net, "dbgh")
            code, found, err = trace(lab, first, a, b)
            kinds = [h["Kind"] for h in found.get("Hops", [])]
            report.add("debug", "trace hostgw: every hop both ways", a, b,
                       code == 0 and seen_everywhere(found) and kinds == [
                           "container", "veth", "bridge", "underlay", "underlay", "bridge", "veth", "container"],
                       f"{found.get('Result', err)}: {' > '.join(kinds)}")
            address_b = container_address(lab, second, b, net)
            blackhole = f"ip route add blackhole {address_b}/32"
            lab.sh(first, blackhole)
            try:
                code, found, err = trace(lab, first, a, b)
            finally:
                lab.sh(first, f"ip route del blackhole {address_b}/32")
            lost = found.get("LostAfterHop")
            reasons = " ".join(found.get("Reasons", []))
            report.add("debug", "trace hostgw finds a blackhole route", a, b,
                       code == 1 and found.get("Result") == "request lost" and lost
                       and found["Hops"][lost - 1]["Kind"] == "bridge" and "blackhole" in reasons,
                       f"{found.get('Result', err)} after hop {lost}: {reasons}")
        finally:
            lab.try_netd(first, "rm", "-f", a)
            lab.try_netd(second, "rm", "-f", b)
            lab.try_netd(first, "network", "rm", net)
    if "macvlan" in drivers:
        net = unique("dbgmv")
        lab.netd(first, "network", "create", "-d", "macvlan", "--scope", "global", "--subnet", "10.10.0.0/24",
                 "--gateway", "10.10.0.254", "--ip-range", "10.10.0.224/28", "-o", "parent=eth0", net)
        a = b = ""
        try:
            a, b = two_containers(lab, first, second, net, "dbgm")
            code, found, err = trace(lab, first, a, b)
            kinds = [h["Kind"] for h in found.get("Hops", [])]
            report.add("debug", "trace macvlan: every hop both ways", a, b,
                       code == 0 and seen_everywhere(found) and kinds == ["container", "parent", "parent", "container"],
                       f"{found.get('Result', err)}: {' > '.join(kinds)}")
        finally:
            lab.try_netd(first, "rm", "-f", a)
            lab.try_netd(second, "rm", "-f", b)
            lab.try_netd(first, "network", "rm", net)


def start_capture(lab: Lab, host: str, *args: str) -> subprocess.Popen:
    """`netd capture ARGS` in the background; returns once it listens (its first stderr line)."""
    process = lab.hosts[host].popen(NETD + ["capture", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
    line = process.stderr.readline()
    if not line.startswith("capturing on"):
        process.kill()
        out, err = process.communicate()
        raise LabError(f"{host}$ netd capture {' '.join(args)}: {line}{err}{out}".strip())
    return process


def finish(process: subprocess.Popen, timeout: float = 30) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    return process.returncode, out, err


def check_capture_pcap(lab: Lab, report: Report, host: str, a: str, b: str, address_b: str) -> None:
    pcap = os.path.join(lab.tmp, f"{a}.pcap")
    capture = start_capture(lab, host, a, "-f", "icmp", "-c", "4", "--timeout", "20", "-w", pcap)
    ok, detail = pings(lab, host, a, b, count=2)
    code, out, err = finish(capture)
    lines = out.strip().splitlines()
    read = lab.sh(host, f"tcpdump -nr {pcap} icmp")
    requests = read.stdout.count(f"> {address_b}: ICMP echo request")
    replies = read.stdout.count(f"{address_b} > ") and read.stdout.count("ICMP echo reply")
    report.add("debug", "capture pcap: echo and reply", a, b,
               ok and code == 0 and requests >= 1 and replies >= 1 and len(lines) == 4,
               f"{len(lines)} lines printed; tcpdump -r: {requests} echo request(s), {replies} reply(ies); "
               f"{lines[0] if lines else err.strip()}")
    named = [line for line in lines if f"({b})" in line]
    report.add("debug", "capture names addresses", a, b, bool(named), named[0] if named else out[:200])


def check_quiet_capture(lab: Lab, report: Report, host_a: str, host_c: str, a: str, net: str) -> None:
    """Quiet wires: a fresh container captured with `-c 4` and no filter while a container on the
    other host pings it three times: the four packets are the pings, not IPv6 chatter."""
    c = unique("dbgq")
    lab.netd(host_c, "run", "-d", "--name", c, "--network", net, "sleep", "100000")
    try:
        capture = start_capture(lab, host_c, c, "-c", "4", "--timeout", "20")
        ok, _ = pings(lab, host_a, a, c, count=3)
        code, out, err = finish(capture)
        lines = out.strip().splitlines()
        ipv6 = [line for line in lines if "IP6" in line or "fe80:" in line or "ff02:" in line]
        requests = sum("echo request" in line for line in lines)
        replies = sum("echo reply" in line for line in lines)
        report.add("debug", "capture -c 4 during 3 pings: no chatter", a, c,
                   ok and code == 0 and not ipv6 and requests >= 1 and replies >= 1,
                   f"{requests} request(s), {replies} reply(ies), {len(ipv6)} IPv6 line(s) in {len(lines)}"
                   + (f"; first: {ipv6[0]}" if ipv6 else "") + ("" if lines else f"; {err.strip()}"))
    finally:
        lab.try_netd(host_c, "rm", "-f", c)


def check_underlay(lab: Lab, report: Report, host: str, a: str, b: str, vni: int, address_a: str,
                   address_b: str) -> None:
    capture = start_capture(lab, host, "underlay", "--format", "json", "-c", "2", "--timeout", "20")
    pings(lab, host, a, b)
    code, out, err = finish(capture)
    packets = [json.loads(line) for line in out.splitlines() if line.strip()]
    vxlan = [p["Packet"]["VXLAN"] for p in packets if p["Packet"].get("VXLAN")]
    inner = {(v.get("Inner", {}).get("Src"), v.get("Inner", {}).get("Dst")) for v in vxlan}
    report.add("debug", "underlay VNI matches", host, b,
               code == 0 and bool(vxlan) and all(v["VNI"] == vni for v in vxlan)
               and (address_a, address_b) in inner and (address_b, address_a) in inner,
               f"network VNI {vni}; captured VNIs {sorted({v['VNI'] for v in vxlan})}; inner {sorted(inner)}")


def check_vxlan_device(lab: Lab, report: Report, host: str, a: str, b: str, net: str, address_a: str) -> None:
    """On the other host, the overlay's VXLAN device shows the inner frames, unwrapped."""
    capture = start_capture(lab, host, f"vxlan:{net}", "-f", "icmp", "-c", "2", "--timeout", "20")
    pings(lab, lab.container_hosts[0], a, b)
    code, out, err = finish(capture)
    lines = out.strip().splitlines()
    report.add("debug", "capture vxlan device", host, net,
               code == 0 and len(lines) == 2 and " vxlan0 " in lines[0] and f"{address_a} ({a})" in lines[0],
               lines[0] if lines else err.strip())


def trace(lab: Lab, host: str, a: str, b: str) -> tuple[int, dict, str]:
    result = lab.try_netd(host, "trace", a, b, "--format", "json", timeout=90)
    try:
        return result.returncode, json.loads(result.stdout), result.stderr.strip()
    except ValueError:
        return result.returncode, {}, (result.stderr.strip() or result.stdout.strip())


def seen_everywhere(found: dict) -> bool:
    return bool(found.get("Hops")) and all(h["Request"] and h["Reply"] for h in found["Hops"])


def check_trace_ok(lab: Lab, report: Report, host: str, a: str, b: str) -> None:
    started = time.monotonic()
    code, found, err = trace(lab, host, a, b)
    hops = found.get("Hops", [])
    where = " > ".join(f"{h['Host']}:{h['Interface'] or h['Kind']}" for h in hops)
    report.add("debug", "trace: every hop both ways", a, b,
               code == 0 and found.get("Result") == "ok" and len(hops) == 10 and seen_everywhere(found),
               f"{found.get('Result', err)} in {time.monotonic() - started:.1f} s: {where}")
    text = lab.try_netd(host, "trace", a, b, timeout=90)
    report.add("debug", "trace table", a, b, text.returncode == 0 and "the path works" in text.stdout,
               (text.stdout.strip().splitlines() or [text.stderr.strip()])[-1])


def fdb(lab: Lab, host: str, vni: int, verb: str, mac: str, remote: str) -> None:
    command = (f"nsenter --net=/run/netd/netns/ov-{vni} bridge fdb {verb} {mac} dev vxlan0 dst {remote}"
               + (" self permanent" if verb == "replace" else ""))
    result = lab.sh(host, command)
    if result.returncode != 0:
        raise LabError(f"{host}$ {command}: {result.stderr.strip()}")


def check_broken_fdb(lab: Lab, report: Report, first: str, second: str, a: str, b: str, vni: int,
                     net: str) -> None:
    mac_a = json.loads(lab.netd(first, "inspect", a))[0]["NetworkSettings"]["Networks"][net]["MacAddress"]
    mac_b = json.loads(lab.netd(second, "inspect", b))[0]["NetworkSettings"]["Networks"][net]["MacAddress"]
    # The way there: the first host forgets where b's MAC lives.
    fdb(lab, first, vni, "del", mac_b, lab.addresses[second])
    try:
        code, found, err = trace(lab, first, a, b)
        reasons = " ".join(found.get("Reasons", []))
        lost = found.get("LostAfterHop")
        hop = found["Hops"][lost - 1] if lost else {}
        report.add("debug", "trace names the broken hop", first, b,
                   code == 1 and found.get("Result") == "request lost" and hop.get("Kind") == "vxlan"
                   and hop.get("Host") == lab.addresses[first] and "no FDB entry" in reasons and mac_b in reasons,
                   f"{found.get('Result', err)} after hop {lost} ({hop.get('Label')} on {hop.get('Host')}): {reasons}")
    finally:
        fdb(lab, first, vni, "replace", mac_b, lab.addresses[second])
    # The way back: the second host forgets where a's MAC lives; the answer stops there.
    fdb(lab, second, vni, "del", mac_a, lab.addresses[first])
    try:
        code, found, err = trace(lab, first, a, b)
        reasons = " ".join(found.get("Reasons", []))
        lost = found.get("LostAfterHop")
        hop = found["Hops"][lost - 1] if lost else {}
        report.add("debug", "trace names the broken hop (answer)", b, a,
                   code == 1 and found.get("Result") == "reply lost" and hop.get("Kind") == "vxlan"
                   and hop.get("Host") == lab.addresses[second] and "no FDB entry" in reasons and mac_a in reasons,
                   f"{found.get('Result', err)} after hop {lost} ({hop.get('Label')} on {hop.get('Host')}): {reasons}")
    finally:
        fdb(lab, second, vni, "replace", mac_a, lab.addresses[first])
    ok, detail = pings(lab, first, a, b)
    report.add("debug", "path repaired", a, b, ok, detail)


SCENARIO = Scenario("debug", "netd capture and netd trace on an overlay: pcap, VNI, a broken FDB entry found", run,
                    default_hosts=2)
