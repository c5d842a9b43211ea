"""`make clean-host`: remove what a crashed daemon, test or lab left on this machine, only netd's names.

- a crashed daemon: `netd cleanup` (netd.api.cleanup) for the default /run/netd;
- tests: their named namespaces (netdt-*, hgt-*, mvt-*, ndcap-*, netd-fw-*, drv-*) with whatever
  still runs in them, their temp dirs and etcd data dirs;
- labs: Mininet's own cleanup when a lab's switch or host is left (netd labs name their
  switches s1.., their hosts h1.., kv).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from netd.api.cleanup import cleanup, daemon_answers, kill_in_namespaces

TEST_NAMESPACE = re.compile(r"^(netdt|hgt|mvt|ndcap|netd-fw|drv)-[0-9a-f]{6}(-\w+)?$")
TEMP_DIRS = ["/tmp/netdt-*", "/tmp/hgt-*", "/tmp/mvt-*", "/tmp/ndcap-*", "/tmp/netd-lab-*",
             "/dev/shm/netd-etcd-*", "/tmp/netd-etcd-*"]


def test_namespaces() -> list[str]:
    if not os.path.isdir("/run/netns"):
        return []
    return [n for n in sorted(os.listdir("/run/netns")) if TEST_NAMESPACE.match(n)]


def main() -> int:
    done = []
    names = test_namespaces()
    for name in names:   # tests' daemons keep their containers' namespaces under their temp dir
        kill_in_namespaces([f"/run/netns/{name}"])
    for pattern in ("/tmp/netdt-*/run/netns", "/tmp/hgt-*/run/netns", "/tmp/mvt-*/run/netns", "/tmp/ndcap-*/run/netns"):
        for directory in glob.glob(pattern):
            kill_in_namespaces([os.path.join(directory, e) for e in os.listdir(directory)])
            subprocess.run(["umount", "-l", *glob.glob(f"{directory}/*")], capture_output=True)
    for name in names:
        if subprocess.run(["ip", "netns", "del", name], capture_output=True).returncode == 0:
            done.append(f"namespace {name}")
    if daemon_answers("/run/netd"):
        print("a netd daemon answers on /run/netd/netd.sock: its state is left alone", file=sys.stderr)
    else:
        done += cleanup("/run/netd")
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    if re.search(r"^\d+: (s\d+-eth\d+|h\d+-eth\d+|kv-eth\d+)[@:]", links, re.M) and shutil.which("mn"):
        subprocess.run(["mn", "-c"], capture_output=True)
        done.append("Mininet leftovers (mn -c)")
    for pattern in TEMP_DIRS:
        for path in glob.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"directory {path}")
    for line in done:
        print(f"removed {line}")
    print(f"clean-host: {len(done)} things removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
