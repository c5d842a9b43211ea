"""Single-host container networking, as Docker's docs show it, through netd's CLI.

Each test runs containers on a real daemon in its own host namespace (see conftest) and checks
from inside the containers: pings that answer, names that resolve, ports that serve.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile

import pytest

from tests.support.hosts import OUTSIDE_ADDRESS, UPLINK_HOST


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(2)}"


def sleeper(host, name: str, *options: str) -> str:
    return host.netd("run", "-d", "--name", name, *options, "sleep", "1000")


def pings(host, container: str, target: str) -> bool:
    return host.cli("exec", container, "ping", "-c1", "-W1", target, check=False).returncode == 0


# --- default networks -----------------------------------------------------------------------

def test_default_networks_exist_from_the_first_start(host):
    networks = {n["Name"]: n for n in json.loads(host.netd("network", "ls", "--format", "json"))}
    assert {"bridge", "host", "none"} <= set(networks)
    assert networks["bridge"]["Driver"] == "bridge" and networks["host"]["Driver"] == "host"
    assert networks["none"]["Driver"] == "null"
    [bridge] = json.loads(host.netd("network", "inspect", "bridge"))
    assert bridge["IPAM"]["Config"][0] == {"Subnet": "172.17.0.0/16", "Gateway": "172.17.0.1"}
    assert "172.17.0.1/16" in host.sh("ip -4 addr show netd0").stdout


def test_default_bridge_gives_outbound_but_no_names(host):
    a, b = unique("defa"), unique("defb")
    sleeper(host, a)
    sleeper(host, b)
    try:
        assert host.address(a).startswith("172.17.")
        assert pings(host, a, host.address(b))
        assert pings(host, a, OUTSIDE_ADDRESS)
        assert not pings(host, a, b), "the default bridge network does not resolve names (as Docker)"
    finally:
        host.netd("rm", "-f", a, b)


# --- user-defined bridge networks -----------------------------------------------------------

def test_user_defined_bridge_names_aliases_and_nat(host):
    net, a, b = unique("web"), unique("alpha"), unique("beta")
    host.netd("network", "create", "--subnet", "172.30.5.0/24", net)
    try:
        sleeper(host, a, "--network", net)
        sleeper(host, b, "--network", net, "--alias", "db")
        assert host.address(a) == "172.30.5.2" and host.address(b) == "172.30.5.3"
        assert pings(host, a, b), "containers on a user-defined network reach each other by name"
        assert pings(host, a, "db"), "and by alias"
        assert pings(host, b, f"{a}.{net}"), "and by name.network"
        assert pings(host, a, OUTSIDE_ADDRESS), "the outside is reached through NAT"
        hosts_file = host.netd("exec", a, "cat", "/etc/hosts")
        assert f"172.30.5.2\t{host.inspect(a)['Config']['Hostname']}" in hosts_file
        assert host.netd("exec", a, "cat", "/etc/resolv.conf").startswith("nameserver 127.0.0.11")
        assert host.netd("exec", a, "cat", "/etc/hostname") == host.inspect(a)["Config"]["Hostname"]
    finally:
        host.netd("rm", "-f", a, b)
        host.netd("network", "rm", net)
    assert net not in host.netd("network", "ls")


def test_inspect_uses_docker_field_names(host):
    net, a = unique("insp"), unique("ia")
    host.netd("network", "create", "--subnet", "172.30.6.0/24", "--gateway", "172.30.6.254",
              "--ip-range", "172.30.6.128/25", "--aux-address", "router=172.30.6.200", "--label", "team=net", net)
    try:
        sleeper(host, a, "--network", net)
        [info] = json.loads(host.netd("network", "inspect", net))
        assert info["Name"] == net and len(info["Id"]) == 64 and info["Scope"] == "local"
        assert info["Driver"] == "bridge" and info["Internal"] is False and info["Labels"] == {"team": "net"}
        assert info["IPAM"]["Config"] == [{"Subnet": "172.30.6.0/24", "Gateway": "172.30.6.254",
                                           "IPRange": "172.30.6.128/25",
                                           "AuxiliaryAddresses": {"router": "172.30.6.200"}}]
        [(cid, endpoint)] = info["Containers"].items()
        assert endpoint["Name"] == a and endpoint["IPv4Address"] == "172.30.6.128/24"
        assert endpoint["MacAddress"] == "02:42:ac:1e:06:80"
        assert cid == host.inspect(a)["Id"]
    finally:
        host.netd("rm", "-f", a)
        host.netd("network", "rm", net)


def test_static_ip_and_isolation_between_bridges(host):
    net1, net2, a, b = unique("iso1"), unique("iso2"), unique("ia"), unique("ib")
    host.netd("network", "create", "--subnet", "172.30.7.0/24", net1)
    host.netd("network", "create", "--subnet", "172.30.8.0/24", net2)
    try:
        sleeper(host, a, "--network", net1, "--ip", "172.30.7.77")
        sleeper(host, b, "--network", net2)
        assert host.address(a) == "172.30.7.77"
        assert not pings(host, b, "172.30.7.77"), "two bridge networks cannot reach each other"
        assert not pings(host, a, host.address(b))
        assert pings(host, a, OUTSIDE_ADDRESS) and pings(host, b, OUTSIDE_ADDRESS)
    finally:
        host.netd("rm", "-f", a, b)
        host.netd("network", "rm", net1, net2)


def test_connect_gives_a_second_interface_and_disconnect_removes_it(host):
    net1, net2, a, b, c = unique("two1"), unique("two2"), unique("ca"), unique("cb"), unique("cc")
    host.netd("network", "create", "--subnet", "172.30.9.0/24", net1)
    host.netd("network", "create", "--subnet", "172.30.10.0/24", net2)
    try:
        sleeper(host, a, "--network", net1)
        sleeper(host, b, "--network", net2)
        sleeper(host, c, "--network", net1)
        host.netd("network", "connect", "--alias", "bridgehead", net2, a)
        links = host.netd("exec", a, "ip", "-o", "-4", "addr")
        assert "eth0" in links and "172.30.9." in links and "eth1" in links and "172.30.10." in links
        assert pings(host, a, b) and pings(host, b, "bridgehead")
        assert not pings(host, c, b)
        message = host.fails("network", "connect", net2, a)
        assert f"already connected to network {net2}" in message
        host.netd("network", "disconnect", net2, a)
        assert "eth1" not in host.netd("exec", a, "ip", "-o", "link")
        assert not pings(host, a, b)
        assert pings(host, a, OUTSIDE_ADDRESS), "the default route stays"
    finally:
        host.netd("rm", "-f", a, b, c)
        host.netd("network", "rm", net1, net2)


def test_internal_network_has_no_way_out(host):
    net, a, b = unique("int"), unique("ia"), unique("ib")
    host.netd("network", "create", "--internal", "--subnet", "172.30.11.0/24", net)
    try:
        sleeper(host, a, "--network", net)
        sleeper(host, b, "--network", net)
        assert pings(host, a, b)
        assert not pings(host, a, OUTSIDE_ADDRESS)
        assert "default" not in host.netd("exec", a, "ip", "route")
    finally:
        host.netd("rm", "-f", a, b)
        host.netd("network", "rm", net)


# --- published ports ------------------------------------------------------------------------

@pytest.fixture
def web_root():
    with tempfile.TemporaryDirectory(prefix="netd-www-") as root:
        with open(os.path.join(root, "index.html"), "w") as f:
            f.write("hello from netd\n")
        yield root


def test_published_port_from_outside_from_the_host_and_from_another_container(host, web_root):
    net, web, client = unique("pub"), unique("web"), unique("cl")
    host.netd("network", "create", "--subnet", "172.30.12.0/24", net)
    try:
        host.netd("run", "-d", "--name", web, "--network", net, "-p", "8080:80",
                  "busybox", "httpd", "-f", "-p", "80", "-h", web_root)
        sleeper(host, client)
        assert host.netd("port", web) == "80/tcp -> 0.0.0.0:8080"
        url = f"http://{UPLINK_HOST}:8080/"
        assert host.outside_sh(f"curl -s --max-time 5 {url}").stdout == "hello from netd\n"
        assert host.sh(f"curl -s --max-time 5 {url}").stdout == "hello from netd\n"
        assert host.sh("curl -s --max-time 5 http://127.0.0.1:8080/").stdout == "hello from netd\n"
        assert host.netd("exec", client, "curl", "-s", "--max-time", "5", url) == "hello from netd"
        assert host.netd("exec", web, "curl", "-s", "--max-time", "5", url) == "hello from netd", "hairpin"
        message = host.fails("run", "-d", "--network", net, "-p", "8080:80", "sleep", "1")
        assert "port 8080/tcp is already published by container " + web in message
    finally:
        host.netd("rm", "-f", web, client)
        host.netd("network", "rm", net)
    assert host.outside_sh(f"curl -s --max-time 2 http://{UPLINK_HOST}:8080/", check=False).returncode != 0


UDP_SERVER = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('', 7000)); "
              "print(s.recv(100).decode(), flush=True)")


def test_publish_all_uses_random_host_ports_and_udp_works(host):
    net, srv = unique("pall"), unique("srv")
    host.netd("network", "create", net)
    try:
        host.netd("run", "-d", "--name", srv, "--network", net, "--expose", "7000/udp", "-P",
                  "python3", "-c", UDP_SERVER)
        [line] = host.netd("port", srv).splitlines()
        spec, binding = line.split(" -> ")
        port = int(binding.rsplit(":", 1)[1])
        assert spec == "7000/udp" and 1024 < port < 65536
        send = f"import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'ping-udp', ('{UPLINK_HOST}', {port}))"
        for _ in range(50):   # until the server is up
            host.outside_sh(f'python3 -c "{send}"')
            if "ping-udp" in host.netd("logs", srv):
                break
        assert "ping-udp" in host.netd("logs", srv)
    finally:
        host.netd("rm", "-f", srv)
        host.netd("network", "rm", net)


# --- host, none, container: modes -----------------------------------------------------------

def test_host_mode_sees_the_hosts_interfaces(host):
    links = host.netd("run", "--rm", "--network", "host", "ip", "-o", "link")
    assert "uplink" in links and "netd0" in links


def test_none_mode_has_only_loopback(host):
    links = host.netd("run", "--rm", "--network", "none", "ip", "-o", "link").splitlines()
    assert len(links) == 1 and ": lo:" in links[0]


def test_container_mode_shares_the_namespace(host):
    server, net = unique("srv"), unique("cm")
    host.netd("network", "create", net)
    try:
        host.netd("run", "-d", "--name", server, "--network", net, "busybox", "httpd", "-f", "-p", "127.0.0.1:9000",
                  "-h", "/etc")
        out = host.netd("run", "--rm", "--network", f"container:{server}", "curl", "-s", "--max-time", "5",
                        "http://127.0.0.1:9000/hostname")
        assert out == host.inspect(server)["Config"]["Hostname"]
        host.netd("stop", "-t", "0", server)
        message = host.fails("run", "--rm", "--network", f"container:{server}", "true")
        assert f"cannot join the network namespace of container {server}: it is not running" in message
    finally:
        host.netd("rm", "-f", server)
        host.netd("network", "rm", net)


# --- the runtime ----------------------------------------------------------------------------

def test_foreground_run_prints_output_and_exits_with_the_code(host):
    result = host.cli("run", "--rm", "sh", "-c", "echo out; echo err >&2; exit 7", check=False)
    assert result.returncode == 7
    assert "out\n" in result.stdout and "err\n" in result.stdout


def test_rootfs_hostname_pid_namespace_logs_exec_and_rm(host, busybox_rootfs):
    name = unique("bb")
    cid = host.netd("run", "-d", "--name", name, "--hostname", "box", "--rootfs", busybox_rootfs,
                    "sh", "-c", "echo started as $$ on $(hostname); sleep 1000")
    try:
        assert len(cid) == 64
        assert host.netd("logs", name) == "started as 1 on box"
        assert host.netd("exec", name, "ls", "/") .split() == sorted(os.listdir(busybox_rootfs))
        ps = host.netd("ps")
        assert name in ps and "Up" in ps
        address = host.address(name)
        pools = json.loads(host.netd("ipam", "inspect", "bridge", "--format", "json"))
        assert address in [a["Address"] for a in pools]
    finally:
        host.netd("rm", "-f", name)
    assert name not in host.netd("ps", "-a")
    pools = json.loads(host.netd("ipam", "inspect", "bridge", "--format", "json"))
    assert address not in [a["Address"] for a in pools], "rm -f frees the address"


def test_exited_containers_stay_listed_until_removed(host):
    name = unique("done")
    host.cli("run", "--name", name, "sh", "-c", "exit 3", check=False)
    listed = host.netd("ps", "-a")
    assert name in listed and "Exited (3)" in listed
    assert name not in host.netd("ps")
    host.netd("rm", name)
    assert name not in host.netd("ps", "-a")


def test_prune_removes_only_unused_user_networks(host):
    used, unused, name = unique("used"), unique("unused"), unique("pr")
    host.netd("network", "create", used)
    host.netd("network", "create", unused)
    try:
        sleeper(host, name, "--network", used)
        out = host.netd("network", "prune")
        assert unused in out and used not in out
        names = host.netd("network", "ls")
        assert used in names and unused not in names and "bridge" in names
    finally:
        host.netd("rm", "-f", name)
        host.netd("network", "rm", used)


def test_stop_ends_a_container_and_keeps_its_record(host):
    name = unique("st")
    sleeper(host, name)
    address = host.address(name)
    assert host.netd("stop", "-t", "1", name) == name
    state = host.inspect(name)["State"]
    assert state["Status"] == "exited" and state["ExitCode"] == 137   # SIGKILL after the timeout
    assert host.inspect(name)["NetworkSettings"]["Networks"] == {}, "its address is given back"
    assert address not in host.netd("ipam", "inspect", "bridge")
    host.netd("rm", name)
