"""Cluster-wide IPAM on a real etcd: several processes, standing for hosts, allocate from one
pool at once; no address is ever handed out twice, and a contested static address has exactly
one winner."""

from __future__ import annotations

import multiprocessing

import pytest

from kvstore import open_store
from netd.contract.errors import Conflict
from netd.core.ipam import IPAM
from tests.support.etcd_server import EtcdServer

HOSTS = 8
PER_HOST = 40


@pytest.fixture(scope="module")
def etcd():
    with EtcdServer() as server:
        yield server


def allocate_many(url: str, host: str, count: int, start, results) -> None:
    store = open_store(url)
    ipam = IPAM(store, host=host, scope="global")
    start.wait()
    results.put([ipam.allocate("pool1", endpoint_id=f"{host}-{i}") for i in range(count)])
    store.close()


def take_static(url: str, host: str, start, results) -> None:
    store = open_store(url)
    ipam = IPAM(store, host=host, scope="global")
    start.wait()
    try:
        results.put((host, ipam.allocate("pool2", "10.77.0.9", endpoint_id=host)))
    except Conflict as e:
        results.put((host, str(e)))
    store.close()


def run_hosts(target, args_per_host) -> list:
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    processes = [ctx.Process(target=target, args=(*args, start, results)) for args in args_per_host]
    for p in processes:
        p.start()
    start.set()
    collected = [results.get(timeout=120) for _ in processes]
    for p in processes:
        p.join(timeout=30)
    return collected


def test_hosts_allocating_at_once_never_get_the_same_address(etcd):
    store = open_store(etcd.url)
    IPAM(store, host="creator", scope="global").request_pool("pool1", "one", subnet="10.76.0.0/22")
    results = run_hosts(allocate_many, [(etcd.url, f"h{i}", PER_HOST) for i in range(HOSTS)])
    addresses = [a for batch in results for a in batch]
    assert len(addresses) == HOSTS * PER_HOST == len(set(addresses))
    assert len(IPAM(store, scope="global").allocations("pool1")) == HOSTS * PER_HOST + 1   # and the gateway
    store.close()


def test_a_static_address_asked_by_two_hosts_at_once_has_one_winner(etcd):
    store = open_store(etcd.url)
    IPAM(store, host="creator", scope="global").request_pool("pool2", "two", subnet="10.77.0.0/24")
    results = run_hosts(take_static, [(etcd.url, f"h{i}") for i in range(4)])
    winners = [host for host, outcome in results if outcome == "10.77.0.9"]
    assert len(winners) == 1
    assert all("already in use on network two" in outcome for host, outcome in results if host not in winners)
    store.close()


def create_pool(url: str, host: str, network_id: str, subnet: str, start, results) -> None:
    store = open_store(url)
    ipam = IPAM(store, host=host, scope="global")
    start.wait()
    try:
        ipam.request_pool(network_id, network_id, subnet=subnet)
        results.put((network_id, "created"))
    except Conflict as e:
        results.put((network_id, str(e)))
    store.close()


def test_overlapping_subnets_created_at_once_on_two_hosts_have_one_winner(etcd):
    """10.N.0.0/16 and 10.N.2.0/24 at the same moment, for 12 values of N at once: a key per exact
    CIDR lets both in; the subnet index, swapped in the same transaction, lets one of each pair."""
    pairs = range(80, 92)
    args = [(etcd.url, f"h{n}a", f"wide{n}", f"10.{n}.0.0/16") for n in pairs]
    args += [(etcd.url, f"h{n}b", f"narrow{n}", f"10.{n}.2.0/24") for n in pairs]
    results = dict(run_hosts(create_pool, args))
    for n in pairs:
        outcomes = [results[f"wide{n}"], results[f"narrow{n}"]]
        assert outcomes.count("created") == 1, (n, outcomes)
