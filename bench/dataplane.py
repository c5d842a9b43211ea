"""Data plane: iperf3 between containers on two Mininet hosts, per driver, as a fraction of
iperf3 between the two hosts' own addresses, measured in the same run.

    python -m bench.dataplane [--drivers macvlan,hostgw,overlay[,bridge]] [--seconds 4] [--rounds 3]

One 2-host lab. Each round measures, for every driver, host-to-host and right after it the driver's
container-to-container path (a server container on h1, a client container on h2; one TCP stream,
the first second omitted), so that each figure is divided by a baseline taken moments before it
under the same machine load; the table shows the medians over the rounds. Drivers that do not exist (yet) are skipped.
`bridge` is local: both its containers are on h1, for comparison only.
The lab's links are veth pairs through a Linux bridge with no rate limit: every figure is CPU-bound,
and the fractions, not the absolute numbers, are the result.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Callable

import drivers
from bench.stats import print_table
from labs.lab import Lab, LabError

DEFAULT_DRIVERS = ("macvlan", "hostgw", "overlay")
SERVER, CLIENT = "h1", "h2"


def network_args(driver: str) -> list[str]:
    """How each driver's network is made in the lab (10.10.0.0/24 is the hosts' own segment)."""
    return {
        "macvlan": ["-d", "macvlan", "--scope", "global", "--subnet", "10.10.0.0/24", "--gateway", "10.10.0.254",
                    "--ip-range", "10.10.0.128/26", "-o", "parent=eth0"],
        "hostgw": ["-d", "hostgw", "--subnet", "10.244.0.0/16"],
        "overlay": ["-d", "overlay", "--subnet", "172.16.9.0/24"],
        "bridge": ["-d", "bridge"],   # one host only: both containers on h1 (see path())
    }.get(driver, ["-d", driver])


def throughput(result: subprocess.CompletedProcess | object, what: str) -> float:
    """Bits per second received, from `iperf3 -J` output."""
    stdout = getattr(result, "stdout", "")
    try:
        return float(json.loads(stdout)["end"]["sum_received"]["bits_per_second"])
    except (ValueError, KeyError, TypeError):
        raise LabError(f"iperf3 {what} gave no result: {stdout.strip()[-300:] or getattr(result, 'stderr', '')}") from None


def iperf_args(address: str, seconds: float) -> list[str]:
    return ["iperf3", "-c", address, "-t", str(seconds), "-O", "1", "-J"]


class Path:
    """A server and a client container of one driver, made once, measured every round."""

    def __init__(self, lab: Lab, driver: str):
        self.lab, self.driver = lab, driver
        self.net = f"bench-{driver}"
        self.server, self.client = f"srv-{driver}", f"cli-{driver}"
        client_host = SERVER if driver == "bridge" else CLIENT
        lab.netd(SERVER, "network", "create", *network_args(driver), self.net)
        if driver != "bridge":
            for _ in range(50):   # a global network appears on the other host within moments
                if lab.try_netd(CLIENT, "network", "inspect", self.net).returncode == 0:
                    break
        lab.netd(SERVER, "run", "-d", "--name", self.server, "--network", self.net, "iperf3", "-s")
        lab.netd(client_host, "run", "-d", "--name", self.client, "--network", self.net, "sleep", "100000")
        self.client_host = client_host
        info = json.loads(lab.netd(SERVER, "inspect", self.server))[0]
        self.address = info["NetworkSettings"]["Networks"][self.net]["IPAddress"]
        lab.netd(client_host, "exec", self.client, "ping", "-c", "3", "-i", "0.2", "-W", "2", self.address)

    def measure(self, seconds: float) -> float:
        result = self.lab.try_netd(self.client_host, "exec", self.client, *iperf_args(self.address, seconds),
                                   timeout=seconds + 30)
        return throughput(result, f"over {self.driver}")

    def remove(self) -> None:
        self.lab.try_netd(SERVER, "rm", "-f", self.server)
        self.lab.try_netd(self.client_host, "rm", "-f", self.client)
        self.lab.try_netd(SERVER, "network", "rm", self.net)


def run(driver_names: list[str], seconds: float, rounds: int, log: Callable[[str], None] = print) -> list[list[str]]:
    known = drivers.driver_classes()
    chosen = [d for d in driver_names if d in known]
    for skipped in (d for d in driver_names if d not in known):
        log(f"-- driver {skipped} does not exist here: skipped")
    with Lab(hosts=2) as lab:
        host_server = lab.hosts[SERVER].popen(["iperf3", "-s"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        paths: list[Path] = []
        try:
            paths = [Path(lab, driver) for driver in chosen]
            baseline: list[float] = []
            figures: dict[str, list[float]] = {d: [] for d in chosen}
            fractions: dict[str, list[float]] = {d: [] for d in chosen}
            for number in range(1, rounds + 1):
                line = [f"round {number}:"]
                for path in paths:
                    # the baseline just before each driver: the pair sees the same machine load
                    result = lab.run(CLIENT, iperf_args(lab.addresses[SERVER], seconds), timeout=seconds + 30)
                    base = throughput(result, "host to host")
                    bits = path.measure(seconds)
                    baseline.append(base)
                    figures[path.driver].append(bits)
                    fractions[path.driver].append(bits / base)
                    line.append(f"{path.driver} {bits / 1e9:.2f} Gbit/s = {bits / base:.0%} of {base / 1e9:.2f}")
                log(" ".join(line))
        finally:
            for path in paths:
                path.remove()
            host_server.kill()
            host_server.wait()
    rows = [["host-to-host", f"{statistics.median(baseline) / 1e9:.2f}", "100%", ""]]
    for driver in chosen:
        per_round = " ".join(f"{f:.0%}" for f in fractions[driver])
        label = f"{driver} (both on {SERVER})" if driver == "bridge" else driver
        rows.append([label, f"{statistics.median(figures[driver]) / 1e9:.2f}",
                     f"{statistics.median(fractions[driver]):.0%}", per_round])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dataplane", description=__doc__.split("\n\n")[0])
    parser.add_argument("--drivers", default=",".join(DEFAULT_DRIVERS),
                        help="drivers to measure, comma-separated (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=4, help="length of each iperf3 run (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every measurement (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        rows = run([d.strip() for d in args.drivers.split(",") if d.strip()], args.seconds, args.rounds)
    except LabError as e:
        print(f"bench.dataplane: {e}", file=sys.stderr)
        return 1
    print()
    print_table(rows, ["PATH", "MEDIAN Gbit/s", "OF HOST-TO-HOST", "EACH ROUND"])
    print("\n(iperf3, one TCP stream, container on h2 to container on h1 across the lab's switch; "
          "host-to-host between h2's and h1's own addresses, measured in each round just before)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
