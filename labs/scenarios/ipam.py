"""Cluster-wide IPAM: every host allocates from one address space and never hands out an address
twice — under concurrent `netd run`s on all hosts, for a static --ip two hosts ask for at the
same moment, and after a dead host's addresses are reclaimed. The queries answer from any host."""

from __future__ import annotations

import json
import signal

from labs.lab import Lab
from labs.report import Report, run_parallel
from labs.scenarios import Scenario
from labs.scenarios.common import unique, wait_for, wait_for_network

PER_HOST = 4


def run(lab: Lab, report: Report, options: dict) -> None:
    hosts = lab.container_hosts
    net = unique("pool")
    lab.netd(hosts[0], "network", "create", "-d", "overlay", "--subnet", "172.16.9.0/24", net)
    names: dict[str, str] = {}
    try:
        wait_for_network(lab, net)
        # Every host starts its containers at the same moment.
        tasks = []
        for host in hosts:
            for i in range(PER_HOST):
                name = f"{host}-c{i}"
                names[name] = host
                tasks.append(lambda h=host, n=name: lab.try_netd(h, "run", "-d", "--name", n, "--network", net,
                                                                  "sleep", "100000"))
        results = run_parallel(tasks, workers=len(tasks))
        started = sum(r.returncode == 0 for r in results)
        report.add("ipam", "concurrent runs on all hosts", "all hosts", net, started == len(tasks),
                   f"{started}/{len(tasks)} started" + "".join(f"; {r.stderr.strip()}" for r in results if r.returncode))
        allocations = json.loads(lab.netd(hosts[-1], "ipam", "inspect", net, "--format", "json"))
        endpoints = [a for a in allocations if a["Kind"] == "endpoint"]
        addresses = [a["Address"] for a in endpoints]
        report.add("ipam", "no address twice", hosts[-1], net,
                   len(addresses) == len(set(addresses)) == len(tasks),
                   f"{len(addresses)} allocations, {len(set(addresses))} distinct, by hosts "
                   f"{sorted({a['Host'] for a in endpoints})}")
        pools = {p["Network"]: p for p in json.loads(lab.netd(hosts[1 % len(hosts)], "ipam", "ls", "--format", "json"))}
        report.add("ipam", "pool usage from any host", hosts[1 % len(hosts)], net,
                   pools.get(net, {}).get("Used") == len(tasks) + 1,   # the gateway counts too
                   json.dumps(pools.get(net, {})))
        first = next(a for a in endpoints if a["Container"] == f"{hosts[0]}-c0")
        [found] = json.loads(lab.netd(hosts[-1], "ipam", "lookup", first["Address"], "--format", "json"))
        report.add("ipam", "lookup from another host", hosts[-1], first["Address"],
                   found["Container"] == f"{hosts[0]}-c0" and found["Host"] == lab.addresses[hosts[0]],
                   f"{found.get('Container')} on {found.get('Host')}")
        check_static_race(lab, report, net, names)
        if len(hosts) > 2:
            check_reclaim(lab, report, net, hosts[-1], [a for a in endpoints if a["Host"] == lab.addresses[hosts[-1]]])
    finally:
        for name, host in names.items():
            lab.try_netd(host, "rm", "-f", name)
        lab.try_netd(hosts[0], "network", "rm", net)


def check_static_race(lab: Lab, report: Report, net: str, names: dict[str, str]) -> None:
    """Two hosts ask for the same static address at the same moment: exactly one wins. (An address
    no one holds yet: a host that meets contention takes the next address from a random place.)"""
    contenders = lab.container_hosts[:2]
    held = {a["Address"] for a in json.loads(lab.netd(contenders[0], "ipam", "inspect", net, "--format", "json"))}
    static = next(f"172.16.9.{i}" for i in range(250, 1, -1) if f"172.16.9.{i}" not in held)
    tasks = [lambda h=h: lab.try_netd(h, "run", "-d", "--name", f"{h}-static", "--network", net,
                                      "--ip", static, "sleep", "100000") for h in contenders]
    results = run_parallel(tasks)
    winners = [h for h, r in zip(contenders, results, strict=True) if r.returncode == 0]
    for h in winners:
        names[f"{h}-static"] = h
    loser = next((r.stderr.strip() for r in results if r.returncode), "")
    report.add("ipam", "same static address at once", " & ".join(contenders), static,
               len(winners) == 1 and "already in use" in loser, f"winner {winners}; the other: {loser}")


def check_reclaim(lab: Lab, report: Report, net: str, dead: str, held: list[dict]) -> None:
    """A host dies with containers on it: after its lease and the grace period, its addresses are
    free again, cluster-wide."""
    lab.stop_daemon(dead, signal.SIGKILL)
    lab.kill_containers(dead)
    watcher = lab.container_hosts[0]

    def freed() -> bool:
        for allocation in held:
            found = json.loads(lab.netd(watcher, "ipam", "lookup", allocation["Address"], "--format", "json"))
            if not found or found[0]["State"] != "free":
                return False
        return True

    ok = wait_for(freed, timeout=60, interval=1)
    report.add("ipam", "dead host's addresses reclaimed", watcher, dead, ok,
               f"{len(held)} address(es) of {dead} {'free' if ok else 'still held'}")
    lab.start_daemon(dead)
    left = lab.sh(dead, "ls /run/netd/netns").stdout.split()
    report.add("ipam", "host back: nothing stale", dead, dead, not left, f"namespaces left: {left}")


SCENARIO = Scenario("ipam", "cluster-wide IPAM: concurrent hosts, static-address race, dead-host reclaim", run,
                    default_hosts=3, daemon_args=("--host-ttl", "3", "--reclaim-after", "3"))
