"""host-gw across hosts, flannel-style: one `hostgw` network, each host leasing a /24 of it and
routing the other hosts' /24s through them.

Checks: every host holds a different part and its container an address in it; every container
reaches every other by address and by name, and the outside through NAT; every host routes every
other host's part. Then the routes are attacked as flannel's users report: one deleted by hand,
and all of one host's flushed by an interface restart (ip link set eth0 down/up); both come back
within seconds. Then one host dies (its daemon killed with SIGKILL): its lease lapses after the
short TTL and every other host drops its route to that host's part, so its containers are no
longer reachable; restarted, the daemon takes its part back (the same /24) and they are again."""

from __future__ import annotations

import json
import signal
import time
from ipaddress import IPv4Address, IPv4Network

from labs.lab import Lab
from labs.report import Report, run_parallel
from labs.scenarios import Scenario
from labs.scenarios.common import (
    check_all_pairs,
    pings,
    start_containers,
    unique,
    wait_for,
    wait_for_network,
)

SUBNET = "10.244.0.0/16"
LEASE_TTL = 5                # seconds: a dead host's routes leave within about this
RETURN_TIMEOUT = 10.0        # a lost route must come back within this (the driver checks every 2 s)
SCENARIO_NAME = "hostgw"


def run(lab: Lab, report: Report, options: dict) -> None:
    hosts = lab.container_hosts
    first = hosts[0]
    net = unique("hg")
    lab.netd(first, "network", "create", "-d", "hostgw", "--subnet", SUBNET, "-o", f"lease_ttl={LEASE_TTL}", net)
    names = {f"hg{i}": host for i, host in enumerate(hosts, 1)}
    containers: dict[str, tuple[str, str]] = {}
    try:
        wait_for_network(lab, net)
        containers.update(start_containers(lab, report, SCENARIO_NAME, net, names))
        leases = check_leases(lab, report, net, containers)
        if options.get("routed"):
            check_not_adjacent_reported(lab, report, net, leases, containers)
            return
        check_all_pairs(lab, report, SCENARIO_NAME, containers)
        name, (host, _) = next(iter(containers.items()))
        ok, detail = pings(lab, host, name, lab.ext_address)
        report.add(SCENARIO_NAME, "outbound NAT", name, "ext", ok, detail)
        wait_for(lambda: all_routes_present(lab, leases), timeout=RETURN_TIMEOUT)
        for host in hosts:
            missing = missing_routes(lab, host, leases)
            report.add(SCENARIO_NAME, "routes to every other part", host, "all hosts", not missing,
                       f"missing {', '.join(missing)}" if missing else routes_text(lab, host))
        if len(hosts) > 1:
            check_route_deleted_by_hand(lab, report, leases, containers)
            check_interface_restart(lab, report, leases, containers)
            check_dead_host(lab, report, net, leases, containers)
    finally:
        run_parallel([lambda n=name, h=host: lab.try_netd(h, "rm", "-f", n) for name, host in names.items()])
        lab.try_netd(first, "network", "rm", net)


# --- leases -------------------------------------------------------------------------------------


def netd_info(lab: Lab, host: str, net: str) -> dict:
    return json.loads(lab.netd(host, "network", "inspect", net))[0]["Netd"]


def check_leases(lab: Lab, report: Report, net: str, containers: dict[str, tuple[str, str]]) -> dict[str, str]:
    """Each host holds its own part, and its container's address is in it. host -> part."""
    leases = {}
    for name, (host, address) in containers.items():
        part = netd_info(lab, host, net).get("Lease", "")
        leases[host] = part
        try:
            inside = IPv4Address(address) in IPv4Network(part)
        except ValueError:
            inside = False
        report.add(SCENARIO_NAME, "address from its host's part", name, host, inside, f"{address} in {part}")
    parts = list(leases.values())
    report.add(SCENARIO_NAME, "one part per host", ", ".join(leases), net, len(set(parts)) == len(parts),
               " ".join(f"{h}={p}" for h, p in leases.items()))
    return leases


def routes_of(lab: Lab, host: str) -> dict[str, str]:
    """netd's hostgw routes on a host: destination -> the `ip route` line."""
    lines = lab.sh(host, "ip -4 route show proto 110").stdout.splitlines()
    return {line.split()[0]: line.strip() for line in lines if line.strip()}


def routes_text(lab: Lab, host: str) -> str:
    return "; ".join(routes_of(lab, host).values())


def missing_routes(lab: Lab, host: str, leases: dict[str, str], skip: str | None = None) -> list[str]:
    have = routes_of(lab, host)
    return [part for other, part in leases.items() if other not in (host, skip) and part not in have]


def all_routes_present(lab: Lab, leases: dict[str, str]) -> bool:
    return all(not missing_routes(lab, host, leases) for host in leases)


def reachable(lab: Lab, containers: dict[str, tuple[str, str]], src: str, dst: str) -> tuple[bool, str]:
    host, _ = containers[src]
    return pings(lab, host, src, containers[dst][1])


# --- routes under attack ------------------------------------------------------------------------


def check_route_deleted_by_hand(lab: Lab, report: Report, leases: dict[str, str],
                                containers: dict[str, tuple[str, str]]) -> None:
    hosts = list(leases)
    host, victim = hosts[0], hosts[1]
    part = leases[victim]
    lab.sh(host, f"ip route del {part}")
    gone = part not in routes_of(lab, host)
    started = time.monotonic()
    back = wait_for(lambda: part in routes_of(lab, host), timeout=RETURN_TIMEOUT, interval=0.1)
    took = time.monotonic() - started
    report.add(SCENARIO_NAME, "route deleted by hand returns", host, part, gone and back,
               f"back after {took:.1f} s: {routes_of(lab, host).get(part, 'missing')}" if back
               else f"not back after {RETURN_TIMEOUT:.0f} s")
    src = next(n for n, (h, _) in containers.items() if h == host)
    dst = next(n for n, (h, _) in containers.items() if h == victim)
    ok, detail = reachable(lab, containers, src, dst)
    report.add(SCENARIO_NAME, "reachable after the route returned", src, dst, ok, detail)


def check_interface_restart(lab: Lab, report: Report, leases: dict[str, str],
                            containers: dict[str, tuple[str, str]]) -> None:
    """`ip link set eth0 down; up` flushes every route through eth0 (flannel#1070)."""
    host = list(leases)[-1]
    lab.sh(host, "ip link set eth0 down && sleep 0.3 && ip link set eth0 up")
    flushed = not routes_of(lab, host)
    started = time.monotonic()
    back = wait_for(lambda: not missing_routes(lab, host, leases), timeout=RETURN_TIMEOUT, interval=0.1)
    took = time.monotonic() - started
    report.add(SCENARIO_NAME, "routes return after eth0 restart", host, "all parts", flushed and back,
               (f"flushed, back after {took:.1f} s" if back else f"still missing {missing_routes(lab, host, leases)}")
               if flushed else "the restart did not flush the routes")
    src = next(n for n, (h, _) in containers.items() if h == host)
    for dst, (other, _) in containers.items():
        if other != host:
            ok, detail = wait_for_ping(lab, containers, src, dst)
            report.add(SCENARIO_NAME, "reachable after eth0 restart", src, dst, ok, detail)


def wait_for_ping(lab: Lab, containers, src: str, dst: str, timeout: float = 6.0) -> tuple[bool, str]:
    """A ping that may need a moment (ARP after a link came back)."""
    deadline = time.monotonic() + timeout
    while True:
        ok, detail = reachable(lab, containers, src, dst)
        if ok or time.monotonic() > deadline:
            return ok, detail


def check_dead_host(lab: Lab, report: Report, net: str, leases: dict[str, str],
                    containers: dict[str, tuple[str, str]]) -> None:
    """Kill one host's daemon (SIGKILL: no goodbye): once its lease lapses the others drop their
    routes to its part; restarted, it takes the same part back."""
    hosts = list(leases)
    dead = hosts[-1]
    part = leases[dead]
    others = [h for h in hosts if h != dead]
    victim = next(n for n, (h, _) in containers.items() if h == dead)
    src = next(n for n, (h, _) in containers.items() if h == others[0])
    lab.stop_daemon(dead, signal.SIGKILL)
    started = time.monotonic()
    gone = wait_for(lambda: all(part not in routes_of(lab, h) for h in others), timeout=LEASE_TTL + RETURN_TIMEOUT,
                    interval=0.1)
    took = time.monotonic() - started
    for host in others:
        report.add(SCENARIO_NAME, "dead host's route leaves", host, f"{dead} {part}", part not in routes_of(lab, host),
                   f"gone {took:.1f} s after the daemon was killed (lease TTL {LEASE_TTL} s)" if gone
                   else f"still there: {routes_of(lab, host).get(part)}")
    ok, detail = reachable(lab, containers, src, victim)
    report.add(SCENARIO_NAME, "dead host's container unreachable", src, victim, not ok, detail)
    lab.start_daemon(dead)
    back = wait_for(lambda: all(part in routes_of(lab, h) for h in others), timeout=RETURN_TIMEOUT, interval=0.1)
    now_held = netd_info(lab, dead, net).get("Lease")
    report.add(SCENARIO_NAME, "restarted host takes its part back", dead, part, back and now_held == part,
               f"holds {now_held}; routes on the others: {'back' if back else 'missing'}")
    ok, detail = wait_for_ping(lab, containers, src, victim)
    report.add(SCENARIO_NAME, "reachable again after restart", src, victim, ok, detail)


def check_not_adjacent_reported(lab: Lab, report: Report, net: str, leases: dict[str, str],
                                containers: dict[str, tuple[str, str]]) -> None:
    """--routed: hosts on the other subnet are behind a router: inspect and the log say why they
    get no route; hosts on the same subnet still reach each other."""
    side = {host: lab.addresses[host].split(".")[2] for host in leases}
    for host in leases:
        for peer in netd_info(lab, host, net).get("Peers", []):
            other = next((h for h, p in leases.items() if p == peer["Subnet"]), "?")
            if side.get(other) == side[host]:
                report.add(SCENARIO_NAME, "adjacent peer routed", host, other,
                           peer["Route"].startswith("via "), peer["Route"])
            else:
                report.add(SCENARIO_NAME, "peer behind a router reported", host, other,
                           "not on a directly connected network" in peer["Route"], peer["Route"])
        if len(set(side.values())) > 1:
            said = [line for line in lab.daemon_log(host).splitlines() if "not on a directly connected network" in line]
            report.add(SCENARIO_NAME, "the log says why", host, "peers behind the router", bool(said),
                       said[0].split("hostgw network", 1)[-1].strip() if said else "nothing in the log")
    for src, (src_host, _) in containers.items():
        for dst, (dst_host, address) in containers.items():
            if src != dst and side[src_host] == side[dst_host]:
                ok, detail = pings(lab, src_host, src, address)
                report.add(SCENARIO_NAME, "ping by address", src, dst, ok, detail)


SCENARIO = Scenario(SCENARIO_NAME, "host-gw: a leased /24 per host, routes reconciled, a dead host's routes leave",
                    run)
