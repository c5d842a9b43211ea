"""Bad input: each gets a clear one-line error, a non-zero exit, and leaves nothing behind."""

from __future__ import annotations

import os
import secrets

import pytest

from tests.support.hosts import NetdHost


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(2)}"


def snapshot(host) -> dict:
    """What a failed command must not change: interfaces, networks, pools, addresses,
    namespaces, containers and firewall rules of the host."""
    netns_dir = os.path.join(host.run_dir, "netns")
    return {
        "links": sorted(line.split(":")[1].split("@")[0].strip()
                        for line in host.sh("ip -o link").stdout.splitlines()),
        "networks": host.netd("network", "ls", "--format", "json"),
        "pools": host.netd("ipam", "ls", "--format", "json"),
        "containers": host.netd("ps", "-a", "-q"),
        "netns": sorted(os.listdir(netns_dir)),
        "rules": host.sh("nft list table ip netd", check=False).stdout,
    }


@pytest.fixture(scope="module")
def busy(host):
    """A network with one container, the state every bad command runs against."""
    net, name = unique("busy"), unique("resident")
    host.netd("network", "create", "--subnet", "172.31.200.0/29", net)   # room for 5 containers
    host.netd("run", "-d", "--name", name, "--network", net, "--ip", "172.31.200.2", "-p", "8181:80",
              "sleep", "1000")
    yield net, name
    host.netd("rm", "-f", name)
    host.netd("network", "rm", net)


CASES = [
    # (arguments, what the message must say); {net} and {ctr} are the busy network and container
    (["network", "create", "{net}"], "network with name {net} already exists"),
    (["network", "create", "bad name!"], "invalid network name 'bad name!'"),
    (["network", "create", "--subnet", "10.0.0.300/24", "x1"], "invalid subnet '10.0.0.300/24'"),
    (["network", "create", "--subnet", "172.31.200.0/24", "x2"], "overlaps an address pool already in use (network {net}"),
    (["network", "create", "--subnet", "10.55.0.0/16", "--gateway", "10.56.0.1", "x3"], "gateway 10.56.0.1 is not a usable address of subnet 10.55.0.0/16"),
    (["network", "create", "-d", "vlanish", "x4"], "unknown driver 'vlanish'"),
    (["network", "create", "-o", "colour=blue", "x5"], "unknown option 'colour' for driver bridge"),
    (["network", "create", "host"], "pre-defined network"),
    (["network", "create", "-d", "overlay", "x6"], "overlay networks need a cluster store: start every daemon with --cluster-store"),
    (["network", "create", "--scope", "global", "x7"], "global networks need a cluster store"),
    (["network", "rm", "{net}"], "network {net} has active endpoints ({ctr})"),
    (["network", "rm", "bridge"], "bridge is a pre-defined network and cannot be removed"),
    (["network", "rm", "nosuchnet"], "network nosuchnet not found"),
    (["network", "connect", "nosuchnet", "{ctr}"], "network nosuchnet not found"),
    (["network", "connect", "{net}", "nosuchctr"], "no such container: nosuchctr"),
    (["network", "connect", "{net}", "{ctr}"], "already connected to network {net}"),
    (["run", "--network", "{net}", "--ip", "172.31.200.2", "true"], "address 172.31.200.2 is already in use on network {net}"),
    (["run", "--network", "{net}", "--ip", "10.9.9.9", "true"], "address 10.9.9.9 is not a usable address of subnet 172.31.200.0/29"),
    (["run", "--network", "nosuchnet", "true"], "network nosuchnet not found"),
    (["run", "--name", "{ctr}", "true"], "container name {ctr} is already in use"),
    (["run", "--network", "{net}", "-p", "8181:80", "true"], "port 8181/tcp is already published by container {ctr}"),
    (["run", "-p", "99999:80", "true"], "host port must be a number from 1 to 65535"),
    (["run", "--network", "container:nosuchctr", "true"], "container nosuchctr not found"),
    (["run", "--network", "host", "-p", "80:80", "true"], "ports cannot be published with --network host"),
    (["run", "--ip", "172.17.0.50", "true"], "--ip needs a user-defined network"),
    (["run", "--network", "{net}", "no-such-program-here"], "no-such-program-here"),
    (["run", "--rootfs", "/no/such/dir", "true"], "--rootfs /no/such/dir: no such directory"),
    (["rm", "{ctr}"], "container {ctr} is running: stop it first or use netd rm -f"),
    (["logs", "nosuchctr"], "no such container: nosuchctr"),
    (["ipam", "lookup", "not-an-ip"], "invalid address 'not-an-ip'"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_fails_clearly_and_leaves_nothing(host, busy, args, message):
    net, ctr = busy
    args = [a.format(net=net, ctr=ctr) for a in args]
    before = snapshot(host)
    error = host.fails(*args)
    assert message.format(net=net, ctr=ctr) in error
    assert snapshot(host) == before


def test_pool_exhaustion_fails_clearly_and_frees_nothing_taken(host, busy):
    net, _ = busy
    fillers = [unique("fill") for _ in range(4)]   # .3 .4 .5 .6: the /29 is then full
    try:
        for name in fillers:
            host.netd("run", "-d", "--name", name, "--network", net, "sleep", "1000")
        before = snapshot(host)
        error = host.fails("run", "--network", net, "true")
        assert f"no free address left in 172.31.200.0/29 (network {net}): the pool is exhausted" in error
        assert snapshot(host) == before
    finally:
        host.netd("rm", "-f", *fillers)


def test_the_cli_says_how_to_start_a_daemon_that_is_not_running():
    with NetdHost(uplink=False) as host:
        host.stop()
        error = host.fails("network", "ls")
        assert "cannot connect to the netd daemon" in error and "netd daemon" in error
