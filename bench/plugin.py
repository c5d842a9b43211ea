"""`docker network connect` through netd's plugin (netd-bridge) vs Docker's own bridge driver.

    python -m bench.plugin [--levels 10,100] [--cli-levels 10]

Like for like: one dockerd (Debian's 20.10, private, in a netd test host's namespace), the same
running containers (already on a network of their own), two user-defined networks side by side,
one of each driver. Each container is connected to both, the two attaches taken in turn, then
disconnected from both; the figure at level L is that of the attaches before the count reached
L. Timed at dockerd's API on its Unix socket, and (the CLI case) as `docker network connect`
typed, fork and CLI start-up included.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from urllib.parse import urlencode

from bench.peers import SYSTEM_PATH, timed_command
from bench.stats import print_table, summarize
from tests.support.dockerd import DockerdHost

WINDOW = 30
NETWORKS = {"docker-bridge": ("bridge", "10.237.0.0/16"), "netd-bridge": ("netd-bridge", "10.238.0.0/16")}


def make_containers(dk: DockerdHost, n: int) -> list[str]:
    api = dk.dockerd.api
    ids = []
    for i in range(n):
        reply = api.request("POST", "/containers/create?" + urlencode({"name": f"benchp{i}"}), {
            "Image": dk.image, "Cmd": ["/bin/sleep", "2147483647"],
            "HostConfig": {"NetworkMode": "home", "LogConfig": {"Type": "none"}}})
        api.request("POST", f"/containers/{reply['Id']}/start")
        ids.append(reply["Id"])
        if (i + 1) % 25 == 0:
            print(f"   {i + 1}/{n} containers running", flush=True)
    return ids


def timed_api(dk: DockerdHost, op: str, network: str, container: str) -> float:
    body = {"Container": container} if op == "connect" else {"Container": container, "Force": False}
    started = time.perf_counter()
    dk.dockerd.api.request("POST", f"/networks/{network}/{op}", body)
    return time.perf_counter() - started


def timed_cli(dk: DockerdHost, op: str, network: str, container: str) -> float:
    argv = [shutil.which("docker") or "/usr/bin/docker", "-H", f"unix://{dk.dockerd.socket_path}", "network", op,
            network, container]
    env = {"PATH": SYSTEM_PATH, "DOCKER_CONFIG": os.path.join(dk.dockerd.tmp, "cli")}
    return timed_command(argv, env, f"docker network {op}")


def run(dk: DockerdHost, containers: list[str], levels: list[int], timer) -> dict[str, dict[str, list[float]]]:
    top = max(levels)
    samples = {name: {"attach": [], "detach": [0.0] * top} for name in NETWORKS}
    for i in range(top):
        for name in NETWORKS:   # in turn: whatever drifts on the machine drifts for both
            samples[name]["attach"].append(timer(dk, "connect", name, containers[i]))
        if i + 1 in levels:
            print(f"   {i + 1}/{top} connected to both", flush=True)
    for i in reversed(range(top)):
        for name in NETWORKS:
            samples[name]["detach"][i] = timer(dk, "disconnect", name, containers[i])
    return samples


def report(title: str, samples: dict, levels: list[int]) -> None:
    print(f"\n{title}")
    rows, ratios = [], []
    for level in levels:
        window = slice(max(0, level - min(level, WINDOW)), level)
        medians = {}
        for name, s in samples.items():
            a, d = summarize(s["attach"][window]), summarize(s["detach"][window])
            medians[name] = (a["median_ms"], d["median_ms"])
            rows.append([name, str(level), f"{a['median_ms']:.2f}", f"{a['p99_ms']:.2f}",
                         f"{d['median_ms']:.2f}", f"{d['p99_ms']:.2f}"])
        (da, dd), (na, nd) = medians["docker-bridge"], medians["netd-bridge"]
        ratios.append([str(level), f"{da / na:.2f}x", f"{dd / nd:.2f}x"])
    print_table(rows, ["NETWORK DRIVER", "ENDPOINTS", "CONNECT MEDIAN ms", "CONNECT P99 ms",
                       "DISCONNECT MEDIAN ms", "DISCONNECT P99 ms"])
    print()
    print_table(ratios, ["ENDPOINTS", "DOCKER BRIDGE / NETD-BRIDGE, CONNECT", "DISCONNECT"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plugin", description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="10,100", help="endpoint counts to report (default %(default)s)")
    parser.add_argument("--cli-levels", default="10", help="levels of the CLI case (default %(default)s)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the benchmark needs root", file=sys.stderr)
        return 2
    levels = sorted(int(x) for x in args.levels.split(","))
    cli_levels = sorted(int(x) for x in args.cli_levels.split(","))
    print("-- starting netd and a private dockerd", flush=True)
    with DockerdHost(prefix="netdbp") as dk:
        api = dk.dockerd.api
        api.request("POST", "/networks/create", {"Name": "home", "Driver": "bridge",
                                                 "IPAM": {"Config": [{"Subnet": "10.236.0.0/16"}]}})
        for name, (driver, subnet) in NETWORKS.items():
            api.request("POST", "/networks/create", {"Name": name, "Driver": driver,
                                                     "IPAM": {"Config": [{"Subnet": subnet}]}})
        top = max(levels + cli_levels)
        print(f"-- {top} containers on a home network", flush=True)
        containers = make_containers(dk, top)
        print("-- API: connect and disconnect, the two drivers in turn", flush=True)
        report("dockerd's API (POST /networks/{id}/connect), a second network", run(dk, containers, levels, timed_api),
               levels)
        print("\n-- CLI: `docker network connect` typed", flush=True)
        report("`docker network connect` as typed (fork, CLI start-up), a second network",
               run(dk, containers, cli_levels, timed_cli), cli_levels)
        for cid in containers:
            api.request("DELETE", f"/containers/{cid}?force=1", expect=(200, 204, 404))
        for name in ["home", *(NETWORKS)]:
            api.request("DELETE", f"/networks/{name}", expect=(200, 204, 404))
    return 0


if __name__ == "__main__":
    sys.exit(main())
