"""Daemon restarts keep containers networked; netd's firewall rules stay in netd's own table,
and netd still forwards on a host where Docker set FORWARD to DROP."""

from __future__ import annotations

import json
import secrets

from tests.support.hosts import OUTSIDE_ADDRESS, UPLINK_HOST, NetdHost


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(2)}"


def pings(host, container: str, target: str) -> bool:
    return host.cli("exec", container, "ping", "-c1", "-W1", target, check=False).returncode == 0


def containers(host) -> list[dict]:
    """What `ps` shows, less the status text that changes with time."""
    listed = json.loads(host.netd("ps", "--format", "json"))
    return [{k: v for k, v in c.items() if k != "Status"} for c in listed]


def host_links(host) -> list[str]:
    return sorted(line.split(":")[1].strip() for line in host.sh("ip -o link").stdout.splitlines())


def test_restart_keeps_containers_networked_and_duplicates_nothing():
    with NetdHost() as host:
        net, a, b, web = unique("rs"), unique("ra"), unique("rb"), unique("rweb")
        host.netd("network", "create", "--subnet", "172.29.1.0/24", net)
        host.netd("run", "-d", "--name", a, "--network", net, "sleep", "1000")
        host.netd("run", "-d", "--name", b, "--network", net, "sleep", "1000")
        host.netd("run", "-d", "--name", web, "--network", net, "-p", "8282:80",
                  "busybox", "httpd", "-f", "-p", "80", "-h", "/etc")
        before = {
            "ps": containers(host),
            "inspect": json.loads(host.netd("network", "inspect", net)),
            "links": host_links(host),
            "rules": host.sh("nft list table ip netd").stdout,
        }

        host.restart()

        assert containers(host) == before["ps"]
        assert json.loads(host.netd("network", "inspect", net)) == before["inspect"]
        assert host_links(host) == before["links"]
        assert host.sh("nft list table ip netd").stdout == before["rules"]
        assert pings(host, a, b), "names resolve again after the restart"
        assert pings(host, a, OUTSIDE_ADDRESS)
        assert "hostname" not in host.outside_sh(f"curl -s --max-time 5 http://{UPLINK_HOST}:8282/hostname").stdout
        c = unique("rc")
        host.netd("run", "-d", "--name", c, "--network", net, "sleep", "1000")
        assert host.address(c) == "172.29.1.5", "no address handed out twice after a restart"


def test_containers_keep_forwarding_while_the_daemon_is_down():
    with NetdHost() as host:
        net, a, b = unique("down"), unique("da"), unique("db")
        host.netd("network", "create", "--subnet", "172.29.2.0/24", net)
        host.netd("run", "-d", "--name", a, "--network", net, "sleep", "1000")
        host.netd("run", "-d", "--name", b, "--network", net, "sleep", "1000")
        pid = host.inspect(a)["State"]["Pid"]
        address_b = host.address(b)
        host.stop()
        enter = f"nsenter -t {pid} -n"
        assert host.sh(f"{enter} ping -c1 -W1 {address_b}", check=False).returncode == 0
        assert host.sh(f"{enter} ping -c1 -W1 {OUTSIDE_ADDRESS}", check=False).returncode == 0
        host.start()


def test_rules_live_in_netds_table_and_go_with_their_networks(host):
    net, a = unique("fw"), unique("fa")
    others_before = host.sh("nft list ruleset").stdout.replace(host.sh("nft list table ip netd").stdout, "")
    host.netd("network", "create", "--subnet", "172.29.3.0/24", net)
    host.netd("run", "-d", "--name", a, "--network", net, "-p", "8383:80", "sleep", "1000")
    rules = host.sh("nft list table ip netd").stdout
    assert "172.29.3.0/24" in rules and "8383" in rules
    host.netd("rm", "-f", a)
    assert "8383" not in host.sh("nft list table ip netd").stdout
    host.netd("network", "rm", net)
    assert "172.29.3.0/24" not in host.sh("nft list table ip netd").stdout
    others_after = host.sh("nft list ruleset").stdout.replace(host.sh("nft list table ip netd").stdout, "")
    assert others_after == others_before, "netd touched no other table"


def test_forwarding_works_where_docker_set_forward_to_drop():
    """Docker sets the iptables FORWARD policy to DROP (and br_netfilter makes bridged traffic
    pass FORWARD). Imitate that in the test host's namespace before netd starts."""
    host = NetdHost()
    try:
        host.create_namespaces()
        host.sh("iptables -N DOCKER-USER && iptables -A DOCKER-USER -j RETURN && "
                "iptables -I FORWARD -j DOCKER-USER && iptables -P FORWARD DROP")
        host.start()
        info = host.netd("info")
        assert "DROP" in info and "DOCKER-USER" in info
        net, a, b = unique("dk"), unique("ka"), unique("kb")
        host.netd("network", "create", "--subnet", "172.29.4.0/24", net)
        host.netd("run", "-d", "--name", a, "--network", net, "sleep", "1000")
        host.netd("run", "-d", "--name", b, "--network", net, "sleep", "1000")
        assert pings(host, a, b), "same-bridge traffic passes FORWARD (br_netfilter) and is accepted"
        assert pings(host, a, OUTSIDE_ADDRESS), "outbound traffic is accepted via DOCKER-USER"
        assert "policy drop" in host.sh("nft list chain ip filter FORWARD").stdout, "netd left the policy alone"
    finally:
        host.cleanup()
