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

from bench.peers import rss_bytes, timed_command
from bench.stats import print_table, summarize
from netd.api.client import Client
from tests.support.hosts import NetdHost

WINDOW = 30
NETD_CLI = os.path.join(os.path.dirname(sys.executable), "netd")   # the installed launcher


class NetdAttachPeer:
    """netd: a daemon in its own host namespace, `network connect` over its API socket."""

    name = "netd"

    def __init__(self, second: bool = False, use_cli: bool = False) -> None:
        self.host = NetdHost(prefix="netdb", uplink=False, daemon_args=tuple(os.environ.get("NETD_BENCH_DAEMON_ARGS", "").split()))
        self.second = second      # the containers are on a "home" network first (like-for-like with Docker)
        self.use_cli = use_cli    # time `netd network connect` as typed (the installed launcher), not the API
        self.client: Client | None = None
        self.containers: list[str] = []
        self.network = "benchnet"

    def start(self) -> None:
        self.host.__enter__()
        self.client = Client(f"unix://{self.host.socket}")
        self.client.request("POST", "/networks/create", {
            "Name": self.network, "IPAM": {"Config": [{"Subnet": "10.200.0.0/16"}]}})
        if self.second:
            self.client.request("POST", "/networks/create", {
                "Name": "home", "IPAM": {"Config": [{"Subnet": "10.201.0.0/16"}]}})

    def make_sandboxes(self, n: int) -> None:
        for i in range(len(self.containers), n):
            reply = self.client.request("POST", "/containers/run", {
                "Cmd": ["sleep", "100000"], "Name": f"bench{i}", "NetworkMode": "home" if self.second else "none",
                "Detach": True})
            self.containers.append(reply["Id"])

    def attach(self, i: int) -> float:
        return self._network_op("connect", i)

    def detach(self, i: int) -> float:
        return self._network_op("disconnect", i)

    def _network_op(self, op: str, i: int) -> float:
        if self.use_cli:
            argv = [NETD_CLI, "network", op, self.network, self.containers[i]]
            env = {"PATH": os.environ.get("PATH", ""), "NETD_HOST": f"unix://{self.host.socket}"}
            return timed_command(argv, env, f"netd network {op} {i}")
        started = time.perf_counter()
        self.client.request("POST", f"/networks/{self.network}/{op}", {"Container": self.containers[i]})
        return time.perf_counter() - started

    def memory_rss_bytes(self) -> int | None:
        return rss_bytes(self.host.daemon.pid) if self.host.daemon else None

    def stop(self) -> None:
        if self.client:
            self.client.close()
        self.host.cleanup()




def make_peer(name: str, second: bool = False, use_cli: bool = False):
    if name == "netd":
        return NetdAttachPeer(second=second, use_cli=use_cli)
    from bench import peers

    if name == "docker":
        return peers.DockerBridgePeer(second=second, use_cli=use_cli)
    if name == "cni" and not use_cli:
        return peers.CniBridgePeer(second=second)
    raise SystemExit(f"unknown peer {name!r}: use netd, docker or cni")


def measure(peer, levels: list[int]) -> dict:
    """Latencies (seconds) of the attaches/detaches around each level, and RSS at the top."""
    top = max(levels)
    started = time.monotonic()
    peer.make_sandboxes(top)
    print(f"   {peer.name}: {top} sandboxes made in {time.monotonic() - started:.0f}s", flush=True)
    attach = []
    for i in range(top):
        attach.append(peer.attach(i))
        if i + 1 in levels or (i + 1) % 250 == 0:
            print(f"   {peer.name}: {i + 1}/{top} attached, median so far {summarize(attach[-WINDOW:])['median_ms']:.2f} ms",
                  flush=True)
    rss = peer.memory_rss_bytes()
    detach = [0.0] * top
    for i in reversed(range(top)):
        detach[i] = peer.detach(i)
        if i % 250 == 0:
            print(f"   {peer.name}: {top - i}/{top} detached", flush=True)
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


CASES = {
    # name: (title, containers already on a network?, through the CLI?)
    "second": ("like for like: a container already on a network, connected to a second one (API)", True, False),
    "first": ("a container on no network, connected to its first (API; Docker's slow path)", False, False),
    "cli": ("as a user types it: `netd network connect` vs `docker network connect`, second network", True, True),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.attach", description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="10,100,1000", help="endpoint counts to report (default %(default)s)")
    parser.add_argument("--peers", default="netd,docker,cni", help="which to run (default %(default)s)")
    parser.add_argument("--cases", default="second,first,cli", help=f"which cases (of {', '.join(CASES)}; default %(default)s)")
    parser.add_argument("--docker-levels", default="10,100",
                        help="levels for Docker (default %(default)s; 1000 takes ~15 min and ~4 GiB here)")
    parser.add_argument("--cli-levels", default="10", help="levels of the CLI case (default %(default)s)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the benchmark needs root", file=sys.stderr)
        return 2
    ok = True
    for case in args.cases.split(","):
        title, second, use_cli = CASES[case]
        levels = sorted(int(x) for x in (args.cli_levels if use_cli else args.levels).split(","))
        docker_levels = levels if use_cli else sorted(int(x) for x in args.docker_levels.split(","))
        print(f"== {case}: {title}", flush=True)
        results = run_case(args.peers.split(","), levels, docker_levels, second, use_cli)
        print(f"\n{title}")
        report(results)
        print()
        ok = ok and "netd" in results
    return 0 if ok else 1


def run_case(names: list[str], levels: list[int], docker_levels: list[int], second: bool, use_cli: bool) -> dict:
    results: dict[str, dict] = {}
    for name in names:
        if use_cli and name == "cni":
            continue   # a CNI plugin has no CLI: its figure is already one exec per call
        peer_levels = docker_levels if name == "docker" else levels
        print(f"-- {name}: {max(peer_levels)} endpoints", flush=True)
        try:
            peer = make_peer(name, second=second, use_cli=use_cli)
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
    return results


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
