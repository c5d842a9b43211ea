"""Failures a cluster lives through: the store goes away and comes back, a host's link is cut
and restored, a corrupt value lands in the store, a daemon is pointed at a store that is not
there. Containers keep their networking throughout; operations that need the store fail fast
with a message that says so; everything catches up when the store returns."""

from __future__ import annotations

import base64
import json
import time

from labs.lab import ETCD_PORT, Lab
from labs.report import Report
from labs.scenarios import Scenario
from labs.scenarios.common import container_address, pings, unique, wait_for, wait_for_network


def run(lab: Lab, report: Report, options: dict) -> None:
    hosts = lab.container_hosts
    net = unique("fo")
    lab.netd(hosts[0], "network", "create", "-d", "overlay", "--subnet", "172.16.7.0/24", net)
    names: dict[str, tuple[str, str]] = {}
    try:
        wait_for_network(lab, net)
        for i, host in enumerate(hosts[:2]):
            name = f"f{i + 1}"
            lab.netd(host, "run", "-d", "--name", name, "--network", net, "sleep", "100000")
            names[name] = (host, container_address(lab, host, name, net))
        store_goes_away(lab, report, net, names)
        link_is_cut(lab, report, names)
        corrupt_value(lab, report)
        unreachable_store_at_start(lab, report)
    finally:
        for name, (host, _) in names.items():
            lab.try_netd(host, "rm", "-f", name)
        lab.try_netd(hosts[0], "network", "rm", net)


def store_goes_away(lab: Lab, report: Report, net: str, names: dict[str, tuple[str, str]]) -> None:
    (a, (host_a, _)), (b, (host_b, address_b)) = list(names.items())[:2]
    lab.stop_etcd()
    try:
        ok, detail = pings(lab, host_a, a, address_b)
        report.add("failures", "store away: containers still talk", a, b, ok, detail)
        listed = lab.try_netd(host_a, "network", "ls")
        report.add("failures", "store away: local queries answer", host_a, "network ls",
                   listed.returncode == 0 and net in listed.stdout, listed.stderr.strip())
        started = time.monotonic()
        refused = lab.try_netd(host_a, "run", "-d", "--name", unique("x"), "--network", net, "sleep", "1")
        took = time.monotonic() - started
        report.add("failures", "store away: fails fast and says why", host_a, "netd run",
                   refused.returncode != 0 and took < 10 and "etcd" in refused.stderr and "\n" not in refused.stderr.strip(),
                   f"{took:.1f}s: {refused.stderr.strip()}")
    finally:
        lab.start_etcd()
    # Caught up: new containers on two hosts get distinct addresses, none lost or doubled.
    late = {}
    for host in lab.container_hosts[:2]:
        name = unique("late")
        result = lab.try_netd(host, "run", "-d", "--name", name, "--network", net, "sleep", "100000")
        if result.returncode == 0:
            names[name] = (host, container_address(lab, host, name, net))
            late[name] = names[name][1]
    allocations = json.loads(lab.netd(lab.container_hosts[-1], "ipam", "inspect", net, "--format", "json"))
    held = sorted(a["Address"] for a in allocations if a["Kind"] == "endpoint")
    expected = sorted(address for _, address in names.values())
    report.add("failures", "store back: caught up, nothing lost or doubled", "cluster", net,
               len(late) == 2 and held == expected, f"held {held}, containers {expected}")


def link_is_cut(lab: Lab, report: Report, names: dict[str, tuple[str, str]]) -> None:
    (a, (host_a, _)), (b, (host_b, address_b)) = list(names.items())[:2]
    lab.sh(host_b, "ip link set eth0 down")
    try:
        ok, _ = pings(lab, host_a, a, address_b)
        report.add("failures", "link cut: unreachable", a, b, not ok, "")
    finally:
        lab.sh(host_b, "ip link set eth0 up")
    back = wait_for(lambda: pings(lab, host_a, a, address_b)[0], timeout=30, interval=0.5)
    report.add("failures", "link back: reachable again", a, b, back, "")


def corrupt_value(lab: Lab, report: Report) -> None:
    key, value = "netd/networks/" + "f" * 64, "{this is not json"
    body = json.dumps({"key": base64.b64encode(key.encode()).decode(), "value": base64.b64encode(value.encode()).decode()})
    lab.sh("kv", f"curl -s -X POST http://127.0.0.1:{ETCD_PORT}/v3/kv/put -d '{body}'")
    host = lab.container_hosts[0]
    try:
        time.sleep(0.5)
        listed = lab.try_netd(host, "network", "ls")
        logged = "corrupt" in lab.daemon_log(host)
        report.add("failures", "corrupt value: reported, no crash", "store", host,
                   listed.returncode == 0 and logged, "logged" if logged else "not logged")
    finally:
        delete = json.dumps({"key": base64.b64encode(key.encode()).decode()})
        lab.sh("kv", f"curl -s -X POST http://127.0.0.1:{ETCD_PORT}/v3/kv/deleterange -d '{delete}'")


def unreachable_store_at_start(lab: Lab, report: Report) -> None:
    host = lab.container_hosts[-1]
    lab.stop_daemon(host)
    try:
        started = time.monotonic()
        result = lab.try_netd(
            host, "daemon", "--cluster-store", f"etcd://{lab.kv_address}:1", "--cluster-advertise",
            lab.addresses[host], timeout=30)
        took = time.monotonic() - started
        message = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
        report.add("failures", "unreachable store at start: clear error", host, "netd daemon",
                   result.returncode != 0 and took < 10 and "cannot reach etcd" in message, f"{took:.1f}s: {message}")
    finally:
        lab.start_daemon(host)


SCENARIO = Scenario("failures", "the store goes away, a link is cut, a corrupt value, a missing store", run,
                    default_hosts=3, daemon_args=("--host-ttl", "3"), in_demo=False)
