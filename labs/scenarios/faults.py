"""The promise under faults: no address twice among running containers.

A live host is cut off from the cluster (its link down) past its lease and --reclaim-after; the
others reclaim its addresses and fill the pool while it is away. The link heals: the returning
host finds it was reclaimed and claims its containers' addresses back, renumbering (or, with no
free address, quarantining) each one someone else now holds. Then: no address is held twice by
running containers, every container still on the network reaches the others, and `netd ps` says
what happened. Then a daemon killed with SIGKILL comes back and converges. The figures: seconds
from the cut to the reclaim, from the heal to convergence, and from the restart to convergence.
"""

from __future__ import annotations

import json
import signal
import time

from labs.lab import NETD, Lab
from labs.report import Report, run_parallel
from labs.scenarios import Scenario
from labs.scenarios.common import pings, unique, wait_for, wait_for_network

SUBNET = "172.16.11.0/27"      # 29 addresses for containers: small, so the others take the freed ones


def addresses_in_use(lab: Lab, net: str) -> dict[str, list[str]]:
    """address -> the running containers that answer on it (from inside each), across all hosts."""
    held: dict[str, list[str]] = {}
    for host in lab.container_hosts:
        for container in json.loads(lab.netd(host, "ps", "--format", "json")):
            name = container["Names"][0]
            info = json.loads(lab.netd(host, "inspect", name))[0]
            entry = info["NetworkSettings"]["Networks"].get(net)
            if entry and not entry.get("Note", "").startswith("quarantined"):
                held.setdefault(entry["IPAddress"], []).append(f"{name}@{host}")
    return held


def run(lab: Lab, report: Report, options: dict) -> None:
    first, second, cut = lab.container_hosts[:3]
    net = unique("flt")
    lab.netd(first, "network", "create", "-d", "overlay", "--subnet", SUBNET, net)
    names: dict[str, str] = {}
    try:
        wait_for_network(lab, net)
        for i in range(3):
            names[f"away{i}"] = cut
            lab.netd(cut, "run", "-d", "--name", f"away{i}", "--network", net, "sleep", "100000")
        held = {a["Address"] for a in json.loads(lab.netd(first, "ipam", "inspect", net, "--format", "json"))
                if a["Host"] == lab.addresses[cut] and a["Kind"] == "endpoint"}

        interface = "eth0"        # the lab host's only link (to the switch)
        lab.sh(cut, f"ip link set {interface} down")
        cut_at = time.monotonic()

        def reclaimed() -> bool:
            found = [json.loads(lab.netd(first, "ipam", "lookup", a, "--format", "json")) for a in held]
            return all(f and f[0]["State"] == "free" for f in found)

        ok = wait_for(reclaimed, timeout=60, interval=0.5)
        report.add("faults", "cut-off host reclaimed", first, cut, ok,
                   f"{len(held)} address(es) free {time.monotonic() - cut_at:.1f}s after the cut" if ok else "still held")
        # The others fill the pool while the cut-off host is away (some take its old addresses).
        tasks = []
        for i in range(23):   # leaves room for the renumbered three and one more
            host = (first, second)[i % 2]
            names[f"fill{i}"] = host
            tasks.append(lambda h=host, n=f"fill{i}": lab.try_netd(h, "run", "-d", "--name", n, "--network", net,
                                                                   "sleep", "100000"))
        started = sum(r.returncode == 0 for r in run_parallel(tasks, workers=8))
        report.add("faults", "others fill the pool meanwhile", f"{first} & {second}", net, started == len(tasks),
                   f"{started}/{len(tasks)} started")

        lab.sh(cut, f"ip link set {interface} up")
        healed_at = time.monotonic()

        def converged() -> bool:
            held_now = addresses_in_use(lab, net)
            if any(len(owners) > 1 for owners in held_now.values()):
                return False
            notes = [json.loads(lab.netd(cut, "inspect", f"away{i}"))[0]["NetworkSettings"]["Networks"][net]
                     for i in range(3)]
            records = {a["Container"] for a in json.loads(lab.netd(first, "ipam", "inspect", net, "--format", "json"))}
            return all(f"away{i}" in records or notes[i]["Note"].startswith("quarantined") for i in range(3))

        ok = wait_for(converged, timeout=60, interval=0.5)
        took = time.monotonic() - healed_at
        held_now = addresses_in_use(lab, net)
        twice = {a: o for a, o in held_now.items() if len(o) > 1}
        report.add("faults", "no address twice after the heal", "all hosts", net, ok and not twice,
                   f"converged {took:.1f}s after the heal; {len(held_now)} addresses in use"
                   + (f"; twice: {twice}; {cut}'s log: {_recovery_lines(lab, cut)}" if twice else ""))
        ps = lab.netd(cut, "ps")
        notes = [json.loads(lab.netd(cut, "inspect", f"away{i}"))[0]["NetworkSettings"]["Networks"][net]["Note"]
                 for i in range(3)]
        said = all(not n or (n.split(":")[0] in ps) for n in notes)
        report.add("faults", "netd ps and inspect say what happened", cut, net, said,
                   "; ".join(n for n in notes if n) or "every address claimed back as it was")
        reachable = [i for i in range(3) if not notes[i].startswith("quarantined")]
        reached = {i: wait_for(lambda i=i: pings(lab, cut, f"away{i}", "fill0")[0], timeout=15, interval=0.5)
                   for i in reachable}
        report.add("faults", "returning containers reach the others", cut, "fill0", all(reached.values()),
                   "; ".join(f"away{i}: {'reaches' if ok else 'does not reach'} fill0 ({notes[i] or 'as before'})"
                             for i, ok in reached.items()))
        check_kill_9(lab, report, net, second)
    finally:
        tasks = [lambda h=h, n=n: lab.try_netd(h, "rm", "-f", n) for n, h in names.items()]
        run_parallel(tasks, workers=8)
        lab.try_netd(first, "network", "rm", net)


def _recovery_lines(lab: Lab, host: str) -> str:
    words = ("claim", "renumber", "quarantin", "register", "reclaim", "Traceback", "Error")
    lines = [line for line in lab.daemon_log(host).splitlines() if any(w in line for w in words)]
    return " | ".join(lines[-12:])


def check_kill_9(lab: Lab, report: Report, net: str, host: str) -> None:
    """SIGKILL the daemon in the middle of a `netd run`; after the restart, the name is free
    again, and no address is held twice."""
    name = unique("k9")
    runner = lab.hosts[host].popen([*NETD, "run", "-d", "--name", name, "--network", net, "sleep", "100000"])
    time.sleep(0.15)
    lab.stop_daemon(host, signal.SIGKILL)
    runner.wait(timeout=30)
    started = time.monotonic()
    lab.start_daemon(host)
    lab.try_netd(host, "rm", "-f", name)
    again = lab.try_netd(host, "run", "-d", "--name", name, "--network", net, "sleep", "100000")
    took = time.monotonic() - started
    held = addresses_in_use(lab, net)
    twice = {a: o for a, o in held.items() if len(o) > 1}
    report.add("faults", "kill -9 during run: converges", host, name, again.returncode == 0 and not twice,
               f"name usable again {took:.1f}s after the restart" if again.returncode == 0 else again.stderr.strip())
    lab.try_netd(host, "rm", "-f", name)


SCENARIO = Scenario("faults", "a live host cut off past its lease and reclaim, then healed; kill -9 mid-run", run,
                    default_hosts=3, daemon_args=("--host-ttl", "3", "--reclaim-after", "3"), in_demo=False)
