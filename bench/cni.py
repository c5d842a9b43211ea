"""CNI ADD and DEL latency: the netd plugin vs the reference `bridge` plugin (host-local IPAM).

    python -m bench.cni [--levels 10,100]

Both are timed as a CNI runtime runs them: one exec per ADD or DEL, the CNI_* environment and the
config on stdin, from a private "host" namespace, against bare container namespaces (each gets
eth0). The netd plugin is the installed `netd` (its launcher's fast path) talking to a netd daemon
in that host namespace, attaching to a netd bridge network; the bridge plugin makes its bridge,
veth and host-local address itself (peers.CniBridgePeer). DEL gets the ADD's result as
prevResult, as libcni gives it. The figure at level L is that of the last min(L, 30) ADDs before
the count reached L (and of as many DELs on the way down), as in bench.attach.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

from bench.attach import measure, report
from bench.peers import CniBridgePeer, LeftoverError, kill_pids, netns_exists, netns_pids, wait_gone
from tests.support.hosts import NetdHost

NETD = os.path.join(os.path.dirname(sys.executable), "netd")   # the installed launcher


class NetdCniPeer(CniBridgePeer):
    """netd as a CNI plugin: the reference peer's exec path, a netd daemon behind it."""

    name = "netd"

    def __init__(self, subnet: str = "10.233.0.0/16") -> None:
        super().__init__(subnet=subnet)
        self.host = NetdHost(prefix="netdbc", uplink=False)

    def start(self) -> None:
        if not os.access(NETD, os.X_OK):
            raise RuntimeError(f"{NETD} not found: make install")
        self.host.__enter__()
        self.host.netd("network", "create", "--subnet", self.subnet, "benchcni")
        self.host_netns = self.host.name
        self.tmp = tempfile.mkdtemp(prefix=f"{self.prefix}-")
        self.plugin_dir = os.path.join(self.tmp, "bin")
        os.makedirs(self.plugin_dir)
        os.symlink(NETD, os.path.join(self.plugin_dir, "netd"))
        self.host_fd = os.open(f"/run/netns/{self.host.name}", os.O_RDONLY | os.O_CLOEXEC)
        self.config = {"cniVersion": "1.0.0", "name": "benchcni", "type": "netd", "socket": self.host.socket}

    def memory_rss_bytes(self) -> int | None:
        from bench.peers import rss_bytes
        return rss_bytes(self.host.daemon.pid) if self.host.daemon else None

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.host_fd is not None:
            os.close(self.host_fd)
            self.host_fd = None
        for name in self.sandboxes:
            pids = netns_pids(name)
            if pids:
                kill_pids(pids)
                wait_gone(pids, 5)
        script = "".join(f"netns del {name}\n" for name in self.sandboxes if netns_exists(name))
        if script:
            import subprocess
            subprocess.run(["ip", "-force", "-batch", "-"], input=script, capture_output=True, text=True, timeout=600)
        self.host.cleanup()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
        left = [name for name in self.sandboxes if netns_exists(name)]
        if left:
            raise LeftoverError(f"netd cni peer clean-up: namespaces {', '.join(left)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cni", description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="10,100", help="attachment counts to report (default %(default)s)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the benchmark needs root", file=sys.stderr)
        return 2
    levels = sorted(int(x) for x in args.levels.split(","))
    results: dict[str, dict] = {}
    for name, make in (("netd", NetdCniPeer), ("cni-bridge", CniBridgePeer)):
        print(f"-- {name}: {max(levels)} attachments, one exec per ADD/DEL", flush=True)
        peer = make()
        peer.name = name
        try:
            peer.start()
            results[name] = measure(peer, levels)
        except Exception as e:  # noqa: BLE001 - report the peer as failed, go on
            print(f"   {name} failed: {e}", flush=True)
        finally:
            peer.stop()
    print("\nCNI ADD (attach) and DEL (detach), one exec per call")
    report(results)
    return 0 if "netd" in results else 1


if __name__ == "__main__":
    sys.exit(main())
