"""The cluster store under faults, with a real etcd: frozen (SIGSTOP) during an operation — reads,
DNS and local work still answer; garbage written into it — nothing dies; a second daemon with this
host's --cluster-advertise — refused."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import time
import urllib.request

import pytest

from kvstore import open_store
from runtime.namespaces import entered_netns
from tests.support.hosts import PYTHON, NetdHost, clustered_host

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def cluster():
    with clustered_host() as (host, url):
        host.netd("network", "create", "-d", "overlay", "--subnet", "10.97.0.0/24", "sf1")
        host.netd("run", "-d", "--name", "sfa", "--network", "sf1", "sleep", "100000")
        host.netd("run", "-d", "--name", "sfb", "--network", "sf1", "sleep", "100000")
        yield host, url


def timed(host: NetdHost, *args: str) -> tuple[float, subprocess.CompletedProcess]:
    started = time.monotonic()
    result = host.cli(*args, check=False, timeout=30)
    return time.monotonic() - started, result


def test_frozen_store_does_not_freeze_reads_dns_or_local_work(cluster):
    host, _ = cluster
    host.etcd.process.send_signal(signal.SIGSTOP)
    try:
        # An operation that needs the store, stuck on it in the background.
        stuck = subprocess.Popen(["nsenter", f"--net=/run/netns/{host.name}", PYTHON, "-m", "netd", "run", "-d",
                                  "--name", "sfc", "--network", "sf1", "sleep", "100000"], env=host.env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        for args in (("ps",), ("network", "ls"), ("inspect", "sfa"), ("exec", "sfa", "ping", "-c1", "-W1", "sfb")):
            took, result = timed(host, *args)
            assert result.returncode == 0, f"netd {' '.join(args)}: {result.stderr}"
            assert took < 1.5, f"netd {' '.join(args)} took {took:.1f}s with the store frozen"
        took, result = timed(host, "network", "create", "--subnet", "10.98.0.0/24", "sflocal")
        assert result.returncode == 0, result.stderr
        assert took < 12, f"a local network took {took:.1f}s with the store frozen"
        took, result = timed(host, "ipam", "ls")
        assert result.returncode == 0 and "sflocal" in result.stdout, result.stderr
        stuck.kill()
    finally:
        host.etcd.process.send_signal(signal.SIGCONT)
    host.cli("rm", "-f", "sfc", check=False)
    host.cli("network", "rm", "sflocal", check=False)


def put_raw(host: NetdHost, url: str, key: str, value: bytes) -> None:
    port = url.rsplit(":", 1)[1]
    body = json.dumps({"key": base64.b64encode(key.encode()).decode(), "value": base64.b64encode(value).decode()})
    with entered_netns(f"/run/netns/{host.name}"):
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/v3/kv/put", body.encode()), timeout=5)


def test_garbage_in_the_store_is_skipped_and_nothing_dies(cluster):
    host, url = cluster
    put_raw(host, url, "netd/endpoints/zz/garbage", b"\xff\xfe not utf-8")
    put_raw(host, url, "netd/networks/garbage", b"{not json")
    put_raw(host, url, "netd/ipam/pools/garbage", b'{"subnet": 12}')
    put_raw(host, url, "netd/hosts/10.9.9.9", b"\x00\x01")
    time.sleep(1)
    info = json.loads(host.netd("info", "--format", "json"))
    assert all(state.startswith("ok") for state in info["Health"].values()), info["Health"]
    assert "sf1" in host.netd("ipam", "ls")
    host.netd("run", "-d", "--name", "sfd", "--network", "sf1", "sleep", "100000")
    host.cli("exec", "sfa", "ping", "-c1", "-W2", "sfd")
    host.netd("rm", "-f", "sfd")


def test_a_second_daemon_with_this_hosts_address_is_refused(cluster, tmp_path):
    host, url = cluster
    argv = ["nsenter", f"--net=/run/netns/{host.name}", PYTHON, "-m", "netd", "daemon", "--run-dir",
            str(tmp_path / "run"), "--data-dir", str(tmp_path / "data"), "--config-file", "/nonexistent",
            *host.daemon_args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "is alive in the cluster store with the address" in result.stderr, result.stderr
    same_dir = subprocess.run(["nsenter", f"--net=/run/netns/{host.name}", PYTHON, "-m", "netd", "daemon",
                               "--run-dir", str(tmp_path / "run2"), "--data-dir", host.data_dir,
                               "--config-file", "/nonexistent"], capture_output=True, text=True, timeout=60)
    assert same_dir.returncode != 0 and "already running with data dir" in same_dir.stderr, same_dir.stderr


def test_global_pools_avoid_every_hosts_local_networks(cluster):
    host, url = cluster
    with entered_netns(f"/run/netns/{host.name}"):
        store = open_store(url)
    try:
        host.netd("network", "create", "--subnet", "10.99.7.0/24", "sflocal2")
        with entered_netns(f"/run/netns/{host.name}"):
            mine = [p.key for p in store.list("netd/local-subnets/")[0]]
            store.put("netd/local-subnets/203.0.113.50/abc", json.dumps({"Name": "lan", "Subnet": "10.99.8.0/24"}))
        assert any(key.endswith("/" + json.loads(host.netd("network", "inspect", "sflocal2"))[0]["Id"]) for key in mine)
        message = host.fails("network", "create", "-d", "overlay", "--subnet", "10.99.8.0/25", "sfglobal")
        assert "overlaps local network lan on host 203.0.113.50" in message, message
    finally:
        host.cli("network", "rm", "sflocal2", check=False)
        with entered_netns(f"/run/netns/{host.name}"):
            store.delete("netd/local-subnets/203.0.113.50/abc")
            store.close()
