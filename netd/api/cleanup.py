"""`netd cleanup`: remove what a crashed netd daemon left on this host, and only netd's own names.

A daemon that restarts cleans up after itself (restore); this is for a daemon that will not be
started again, or a machine to hand back: container processes in netd's namespaces, the pinned
namespaces, netd's interfaces (bridges netd0/netd-*/hg-*, veths vnd*/vhg*, macvlan shims mvh-*),
its nftables table and its DOCKER-USER rules. It refuses while a daemon answers on the socket.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess

from runtime.namespaces import delete_netns, pids_in_netns

INTERFACE = re.compile(r"^(netd0|netd-[0-9a-f]+|hg-[0-9a-f]+|mvh-[0-9a-f]+|vnd[0-9a-f]+|vhg[0-9a-f]+)$")
DOCKER_USER_COMMENT = re.compile(r'--comment "?netd(-[\w-]+)?"?')


def daemon_answers(run_dir: str) -> bool:
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(1)
        sock.connect(os.path.join(run_dir, "netd.sock"))
        return True
    return False


def kill_in_namespaces(paths: list[str]) -> list[int]:
    pids = pids_in_netns(paths)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return pids


def remove_namespaces(directory: str) -> list[str]:
    """Kill what runs in the pinned namespaces under `directory`, then unpin them."""
    if not os.path.isdir(directory):
        return []
    paths = [os.path.join(directory, e) for e in sorted(os.listdir(directory))]
    kill_in_namespaces(paths)
    for path in paths:
        delete_netns(path)
    return paths


def remove_interfaces(pattern: re.Pattern = INTERFACE) -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    removed = []
    for line in out.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if pattern.match(name) and subprocess.run(["ip", "link", "del", name], capture_output=True).returncode == 0:
            removed.append(name)
    return removed


def remove_firewall(table: str = "netd") -> list[str]:
    removed = []
    if subprocess.run(["nft", "delete", "table", "ip", table], capture_output=True).returncode == 0:
        removed.append(f"nftables table ip {table}")
    if shutil.which("iptables"):
        rules = subprocess.run(["iptables", "-S", "DOCKER-USER"], capture_output=True, text=True).stdout
        for rule in rules.splitlines():
            if rule.startswith("-A DOCKER-USER") and DOCKER_USER_COMMENT.search(rule):
                args = rule.split()[2:]
                if subprocess.run(["iptables", "-D", "DOCKER-USER", *[a.strip('"') for a in args]],
                                  capture_output=True).returncode == 0:
                    removed.append(f"DOCKER-USER rule: {' '.join(args)}")
    return removed


def cleanup(run_dir: str = "/run/netd") -> list[str]:
    """Everything removed, one line each."""
    done = [f"namespace {p}" for p in remove_namespaces(os.path.join(run_dir, "netns"))]
    done += [f"interface {name}" for name in remove_interfaces()]
    done += remove_firewall()
    return done


def cmd_cleanup(args) -> int:
    import sys

    if os.geteuid() != 0:
        print("netd cleanup: must run as root", file=sys.stderr)
        return 1
    if daemon_answers(args.run_dir):
        print(f"netd cleanup: a daemon answers on {args.run_dir}/netd.sock: stop it first "
              "(a running daemon keeps its own state tidy)", file=sys.stderr)
        return 1
    for line in cleanup(args.run_dir):
        print(f"removed {line}")
    return 0
