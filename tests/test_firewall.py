"""netd.kernel.firewall against real nftables, in private network namespaces, proved with real traffic.

Each test builds its own lab (all names unique, everything removed even when the test fails):

    outside (203.0.113.1) ── uplink ── host (203.0.113.2, routes, runs the Firewall)
                                        ├─ bridge A 10.77.1.1/24: c1 10.77.1.2, c2 10.77.1.3
                                        ├─ bridge B 10.77.2.1/24: c3 10.77.2.2
                                        └─ bridge I 10.77.3.1/24 (internal): c4 10.77.3.2

"outside" has no route to the containers' subnets, so a container reaches it only through NAT.
br_netfilter is built into this kernel and on in every new namespace, so bridged traffic passes
the forward hook too, as on a Docker host.

The Firewall is made inside the host namespace (libnftables binds its netlink socket to the
namespace of the thread that creates its context); it then works from any thread. TCP servers and
clients are sockets opened inside the namespaces from this process (a socket stays in the
namespace it was made in); pings run under `ip netns exec`.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import secrets
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest

import netd.kernel.firewall as firewall_module
from netd.contract.errors import BadRequest, Conflict, NotFound
from netd.kernel.firewall import Firewall
from netd.kernel.firewall_elements import PublishedPort
from runtime.namespaces import entered_netns

HOST_UPLINK = "203.0.113.2"
OUTSIDE = "203.0.113.1"
NET_A, NET_B, NET_I = "a" * 12 + "1" * 52, "b" * 12 + "2" * 52, "c" * 12 + "3" * 52
CONTAINERS = {  # name: (bridge, address, gateway)
    "c1": ("brA", "10.77.1.2", "10.77.1.1"),
    "c2": ("brA", "10.77.1.3", "10.77.1.1"),
    "c3": ("brB", "10.77.2.2", "10.77.2.1"),
    "c4": ("brI", "10.77.3.2", "10.77.3.1"),
}
BRIDGES = {"brA": "10.77.1.1/24", "brB": "10.77.2.1/24", "brI": "10.77.3.1/24"}

pytestmark = pytest.mark.timeout(120)


def run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {result.stderr.strip() or result.stdout.strip()}")
    return result


class Lab:
    def __init__(self) -> None:
        self.prefix = f"netd-fw-{secrets.token_hex(3)}"
        self.names: list[str] = []
        self.servers: list[socket.socket] = []
        self.firewall: Firewall | None = None

    # --- building and removing --------------------------------------------------------------

    def ns(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    def path(self, role: str) -> str:
        return f"/run/netns/{self.ns(role)}"

    def sh(self, role: str, command: str, check: bool = True) -> subprocess.CompletedProcess:
        return run(["ip", "netns", "exec", self.ns(role), "sh", "-c", command], check=check)

    def build(self) -> None:
        for role in ("host", "out", *CONTAINERS):
            run(["ip", "netns", "add", self.ns(role)])
            self.names.append(self.ns(role))
            self.sh(role, "ip link set lo up")
        self.sh("host", f"""
            sysctl -qw net.ipv4.ip_forward=1
            ip link add up0 type veth peer name eth0 netns {self.ns('out')}
            ip addr add {HOST_UPLINK}/24 dev up0 && ip link set up0 up
            ip route add default via {OUTSIDE}
        """)
        self.sh("out", f"ip addr add {OUTSIDE}/24 dev eth0 && ip link set eth0 up")
        for bridge, address in BRIDGES.items():
            self.sh("host", f"ip link add {bridge} type bridge && ip addr add {address} dev {bridge} "
                            f"&& ip link set {bridge} up")
        for name, (bridge, address, gateway) in CONTAINERS.items():
            # Hairpin mode on the bridge port, as the bridge driver sets it (and Docker without its
            # userland proxy): with br_netfilter a container's packet to its own published port is
            # bridged straight back out of the port it came in by.
            self.sh("host", f"ip link add v{name} master {bridge} type veth peer name eth0 netns {self.ns(name)} "
                            f"&& ip link set v{name} type bridge_slave hairpin on && ip link set v{name} up")
            self.sh(name, f"ip addr add {address}/24 dev eth0 && ip link set eth0 up "
                          f"&& ip route add default via {gateway}")

    def make_firewall(self) -> Firewall:
        """A Firewall of the host namespace (made there, used from anywhere)."""
        with entered_netns(self.path("host")):
            firewall = Firewall()
        self.firewall = self.firewall or firewall
        return firewall

    def add_networks(self, firewall: Firewall) -> None:
        firewall.add_network(NET_A, "brA", "10.77.1.0/24", internal=False)
        firewall.add_network(NET_B, "brB", "10.77.2.0/24", internal=False)
        firewall.add_network(NET_I, "brI", "10.77.3.0/24", internal=True)

    def cleanup(self) -> None:
        for server in self.servers:
            with contextlib.suppress(OSError):
                server.close()
        if self.firewall is not None:
            self.firewall.close()
            self.firewall = None
        gc.collect()  # frees libnftables contexts (their sockets keep a namespace alive)
        for name in self.names:
            run(["ip", "netns", "del", name], check=False)

    # --- traffic ----------------------------------------------------------------------------

    def serve(self, role: str, port: int, label: str, proto: str = "tcp") -> None:
        """A server in `role` that answers every connection (or datagram) with
        "<label> <the peer's address>", so a test sees who reached whom and with which source."""
        kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        with entered_netns(self.path(role)):
            server = socket.socket(socket.AF_INET, kind)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("0.0.0.0", port))
        if proto == "tcp":
            server.listen(16)
        self.servers.append(server)

        def answer_tcp() -> None:
            while True:
                try:
                    conn, peer = server.accept()
                except OSError:
                    return
                with conn:
                    conn.sendall(f"{label} {peer[0]}".encode())

        def answer_udp() -> None:
            while True:
                try:
                    _, peer = server.recvfrom(512)
                    server.sendto(f"{label} {peer[0]}".encode(), peer)
                except OSError:
                    return

        threading.Thread(target=answer_tcp if proto == "tcp" else answer_udp, daemon=True).start()

    def ask(self, role: str, address: str, port: int, proto: str = "tcp", timeout: float = 1.5) -> str | None:
        """Connect from `role` to address:port; the server's answer, or None if nothing came."""
        kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        with entered_netns(self.path(role)):
            client = socket.socket(socket.AF_INET, kind)
        with client:
            client.settimeout(timeout)
            try:
                if proto == "tcp":
                    client.connect((address, port))
                    return client.recv(512).decode()
                client.sendto(b"?", (address, port))
                return client.recvfrom(512)[0].decode()
            except OSError:
                return None

    def pings(self, role: str, address: str) -> bool:
        return self.sh(role, f"ping -c1 -W1 {address}", check=False).returncode == 0

    def nft(self, command: str, check: bool = True) -> str:
        return self.sh("host", f"nft {command}", check=check).stdout

    def iptables_save(self) -> str:
        return self.sh("host", "iptables -S").stdout

    def imitate_docker(self) -> None:
        """What dockerd does to the filter table (iptables-nft), in the lab's host namespace."""
        self.sh("host", "iptables -N DOCKER-USER && iptables -A DOCKER-USER -j RETURN "
                        "&& iptables -I FORWARD -j DOCKER-USER && iptables -P FORWARD DROP")


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = Lab()
    try:
        lab.build()
        yield lab
    finally:
        lab.cleanup()


@pytest.fixture
def firewall(lab: Lab) -> Firewall:
    firewall = lab.make_firewall()
    firewall.setup()
    lab.add_networks(firewall)
    return firewall


# --- NAT and published ports ---------------------------------------------------------------------


def test_outbound_traffic_is_masqueraded(lab: Lab, firewall: Firewall):
    lab.serve("out", 7000, "outside")
    assert lab.ask("c1", OUTSIDE, 7000) == f"outside {HOST_UPLINK}", "seen from outside as the host"
    assert lab.pings("c3", OUTSIDE)


def test_without_masquerade_the_container_address_leaves_unchanged(lab: Lab, firewall: Firewall):
    firewall.add_network(NET_A, "brA", "10.77.1.0/24", internal=False, masquerade=False)
    lab.serve("out", 7000, "outside")
    assert lab.ask("c1", OUTSIDE, 7000) is None, "outside has no route back to 10.77.1.2"
    lab.sh("out", f"ip route add 10.77.0.0/16 via {HOST_UPLINK}")
    assert lab.ask("c1", OUTSIDE, 7000) == "outside 10.77.1.2"


@pytest.mark.parametrize("br_netfilter", [True, False], ids=["br_netfilter", "no-br_netfilter"])
def test_published_port_from_outside_host_loopback_and_containers(lab: Lab, firewall: Firewall, br_netfilter: bool):
    lab.sh("host", f"sysctl -qw net.bridge.bridge-nf-call-iptables={int(br_netfilter)}")
    lab.serve("c1", 80, "c1")
    firewall.add_port(NET_A, "10.77.1.2", "tcp", None, 8080, 80, "brA")
    assert lab.ask("out", HOST_UPLINK, 8080) == f"c1 {OUTSIDE}", "from outside, the client's address is kept"
    assert lab.ask("host", HOST_UPLINK, 8080) == f"c1 {HOST_UPLINK}", "from the host, by its own address"
    assert lab.ask("host", "127.0.0.1", 8080) == "c1 10.77.1.1", "from the host's 127.0.0.1 (masqueraded)"
    assert lab.ask("host", "10.77.1.1", 8080) is not None, "by the bridge's address"
    # Hairpin: containers of the same network, c1 itself included, by a host address. Through
    # br_netfilter the packet is bridged back and the answer un-NATed on the bridge, so c2 is seen
    # as itself; routed, it is masqueraded so that the answer comes back through the host.
    assert lab.ask("c2", HOST_UPLINK, 8080) == ("c1 10.77.1.3" if br_netfilter else "c1 10.77.1.1")
    assert lab.ask("c1", HOST_UPLINK, 8080) == "c1 10.77.1.1"
    assert lab.ask("c1", "10.77.1.1", 8080) == "c1 10.77.1.1"
    # Another network reaches it as the outside does (Docker's userland proxy allows that too),
    # masqueraded since it leaves its own bridge (Docker: -s SUBNET ! -o BRIDGE).
    assert lab.ask("c3", HOST_UPLINK, 8080) == "c1 10.77.1.1"
    assert lab.ask("c4", HOST_UPLINK, 8080) is None, "not from an internal network"
    # Unpublished: gone for everyone.
    firewall.remove_port("tcp", None, 8080)
    assert lab.ask("out", HOST_UPLINK, 8080) is None
    assert lab.ask("host", "127.0.0.1", 8080) is None


def test_published_port_on_one_host_address_and_udp(lab: Lab, firewall: Firewall):
    lab.serve("c3", 53, "dns", proto="udp")
    lab.serve("c3", 80, "web")
    firewall.add_port(NET_B, "10.77.2.2", "udp", None, 5353, 53, "brB")
    firewall.add_port(NET_B, "10.77.2.2", "tcp", "127.0.0.1", 8081, 80, "brB")
    assert lab.ask("out", HOST_UPLINK, 5353, proto="udp") == f"dns {OUTSIDE}"
    assert lab.ask("host", "127.0.0.1", 8081) == "web 10.77.2.1"
    assert lab.ask("out", HOST_UPLINK, 8081) is None, "published on 127.0.0.1 only"
    assert lab.ask("host", HOST_UPLINK, 8081) is None


def test_port_conflicts_and_bad_ports(lab: Lab, firewall: Firewall):
    firewall.add_port(NET_A, "10.77.1.2", "tcp", None, 8080, 80, "brA")
    firewall.add_port(NET_A, "10.77.1.2", "tcp", "0.0.0.0", 8080, 80, "brA")   # the same: a no-op
    with pytest.raises(Conflict, match="8080/tcp is already published"):
        firewall.add_port(NET_A, "10.77.1.3", "tcp", None, 8080, 80, "brA")
    with pytest.raises(Conflict):
        firewall.add_port(NET_A, "10.77.1.3", "tcp", "127.0.0.1", 8080, 80, "brA")  # inside every address
    firewall.add_port(NET_A, "10.77.1.3", "udp", None, 8080, 80, "brA")             # another protocol
    firewall.add_port(NET_A, "10.77.1.3", "tcp", "127.0.0.1", 9090, 80, "brA")
    with pytest.raises(Conflict):
        firewall.add_port(NET_A, "10.77.1.2", "tcp", None, 9090, 80, "brA")
    with pytest.raises(BadRequest):
        firewall.add_port(NET_I, "10.77.3.2", "tcp", None, 7070, 80, "brI")          # internal
    with pytest.raises(BadRequest):
        firewall.add_port(NET_A, "10.77.1.2", "icmp", None, 7070, 80, "brA")
    with pytest.raises(BadRequest):
        firewall.add_port(NET_A, "10.77.1.2", "tcp", None, 0, 80, "brA")
    with pytest.raises(BadRequest):
        firewall.add_port(NET_A, "10.77.1.2", "tcp", "::1", 7070, 80, "brA")
    with pytest.raises(NotFound):
        firewall.add_port("f" * 64, "10.77.1.2", "tcp", None, 7070, 80, "brA")
    assert firewall.published_ports() == [
        PublishedPort("tcp", None, 8080, "10.77.1.2", 80, NET_A),
        PublishedPort("tcp", "127.0.0.1", 9090, "10.77.1.3", 80, NET_A),
        PublishedPort("udp", None, 8080, "10.77.1.3", 80, NET_A),
    ]
    firewall.remove_port("tcp", "127.0.0.1", 9090)
    firewall.remove_port("tcp", "127.0.0.1", 9090)   # not published any more: a no-op
    assert len(firewall.published_ports()) == 2


# --- isolation and internal networks -------------------------------------------------------------


def test_bridge_networks_are_isolated_from_each_other(lab: Lab):
    lab.serve("c1", 80, "c1")
    lab.serve("c3", 80, "c3")
    assert lab.pings("c1", "10.77.2.2"), "without netd the host routes between the bridges"
    firewall = lab.make_firewall()
    firewall.setup()
    lab.add_networks(firewall)
    assert not lab.pings("c1", "10.77.2.2")
    assert not lab.pings("c3", "10.77.1.2")
    assert lab.ask("c3", "10.77.1.2", 80) is None
    assert lab.ask("c1", "10.77.2.2", 80) is None
    assert lab.pings("c1", "10.77.1.3"), "within a bridge all is allowed (through br_netfilter)"
    assert lab.ask("c2", "10.77.1.2", 80) == "c1 10.77.1.3"
    assert lab.ask("host", "10.77.2.2", 80) == "c3 10.77.2.1", "the host itself reaches its containers"


def test_unsolicited_traffic_from_outside_does_not_reach_containers(lab: Lab, firewall: Firewall):
    lab.serve("c1", 80, "c1")
    lab.sh("out", f"ip route add 10.77.0.0/16 via {HOST_UPLINK}")
    assert lab.ask("out", "10.77.1.2", 80) is None
    assert not lab.pings("out", "10.77.1.2")
    lab.serve("out", 7000, "outside")
    assert lab.ask("c1", OUTSIDE, 7000) == f"outside {HOST_UPLINK}", "replies do come in"


def test_internal_network_has_no_way_in_or_out(lab: Lab, firewall: Firewall):
    lab.serve("c4", 80, "c4")
    lab.serve("out", 7000, "outside")
    assert not lab.pings("c4", OUTSIDE)
    assert lab.ask("c4", OUTSIDE, 7000) is None
    assert not lab.pings("c4", "10.77.1.2")
    assert not lab.pings("c1", "10.77.3.2")
    assert lab.ask("c1", "10.77.3.2", 80) is None
    lab.sh("out", f"ip route add 10.77.0.0/16 via {HOST_UPLINK}")
    assert lab.ask("out", "10.77.3.2", 80) is None
    assert lab.pings("c4", "10.77.3.1"), "the bridge (the host) itself stays reachable, as with Docker"


def test_containers_cannot_reach_the_hosts_loopback_services(lab: Lab, firewall: Firewall):
    """route_localnet is on for netd's bridges (published 127.0.0.1 ports need it); without the
    guard a container could reach the host's 127.0.0.1-only services (CVE-2020-8558)."""
    firewall.add_port(NET_A, "10.77.1.2", "tcp", None, 8080, 80, "brA")
    assert lab.sh("host", "sysctl -n net.ipv4.conf.brA.route_localnet").stdout.strip() == "1"
    assert lab.sh("host", "sysctl -n net.ipv4.conf.up0.route_localnet").stdout.strip() == "0"
    with entered_netns(lab.path("host")):
        loopback_only = socket.socket()
    lab.servers.append(loopback_only)
    loopback_only.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    loopback_only.bind(("127.0.0.1", 9999))
    loopback_only.listen(4)
    # The attacker's route: 127.0.0.0/8 through its gateway instead of its own loopback.
    lab.sh("c1", "ip addr flush dev lo && ip route add 127.0.0.0/8 via 10.77.1.1 "
                 "&& sysctl -qw net.ipv4.conf.eth0.route_localnet=1")

    def attack() -> int:
        with entered_netns(lab.path("c1")):
            probe = socket.socket()
        with probe:
            probe.settimeout(1.5)
            return probe.connect_ex(("127.0.0.1", 9999))

    assert attack() == errno.EAGAIN, "the guard drops it (no answer at all)"
    lab.nft(f"flush chain ip {firewall.table} localnet_guard")
    assert attack() == 0, "without the guard the attack works: the test can tell"


# --- lifecycle: idempotence, restart, removal -----------------------------------------------------


def test_setup_twice_and_adding_again_change_nothing(lab: Lab, firewall: Firewall):
    firewall.add_port(NET_A, "10.77.1.2", "tcp", None, 8080, 80, "brA")
    before = lab.nft("list table ip netd")
    firewall.setup()
    lab.add_networks(firewall)
    firewall.add_port(NET_A, "10.77.1.2", "tcp", None, 8080, 80, "brA")
    assert lab.nft("list table ip netd") == before
    assert before.count("fib daddr type local jump published_ports") == 2


def test_a_restarted_daemon_finds_what_is_installed(lab: Lab, firewall: Firewall):
    lab.serve("c1", 80, "c1")
    firewall.add_port(NET_A, "10.77.1.2", "tcp", None, 8080, 80, "brA")
    firewall.add_port(NET_A, "10.77.1.2", "udp", "127.0.0.1", 5353, 53, "brA")
    before = lab.nft("list table ip netd")
    restarted = lab.make_firewall()          # a new daemon: no memory of its own
    restarted.setup()
    try:
        assert restarted.published_ports() == firewall.published_ports()
        assert restarted.networks() == firewall.networks()
        assert {(n.bridge, n.internal, n.masquerade, n.subnet) for n in restarted.networks()} == {
            ("brA", False, True, "10.77.1.0/24"), ("brB", False, True, "10.77.2.0/24"),
            ("brI", True, False, "10.77.3.0/24")}
        lab.add_networks(restarted)              # what the bridge driver's restore() does
        restarted.add_port(NET_A, "10.77.1.2", "tcp", None, 8080, 80, "brA")
        assert lab.nft("list table ip netd") == before
        assert lab.ask("out", HOST_UPLINK, 8080) == f"c1 {OUTSIDE}"
        restarted.remove_network(NET_B)
        assert "brB" not in lab.nft("list table ip netd")
    finally:
        restarted.close()


def test_setup_after_a_crash_replaces_a_broken_table(lab: Lab):
    """A table left by something else under netd's name (another layout): setup starts afresh."""
    lab.nft("add table ip netd")
    lab.nft("add set ip netd bridges '{ type ipv4_addr; }'")
    lab.nft("add chain ip netd forward '{ type filter hook forward priority 0; policy accept; }'")
    lab.nft("add rule ip netd forward drop")
    firewall = lab.make_firewall()
    firewall.setup()
    fresh = lab.nft("list table ip netd")
    bridges = fresh[fresh.index("set bridges {"):].split("}", 1)[0]
    assert "type ifname" in bridges and "type ipv4_addr" not in bridges and "\t\tdrop\n" not in fresh
    lab.add_networks(firewall)
    assert lab.pings("c1", "10.77.1.3")
    assert lab.pings("c1", OUTSIDE)


def test_setup_upgrades_an_older_table_in_place(lab: Lab, firewall: Firewall):
    """Objects an older netd left in its table go; networks and ports stay, and keep working."""
    firewall.add_port(NET_A, "10.77.1.2", "tcp", None, 8080, 80, "brA")
    current = lab.nft("list table ip netd")
    lab.nft("add map ip netd bridge_forward '{ type ifname : verdict; }'")
    lab.nft("add chain ip netd net-aaaaaaaaaaaa-forward")
    lab.nft("add rule ip netd net-aaaaaaaaaaaa-forward oifname brA accept")
    lab.nft("add element ip netd bridge_forward '{ \"brA\" : jump net-aaaaaaaaaaaa-forward }'")
    lab.nft("add rule ip netd forward iifname vmap @bridge_forward")
    restarted = lab.make_firewall()
    try:
        restarted.setup()
        assert lab.nft("list table ip netd") == current
        assert restarted.published_ports() == firewall.published_ports()
    finally:
        restarted.close()
    lab.serve("c1", 80, "c1")
    assert lab.ask("out", HOST_UPLINK, 8080) == f"c1 {OUTSIDE}"


def test_remove_network_removes_exactly_its_rules(lab: Lab, firewall: Firewall):
    firewall.remove_network(NET_B)
    without_b = lab.nft("list table ip netd")
    firewall.add_network(NET_B, "brB", "10.77.2.0/24", internal=False)
    firewall.add_port(NET_B, "10.77.2.2", "tcp", None, 8080, 80, "brB")
    firewall.add_port(NET_A, "10.77.1.2", "tcp", None, 8081, 80, "brA")
    firewall.remove_port("tcp", None, 8081)
    assert "brB" in lab.nft("list table ip netd")
    firewall.remove_network(NET_B)                  # its published port goes with it
    assert lab.nft("list table ip netd") == without_b
    assert firewall.published_ports() == []
    firewall.remove_network(NET_B)                  # unknown now: a no-op
    assert lab.sh("host", "sysctl -n net.ipv4.conf.brB.route_localnet").stdout.strip() == "0"
    lab.serve("c3", 80, "c3")
    assert lab.pings("c1", "10.77.1.3") and not lab.pings("c1", "10.77.3.2")


def test_network_conflicts_and_replacement(lab: Lab, firewall: Firewall):
    with pytest.raises(Conflict):
        firewall.add_network("d" * 64, "brA", "10.88.0.0/24", internal=False)       # bridge in use
    with pytest.raises(Conflict):
        firewall.add_network("d" * 64, "brD", "10.77.1.128/25", internal=False)     # overlapping subnet
    with pytest.raises(BadRequest):
        firewall.add_network("d" * 64, "br+", "10.88.0.0/24", internal=False)
    with pytest.raises(BadRequest):
        firewall.add_network("d" * 64, "brD", "10.88.0.0/33", internal=False)
    # Adding a network again with other settings replaces its rules.
    firewall.add_network(NET_B, "brB", "10.77.2.0/24", internal=True)
    assert lab.nft("list set ip netd internal_bridges").count('"brB"') == 1
    assert '"brB"' not in lab.nft("list set ip netd masquerade_bridges")
    assert not lab.pings("c3", OUTSIDE)


def test_teardown_leaves_no_netd_table_and_nothing_else_touched(lab: Lab, firewall: Firewall):
    lab.nft("add table inet someone_else")
    lab.nft("add chain inet someone_else input '{ type filter hook input priority 0; policy accept; }'")
    lab.nft("add rule inet someone_else input tcp dport 22 accept")
    others = lab.nft("list table inet someone_else")
    firewall.add_port(NET_A, "10.77.1.2", "tcp", None, 8080, 80, "brA")
    firewall.teardown()
    assert "netd" not in lab.nft("list tables")
    assert lab.nft("list table inet someone_else") == others
    assert lab.sh("host", "sysctl -n net.ipv4.conf.brA.route_localnet").stdout.strip() == "0"
    assert firewall.networks() == [] and firewall.published_ports() == []
    firewall.teardown()                             # twice: harmless
    assert lab.pings("c1", "10.77.2.2"), "no netd rules: the host routes between bridges again"


# --- the host's firewall: Docker -----------------------------------------------------------------


def test_report_on_a_plain_host(lab: Lab):
    firewall = lab.make_firewall()
    report = firewall.setup()
    assert (report.forward_policy, report.docker_user_chain, report.br_netfilter) == ("accept", False, True)
    assert "ACCEPT" in report.summary()


def test_docker_host_netd_still_forwards_and_says_so(lab: Lab):
    lab.imitate_docker()
    lab.sh("host", "iptables -I DOCKER-USER -s 192.0.2.0/24 -j DROP")   # a rule of the host's admin
    lab.serve("c1", 80, "c1")
    lab.serve("out", 7000, "outside")
    assert not lab.pings("c1", "10.77.1.3"), "Docker's FORWARD DROP + br_netfilter break even a bridge"
    iptables_before = lab.iptables_save()

    firewall = lab.make_firewall()
    report = firewall.setup()
    lab.add_networks(firewall)
    firewall.add_port(NET_A, "10.77.1.2", "tcp", None, 8080, 80, "brA")
    assert (report.forward_policy, report.docker_user_chain, report.br_netfilter) == ("drop", True, True)
    assert report.forward_drop_chains == ["ip filter FORWARD"]
    assert "DROP" in report.summary() and "DOCKER-USER" in report.summary()
    assert "cannot" not in report.summary()

    assert lab.pings("c1", "10.77.1.3"), "within a bridge"
    assert lab.ask("c1", OUTSIDE, 7000) == f"outside {HOST_UPLINK}", "out, masqueraded"
    assert lab.ask("out", HOST_UPLINK, 8080) == f"c1 {OUTSIDE}", "a published port"
    assert lab.ask("c2", HOST_UPLINK, 8080) == "c1 10.77.1.3", "hairpin (through br_netfilter)"
    assert lab.ask("c1", HOST_UPLINK, 8080) == "c1 10.77.1.1", "hairpin to itself"
    assert not lab.pings("c1", "10.77.2.2"), "netd's isolation still holds"
    assert not lab.pings("c4", OUTSIDE), "internal still holds"

    rules = lab.sh("host", "iptables -S DOCKER-USER").stdout.splitlines()
    netd_rules = [r for r in rules if "--comment netd" in r]
    assert sorted(netd_rules) == sorted(
        f"-A DOCKER-USER -{d} {b} -m comment --comment netd -j ACCEPT" for b in ("brA", "brB", "brI") for d in "io")
    assert rules[-1] == "-A DOCKER-USER -j RETURN", "inserted before Docker's RETURN"
    assert "policy drop" in lab.nft("list chain ip filter FORWARD"), "the policy is left alone"

    firewall.remove_network(NET_B)
    assert "brB" not in lab.sh("host", "iptables -S DOCKER-USER").stdout
    firewall.setup()                                 # a restart: no duplicates
    assert lab.sh("host", "iptables -S DOCKER-USER").stdout.count("--comment netd") == 4

    firewall.teardown()
    assert lab.iptables_save() == iptables_before, "exactly netd's DOCKER-USER rules are gone"


def test_docker_on_iptables_legacy(lab: Lab, monkeypatch: pytest.MonkeyPatch):
    """A host whose iptables command is iptables-legacy: DOCKER-USER is not in nftables at all."""
    legacy = {"iptables": "iptables-legacy", "iptables-restore": "iptables-legacy-restore"}
    monkeypatch.setattr(firewall_module, "_find_command", lambda name: shutil.which(
        legacy.get(name, name), path="/usr/sbin:/sbin:/usr/bin:/bin"))
    lab.sh("host", "iptables-legacy -N DOCKER-USER && iptables-legacy -A DOCKER-USER -j RETURN "
                   "&& iptables-legacy -I FORWARD -j DOCKER-USER && iptables-legacy -P FORWARD DROP")
    before = lab.sh("host", "iptables-legacy -S").stdout
    firewall = lab.make_firewall()
    report = firewall.setup()
    lab.add_networks(firewall)
    assert (report.iptables, report.forward_policy, report.docker_user_chain) == ("legacy", "drop", True)
    assert report.forward_drop_chains == ["iptables-legacy filter FORWARD"]
    assert "cannot" not in report.summary()
    assert lab.pings("c1", "10.77.1.3") and lab.pings("c1", OUTSIDE)
    assert not lab.pings("c1", "10.77.2.2")
    assert lab.sh("host", "iptables-legacy -S DOCKER-USER").stdout.count("--comment netd") == 6
    firewall.teardown()
    assert lab.sh("host", "iptables-legacy -S").stdout == before


def test_docker_started_after_netd(lab: Lab, firewall: Firewall):
    assert lab.pings("c1", "10.77.1.3")
    lab.imitate_docker()
    assert not lab.pings("c1", "10.77.1.3"), "Docker just broke netd's bridges"
    assert firewall.report.docker_user_chain is False
    firewall.reconcile_docker_user()
    assert firewall.report.docker_user_chain is True and firewall.report.forward_policy == "drop"
    assert lab.pings("c1", "10.77.1.3")
    assert lab.pings("c1", OUTSIDE)
    # A firewall reload wiped DOCKER-USER: the next reconcile puts netd's rules back.
    lab.sh("host", "iptables -F DOCKER-USER && iptables -A DOCKER-USER -j RETURN")
    assert not lab.pings("c1", "10.77.1.3")
    firewall.reconcile_docker_user()
    assert lab.pings("c1", "10.77.1.3")
    firewall.reconcile_docker_user()                 # nothing changed: nothing added
    assert lab.sh("host", "iptables -S DOCKER-USER").stdout.count("--comment netd") == 6


def test_forward_drop_without_docker_user_is_reported(lab: Lab):
    lab.sh("host", "iptables -P FORWARD DROP")
    firewall = lab.make_firewall()
    report = firewall.setup()
    assert (report.forward_policy, report.docker_user_chain) == ("drop", False)
    assert "cannot forward" in report.summary() and "DOCKER-USER" in report.summary()
    lab.add_networks(firewall)
    assert "policy drop" in lab.nft("list chain ip filter FORWARD"), "netd changes no policy"
    assert "netd" not in lab.iptables_save()


# --- routed bridges (hostgw) ---------------------------------------------------------------------


def ask_from(lab: Lab, role: str, source: str, address: str, port: int) -> str | None:
    """Like Lab.ask over TCP, from a given source address of `role`."""
    with entered_netns(lab.path(role)):
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with client:
        client.settimeout(1.5)
        client.bind((source, 0))
        try:
            client.connect((address, port))
            return client.recv(512).decode()
        except OSError:
            return None


def test_routed_bridge_reaches_the_rest_of_its_network_unmasqueraded(lab: Lab, firewall: Firewall):
    """hostgw: brA holds this host's part (10.77.1.0/24) of 10.77.0.0/16; "out" stands for a peer
    host whose containers hold 10.77.9.0/24, routed by address both ways."""
    firewall.add_network(NET_A, "brA", "10.77.1.0/24", internal=False, routed="10.77.0.0/16")
    lab.sh("out", f"ip addr add 10.77.9.1/32 dev lo && ip route add 10.77.1.0/24 via {HOST_UPLINK}")
    lab.sh("host", f"ip route add 10.77.9.0/24 via {OUTSIDE}")
    lab.serve("c1", 80, "c1")
    lab.serve("out", 7000, "peer")
    assert lab.ask("c1", "10.77.9.1", 7000) == "peer 10.77.1.2", "to the rest of the network: no NAT"
    assert lab.ask("c1", OUTSIDE, 7000) == f"peer {HOST_UPLINK}", "anywhere else: masqueraded as before"
    assert ask_from(lab, "out", "10.77.9.1", "10.77.1.2", 80) == "c1 10.77.9.1", "the network's other hosts come in"
    assert lab.ask("out", "10.77.1.2", 80) is None, "a source outside the network does not"
    assert lab.ask("c3", "10.77.1.2", 80) is None, "nor another netd bridge, even one inside the range"
    assert lab.ask("c1", "10.77.2.2", 80) is None
    restarted = lab.make_firewall()
    restarted.setup()
    assert [n.routed for n in restarted.networks() if n.network_id == NET_A] == ["10.77.0.0/16"]
    firewall.add_network(NET_A, "brA", "10.77.1.0/24", internal=False)     # no longer routed
    assert "10.77.0.0/16" not in lab.nft("list set ip netd routed")
    assert lab.ask("c1", "10.77.9.1", 7000) == f"peer {HOST_UPLINK}"
    with pytest.raises(BadRequest, match="internal network cannot be routed"):
        firewall.add_network(NET_I, "brI", "10.77.3.0/24", internal=True, routed="10.77.0.0/16")
