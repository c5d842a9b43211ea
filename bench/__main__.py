"""`python -m bench` (`make bench`): every benchmark, one after another, on this machine.

    attach       endpoint attach/detach vs Docker's bridge driver and the CNI bridge plugin
    ipam         allocations per second: embedded, etcd, etcd with 8 hosts at once
    convergence  overlay: from `netd run` on one host to the first reply from another
    dataplane    iperf3 across hosts per driver, as a fraction of host-to-host
    cni          CNI ADD/DEL: the netd plugin vs the reference bridge plugin, one exec per call
    plugin       `docker network connect` through netd's plugin vs Docker's own bridge driver

Each is also a module of its own (`python -m bench.attach --help`, ...). They measure; they do
not pass or fail, except when a benchmark could not run at all.
"""

from __future__ import annotations

import sys

from bench import attach, cni, convergence, dataplane, ipam, plugin

BENCHMARKS = {"attach": attach.main, "ipam": ipam.main, "convergence": convergence.main, "dataplane": dataplane.main,
              "cni": cni.main, "plugin": plugin.main}


def main(argv: list[str]) -> int:
    chosen = argv or list(BENCHMARKS)
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark {unknown[0]!r}: choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    status = 0
    for name in chosen:
        print(f"\n===== {name} =====", flush=True)
        status |= BENCHMARKS[name]([])
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
