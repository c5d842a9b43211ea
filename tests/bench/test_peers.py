"""Smoke test of the benchmark's peers (bench/peers.py): three endpoints each, in private
namespaces; checks that attach really gives an address, detach takes it away, and stop()
leaves nothing behind. Figures are not checked here: that is the benchmark's job."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from bench.peers import NETNS_DIR, CniBridgePeer, DockerBridgePeer
from bench.stats import format_table, percentile, summarize

N = 3


def test_summarize_and_table():
    s = summarize([0.003, 0.001, 0.002, 0.010])
    assert s["n"] == 4
    assert s["median_ms"] == pytest.approx(2.5)
    assert s["p99_ms"] == pytest.approx(10.0)
    assert percentile(list(range(1, 101)), 99) == 99
    assert summarize([])["n"] == 0
    lines = format_table([["docker", "39.10", "1.2x"], ["cni", "123.00", "10.5x"]], ["PEER", "MS", "RATIO"]).splitlines()
    assert lines[0].split() == ["PEER", "MS", "RATIO"]
    assert lines[2] == "docker   39.10   1.2x"
    assert lines[3] == "cni     123.00  10.5x"


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")


def test_docker_bridge_peer():
    need_root()
    missing = [p for p in ("/usr/sbin/dockerd", "/usr/bin/containerd", "/usr/sbin/runc", "/bin/busybox")
               if not os.path.exists(p)]
    if missing:
        pytest.skip(f"Docker peer needs docker.io and busybox-static (missing {', '.join(missing)})")
    peer = DockerBridgePeer()
    try:
        peer.start()
        peer.make_sandboxes(N)
        for i in range(N):
            assert 0 < peer.attach(i) < 30
        assert peer.api is not None
        info = peer.api.request("GET", f"/containers/{peer.containers[0]}/json")
        networks = info["NetworkSettings"]["Networks"]
        assert list(networks) == [peer.network_name]
        assert networks[peer.network_name]["IPAddress"].startswith("10.231.")
        assert (peer.memory_rss_bytes() or 0) > 10 * 2**20
        for i in reversed(range(N)):
            assert 0 < peer.detach(i) < 30
        info = peer.api.request("GET", f"/containers/{peer.containers[0]}/json")
        assert info["NetworkSettings"]["Networks"] == {}
        assert info["State"]["Running"]
    finally:
        peer.stop()
    assert peer.leftovers() == []
    assert not os.path.exists(os.path.join(NETNS_DIR, peer.netns))


def test_cni_bridge_peer():
    need_root()
    if not os.access("/usr/lib/cni/bridge", os.X_OK) or not os.access("/usr/lib/cni/host-local", os.X_OK):
        pytest.skip("CNI peer needs containernetworking-plugins (/usr/lib/cni/bridge, host-local)")
    if shutil.which("iptables") is None:
        pytest.skip("CNI bridge plugin with ipMasq needs iptables")
    peer = CniBridgePeer()
    try:
        peer.start()
        peer.make_sandboxes(N)
        for i in range(N):
            assert 0 < peer.attach(i) < 30
        addresses = json.loads(subprocess.run(["ip", "-j", "-n", peer.sandboxes[0], "addr", "show", "eth0"],
                                              capture_output=True, text=True, check=True).stdout)
        assert any(a["local"].startswith("10.232.") for a in addresses[0]["addr_info"])
        assert peer.results[0]["ips"][0]["address"].startswith("10.232.")
        ports = subprocess.run(["ip", "-n", peer.host_netns, "-o", "link", "show", "master", peer.bridge],
                               capture_output=True, text=True, check=True).stdout
        assert len(ports.splitlines()) == N
        assert peer.memory_rss_bytes() is None
        for i in reversed(range(N)):
            assert 0 < peer.detach(i) < 30
        gone = subprocess.run(["ip", "-n", peer.sandboxes[0], "link", "show", "eth0"], capture_output=True)
        assert gone.returncode != 0
    finally:
        peer.stop()
    assert peer.leftovers() == []


def test_stop_without_start_is_harmless():
    for peer in (DockerBridgePeer(), CniBridgePeer()):
        peer.stop()
        assert peer.leftovers() == []
