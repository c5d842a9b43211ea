"""IPAM allocation throughput and latency: embedded store, etcd with one host, and etcd with
several processes allocating at once as several hosts — with every address checked unique.

    python -m bench.ipam [--count 2000] [--hosts 8]

Each "host" is a process with its own store client and IPAM, as each daemon has; they start
together on one /16 pool and allocate until each has `count / hosts` addresses.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time

from bench.stats import print_table, summarize
from kvstore import open_store
from netd.core.ipam import IPAM

SUBNET = "10.80.0.0/16"


def allocate(url: str, host: str, count: int, start, results) -> None:
    store = open_store(url)
    ipam = IPAM(store, host=host, scope="global")
    ipam.pool("bench")   # connect and read the pool before the clock starts
    start.wait()
    latencies, addresses = [], []
    began = time.perf_counter()
    for i in range(count):
        t = time.perf_counter()
        addresses.append(ipam.allocate("bench", endpoint_id=f"{host}-{i}"))
        latencies.append(time.perf_counter() - t)
    results.put((addresses, latencies, began, time.perf_counter()))
    store.close()


def run(url: str, hosts: int, count: int) -> dict:
    store = open_store(url)
    IPAM(store, host="bench", scope="global").request_pool("bench", "bench", subnet=SUBNET)
    store.close()
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    per_host = count // hosts
    processes = [ctx.Process(target=allocate, args=(url, f"h{i}", per_host, start, results)) for i in range(hosts)]
    for p in processes:
        p.start()
    time.sleep(1.0)   # every process connected and waiting
    start.set()
    collected = [results.get(timeout=600) for _ in processes]
    for p in processes:
        p.join()
    addresses = [a for batch, _, _, _ in collected for a in batch]
    latencies = [x for _, batch, _, _ in collected for x in batch]
    elapsed = max(end for *_, end in collected) - min(began for *_, began, _ in collected)
    return {"allocations": len(addresses), "duplicates": len(addresses) - len(set(addresses)),
            "per_second": len(addresses) / elapsed, **summarize(latencies)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ipam", description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=4000, help="allocations per case (default %(default)s)")
    parser.add_argument("--hosts", type=int, default=8, help="concurrent hosts in the last case (default %(default)s)")
    args = parser.parse_args(argv)
    from tests.support.etcd_server import EtcdServer

    rows = []
    with tempfile.TemporaryDirectory(prefix="netd-bench-ipam-") as tmp:
        cases = [("embedded (SQLite)", f"sqlite://{os.path.join(tmp, 'ipam.db')}", 1)]
        with EtcdServer() as etcd:
            cases += [("etcd, 1 host", etcd.url, 1)]
            for label, url, hosts in cases:
                result = run(url, hosts, args.count)
                rows.append([label, str(hosts), str(result["allocations"]), f"{result['per_second']:.0f}",
                             f"{result['median_ms']:.2f}", f"{result['p99_ms']:.2f}", str(result["duplicates"])])
                print(f"-- {label}: {result['per_second']:.0f}/s", flush=True)
        with EtcdServer() as etcd:   # a fresh store: the same pool, empty again
            result = run(etcd.url, args.hosts, args.count)
            rows.append([f"etcd, {args.hosts} hosts at once", str(args.hosts), str(result["allocations"]),
                         f"{result['per_second']:.0f}", f"{result['median_ms']:.2f}", f"{result['p99_ms']:.2f}",
                         str(result["duplicates"])])
    print()
    print_table(rows, ["STORE", "HOSTS", "ALLOCATIONS", "PER SECOND", "MEDIAN ms", "P99 ms", "DUPLICATES"])
    print("\netcd's data is on tmpfs (/dev/shm), as in the tests: the figures measure netd and etcd, not the disk.")
    return 0 if all(row[-1] == "0" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
