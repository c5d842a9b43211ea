"""Quiet wires: while netd runs IPv4 only, no interface it makes sends IPv6 (router solicitations,
MLD reports, DAD), for every driver, on the container's interface and on the network's bridge
(or the macvlan parent's wire); and `netd capture C -c 4` during three pings holds the pings.

One host with a real etcd as its cluster store (overlay and hostgw need one), as in test_hostgw."""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from collections.abc import Iterator

import pytest

from netd.api.client import Client
from tests.support.hosts import PYTHON, NetdHost, clustered_host

pytestmark = pytest.mark.timeout(240)
LISTEN = 4.0     # seconds of capture while the second container comes up and settles


@pytest.fixture(scope="module")
def host() -> Iterator[NetdHost]:
    with clustered_host() as (netd_host, _):
        # The macvlan parent and its wire are the test's, not netd's: quiet them too, before they are up.
        netd_host.sh("ip link add qparent type veth peer name qwire"
                     " && sysctl -qw net.ipv6.conf.qparent.disable_ipv6=1 net.ipv6.conf.qwire.disable_ipv6=1"
                     " && ip link set qparent up && ip link set qwire up")
        yield netd_host


def listen(netns: str, ifname: str) -> subprocess.Popen:
    """tcpdump for IPv6 frames on `ifname` in `netns`, printing each one, for LISTEN seconds."""
    return subprocess.Popen(["nsenter", f"--net={netns}", "timeout", str(LISTEN), "tcpdump", "-nn", "-l", "-i",
                             ifname, "ip6"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def heard(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=LISTEN + 20)
    assert "listening on" in err, f"tcpdump did not start: {err}"
    return out.strip()


DRIVERS = {
    # driver: (network create flags, where its bridge is: a function of (host, network name))
    "bridge": ["--subnet", "10.91.0.0/24"],
    "overlay": ["-d", "overlay", "--subnet", "10.92.0.0/24"],
    "hostgw": ["-d", "hostgw", "--subnet", "10.93.0.0/16"],
    "macvlan": ["-d", "macvlan", "--subnet", "10.94.0.0/24", "-o", "parent=qparent", "-o", "host_access=true"],
}


@pytest.mark.parametrize("driver", list(DRIVERS))
def test_no_ipv6_from_any_interface_netd_makes(host: NetdHost, driver: str):
    network = f"q{driver[:3]}{secrets.token_hex(2)}"
    first, second = f"{network}a", f"{network}b"
    host.netd("network", "create", *DRIVERS[driver], network)
    try:
        host.netd("run", "-d", "--name", first, "--network", network, "sleep", "1000")
        sandbox = host.inspect(first)["NetworkSettings"]["SandboxKey"]
        where = capture_point(host, network)
        on_bridge, on_container = listen(*where), listen(sandbox, "eth0")
        time.sleep(0.5)
        host.netd("run", "-d", "--name", second, "--network", network, "sleep", "1000")
        bridge_heard, container_heard = heard(on_bridge), heard(on_container)
        assert bridge_heard == "", f"{driver}: IPv6 on {where[1]}:\n{bridge_heard}"
        assert container_heard == "", f"{driver}: IPv6 on {first}'s eth0:\n{container_heard}"
    finally:
        host.cli("rm", "-f", first, second, check=False)
        host.cli("network", "rm", network, check=False)


def capture_point(host: NetdHost, network: str) -> tuple[str, str]:
    """Where the network's containers meet on this host, as `netd capture network:NAME` finds it."""
    if json.loads(host.netd("network", "inspect", network))[0]["Driver"] == "macvlan":
        return f"/run/netns/{host.name}", "qwire"          # the parent's wire: what the macvlans send
    client = Client(f"unix://{host.socket}")
    try:
        point = client.request("GET", f"/debug/capture-targets/network:{network}")["Points"][0]
    finally:
        client.close()
    return point["Netns"] or f"/run/netns/{host.name}", point["Interface"]


def test_capture_of_three_pings_holds_them(host: NetdHost):
    """The case from the issue: `netd capture C -c 4` while C is pinged three times."""
    network = f"qcap{secrets.token_hex(2)}"
    first, second = f"{network}a", f"{network}b"
    host.netd("network", "create", "-d", "overlay", "--subnet", "10.95.0.0/24", network)
    try:
        host.netd("run", "-d", "--name", first, "--network", network, "sleep", "1000")
        argv = ["nsenter", f"--net=/run/netns/{host.name}", PYTHON, "-m", "netd", "capture", first, "-c", "4",
                "--timeout", "20"]
        host.netd("run", "-d", "--name", second, "--network", network, "sleep", "1000")
        host.cli("exec", second, "ping", "-c", "1", "-W", "2", first)   # ARP settled first: the pings alone
        capture = subprocess.Popen(argv, env=host.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert capture.stderr.readline().startswith("capturing on")
        host.cli("exec", second, "ping", "-c", "3", "-i", "0.3", "-W", "2", first)
        out, _ = capture.communicate(timeout=30)
        lines = out.strip().splitlines()
        assert len(lines) == 4, out
        assert sum("echo request" in line for line in lines) == 2, out
        assert sum("echo reply" in line for line in lines) == 2, out
    finally:
        host.cli("rm", "-f", first, second, check=False)
        host.cli("network", "rm", network, check=False)


@pytest.mark.parametrize("driver", ["bridge", "overlay"])
def test_restart_sends_nothing(host: NetdHost, driver: str):
    """Other chatter netd could cause: a daemon restart rebuilds nothing that works, so the wire
    stays silent (no gratuitous ARP, no IPv6) while idle containers wait."""
    network = f"r{driver[:3]}{secrets.token_hex(2)}"
    first, second = f"{network}a", f"{network}b"
    host.netd("network", "create", *DRIVERS[driver], network)
    try:
        host.netd("run", "-d", "--name", first, "--network", network, "sleep", "1000")
        host.netd("run", "-d", "--name", second, "--network", network, "sleep", "1000")
        host.cli("exec", first, "ping", "-c", "1", "-W", "2", second)
        netns, ifname = capture_point(host, network)
        wire = subprocess.Popen(["nsenter", f"--net={netns}", "timeout", str(LISTEN), "tcpdump", "-nn", "-l", "-i",
                                 ifname], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        host.restart()
        assert heard(wire) == "", f"{driver}: frames on {ifname} after a restart"
        host.cli("exec", first, "ping", "-c", "1", "-W", "2", second)
    finally:
        host.cli("rm", "-f", first, second, check=False)
        host.cli("network", "rm", network, check=False)
