"""netd as dockerd's network and IPAM plugin, driven by the real docker CLI against a real
dockerd (Debian's 20.10), and netd's socket compared with dockerd's Engine API.

One host namespace runs netd (with a cluster store, so that overlay and hostgw work) and a private
dockerd that finds netd's plugin sockets; containers come from an image imported from
busybox-static. Every test checks that nothing is left behind in either daemon.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import socket
import time

import pytest

from bench.peers import DockerAPI
from runtime.namespaces import entered_netns
from tests.support.dockerd import DockerdHost
from tests.support.etcd_server import EtcdServer
from tests.support.hosts import UPLINK_HOST, UPLINK_OUTSIDE

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/sbin/dockerd"), reason="needs docker.io (dockerd)")


def unique(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(2)}"


@pytest.fixture(scope="module")
def dk():
    host = DockerdHost(prefix="ndk")
    etcd = None
    try:
        host.netd.create_namespaces()
        with entered_netns(f"/run/netns/{host.netd.name}"):
            etcd = EtcdServer()
        host.netd.daemon_args += ["--cluster-store", f"etcd://127.0.0.1:{etcd.client_port}",
                                  "--cluster-advertise", UPLINK_HOST]
        host.netd.create_namespaces = lambda: None   # made above, with etcd in them
        with host:
            yield host
    finally:
        host.netd.cleanup()
        if etcd is not None:
            etcd.close()


def netd_state(dk: DockerdHost) -> dict:
    """What netd holds that a Docker network or container could have left."""
    networks = {n["Name"] for n in json.loads(dk.netd.netd("network", "ls", "--format", "json"))}
    pools = {p["Subnet"] for p in json.loads(dk.netd.netd("ipam", "ls", "--format", "json"))}
    sandboxes = [c for c in json.loads(dk.netd.netd("ps", "-a", "--format", "json")) if "sandbox" in c["Command"]]
    links = [name for name in dk.host_links() if name.startswith(("nd", "vnd", "veth"))]
    netns = sorted(os.listdir(os.path.join(dk.netd.run_dir, "netns")))
    return {"networks": networks, "pools": pools, "sandboxes": sandboxes, "links": links,
            "netns": [n for n in netns if not n.startswith("ov-")]}


@pytest.fixture
def clean(dk):
    before = netd_state(dk)
    yield
    deadline = time.monotonic() + 5
    while netd_state(dk) != before and time.monotonic() < deadline:   # veths go in the background
        time.sleep(0.1)
    assert netd_state(dk) == before
    assert dk.docker("ps", "-aq") == ""


def sleeper(dk: DockerdHost, name: str, network: str, *options: str) -> str:
    return dk.docker("run", "-d", "--name", name, "--network", network, *options, dk.image, "sleep", "1000")


def pings(dk: DockerdHost, container: str, target: str) -> bool:
    return dk.docker_run("exec", container, "ping", "-c1", "-W2", target, check=False).returncode == 0


def endpoint_id(dk: DockerdHost, container: str, network: str) -> str:
    return dk.docker("inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{network}").EndpointID}}}}', container)


def docker_address(dk: DockerdHost, container: str, network: str) -> str:
    return dk.docker("inspect", "-f", f"{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}", container)


# --- the plugins ----------------------------------------------------------------------------

def test_a_bridge_network_of_two_containers_pings_publishes_and_leaves_nothing(dk, clean):
    net, a, b = unique("nb"), unique("ca"), unique("cb")
    dk.docker("network", "create", "-d", "netd-bridge", "--subnet", "10.90.1.0/24", net)
    try:
        sleeper(dk, a, net)
        dk.docker("run", "-d", "--name", b, "--network", net, "-p", "8080:80", dk.image,
                  "sh", "-c", "echo hello from docker > /tmp/index.html; exec busybox httpd -f -p 80 -h /tmp")
        address_b = docker_address(dk, b, net)
        assert address_b.startswith("10.90.1.")
        assert pings(dk, a, address_b), "by address"
        assert pings(dk, a, b), "by name (dockerd's own DNS)"
        assert "default via 10.90.1.1" in dk.docker("exec", a, "ip", "route")
        # the port is published by netd, for the host and for the outside
        for where in (dk.netd.sh, dk.netd.outside_sh):
            assert where(f"curl -s --max-time 5 http://{UPLINK_HOST}:8080/").stdout == "hello from docker\n"
        # netd sees dockerd's endpoints as its own
        [network] = json.loads(dk.netd.netd("network", "inspect", "docker-" + network_id(dk, net)[:12]))
        assert sorted(e["IPv4Address"].split("/")[0] for e in network["Containers"].values()) == sorted(
            [docker_address(dk, a, net), address_b])
        [(pool, held)] = [(r["Network"], r) for r in json.loads(dk.netd.netd("ipam", "lookup", address_b, "--format", "json"))]
        assert pool == network["Name"] and held["Kind"] == "endpoint"
        # ... and traces a probe between two of them, hop by hop
        source, destination = (f"docker-{endpoint_id(dk, c, net)[:12]}" for c in (a, b))
        traced = dk.netd.netd("trace", source, destination)
        assert "the path works" in traced and "(bridge)" in traced, traced
        dk.docker("network", "disconnect", net, a)
        assert dk.docker("exec", a, "ip", "-o", "link").count("eth") == 0
        dk.docker("network", "connect", net, a)
        assert pings(dk, a, b)
    finally:
        dk.docker_run("rm", "-f", a, b, check=False)
        dk.docker_run("network", "rm", net, check=False)


def network_id(dk: DockerdHost, docker_network: str) -> str:
    """netd's network id for a Docker network (derived from its subnet: netd.core.docker)."""
    from netd.core.docker import network_id_for
    subnet = dk.docker("network", "inspect", "-f", "{{(index .IPAM.Config 0).Subnet}}", docker_network)
    return network_id_for(subnet)


@pytest.mark.parametrize("driver, subnet, options", [
    ("netd-overlay", "10.90.2.0/24", ()),
    # hostgw: each host gives out its own part of the subnet, which only netd's IPAM knows
    ("netd-hostgw", "10.90.16.0/20", ("--ipam-driver", "netd")),
    ("netd-macvlan", "203.0.113.0/24", ("--gateway", UPLINK_OUTSIDE, "--ip-range", "203.0.113.64/27",
                                        "-o", "parent=uplink")),
])
def test_every_driver_that_works_on_one_host_serves_dockerd(dk, clean, driver, subnet, options):
    net, a, b = unique("nd"), unique("ca"), unique("cb")
    dk.docker("network", "create", "-d", driver, "--subnet", subnet, *options, net)
    try:
        sleeper(dk, a, net)
        sleeper(dk, b, net)
        assert pings(dk, a, docker_address(dk, b, net))
        assert pings(dk, a, b)
        if driver == "netd-macvlan":
            assert pings(dk, a, UPLINK_OUTSIDE), "the parent's segment"
    finally:
        dk.docker_run("rm", "-f", a, b, check=False)
        dk.docker_run("network", "rm", net, check=False)


def test_the_ipam_driver_gives_netd_addresses_to_netd_and_docker_drivers(dk, clean):
    ours, theirs, a, b = unique("ni"), unique("di"), unique("ca"), unique("cb")
    dk.docker("network", "create", "-d", "netd-bridge", "--ipam-driver", "netd", "--subnet", "10.90.4.0/24", ours)
    dk.docker("network", "create", "-d", "bridge", "--ipam-driver", "netd", "--subnet", "10.90.5.0/24", theirs)
    try:
        sleeper(dk, a, ours, "--ip", "10.90.4.40")
        sleeper(dk, b, theirs)
        assert docker_address(dk, a, ours) == "10.90.4.40"
        assert pings(dk, a, "10.90.4.1")
        address_b = docker_address(dk, b, theirs)
        # both addresses are held in netd's IPAM: the first by the netd endpoint, the second for dockerd
        [held] = json.loads(dk.netd.netd("ipam", "lookup", "10.90.4.40", "--format", "json"))
        assert held["Kind"] == "endpoint" and held["Container"].startswith("docker-")
        [held] = json.loads(dk.netd.netd("ipam", "lookup", address_b, "--format", "json"))
        assert held["Container"] == "docker"
        message = dk.docker_fails("run", "--rm", "-d", "--network", ours, "--ip", "10.90.4.40", dk.image, "sleep", "1")
        assert "10.90.4.40 is already in use" in message
        # one subnet, one network of this dockerd (netd's IPAM would share the pool)
        message = dk.docker_fails("network", "create", "-d", "netd-bridge", "--ipam-driver", "netd", "--subnet",
                                  "10.90.4.0/24", unique("twin"))
        assert "already another network of this dockerd" in message
        assert pings(dk, a, "10.90.4.1")
    finally:
        dk.docker_run("rm", "-f", a, b, check=False)
        dk.docker_run("network", "rm", ours, theirs, check=False)


@pytest.mark.parametrize("args, message", [
    (["network", "create", "-d", "netd-bridge", "--subnet", "10.90.6.0/24", "-o", "color=blue", "{net}"],
     "unknown option 'color' for driver bridge"),
    (["network", "create", "-d", "netd-bridge", "--subnet", "172.17.0.0/24", "{net}"], "overlaps"),
    (["network", "create", "-d", "netd-macvlan", "--subnet", "10.90.7.0/24", "-o", "parent=nosuch0", "{net}"],
     "nosuch0"),
    (["network", "create", "-d", "netd-bridge", "--ipam-driver", "netd", "--subnet", "10.90.8.0/24",
      "--ipv6", "--subnet", "fd00:1::/64", "{net}"], "IPv4"),
], ids=["unknown option", "subnet of a netd network", "no such parent", "ipv6"])
def test_bad_input_reaches_the_docker_cli_as_one_line_and_leaves_nothing(dk, clean, args, message):
    net = unique("bad")
    networks = dk.docker("network", "ls", "-q")
    error = dk.docker_fails(*[a.format(net=net) for a in args])
    assert message in error and len(error.splitlines()) == 1, error
    assert dk.docker("network", "ls", "-q") == networks


def test_the_netd_network_can_be_named(dk, clean):
    net, name = unique("nn"), unique("shop")
    dk.docker("network", "create", "-d", "netd-bridge", "--subnet", "10.90.14.0/24", "-o", f"netd.name={name}", net)
    try:
        [network] = json.loads(dk.netd.netd("network", "inspect", name))
        assert network["Options"] == {} and network["Id"] == network_id(dk, net)
    finally:
        dk.docker_run("network", "rm", net, check=False)


def test_a_taken_address_fails_the_container_cleanly(dk, clean):
    net, name = unique("nt"), unique("ct")
    dk.docker("network", "create", "-d", "netd-bridge", "--subnet", "10.90.9.0/24", net)
    squatter = unique("sq")
    try:
        nid = network_id(dk, net)
        dk.netd.netd("run", "-d", "--name", squatter, "--network", "docker-" + nid[:12], "--ip", "10.90.9.2",
                     "sleep", "1000")
        error = dk.docker_fails("run", "--rm", "-d", "--name", name, "--network", net, dk.image, "sleep", "1000")
        assert "10.90.9.2 is already in use" in error
    finally:
        dk.netd.cli("rm", "-f", squatter, check=False)
        dk.docker_run("rm", "-f", name, check=False)
        dk.docker_run("network", "rm", net, check=False)


def test_containers_keep_their_network_when_netd_restarts(dk, clean):
    net, a, b, c = unique("nr"), unique("ca"), unique("cb"), unique("cc")
    dk.docker("network", "create", "-d", "netd-bridge", "--subnet", "10.90.10.0/24", net)
    try:
        sleeper(dk, a, net)
        sleeper(dk, b, net)
        dk.netd.restart()
        assert pings(dk, a, docker_address(dk, b, net))
        sleeper(dk, c, net)
        assert pings(dk, c, a)
        dk.docker("rm", "-f", b)
        assert not pings(dk, a, "10.90.10.3")
    finally:
        dk.docker_run("rm", "-f", a, b, c, check=False)
        dk.docker_run("network", "rm", net, check=False)


def test_netd_follows_dockerd_through_its_restart(dk, clean):
    net, a, b = unique("nr"), unique("ca"), unique("cb")
    dk.docker("network", "create", "-d", "netd-bridge", "--subnet", "10.90.13.0/24", net)
    try:
        sleeper(dk, a, net)
        sleeper(dk, b, net)
        dk.dockerd.restart_dockerd()
        # dockerd stopped its containers (or found them dead): netd let their endpoints go
        sandboxes = [c for c in json.loads(dk.netd.netd("ps", "-a", "--format", "json")) if "sandbox" in c["Command"]]
        assert sandboxes == []
        dk.docker("start", a, b)
        assert pings(dk, a, b)
    finally:
        dk.docker_run("rm", "-f", a, b, check=False)
        dk.docker_run("network", "rm", net, check=False)


def test_every_call_of_the_protocol_is_answered_and_an_unknown_one_is_404(dk):
    def post(plugin: str, call: str, body: dict | None = None) -> tuple[int, dict]:
        conn = UnixHTTPConnection(os.path.join(dk.plugin_dir, plugin + ".sock"))
        conn.request("POST", "/" + call, json.dumps(body or {}))
        response = conn.getresponse()
        return response.status, json.loads(response.read())

    assert post("netd-bridge", "Plugin.Activate") == (200, {"Implements": ["NetworkDriver"]})
    assert post("netd", "Plugin.Activate") == (200, {"Implements": ["IpamDriver"]})
    assert post("netd-overlay", "NetworkDriver.GetCapabilities") == (200, {"Scope": "local", "ConnectivityScope": "global"})
    assert post("netd", "IpamDriver.GetDefaultAddressSpaces")[1]["LocalDefaultAddressSpace"] == "netd-local"
    for call in ("NetworkDriver.DiscoverNew", "NetworkDriver.DiscoverDelete"):
        assert post("netd-bridge", call, {"DiscoveryType": 1, "DiscoveryData": {}}) == (200, {})
    status, reply = post("netd-bridge", "NetworkDriver.Teleport")
    assert status == 404 and "unknown call NetworkDriver.Teleport" in reply["Err"]
    status, reply = post("netd-bridge", "NetworkDriver.Join", {"EndpointID": "0" * 64, "SandboxKey": "/x"})
    assert status == 404 and "not known to netd" in reply["Err"]
    # hostile requests: a clear 400, nothing made
    for plugin, call, body, message in [
        ("netd-bridge", "NetworkDriver.CreateNetwork", {"NetworkID": "x", "IPv4Data": "garbage"}, "IPv4Data must be a list"),
        ("netd-bridge", "NetworkDriver.CreateNetwork", {"NetworkID": "x", "IPv4Data": [{"Pool": "300.1.1.0/24"}]},
         "300.1.1.0/24"),
        ("netd-bridge", "NetworkDriver.CreateEndpoint", {"NetworkID": "x", "EndpointID": ["y"]}, "EndpointID must be"),
        ("netd", "IpamDriver.RequestPool", {"Pool": "10.0.0.0/33"}, "10.0.0.0/33"),
        ("netd", "IpamDriver.RequestAddress", {"PoolID": "nosuch"}, "no address pool"),
    ]:
        status, reply = post(plugin, call, body)
        assert status in (400, 404) and message in reply["Err"], (call, reply)


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


# --- the Engine API -------------------------------------------------------------------------

def shape(value):
    """Keys and types, not values."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


def test_a_network_looks_the_same_from_netd_and_from_dockerd(dk):
    name = unique("cmp")
    body = {"Name": name, "Driver": "bridge", "CheckDuplicate": True, "Labels": {"team": "blue"},
            "IPAM": {"Driver": "default", "Config": [{"Subnet": "10.90.11.0/24", "Gateway": "10.90.11.1"}]},
            "Options": {"com.docker.network.bridge.enable_ip_masquerade": "true"}}
    netd = DockerAPI(dk.netd.socket)
    try:
        docker_net = dk.dockerd.api.request("POST", "/networks/create", body)
        netd_net = netd.request("POST", "/networks/create", {**body, "IPAM": {
            **body["IPAM"], "Config": [{"Subnet": "10.90.12.0/24", "Gateway": "10.90.12.1"}]}})
        assert shape(netd_net) == shape(docker_net)
        theirs = dk.dockerd.api.request("GET", f"/networks/{name}")
        ours = netd.request("GET", f"/networks/{name}")
        ours.pop("Netd")    # netd's own detail, beside Docker's keys
        assert shape(ours) == shape(theirs)
        for key in ("Name", "Scope", "Driver", "EnableIPv6", "Internal", "Attachable", "Ingress", "ConfigOnly",
                    "ConfigFrom", "Options", "Labels"):
            assert ours[key] == theirs[key], key
        listed_theirs = [n for n in dk.dockerd.api.request("GET", "/networks") if n["Name"] == name]
        listed_ours = [n for n in netd.request("GET", "/networks") if n["Name"] == name]
        assert shape(listed_ours) == shape(listed_theirs)
    finally:
        with contextlib.suppress(Exception):
            dk.dockerd.api.request("DELETE", f"/networks/{name}", expect=(204, 404))
        with contextlib.suppress(Exception):
            netd.request("DELETE", f"/networks/{name}", expect=(204, 404))
        netd.close()
