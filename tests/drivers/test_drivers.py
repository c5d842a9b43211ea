"""Each driver alone (tests/drivers/conftest.py): create network, create endpoint, join a container,
ping, leave, delete — nothing left; a restart (a new driver over the same store and kernel state)
keeps a joined container working; bad input leaves nothing behind."""

from __future__ import annotations

import ipaddress

import pytest

from netd.contract.driverapi import JoinInfo
from netd.contract.errors import BadRequest
from netd.kernel.rtnl import flush_retired
from tests.drivers.conftest import Scratch, endpoint, network

DRIVERS = ["bridge", "overlay", "hostgw"]


def join(scratch: Scratch, driver, net, address: str, name: str = "c"):
    """The controller's steps for one container: endpoint, address range, join as eth0."""
    ep = endpoint(net, address, name)
    driver.address_range(net)
    driver.create_endpoint(net, ep)
    ep.sandbox = scratch.container()
    ep.ifname = "eth0"
    driver.join(net, ep, JoinInfo(ep.sandbox, "eth0", set_default_route=True))
    return ep


def remove(driver, net, ep) -> None:
    """The controller's steps back: leave, delete the endpoint, give the range back, delete the network."""
    driver.leave(net, ep)
    driver.delete_endpoint(net, ep)
    driver.release_address_range(net)
    driver.delete_network(net)
    driver.close()


def gateway_of(driver, net) -> str:
    return driver.default_gateway(net) or net.ipam.gateway


def make(scratch: Scratch, name: str):
    driver = scratch.driver(name)
    if name == "hostgw":
        net = network(name, "10.124.0.0/16", None, subnet_len=24, lease_ttl=30)
    else:
        net = network(name)
    driver.validate(net)
    driver.create_network(net)
    return driver, net


@pytest.mark.parametrize("name", DRIVERS)
def test_lifecycle_leaves_nothing(scratch: Scratch, name: str):
    before = scratch.links()
    driver, net = make(scratch, name)
    address = "10.124.0.10" if name == "hostgw" else "10.123.0.10"
    if name == "hostgw":
        address = str(ipaddress.IPv4Network(driver.address_range(net)).network_address + 10)
    ep = join(scratch, driver, net, address)
    assert address in scratch.sh(ep.sandbox, "ip -4 -o addr show eth0").stdout
    ping = scratch.sh(ep.sandbox, f"ping -c1 -W2 {gateway_of(driver, net)}")
    assert ping.returncode == 0, ping.stdout + ping.stderr
    remove(driver, net, ep)
    flush_retired()
    assert scratch.links() == before, "interfaces left behind"


@pytest.mark.parametrize("name", DRIVERS)
def test_restart_keeps_a_joined_container(scratch: Scratch, name: str):
    driver, net = make(scratch, name)
    address = (str(ipaddress.IPv4Network(driver.address_range(net)).network_address + 11)
               if name == "hostgw" else "10.123.0.11")
    ep = join(scratch, driver, net, address)
    driver.close()                                     # the daemon stops; the kernel keeps everything
    again = scratch.driver(name)
    again.restore(net, [ep])
    again.restore_done()
    ping = scratch.sh(ep.sandbox, f"ping -c1 -W2 {gateway_of(again, net)}")
    assert ping.returncode == 0, ping.stdout + ping.stderr
    remove(again, net, ep)


@pytest.mark.parametrize("name, options, message", [
    ("bridge", {"com.docker.network.driver.mtu": "12"}, "invalid MTU"),
    ("bridge", {"nonsense": "1"}, "unknown option 'nonsense'"),
    ("overlay", {"com.docker.network.driver.mtu": "x"}, "invalid MTU 'x'"),
    ("overlay", {"com.docker.network.driver.overlay.vxlanid_list": "99999999"}, "invalid VXLAN id"),
    ("hostgw", {"subnet_len": "40"}, "subnet_len"),
])
def test_bad_input_leaves_nothing(scratch: Scratch, name: str, options: dict, message: str):
    before = scratch.links()
    driver = scratch.driver(name)
    net = network(name, "10.124.0.0/16" if name == "hostgw" else "10.123.0.0/24",
                  None if name == "hostgw" else "10.123.0.1", **options)
    with pytest.raises(BadRequest, match=message):
        driver.validate(net)
        driver.create_network(net)
    driver.close()
    assert scratch.links() == before
    assert scratch.store.list("netd/")[0] == [], "store keys left behind"


def test_overlay_without_a_cluster_store_is_refused(scratch: Scratch):
    driver = scratch.driver("overlay", cluster=False)
    with pytest.raises(BadRequest, match="overlay networks need a cluster store"):
        driver.validate(network("overlay"))


def test_macvlan_containers_reach_each_other(scratch: Scratch):
    before = scratch.links()
    driver = scratch.driver("macvlan", cluster=False)
    net = network("macvlan", parent="underlay0")
    driver.validate(net)
    driver.create_network(net)
    a = join(scratch, driver, net, "10.123.0.21", "a")
    b = join(scratch, driver, net, "10.123.0.22", "b")
    ping = scratch.sh(a.sandbox, "ping -c1 -W2 10.123.0.22")
    assert ping.returncode == 0, ping.stdout + ping.stderr
    for ep in (a, b):
        driver.leave(net, ep)
        driver.delete_endpoint(net, ep)
    driver.delete_network(net)
    driver.close()
    assert scratch.links() == before
