"""Endpoint attach/detach latency: netd vs Docker's bridge driver vs the CNI bridge plugin.

    python -m bench.attach [--levels 10,100,1000] [--peers netd,docker,cni]

Each peer gets sandboxes (containers or namespaces) first, then they are attached one by one
to one user-defined bridge network, then detached one by one. The latency at level L is that
of the last min(L, 30) attaches before the count reached L (and of as many detaches on the way
down), so the table shows how each peer grows with the number of endpoints on the host.

netd and Docker are timed at their APIs on their Unix sockets (no CLI start-up in the figure);
the CNI plugin is timed as a CNI runtime runs it: one exec per ADD or DEL.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from bench.peers import rss_bytes
from bench.stats import print_table, summarize
from netd.api.client import Client
from tests.support.hosts import NetdHost

WINDOW = 30


class NetdAttachPeer:
    """netd: a daemon in its own host namespace, `network connect` over its API socket."""

    name = "netd"

    def __init__(self) -> None:
        self.host = NetdHost(prefix="netdb", uplink=False, daemon_args=tuple(os.environ.get("NETD_BENCH_DAEMON_ARGS", "").split()))
        self.client: Client | None = None
        self.containers: list[str] = []
        self.network = "benchnet"

    def start(self) -> None:
        self.host.__enter__()
        self.client = Client(f"unix://{self.host.socket}")
        self.client.request("POST", "/networks/create", {
            "Name": self.network, "IPAM": {"Config": [{"Subnet": "10.200.0.0/16"}]}})

    def make_sandboxes(self, n: int) -> None:
        for i in range(len(self.containers), n):
            reply = self.client.request("POST", "/containers/run", {
                "Cmd": ["sleep", "100000"], "Name": f"bench{i}", "NetworkMode": "none", "Detach": True})
            self.containers.append(reply["Id"])

    def attach(self, i: int) -> float:
        started = time.perf_counter()
        self.client.request("POST", f"/networks/{self.network}/connect", {"Container": self.containers[i]})
        return time.perf_counter() - started

    def detach(self, i: int) -> float:
        started = time.perf_counter()
        self.client.request("POST", f"/networks/{self.network}/disconnect", {"Container": self.containers[i]})
        return time.perf_counter() - started

    def memory_rss_bytes(self) -> int | None:
        return rss_bytes(self.host.daemon.pid) if self.host.daemon else None

    def stop(self) -> None:
        if self.client:
            self.client.close()
        self.host.cleanup()




def make_peer(name: str):
    if name == "netd":
        return NetdAttachPeer()
    from bench import peers

    if name == "docker":
        return peers.DockerBridgePeer()
    if name == "cni":
        return peers.CniBridgePeer()
    raise SystemExit(f"unknown peer {name!r}: use netd, docker or cni")


def measure(peer, levels: list[int]) -> dict:
    """Latencies (seconds) of the attaches/detaches around each level, and RSS at the top."""
    top = max(levels)
    peer.make_sandboxes(top)
    attach = [peer.attach(i) for i in range(top)]
    rss = peer.memory_rss_bytes()
    detach = [0.0] * top
    for i in reversed(range(top)):
        detach[i] = peer.detach(i)
    return {
        "levels": {
            level: {"attach": attach[max(0, level - min(level, WINDOW)):level],
                    "detach": detach[max(0, level - min(level, WINDOW)):level]}
            for level in levels
        },
        "all_attach": attach,
        "all_detach": detach,
        "rss": rss,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.attach", description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="10,100,1000", help="endpoint counts to report (default %(default)s)")
    parser.add_argument("--peers", default="netd,docker,cni", help="which to run (default %(default)s)")
    parser.add_argument("--docker-levels", default="10,100",
                        help="levels for Docker (default %(default)s; 1000 takes ~15 min and ~4 GiB here)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the benchmark needs root", file=sys.stderr)
        return 2
    levels = sorted(int(x) for x in args.levels.split(","))
    results: dict[str, dict] = {}
    for name in args.peers.split(","):
        peer_levels = levels
        if name == "docker" and args.docker_levels:
            peer_levels = sorted(int(x) for x in args.docker_levels.split(","))
        print(f"-- {name}: {max(peer_levels)} endpoints", flush=True)
        try:
            peer = make_peer(name)
        except Exception as e:  # noqa: BLE001 - report the peer as unavailable, go on
            print(f"   {name} unavailable: {e}", flush=True)
            continue
        try:
            peer.start()
            results[name] = measure(peer, peer_levels)
        except Exception as e:  # noqa: BLE001
            print(f"   {name} failed: {e}", flush=True)
        finally:
            peer.stop()
    report(results)
    return 0 if "netd" in results else 1


def report(results: dict[str, dict]) -> None:
    rows = []
    for name, result in results.items():
        for level, samples in result["levels"].items():
            a, d = summarize(samples["attach"]), summarize(samples["detach"])
            rows.append([name, str(level), f"{a['median_ms']:.2f}", f"{a['p99_ms']:.2f}",
                         f"{d['median_ms']:.2f}", f"{d['p99_ms']:.2f}"])
    print()
    print_table(rows, ["PEER", "ENDPOINTS", "ATTACH MEDIAN ms", "ATTACH P99 ms", "DETACH MEDIAN ms", "DETACH P99 ms"])
    netd = results.get("netd")
    if not netd:
        return
    ratio_rows = []
    for name, result in results.items():
        if name == "netd":
            continue
        for level in result["levels"]:
            if level not in netd["levels"]:
                continue
            ours, theirs = netd["levels"][level], result["levels"][level]
            ratio_rows.append([
                f"{name} / netd", str(level),
                f"{summarize(theirs['attach'])['median_ms'] / summarize(ours['attach'])['median_ms']:.1f}x",
                f"{summarize(theirs['detach'])['median_ms'] / summarize(ours['detach'])['median_ms']:.1f}x",
            ])
    if ratio_rows:
        print()
        print_table(ratio_rows, ["HOW MUCH SLOWER THAN NETD", "ENDPOINTS", "ATTACH (median)", "DETACH (median)"])
    levels = sorted(netd["levels"])
    low, high = netd["levels"][levels[0]], netd["levels"][levels[-1]]
    growth_attach = summarize(high["attach"])["median_ms"] / summarize(low["attach"])["median_ms"]
    growth_detach = summarize(high["detach"])["median_ms"] / summarize(low["detach"])["median_ms"]
    print(f"\nnetd median at {levels[-1]} vs {levels[0]} endpoints: attach {growth_attach:.2f}x, detach {growth_detach:.2f}x")
    for name, result in results.items():
        if result["rss"]:
            print(f"{name} daemon RSS at {max(result['levels'])} endpoints: {result['rss'] / 2**20:.1f} MiB")


if __name__ == "__main__":
    sys.exit(main())
