"""Overlay convergence: time from `netd run` returning on host A to the first ping answer from
a container on host B, in a 3-host and a 10-host Mininet lab.

    python -m bench.convergence [--hosts 3,10] [--containers 50]

A prober container on h2 pings each new container's address (static, so it knows it in
advance) as fast as it can, and prints the time of the first reply; the containers are started
one after another on the other hosts with `netd run -d`. Both clocks are the same machine's.
The prober's ARP retransmit time is set to 10 ms so that the figure measures netd's control
plane (the peer's neighbour and FDB entries appearing), not the kernel's 1 s ARP retry timer.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from bench.stats import print_table, summarize
from labs.lab import NETD, Lab

PROBER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prober.py")


def measure(hosts: int, containers: int) -> tuple[list[float], list[float]]:
    """Per container: (reply time - `netd run` returned, reply time - `netd run` started)."""
    with Lab(hosts=hosts) as lab:
        lab.netd("h1", "network", "create", "-d", "overlay", "--subnet", "172.18.0.0/16", "conv")
        lab.netd("h2", "run", "-d", "--name", "probe", "--network", "conv", "sleep", "100000")
        lab.netd("h2", "exec", "probe", "sysctl", "-qw", "net.ipv4.neigh.eth0.retrans_time_ms=10")
        targets = [f"172.18.1.{i + 1}" for i in range(containers)]
        prober = lab.hosts["h2"].popen(NETD + ["exec", "probe", "python3", "-u", PROBER, *targets],
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if prober.stdout.readline().strip() != "ready":
            raise SystemExit("the prober did not start")
        sources = [h for h in lab.container_hosts if h != "h2"]
        samples, from_start = [], []
        try:
            for i, address in enumerate(targets):
                host = sources[i % len(sources)]
                started = time.time()
                lab.netd(host, "run", "-d", "--name", f"c{i}", "--network", "conv", "--ip", address, "sleep", "100000")
                returned = time.time()
                line = prober.stdout.readline().split()
                if len(line) == 2 and line[0] == address and line[1] != "timeout":
                    samples.append(float(line[1]) - returned)
                    from_start.append(float(line[1]) - started)
                    if samples[-1] > 0.05:
                        print(f"   slowest so far: c{i} on {host}: {samples[-1] * 1000:.1f} ms", flush=True)
                else:
                    print(f"   {address}: no answer ({' '.join(line)})", flush=True)
        finally:
            prober.kill()
        return samples, from_start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.convergence", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", default="3,10", help="lab sizes (default %(default)s)")
    parser.add_argument("--containers", type=int, default=50, help="containers per lab (default %(default)s)")
    args = parser.parse_args(argv)
    rows = []
    for hosts in (int(h) for h in args.hosts.split(",")):
        print(f"-- {hosts}-host lab, {args.containers} containers", flush=True)
        samples, from_start = measure(hosts, args.containers)
        stats = summarize([max(0.0, s) for s in samples])
        whole = summarize(from_start)
        early = sum(s <= 0 for s in samples)
        rows.append([str(hosts), f"{len(samples)}/{args.containers}", f"{stats['median_ms']:.1f}",
                     f"{stats['p99_ms']:.1f}", str(early), f"{whole['median_ms']:.0f}", f"{whole['p99_ms']:.0f}"])
    print()
    print_table(rows, ["HOSTS", "ANSWERED", "MEDIAN ms", "P99 ms", "READY BEFORE RUN RETURNED",
                       "FROM RUN START MEDIAN ms", "P99 ms"])
    print("\n(MEDIAN/P99: from `netd run -d` returning on one host to the first echo reply seen from another,"
          " 0 when the peer answered before the command returned; FROM RUN START: from the moment the"
          " command was typed, CLI start-up and container creation included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
