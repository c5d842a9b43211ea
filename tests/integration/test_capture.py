"""`netd capture` and `netd trace` on one host (a daemon in its own namespace, tests.support.hosts),
through the CLI as a user types them: lines with names, pcap files tcpdump reads, JSON, Ctrl-C,
traces that work and traces that show where and why a probe is lost, and one-line errors."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import tempfile

import pytest

from labs.scenarios.debug import finish
from tests.support.hosts import PYTHON, NetdHost


def unique(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(2)}"


@pytest.fixture(scope="module")
def lan():
    """One host, two bridge networks: a and b on the first, c on the second."""
    with NetdHost(prefix="ndcap") as host:
        first, second = unique("cap"), unique("iso")
        host.netd("network", "create", "--subnet", "172.29.71.0/24", first)
        host.netd("network", "create", "--subnet", "172.29.72.0/24", second)
        names = {"a": unique("a"), "b": unique("b"), "c": unique("c"), "net": first, "other": second}
        host.netd("run", "-d", "--name", names["a"], "--network", first, "sleep", "100000")
        host.netd("run", "-d", "--name", names["b"], "--network", first, "sleep", "100000")
        host.netd("run", "-d", "--name", names["c"], "--network", second, "sleep", "100000")
        host.cli("exec", names["a"], "ping", "-c1", "-W2", names["b"])   # ARP settled, IPv6 noise over
        yield host, names


def start_capture(host: NetdHost, *args: str) -> subprocess.Popen:
    """`netd capture ARGS` in the background, returned once it listens."""
    argv = ["nsenter", f"--net=/run/netns/{host.name}", PYTHON, "-m", "netd", "capture", *args]
    process = subprocess.Popen(argv, env=host.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = process.stderr.readline()
    if not first.startswith("capturing on"):
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"netd capture {' '.join(args)} did not start: {first}{err}{out}")
    return process


def ping(host: NetdHost, container: str, target: str, count: int = 2) -> None:
    host.cli("exec", container, "ping", "-c", str(count), "-i", "0.2", "-W2", target)


def tcpdump_read(path: str) -> str:
    result = subprocess.run(["tcpdump", "-nr", path], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


# --- capture ------------------------------------------------------------------------------------

def test_capture_on_a_container_names_addresses_and_writes_a_pcap_tcpdump_reads(lan):
    host, n = lan
    address_b = host.address(n["b"])
    with tempfile.TemporaryDirectory() as tmp:
        pcap = os.path.join(tmp, "a.pcap")
        capture = start_capture(host, n["a"], "-f", "icmp", "-c", "4", "--timeout", "20", "-w", pcap)
        ping(host, n["a"], n["b"])
        code, out, err = finish(capture)
        assert code == 0, err
        lines = out.strip().splitlines()
        assert len(lines) == 4 and "4 packets captured" in err
        assert f"{n['a']}:eth0 out" in lines[0] and f"> {address_b} ({n['b']}): ICMP echo request" in lines[0]
        assert any(f"{address_b} ({n['b']}) >" in line and "echo reply" in line for line in lines)
        read = tcpdump_read(pcap)
        assert read.count("ICMP echo request") == 2 and read.count("ICMP echo reply") == 2


def test_capture_json_on_a_network_bridge(lan):
    host, n = lan
    capture = start_capture(host, f"network:{n['net']}", "--format", "json", "-f", "icmp", "-c", "2",
                            "--timeout", "20")
    ping(host, n["a"], n["b"], count=1)
    code, out, err = finish(capture)
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 2
    request, reply = records
    assert request["Direction"] in ("in", "out") and request["Interface"].startswith("netd-")
    assert request["Packet"]["Protocol"] == "ICMP" and request["Packet"]["SrcName"] == n["a"]
    assert request["Packet"]["DstName"] == n["b"] and reply["Packet"]["Info"].startswith("echo reply")


def test_ctrl_c_stops_cleanly_and_the_pcap_is_complete(lan):
    host, n = lan
    with tempfile.TemporaryDirectory() as tmp:
        pcap = os.path.join(tmp, "ctrl-c.pcap")
        capture = start_capture(host, n["b"], "-i", "eth0", "-f", "icmp", "-w", pcap)
        ping(host, n["a"], n["b"], count=3)
        capture.send_signal(signal.SIGINT)
        code, out, err = finish(capture)
        assert code == 0 and "Traceback" not in err, err
        assert "6 packets captured" in err
        read = tcpdump_read(pcap)
        assert read.count("ICMP echo request") == 3 and read.count("ICMP echo reply") == 3


def test_bad_capture_targets_are_one_line_errors(lan):
    host, n = lan
    assert "no such container: nosuch" in host.fails("capture", "nosuch")
    assert "network nosuch not found" in host.fails("capture", "network:nosuch")
    assert "only overlay networks have a VXLAN device" in host.fails("capture", f"vxlan:{n['net']}")
    assert "not in a cluster" in host.fails("capture", "underlay")
    assert "unknown capture target 'foo:bar'" in host.fails("capture", "foo:bar")
    assert "has no interface eth7 (it has: eth0)" in host.fails("capture", n["a"], "-i", "eth7")
    assert "invalid filter 'icmpx'" in host.fails("capture", n["a"], "-f", "icmpx")
    assert "invalid -c 0" in host.fails("capture", n["a"], "-c", "0")
    assert "directory" in host.fails("capture", n["a"], "-w", "/nonexistent/dir/x.pcap", "-c", "1")


# --- trace --------------------------------------------------------------------------------------

def trace(host: NetdHost, *args: str) -> tuple[int, dict]:
    result = host.cli("trace", *args, "--format", "json", check=False, timeout=90)
    assert result.returncode in (0, 1) and result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def test_trace_between_two_containers_sees_every_hop_both_ways(lan):
    host, n = lan
    code, report = trace(host, n["a"], n["b"])
    assert code == 0 and report["Result"] == "ok", report
    kinds = [hop["Kind"] for hop in report["Hops"]]
    assert kinds == ["container", "veth", "bridge", "veth", "container"]
    assert all(hop["Request"] and hop["Reply"] for hop in report["Hops"])
    times = [hop["Request"]["Ms"] for hop in report["Hops"]]
    assert times == sorted(times) and times[0] >= 0
    table = host.cli("trace", n["a"], n["b"], timeout=90).stdout
    assert "the path works" in table and f"{n['b']}:eth0" in table


def test_trace_tcp_and_udp_to_closed_ports_are_answered(lan):
    host, n = lan
    code, report = trace(host, n["a"], n["b"], "--proto", "tcp:4567")
    assert code == 0 and report["Result"] == "ok"
    assert "nothing listens on port 4567" in " ".join(report["Reasons"])
    code, report = trace(host, n["a"], n["b"], "--proto", "udp:4567")
    assert code == 0 and report["Result"] == "ok" and report["Hops"][-1]["Request"]
    assert "nothing listens on UDP port 4567" in " ".join(report["Reasons"])


def test_trace_to_an_address_nobody_holds_stops_at_arp(lan):
    host, n = lan
    code, report = trace(host, n["a"], "172.29.71.200")
    assert code == 1 and report["Result"] == "request lost" and report["LostAfterHop"] == 0
    assert "no ARP answer" in " ".join(report["Reasons"]), report["Reasons"]


def test_trace_into_another_network_is_dropped_by_the_firewall(lan):
    host, n = lan
    code, report = trace(host, n["a"], host.address(n["c"]))
    assert code == 1 and report["Result"] == "request lost"
    assert report["Hops"][report["LostAfterHop"] - 1]["Kind"] == "bridge"
    assert "firewall: the probe was dropped in the forward path" in " ".join(report["Reasons"]), report["Reasons"]


def test_trace_a_probe_larger_than_the_mtu(lan):
    host, n = lan
    code, report = trace(host, n["a"], n["b"], "--size", "1600")
    assert code == 1 and report["Result"] == "not sent"
    assert "MTU" in " ".join(report["Reasons"]), report["Reasons"]


def test_bad_trace_requests_are_one_line_errors(lan):
    host, n = lan
    assert "no such container: nosuch" in host.fails("trace", "nosuch", n["b"])
    assert "neither a container on the networks of" in host.fails("trace", n["a"], "nosuch")
    assert "invalid --proto 'sctp:1'" in host.fails("trace", n["a"], n["b"], "--proto", "sctp:1")
    assert "invalid --proto 'tcp:0'" in host.fails("trace", n["a"], n["b"], "--proto", "tcp:0")
    assert "invalid --size" in host.fails("trace", n["a"], n["b"], "--size", "10")


def test_help_explains_targets_and_examples():
    for command, phrases in (("capture", ["network:NAME", "vxlan:NAME", "underlay", "examples:", "-w FILE.pcap"]),
                             ("trace", ["SOURCE", "DEST", "--proto", "examples:", "Exit status"])):
        result = subprocess.run([PYTHON, "-m", "netd", command, "--help"], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0 and all(p in result.stdout for p in phrases), result.stdout


def test_nothing_is_left_behind(lan):
    host, n = lan
    trace(host, n["a"], n["b"])
    tables = host.sh("nft list tables").stdout
    assert "netd_trace" not in tables
    leftover = subprocess.run(["pgrep", "-f", "netd.debug.worker"], capture_output=True, text=True).stdout.split()
    mine = [pid for pid in leftover if _in_namespace(pid, host.name)]
    assert not mine, f"capture workers left running: {mine}"


def _in_namespace(pid: str, name: str) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{name}").st_ino
    except OSError:
        return False
