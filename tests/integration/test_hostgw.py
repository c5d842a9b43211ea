"""The hostgw driver on one host, with a real etcd as its cluster store (run inside the host's
namespace, where the daemon reaches it on 127.0.0.1). Other hosts are played by lease keys written
into the store: one on the host's uplink segment (routed), one behind the uplink's router (not
routable, and said so). Across real hosts: tests/labs/test_hostgw.py."""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from collections.abc import Iterator
from ipaddress import IPv4Network

import pytest

from kvstore import KVStore, open_store
from runtime.namespaces import entered_netns
from tests.support.hosts import UPLINK_OUTSIDE, NetdHost, clustered_host

SUBNET = "10.244.0.0/16"
LEASES = "netd/hostgw/leases/"

pytestmark = pytest.mark.timeout(180)


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(2)}"


class StoreInHost:
    """A store client whose every call runs inside the host's namespace (where etcd listens)."""

    def __init__(self, host: NetdHost, url: str):
        self.netns = f"/run/netns/{host.name}"
        with entered_netns(self.netns):
            self.store: KVStore = open_store(url)

    def __getattr__(self, name: str):
        method = getattr(self.store, name)

        def call(*args, **kwargs):
            with entered_netns(self.netns):
                return method(*args, **kwargs)
        return call


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[NetdHost, StoreInHost]]:
    with clustered_host(prefix="hgt") as (host, url):
        yield host, StoreInHost(host, url)


@pytest.fixture(scope="module")
def network(cluster) -> Iterator[str]:
    host, _ = cluster
    net = unique("hg")
    host.netd("network", "create", "-d", "hostgw", "--subnet", SUBNET, "-o", "lease_ttl=3", net)
    yield net
    host.cli("network", "rm", net, check=False)


def snapshot(host: NetdHost, store: StoreInHost) -> dict:
    netns_dir = os.path.join(host.run_dir, "netns")
    return {
        "links": sorted(line.split(":")[1].split("@")[0].strip() for line in host.sh("ip -o link").stdout.splitlines()),
        "routes": host.sh("ip route").stdout,
        "networks": host.netd("network", "ls", "--format", "json"),
        "pools": host.netd("ipam", "ls", "--format", "json"),
        "containers": host.netd("ps", "-a", "-q"),
        "netns": sorted(os.listdir(netns_dir)),
        "leases": [p.key for p in store.list(LEASES)[0]],
        "rules": host.sh("nft list table ip netd", check=False).stdout,
    }


CASES = [
    (["network", "create", "-d", "hostgw", "x1"], "hostgw needs --subnet, the network every host's part is carved from"),
    (["network", "create", "-d", "hostgw", "--subnet", "10.245.0.0/16", "-o", "subnet_len=12", "x2"],
     "subnet_len 12 does not fit subnet 10.245.0.0/16: give -o subnet_len=N with N from 17 to 30"),
    (["network", "create", "-d", "hostgw", "--subnet", "10.245.0.0/24", "x3"],
     "subnet_len 24 (the default) does not fit subnet 10.245.0.0/24: give -o subnet_len=N with N from 25 to 30"),
    (["network", "create", "-d", "hostgw", "--subnet", "10.245.0.0/16", "-o", "subnet_len=x", "x4"],
     "invalid subnet_len 'x': give a prefix length such as 24"),
    (["network", "create", "-d", "hostgw", "--subnet", "10.245.0.5/16", "x5"],
     "invalid subnet 10.245.0.5/16: it has host bits set; did you mean 10.245.0.0/16?"),
    (["network", "create", "-d", "hostgw", "--subnet", "10.245.0.0/16", "--gateway", "10.245.0.1", "x6"],
     "--gateway does not apply to hostgw"),
    (["network", "create", "-d", "hostgw", "--subnet", "10.245.0.0/16", "--ip-range", "10.245.1.0/24", "x7"],
     "--ip-range does not apply to hostgw"),
    (["network", "create", "-d", "hostgw", "--subnet", "10.245.0.0/16", "--internal", "x8"],
     "--internal does not apply to hostgw"),
    (["network", "create", "-d", "hostgw", "--subnet", "10.245.0.0/16", "--scope", "local", "x9"],
     "hostgw networks are global"),
    (["network", "create", "-d", "hostgw", "--subnet", "10.245.0.0/16", "-o", "lease_ttl=0", "x10"],
     "invalid lease_ttl '0': give seconds from 2 to 86400"),
    (["network", "create", "-d", "hostgw", "--subnet", "203.0.113.0/24", "-o", "subnet_len=26", "x11"],
     "subnet 203.0.113.0/24 overlaps 203.0.113.0/24, which this host already routes"),
    (["network", "create", "-d", "hostgw", "--subnet", "10.244.128.0/17", "x12"],
     "subnet 10.244.128.0/17 overlaps an address pool already in use (network {net}"),
    (["run", "--network", "{net}", "--ip", "10.244.200.9", "true"], "address 10.244.200.9 is outside 10.244."),
    (["run", "--network", "{net}", "-p", "80:80", "true"], "driver hostgw cannot publish ports"),
]


@pytest.fixture(scope="module")
def before(cluster, network) -> dict:
    """The state every bad command starts from, and must leave."""
    host, store = cluster
    return snapshot(host, store)


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a) for a in (c[0] for c in CASES)])
def test_bad_input_fails_clearly_and_leaves_nothing(cluster, network, before, args, message):
    """Also the failed first container: the part it leased is given back at once."""
    host, store = cluster
    args = [a.format(net=network) for a in args]
    error = host.fails(*args)
    assert message.format(net=network) in error
    assert snapshot(host, store) == before


def netd_info(host: NetdHost, net: str) -> dict:
    return json.loads(host.netd("network", "inspect", net))[0]["Netd"]


def wait_until(condition, timeout: float = 8.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_a_part_per_host_routes_to_peers_kept_and_dropped_with_their_leases(cluster, network):
    host, store = cluster
    a, b = unique("a"), unique("b")
    net_id = json.loads(host.netd("network", "inspect", network))[0]["Id"]
    lease = store.grant_lease(60)
    try:
        host.netd("run", "-d", "--name", a, "--network", network, "sleep", "1000")
        host.netd("run", "-d", "--name", b, "--network", network, "sleep", "1000")
        info = netd_info(host, network)
        part = info["Lease"]
        assert info["Gateway"] == str(IPv4Network(part).network_address + 1) and info["LeaseState"] == "held"
        for name in (a, b):
            assert IPv4Network(f"{host.address(name)}/32").subnet_of(IPv4Network(part))
        host.netd("exec", a, "ping", "-c1", "-W2", b)
        host.netd("exec", a, "ping", "-c1", "-W2", UPLINK_OUTSIDE)            # leaves the /16: masqueraded
        # two peers: one on the uplink's segment, one behind the uplink's router
        near = {"PublicIP": "203.0.113.77", "Host": "near"}
        far = {"PublicIP": "192.0.2.50", "Host": "far"}
        for peer in (near, far):   # live members, as their daemons would register them
            store.create(f"netd/hosts/{peer['PublicIP']}", json.dumps({"Name": peer["Host"], "ID": peer["Host"]}), lease)
        store.create(f"{LEASES}{net_id}/10.244.77.0-24", json.dumps(near), lease)
        store.create(f"{LEASES}{net_id}/10.244.78.0-24", json.dumps(far), lease)
        route = "10.244.77.0/24 via 203.0.113.77 dev uplink proto 110"
        assert wait_until(lambda: route in host.sh("ip route").stdout), host.sh("ip route").stdout
        assert "10.244.78.0/24" not in host.sh("ip route").stdout
        peers = {p["Subnet"]: p["Route"] for p in netd_info(host, network)["Peers"]}
        assert peers["10.244.77.0/24"] == "via 203.0.113.77 dev uplink"
        assert peers["10.244.78.0/24"].startswith("not routed: 192.0.2.50 is not on a directly connected network "
                                                  "(this host reaches it through the router 203.0.113.1 on uplink)")
        assert "peer 10.244.78.0/24 (far, 192.0.2.50) not routed" in host.log_tail(100)
        # deleted by hand: back within seconds
        host.sh("ip route del 10.244.77.0/24")
        assert wait_until(lambda: route in host.sh("ip route").stdout, timeout=5), "the route did not come back"
        # a route netd did not make is left alone; one of netd's with no lease behind it goes
        host.sh("ip route add 10.244.99.0/24 via 203.0.113.99 proto 110 && ip route add 10.99.0.0/24 via 203.0.113.98")
        assert wait_until(lambda: "10.244.99.0/24" not in host.sh("ip route").stdout, timeout=5)
        assert "10.99.0.0/24 via 203.0.113.98" in host.sh("ip route").stdout
        host.sh("ip route del 10.99.0.0/24")
        # the peers' lease ends: their routes go at once
        lease.revoke()
        assert wait_until(lambda: "10.244.77.0/24" not in host.sh("ip route").stdout, timeout=5)
        allocations = json.loads(host.netd("ipam", "inspect", network, "--format", "json"))
        assert {"Address": info["Gateway"], "Kind": "gateway"}.items() <= next(
            x for x in allocations if x["Address"] == info["Gateway"]).items()
    finally:
        host.cli("rm", "-f", a, b, check=False)
        lease.revoke()
    # the last container gave the part up: no lease, bridge, routes or rules of the network here
    assert not [p.key for p in store.list(f"{LEASES}{net_id}/")[0]]
    assert "hg-" not in host.sh("ip -o link").stdout
    assert "proto 110" not in host.sh("ip route").stdout
    assert "hg-" not in host.sh("nft list table ip netd").stdout


def test_a_restarted_daemon_keeps_its_part_and_its_containers(cluster, network):
    host, store = cluster
    name, peer = unique("r"), unique("p")
    try:
        host.netd("run", "-d", "--name", name, "--network", network, "sleep", "1000")
        host.netd("run", "-d", "--name", peer, "--network", network, "sleep", "1000")
        part = netd_info(host, network)["Lease"]
        host.restart()
        assert netd_info(host, network)["Lease"] == part
        host.netd("exec", name, "ping", "-c1", "-W2", peer)
        host.netd("exec", name, "ping", "-c1", "-W2", UPLINK_OUTSIDE)
        # killed, and back after the lease lapsed: the part its containers are in is taken again
        host.stop(signal.SIGKILL)
        time.sleep(4)
        host.start()
        assert netd_info(host, network)["Lease"] == part
        host.netd("exec", name, "ping", "-c1", "-W2", peer)
        log = host.log_tail(300)
        assert "File exists" not in log and "could not restore" not in log, log
    finally:
        host.cli("rm", "-f", name, peer, check=False)


def test_leases_are_data_not_orders(cluster, network):
    """Leases that lie outside the subnet, overlap, cover a route of this host, or name a host that
    is not a live member are logged and skipped; no route is made for them."""
    host, store = cluster
    a = unique("a")
    net_id = json.loads(host.netd("network", "inspect", network))[0]["Id"]
    lease = store.grant_lease(60)
    member = {"PublicIP": "203.0.113.81", "Host": "member"}
    stranger = {"PublicIP": "203.0.113.82", "Host": "stranger"}
    try:
        host.netd("run", "-d", "--name", a, "--network", network, "sleep", "1000")
        host.sh("ip route add 10.244.90.0/24 dev uplink")       # a route this host has of its own
        store.create(f"netd/hosts/{member['PublicIP']}", json.dumps({"Name": "member", "ID": "m"}), lease)
        bad = {"10.250.1.0-24": member,        # outside 10.244.0.0/16
               "10.244.80.0-23": member,       # not a /24 part
               "10.244.90.0-24": member,       # covers a route of this host
               "10.244.91.0-24": stranger}     # not a live member
        for key, value in bad.items():
            store.create(f"{LEASES}{net_id}/{key}", json.dumps(value), lease)
        store.create(f"{LEASES}{net_id}/10.244.92.0-24", json.dumps(member), lease)   # a good one, as a witness
        assert wait_until(lambda: "10.244.92.0/24 via 203.0.113.81" in host.sh("ip route").stdout)
        routes = host.sh("ip route").stdout
        for subnet in ("10.250.1.0/24", "10.244.80.0/23", "10.244.91.0/24"):
            assert subnet not in routes, routes
        assert "10.244.90.0/24 via" not in routes, routes
        log = host.log_tail(200)
        for why in ("is not a /24 part of", "covers a route of this host", "203.0.113.82 is not a live member"):
            assert why in log, log
    finally:
        host.sh("ip route del 10.244.90.0/24", check=False)
        host.cli("rm", "-f", a, check=False)
        lease.revoke()
