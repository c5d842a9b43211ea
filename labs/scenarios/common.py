"""Steps shared by scenarios: containers on hosts, and every-pair connectivity checks."""

from __future__ import annotations

import json
import secrets
import time

from labs.lab import Lab
from labs.report import Report, run_parallel


def unique(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(2)}"


def container_address(lab: Lab, host: str, container: str, network: str) -> str:
    info = json.loads(lab.netd(host, "inspect", container))[0]
    return info["NetworkSettings"]["Networks"][network]["IPAddress"]


def pings(lab: Lab, host: str, container: str, target: str, count: int = 1) -> tuple[bool, str]:
    result = lab.try_netd(host, "exec", container, "ping", "-c", str(count), "-W", "2", target)
    last = (result.stdout.strip().splitlines() or [result.stderr.strip()])[-1]
    return result.returncode == 0, last


def check_all_pairs(lab: Lab, report: Report, scenario: str, containers: dict[str, tuple[str, str]],
                    by_name: bool = True) -> None:
    """Every container pings every other, by address and (on user networks) by name.

    `containers`: name -> (host, address)."""
    tasks, labels = [], []
    for src, (src_host, _) in containers.items():
        for dst, (_, dst_address) in containers.items():
            if src == dst:
                continue
            targets = [("ping by address", dst_address)] + ([("ping by name", dst)] if by_name else [])
            for what, target in targets:
                tasks.append(lambda h=src_host, s=src, t=target: pings(lab, h, s, t))
                labels.append((what, src, dst))
    for (what, src, dst), (ok, detail) in zip(labels, run_parallel(tasks), strict=True):
        report.add(scenario, what, src, dst, ok, detail)


def wait_for(condition, timeout: float, interval: float = 0.2) -> bool:
    """Poll `condition` until it holds or `timeout` seconds pass; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def wait_for_network(lab: Lab, net: str, timeout: float = 10) -> bool:
    """A global network created on one host appears on the others within moments: wait for it."""
    return wait_for(lambda: all(lab.try_netd(h, "network", "inspect", net).returncode == 0
                                for h in lab.container_hosts), timeout)


def start_containers(lab: Lab, report: Report, scenario: str, net: str, names: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Start `names` (name -> host) on `net` all at once; record a failed check for each that does
    not start; return name -> (host, address) of those that did."""
    started = run_parallel([lambda n=name, h=host: lab.try_netd(h, "run", "-d", "--name", n, "--network", net,
                                                                "sleep", "100000")
                            for name, host in names.items()], workers=len(names))
    containers = {}
    for (name, host), result in zip(names.items(), started, strict=True):
        if result.returncode != 0:
            report.add(scenario, "container started", host, name, False, result.stderr.strip())
            continue
        containers[name] = (host, container_address(lab, host, name, net))
    return containers
