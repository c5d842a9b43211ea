"""The overlay scenario from Docker's docs, on every host of the lab: `ol1` created on one host
appears with the same ID everywhere, containers on different hosts reach each other by
address and by name, names are unique across the cluster, the outside is reached through NAT,
two overlays cannot reach each other, and the data plane survives a daemon restart and
forgets a host that died."""

from __future__ import annotations

import json
import signal
import time

from labs.lab import Lab
from labs.report import Report
from labs.scenarios import Scenario
from labs.scenarios.common import check_all_pairs, container_address, pings, unique, wait_for

SUBNET, GATEWAY = "172.16.2.0/24", "172.16.2.254"


def run(lab: Lab, report: Report, options: dict) -> None:
    hosts = lab.container_hosts
    net, other = unique("ol"), unique("iso")
    first = hosts[0]
    lab.netd(first, "network", "create", "-d", "overlay", "--subnet", SUBNET, "--gateway", GATEWAY, net)
    containers: dict[str, tuple[str, str]] = {}
    try:
        check_same_network_everywhere(lab, report, net)
        for i, host in enumerate(hosts, 1):
            name = f"test{i:02d}"
            lab.netd(host, "run", "-d", "--name", name, "--network", net, "sleep", "100000")
            containers[name] = (host, container_address(lab, host, name, net))
        check_all_pairs(lab, report, "overlay", containers)
        if len(hosts) > 1:
            refused = lab.try_netd(hosts[1], "run", "-d", "--name", "test01", "--network", net, "sleep", "1")
            report.add("overlay", "names unique in the cluster", hosts[1], "test01",
                       refused.returncode != 0 and "already used on network" in refused.stderr, refused.stderr.strip())
        ok, detail = pings(lab, hosts[-1], f"test{len(hosts):02d}", lab.ext_address)
        report.add("overlay", "outbound NAT", f"test{len(hosts):02d}", "ext", ok, detail)
        check_isolation(lab, report, other, containers)
        if len(hosts) > 1:
            check_restart(lab, report, net, containers)
        if len(hosts) > 2:
            check_dead_host(lab, report, net, containers)
    finally:
        for name, (host, _) in containers.items():
            lab.try_netd(host, "rm", "-f", name)
        lab.try_netd(first, "network", "rm", net)


def check_same_network_everywhere(lab: Lab, report: Report, net: str) -> None:
    ids = {}
    for host in lab.container_hosts:
        deadline = time.monotonic() + 5
        while True:
            result = lab.try_netd(host, "network", "inspect", net)
            if result.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        info = json.loads(result.stdout)[0] if result.returncode == 0 else {}
        ids[host] = info.get("Id")
        report.add("overlay", "network on every host", lab.container_hosts[0], host,
                   bool(info) and info["Scope"] == "global" and info["Driver"] == "overlay",
                   f"id {str(info.get('Id'))[:12]} scope {info.get('Scope')}")
    report.add("overlay", "same network id", lab.container_hosts[0], "all hosts", len(set(ids.values())) == 1,
               ", ".join(f"{h}={str(i)[:12]}" for h, i in ids.items()))


def check_isolation(lab: Lab, report: Report, other: str, containers: dict[str, tuple[str, str]]) -> None:
    hosts = lab.container_hosts
    lab.netd(hosts[0], "network", "create", "-d", "overlay", other)
    name = unique("iso")
    host = hosts[-1]
    try:
        lab.netd(host, "run", "-d", "--name", name, "--network", other, "sleep", "100000")
        for target, (_, address) in containers.items():
            ok, detail = pings(lab, host, name, address)
            report.add("overlay", "isolated from other overlay", name, target, not ok, detail)
    finally:
        lab.try_netd(host, "rm", "-f", name)
        lab.try_netd(hosts[0], "network", "rm", other)


def check_restart(lab: Lab, report: Report, net: str, containers: dict[str, tuple[str, str]]) -> None:
    """Restart the second host's daemon: its containers keep working, nothing is duplicated."""
    host = lab.container_hosts[1]
    before = lab.sh(host, "ip -o link | wc -l").stdout.strip()
    lab.stop_daemon(host)
    lab.start_daemon(host)
    after = lab.sh(host, "ip -o link | wc -l").stdout.strip()
    log = lab.daemon_log(host)
    report.add("overlay", "restart keeps the data plane", host, host,
               before == after and "File exists" not in log and "file exists" not in log,
               f"interfaces before {before}, after {after}")
    for name, (src_host, _) in containers.items():
        if src_host != host:
            ok, detail = pings(lab, host, f"test{lab.container_hosts.index(host) + 1:02d}", name)
            report.add("overlay", "after restart", host, name, ok, detail)


def check_dead_host(lab: Lab, report: Report, net: str, containers: dict[str, tuple[str, str]]) -> None:
    """Kill the last host's daemon: once its lease lapses, the others forget its endpoints;
    when it comes back, they learn them again."""
    dead = lab.container_hosts[-1]
    watcher = lab.container_hosts[0]
    dead_name = next(n for n, (h, _) in containers.items() if h == dead)
    dead_address = containers[dead_name][1]
    vni = json.loads(lab.netd(watcher, "network", "inspect", net))[0]["Netd"]["VNI"]
    neighbours = f"nsenter --net=/run/netd/netns/ov-{vni} ip neigh show dev vxlan0"
    lab.stop_daemon(dead, signal.SIGKILL)
    gone = wait_for(lambda: dead_address not in lab.sh(watcher, neighbours).stdout, timeout=30)
    report.add("overlay", "dead host unprogrammed", watcher, dead, gone,
               f"{dead_address} {'gone from' if gone else 'still in'} vxlan0's neighbours")
    lab.start_daemon(dead)
    back = wait_for(lambda: dead_address in lab.sh(watcher, neighbours).stdout, timeout=30)
    ok, detail = pings(lab, watcher, next(n for n, (h, _) in containers.items() if h == watcher), dead_name)
    report.add("overlay", "host back, peers again", watcher, dead, back and ok, detail)


SCENARIO = Scenario("overlay", "VXLAN overlay across hosts: names, NAT, isolation, restart, dead host", run,
                    default_hosts=3, daemon_args=("--host-ttl", "3"))
