"""macvlan across hosts: the lab hosts' own segment (10.10.0.0/24, each host's eth0 as the parent)
carries the containers, with MACs of their own that the lab's switch learns.

1. Docker's docs way: a local macvlan network of the same subnet on every host, containers with a
   static --ip each. The second host's `network create` warns that another host has a local macvlan
   network on that subnet (separate pools on one segment).
2. netd's way: one `--scope global` network, containers without --ip started on every host at
   once, two per host: the cluster-wide pool gives every one a different address. With
   host_access each host also reaches its own containers (and they it) through its shim.

In both, every container pings every other one and every other lab host by address (and in 2, by
name too, across hosts)."""

from __future__ import annotations

import json
from ipaddress import IPv4Address

from labs.lab import Lab
from labs.report import Report, run_parallel
from labs.scenarios import Scenario
from labs.scenarios.common import (
    pings,
    start_containers,
    unique,
    wait_for_network,
)

SUBNET, GATEWAY = "10.10.0.0/24", "10.10.0.254"     # the lab's segment; its ext host as gateway
STATIC_BASE = 20                                    # static --ip: 10.10.0.21, .22, ... (hosts are .1, .2, ...)
IP_RANGE = "10.10.0.128/26"                         # the global network's containers: .128 - .191
SCENARIO_NAME = "macvlan"


def run(lab: Lab, report: Report, options: dict) -> None:
    if options.get("routed"):
        report.add(SCENARIO_NAME, "scenario ran", "-", "-", False,
                   "macvlan puts containers on the parent's own segment: run it without --routed")
        return
    static_ip_networks(lab, report)
    cluster_ipam_network(lab, report)


def static_ip_networks(lab: Lab, report: Report) -> None:
    """Docker's docs: the same local network on each host, a static --ip per container."""
    hosts = lab.container_hosts
    net = unique("mvs")
    containers: dict[str, tuple[str, str]] = {}
    made: list[str] = []
    try:
        for i, host in enumerate(hosts, 1):
            result = lab.try_netd(host, "network", "create", "-d", "macvlan", "--subnet", SUBNET, "--gateway", GATEWAY,
                                  "-o", "parent=eth0", net)
            if result.returncode != 0:
                report.add(SCENARIO_NAME, "local network created", host, net, False, result.stderr.strip())
                continue
            made.append(host)
            if i > 1:
                warned = "another host has a local macvlan network on an overlapping subnet" in result.stderr
                report.add(SCENARIO_NAME, "warns of another host's local subnet", host, net, warned,
                           result.stderr.strip() or "no warning")
            name = f"mvs{i}"
            address = str(IPv4Address(SUBNET.split("/")[0]) + STATIC_BASE + i)
            lab.netd(host, "run", "-d", "--name", name, "--network", net, "--ip", address, "sleep", "100000")
            containers[name] = (host, address)
        check_pairs(lab, report, containers, "static --ip", by_name=False)
        check_hosts_reached(lab, report, containers, "static --ip")
    finally:
        for name, (host, _) in containers.items():
            lab.try_netd(host, "rm", "-f", name)
        for host in made:
            lab.try_netd(host, "network", "rm", net)


def cluster_ipam_network(lab: Lab, report: Report) -> None:
    """One global network: a cluster-wide pool, no --ip, hosts starting containers at once."""
    hosts = lab.container_hosts
    net = unique("mvg")
    first = hosts[0]
    lab.netd(first, "network", "create", "-d", "macvlan", "--scope", "global", "--subnet", SUBNET,
             "--gateway", GATEWAY, "--ip-range", IP_RANGE, "-o", "parent=eth0", "-o", "host_access=true", net)
    names = {f"mvg{i}{letter}": host for i, host in enumerate(hosts, 1) for letter in "ab"}
    containers: dict[str, tuple[str, str]] = {}
    try:
        wait_for_network(lab, net)
        containers.update(start_containers(lab, report, SCENARIO_NAME, net, names))
        addresses = [address for _, address in containers.values()]
        report.add(SCENARIO_NAME, "addresses unique across hosts (cluster IPAM)", ", ".join(hosts), net,
                   len(addresses) == len(names) and len(set(addresses)) == len(addresses),
                   " ".join(f"{n}@{h}={a}" for n, (h, a) in containers.items()))
        allocations = json.loads(lab.netd(first, "ipam", "inspect", net, "--format", "json"))
        held = [a["Address"] for a in allocations if a["Kind"] == "endpoint"]
        report.add(SCENARIO_NAME, "ipam inspect lists each once", first, net,
                   sorted(held) == sorted(addresses), f"{len(held)} endpoint addresses")
        check_pairs(lab, report, containers, "cluster IPAM", by_name=True)
        check_hosts_reached(lab, report, containers, "cluster IPAM")
        check_host_access(lab, report, net, containers)
    finally:
        run_parallel([lambda n=name, h=host: lab.try_netd(h, "rm", "-f", n) for name, host in names.items()])
        lab.try_netd(first, "network", "rm", net)


def check_pairs(lab: Lab, report: Report, containers: dict[str, tuple[str, str]], label: str, by_name: bool) -> None:
    """Every container pings every other, by address (and by name)."""
    tasks, labels = [], []
    for src, (src_host, _) in containers.items():
        for dst, (_, dst_address) in containers.items():
            if src == dst:
                continue
            for what, target in [("ping by address", dst_address)] + ([("ping by name", dst)] if by_name else []):
                tasks.append(lambda h=src_host, s=src, t=target: pings(lab, h, s, t))
                labels.append((f"{what} ({label})", src, dst))
    for (what, src, dst), (ok, detail) in zip(labels, run_parallel(tasks), strict=True):
        report.add(SCENARIO_NAME, what, src, dst, ok, detail)


def check_hosts_reached(lab: Lab, report: Report, containers: dict[str, tuple[str, str]], label: str) -> None:
    """Every container pings every lab host but its own (which it reaches only with host_access)."""
    tasks, labels = [], []
    for name, (host, _) in containers.items():
        for other in lab.container_hosts:
            if other != host:
                tasks.append(lambda h=host, n=name, a=lab.addresses[other]: pings(lab, h, n, a))
                labels.append((name, other))
    for (name, other), (ok, detail) in zip(labels, run_parallel(tasks), strict=True):
        report.add(SCENARIO_NAME, f"container reaches other hosts ({label})", name, other, ok, detail)


def check_host_access(lab: Lab, report: Report, net: str, containers: dict[str, tuple[str, str]]) -> None:
    """host_access: each host reaches its own containers through its shim, and they the host."""
    for host in lab.container_hosts:
        shim = json.loads(lab.netd(host, "network", "inspect", net))[0]["Netd"].get("HostAccess", {})
        report.add(SCENARIO_NAME, "host-access shim", host, net, isinstance(shim, dict) and bool(shim.get("Address")),
                   json.dumps(shim))
    tasks, labels = [], []
    for name, (host, address) in containers.items():
        tasks.append(lambda h=host, a=address: lab.sh(h, f"ping -c1 -W2 {a}"))
        labels.append((host, name, "host reaches its own container"))
        tasks.append(lambda h=host, n=name: pings(lab, h, n, lab.addresses[h]))
        labels.append((name, host, "container reaches its own host"))
    for (src, dst, what), result in zip(labels, run_parallel(tasks), strict=True):
        if isinstance(result, tuple):
            ok, detail = result
        else:
            ok = result.returncode == 0
            detail = (result.stdout.strip().splitlines() or [result.stderr.strip()])[-1]
        report.add(SCENARIO_NAME, f"{what} (host_access)", src, dst, ok, detail)


SCENARIO = Scenario(SCENARIO_NAME, "macvlan on the hosts' eth0: static --ip, then cluster IPAM with host access", run)
