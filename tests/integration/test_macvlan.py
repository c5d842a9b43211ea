"""The macvlan driver on one host (a daemon in its own namespace, tests.support.hosts): bad input
gets one clear line and leaves nothing behind; containers sit on the parent's segment; host access;
passthru; a daemon restart keeps it all. Across hosts: tests/labs/test_macvlan.py."""

from __future__ import annotations

import json
import os
import secrets

import pytest

from tests.support.hosts import UPLINK_OUTSIDE, NetdHost

SUBNET, GATEWAY, RANGE = "203.0.113.0/24", UPLINK_OUTSIDE, "203.0.113.64/27"   # the uplink's own segment

pytestmark = pytest.mark.timeout(180)


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(2)}"


def snapshot(host: NetdHost) -> dict:
    """What a failed command must not change."""
    netns_dir = os.path.join(host.run_dir, "netns")
    return {
        "links": sorted(line.split(":")[1].split("@")[0].strip() for line in host.sh("ip -o link").stdout.splitlines()),
        "routes": host.sh("ip route").stdout,
        "networks": host.netd("network", "ls", "--format", "json"),
        "pools": host.netd("ipam", "ls", "--format", "json"),
        "containers": host.netd("ps", "-a", "-q"),
        "netns": sorted(os.listdir(netns_dir)),
    }


@pytest.fixture(scope="module")
def host():
    with NetdHost(prefix="mvt") as netd_host:
        # spare parents: one up and free, one down
        netd_host.sh("ip link add free0 type veth peer name free1 && ip link set free0 up && ip link set free1 up"
                     " && ip link add down0 type veth peer name down1")
        yield netd_host


@pytest.fixture(scope="module")
def resident(host):
    """A macvlan network on the uplink with host access, and one container on it."""
    net, name = unique("mv"), unique("res")
    host.netd("network", "create", "-d", "macvlan", "--subnet", SUBNET, "--gateway", GATEWAY, "--ip-range", RANGE,
              "-o", "parent=uplink", "-o", "host_access=true", net)
    host.netd("run", "-d", "--name", name, "--network", net, "--ip", "203.0.113.70", "sleep", "1000")
    yield net, name
    host.cli("rm", "-f", name, check=False)
    host.cli("network", "rm", net, check=False)


CASES = [
    (["network", "create", "-d", "macvlan", "x1"], "macvlan networks need a parent interface: add -o parent=IFACE"),
    (["network", "create", "-d", "macvlan", "-o", "parent=nosuch0", "x2"],
     "parent interface nosuch0 does not exist on this host"),
    (["network", "create", "-d", "macvlan", "-o", "parent=down0", "x3"],
     "parent interface down0 is down: bring it up first (ip link set down0 up)"),
    (["network", "create", "-d", "macvlan", "-o", "parent=lo", "x4"], "parent interface lo is the loopback interface"),
    (["network", "create", "-d", "macvlan", "--subnet", "198.18.0.0/24", "-o", "parent=uplink", "x5"],
     "parent interface uplink already carries macvlan network {net}"),
    (["network", "create", "-d", "macvlan", "-o", "parent=free0", "-o", "macvlan_mode=fast", "x6"],
     "invalid macvlan_mode 'fast': use bridge, private, vepa or passthru"),
    (["network", "create", "-d", "macvlan", "-o", "parent=free0", "-o", "macvlan_mode=vepa", "-o", "host_access=true",
      "x7"], "host_access needs macvlan_mode=bridge"),
    (["network", "create", "-d", "macvlan", "-o", "parent=free0", "-o", "host_access=maybe", "x8"],
     "option host_access takes true or false, not 'maybe'"),
    (["network", "create", "-d", "macvlan", "-o", "parent=free0", "-o", "mode=bridge", "x9"],
     "unknown option 'mode' for driver macvlan"),
    (["network", "create", "-d", "macvlan", "-o", "parent=free0", "--internal", "x10"],
     "--internal does not apply to macvlan"),
    (["network", "create", "-d", "macvlan", "-o", "parent=free0", "--scope", "global", "x11"],
     "global networks need a cluster store"),
    (["network", "create", "-d", "macvlan", "--subnet", "198.18.0.5/24", "-o", "parent=free0", "x12"],
     "invalid subnet 198.18.0.5/24: it has host bits set; did you mean 198.18.0.0/24?"),
    (["network", "create", "-d", "macvlan", "--subnet", "198.18.0.0/24", "--gateway", "198.19.0.1", "-o", "parent=free0",
      "x13"], "gateway 198.19.0.1 is not a usable address of subnet 198.18.0.0/24"),
    (["network", "create", "-d", "macvlan", "--subnet", "198.18.0.0/24", "--ip-range", "198.18.1.0/26",
      "-o", "parent=free0", "x14"], "ip-range 198.18.1.0/26 is not inside subnet 198.18.0.0/24"),
    (["network", "create", "-d", "macvlan", "--subnet", "203.0.113.128/25", "-o", "parent=free0", "x15"],
     "subnet 203.0.113.128/25 overlaps an address pool already in use (network {net}"),
    (["network", "create", "-d", "macvlan", "--subnet", "198.18.0.0/31", "-o", "parent=free0", "x16"],
     "subnet 198.18.0.0/31 is too small"),
    (["network", "create", "-d", "hostgw", "--subnet", "10.244.0.0/16", "x17"],
     "hostgw networks need a cluster store: start every daemon with --cluster-store etcd://HOST:PORT"),
    (["run", "--network", "{net}", "--ip", "203.0.113.70", "true"], "address 203.0.113.70 is already in use"),
    (["run", "--network", "{net}", "--ip", "198.18.0.9", "true"], "address 198.18.0.9 is not a usable address of subnet"),
    (["run", "--network", "{net}", "-p", "80:80", "true"], "driver macvlan cannot publish ports"),
]


@pytest.fixture(scope="module")
def before(host, resident) -> dict:
    """The state every bad command starts from, and must leave."""
    return snapshot(host)


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_fails_clearly_and_leaves_nothing(host, resident, before, args, message):
    net, _ = resident
    args = [a.format(net=net) for a in args]
    error = host.fails(*args)
    assert message.format(net=net) in error
    assert snapshot(host) == before


def test_containers_sit_on_the_parents_segment_and_the_host_reaches_them(host, resident):
    net, name = resident
    other = unique("peer")
    try:
        host.netd("run", "-d", "--name", other, "--network", net, "sleep", "1000")
        address = host.address(other)
        assert address.startswith("203.0.113.") and 64 <= int(address.split(".")[3]) < 96, "from the --ip-range"
        # the outside namespace is on the same segment as the parent: reached directly, no NAT, no route
        host.netd("exec", other, "ping", "-c1", "-W2", UPLINK_OUTSIDE)
        host.netd("exec", other, "ping", "-c1", "-W2", "203.0.113.70")
        host.netd("exec", other, "ping", "-c1", "-W2", name)
        host.outside_sh(f"ping -c1 -W2 {address}")
        # host access: a shim of the host's own, with an address of the pool; routes to its containers
        info = json.loads(host.netd("network", "inspect", net))[0]["Netd"]
        shim = info["HostAccess"]
        assert info["Parent"] == "uplink" and info["Mode"] == "bridge" and info["EndpointsHere"] == 2
        assert f"{address} dev {shim['Interface']}" in host.sh("ip route").stdout
        host.sh(f"ping -c1 -W2 {address}")
        host.netd("exec", other, "ping", "-c1", "-W2", "203.0.113.2")
        allocations = json.loads(host.netd("ipam", "inspect", net, "--format", "json"))
        assert {"Address": shim["Address"], "Kind": "aux"}.items() <= next(
            a for a in allocations if a["Address"] == shim["Address"]).items()
        # the MAC the outside learned is the container's own
        mac = host.inspect(other)["NetworkSettings"]["Networks"][net]["MacAddress"]
        assert mac.lower() in host.outside_sh(f"ip neigh show {address}").stdout.lower()
    finally:
        host.cli("rm", "-f", other, check=False)
    assert f"{address} dev" not in host.sh("ip route").stdout


def test_the_last_container_takes_the_shim_and_its_address_away(host):
    net, name = unique("mvs"), unique("one")
    host.netd("network", "create", "-d", "macvlan", "--subnet", "198.18.0.0/24", "-o", "parent=free0",
              "-o", "host_access=true", net)
    try:
        host.netd("run", "-d", "--name", name, "--network", net, "sleep", "1000")
        shim = json.loads(host.netd("network", "inspect", net))[0]["Netd"]["HostAccess"]["Interface"]
        assert shim in host.sh("ip -o link").stdout
        host.netd("rm", "-f", name)
        assert shim not in host.sh("ip -o link").stdout
        kinds = [a["Kind"] for a in json.loads(host.netd("ipam", "inspect", net, "--format", "json"))]
        assert kinds == ["gateway"]
    finally:
        host.cli("rm", "-f", name, check=False)
        host.netd("network", "rm", net)


def test_passthru_gives_the_parent_to_one_container(host):
    net, first, second = unique("pt"), unique("pt1"), unique("pt2")
    host.netd("network", "create", "-d", "macvlan", "--subnet", "198.18.1.0/24", "-o", "parent=free0",
              "-o", "macvlan_mode=passthru", net)
    try:
        host.netd("run", "-d", "--name", first, "--network", net, "sleep", "1000")
        parent_mac = host.sh("cat /sys/class/net/free0/address").stdout.strip()
        assert host.inspect(first)["NetworkSettings"]["Networks"][net]["MacAddress"] == parent_mac
        before = snapshot(host)
        error = host.fails("run", "--name", second, "--network", net, "true")
        assert "macvlan_mode passthru gives the parent to one container at a time" in error
        assert snapshot(host) == before
    finally:
        host.cli("rm", "-f", first, second, check=False)
        host.netd("network", "rm", net)


def test_a_restarted_daemon_keeps_containers_and_host_access(host, resident):
    net, name = resident
    host.restart()
    host.netd("exec", name, "ping", "-c1", "-W2", UPLINK_OUTSIDE)
    host.sh("ping -c1 -W2 203.0.113.70")
    assert "File exists" not in host.log_tail(200) and "could not restore" not in host.log_tail(200)
    error = host.fails("network", "create", "-d", "macvlan", "-o", "parent=uplink", unique("again"))
    assert f"already carries macvlan network {net}" in error, "the claim on the parent survives the restart"
