"""Docker across hosts without swarm: each lab host runs a real dockerd beside its netd, netd
being dockerd's network and IPAM plugin. The same `docker network create -d netd-overlay
--ipam-driver netd --subnet S` on each host's dockerd is one netd overlay; containers that two
dockerds started reach each other, and netd's IPAM names both from either host."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

from labs.lab import Lab
from labs.report import Report
from labs.scenarios import Scenario
from labs.scenarios.common import unique, wait_for

SUBNET = "172.16.15.0/24"


class HostDocker:
    """A private dockerd in a lab host's network namespace (bench.peers.DockerBridgePeer), finding
    that host's netd plugins."""

    def __init__(self, lab: Lab, host: str):
        from bench.peers import DockerBridgePeer

        self.lab, self.host = lab, host
        self.plugin_dir = os.path.join(lab.tmp, f"{host}-plugins")
        os.makedirs(self.plugin_dir, exist_ok=True)
        lab.stop_daemon(host)
        lab.start_daemon(host, ("--docker-plugin-dir", self.plugin_dir))
        self.peer = DockerBridgePeer(netns=f"/proc/{lab.hosts[host].pid}/ns/net", plugin_dir=self.plugin_dir,
                                     own_network=False)
        self.peer.start()

    def run(self, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "DOCKER_HOST": f"unix://{self.peer.socket_path}",
               "DOCKER_CONFIG": os.path.join(self.peer.tmp, "cli")}
        return subprocess.run([shutil.which("docker") or "/usr/bin/docker", *args], capture_output=True, text=True,
                              timeout=60, env=env)

    def docker(self, *args: str) -> str:
        result = self.run(*args)
        if result.returncode != 0:
            raise RuntimeError(f"{self.host}$ docker {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout.strip()

    def stop(self) -> None:
        self.peer.stop()


def run(lab: Lab, report: Report, options: dict) -> None:
    first, second = lab.container_hosts[:2]
    dockers: list[HostDocker] = []
    net, a, b = unique("dol"), unique("da"), unique("db")
    try:
        for host in (first, second):
            dockers.append(HostDocker(lab, host))
        one, two = dockers
        for docker in dockers:
            docker.docker("network", "create", "-d", "netd-overlay", "--ipam-driver", "netd", "--subnet", SUBNET, net)
        nets = [json.loads(lab.netd(h, "network", "ls", "--format", "json")) for h in (first, second)]
        ours = [{n["Id"] for n in listed if n["Driver"] == "overlay"} for listed in nets]
        report.add("docker", "one netd overlay for both dockerds", first, second,
                   len(ours[0]) == 1 and ours[0] == ours[1], f"netd networks: {sorted(ours[0])} / {sorted(ours[1])}")
        one.docker("run", "-d", "--name", a, "--network", net, one.peer.image, "sleep", "100000")
        two.docker("run", "-d", "--name", b, "--network", net, two.peer.image, "sleep", "100000")
        address_a = one.docker("inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{net}").IPAddress}}}}', a)
        address_b = two.docker("inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{net}").IPAddress}}}}', b)
        report.add("docker", "addresses unique across hosts", first, second, address_a != address_b,
                   f"{a}: {address_a}, {b}: {address_b}")
        for docker, src, dst in ((one, a, address_b), (two, b, address_a)):
            ok = wait_for(lambda d=docker, s=src, t=dst: d.run("exec", s, "ping", "-c1", "-W2", t).returncode == 0,
                          timeout=15, interval=0.5)
            report.add("docker", "dockerd containers ping across hosts", src, dst, ok, "over netd-overlay")
        held = json.loads(lab.netd(second, "ipam", "lookup", address_a, "--format", "json"))
        report.add("docker", "netd's IPAM knows the other host's docker container", second, address_a,
                   any(h.get("Host") == lab.addresses[first] for h in held), json.dumps(held)[:200])
    finally:
        for docker in dockers:
            docker.run("rm", "-f", a, b)
            docker.run("network", "rm", net)
        for docker in dockers:
            docker.stop()


SCENARIO = Scenario("docker", "dockerd on each host with netd as its plugin: one overlay across hosts",
                    run, default_hosts=2, in_demo=False)
