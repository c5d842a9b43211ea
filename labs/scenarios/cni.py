"""CNI across hosts: on each lab host a runtime's namespace is attached to one netd overlay by
running netd as a CNI plugin (one exec per call, the CNI_* environment, the config on stdin, the
host's own daemon at its default socket). The two namespaces ping each other, their addresses
differ, and `netd ipam lookup` on either host names both; DEL removes them."""

from __future__ import annotations

import json
import os
import shlex
import sys

from labs.lab import Lab
from labs.report import Report
from labs.scenarios import Scenario
from labs.scenarios.common import unique, wait_for, wait_for_network

SUBNET = "172.16.16.0/24"
PLUGIN = os.path.join(os.path.dirname(sys.executable), "netd")   # the installed launcher


def cni(lab: Lab, host: str, command: str, config: dict, container_id: str, netns: str) -> tuple[int, dict]:
    env = (f"CNI_COMMAND={command} CNI_CONTAINERID={container_id} CNI_NETNS=/run/netns/{netns} CNI_IFNAME=eth0 "
           f"CNI_PATH={os.path.dirname(PLUGIN)}:/usr/lib/cni")
    result = lab.sh(host, f"echo {shlex.quote(json.dumps(config))} | env {env} {PLUGIN}")
    try:
        reply = json.loads(result.stdout) if result.stdout.strip() else {}
    except ValueError:
        reply = {"msg": result.stdout + result.stderr}
    return result.returncode, reply


def run(lab: Lab, report: Report, options: dict) -> None:
    first, second = lab.container_hosts[:2]
    net = unique("cniol")
    spaces = {first: unique("cnins"), second: unique("cnins")}
    config = {"cniVersion": "1.0.0", "name": net, "type": "netd"}
    added: list[str] = []
    try:
        lab.netd(first, "network", "create", "-d", "overlay", "--subnet", SUBNET, net)
        report.add("cni", "overlay on both hosts", first, second, wait_for_network(lab, net), net)
        addresses = {}
        for host, netns in spaces.items():
            lab.sh(host, f"ip netns add {netns}")
            code, reply = cni(lab, host, "ADD", config, f"lab-{netns}", netns)
            ok = code == 0 and bool(reply.get("ips"))
            report.add("cni", "ADD through the netd plugin", host, netns, ok, json.dumps(reply)[:200])
            if ok:
                added.append(host)
                addresses[host] = reply["ips"][0]["address"].split("/")[0]
        if len(addresses) < 2:
            return
        report.add("cni", "addresses unique across hosts", first, second, addresses[first] != addresses[second],
                   f"{addresses[first]} / {addresses[second]}")
        for src, dst in ((first, second), (second, first)):
            ok = wait_for(lambda s=src, d=dst: lab.sh(s, f"ip netns exec {spaces[s]} ping -c1 -W2 {addresses[d]}")
                          .returncode == 0, timeout=15, interval=0.5)
            report.add("cni", "CNI namespaces ping across hosts", spaces[src], addresses[dst], ok, "over a netd overlay")
        for host in (first, second):
            names = []
            for other in (first, second):
                held = json.loads(lab.netd(host, "ipam", "lookup", addresses[other], "--format", "json"))
                names += [h.get("Container") for h in held if h.get("Host") == lab.addresses[other]]
            report.add("cni", "netd ipam lookup names both", host, ", ".join(addresses.values()),
                       len(names) == 2 and all(n and n.startswith("cni-") for n in names), ", ".join(map(str, names)))
        for host in list(added):
            code, reply = cni(lab, host, "DEL", config, f"lab-{spaces[host]}", spaces[host])
            again, _ = cni(lab, host, "DEL", config, f"lab-{spaces[host]}", spaces[host])
            report.add("cni", "DEL (twice)", host, spaces[host], code == 0 and again == 0, json.dumps(reply)[:200])
            added.remove(host)
        removed = lab.try_netd(first, "network", "rm", net)
        report.add("cni", "network removed after DEL", first, net, removed.returncode == 0, removed.stderr.strip())
    finally:
        for host in added:
            cni(lab, host, "DEL", config, f"lab-{spaces[host]}", spaces[host])
        for host, netns in spaces.items():
            lab.sh(host, f"ip netns del {netns}")
        lab.try_netd(first, "network", "rm", net)


SCENARIO = Scenario("cni", "netd as a CNI plugin on two hosts: runtime namespaces on one overlay",
                    run, default_hosts=2, in_demo=False)
