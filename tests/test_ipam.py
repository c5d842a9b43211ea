"""IPAM on the embedded store: pools, validation, allocation order, exhaustion, concurrency."""

from __future__ import annotations

import threading
from ipaddress import IPv4Network

import pytest

from kvstore import open_store
from netd.contract.errors import BadRequest, Conflict
from netd.core.ipam import IPAM


@pytest.fixture
def ipam(tmp_path):
    store = open_store(f"sqlite://{tmp_path}/ipam.db")
    yield IPAM(store, host="h1")
    store.close()


def test_default_pools_follow_docker_and_skip_what_is_in_use(ipam):
    first = ipam.request_pool("n1", "one")
    second = ipam.request_pool("n2", "two", avoid=[IPv4Network("172.18.0.0/16")])
    assert first.subnet == "172.17.0.0/16" and first.gateway == "172.17.0.1"
    assert second.subnet == "172.19.0.0/16"


def test_global_default_pools_are_slash_24s_of_ten(tmp_path):
    store = open_store(f"sqlite://{tmp_path}/g.db")
    ipam = IPAM(store, host="h1", scope="global")
    assert ipam.request_pool("n1", "one").subnet == "10.0.0.0/24"
    assert ipam.request_pool("n2", "two").subnet == "10.0.1.0/24"
    store.close()


@pytest.mark.parametrize("kwargs, message", [
    ({"subnet": "10.1.2.3/24"}, "host bits set; did you mean 10.1.2.0/24"),
    ({"subnet": "10.1.2.0"}, "give a prefix length"),
    ({"subnet": "banana"}, "invalid subnet 'banana'"),
    ({"subnet": "10.1.0.0/16", "gateway": "10.2.0.1"}, "gateway 10.2.0.1 is not a usable address of subnet 10.1.0.0/16"),
    ({"subnet": "10.1.0.0/16", "ip_range": "10.2.0.0/24"}, "ip-range 10.2.0.0/24 is not inside subnet"),
    ({"subnet": "10.1.0.0/16", "aux_addresses": {"router": "10.9.0.1"}}, "aux-address router=10.9.0.1 is not inside"),
    ({"gateway": "10.1.0.1"}, "need --subnet"),
])
def test_bad_pool_requests_say_what_is_wrong(ipam, kwargs, message):
    with pytest.raises(BadRequest, match=message):
        ipam.request_pool("n1", "one", **kwargs)
    assert ipam.pools() == []


def test_overlapping_subnets_are_refused_with_the_holder(ipam):
    ipam.request_pool("n1", "one", subnet="10.1.0.0/16")
    with pytest.raises(Conflict, match=r"10.1.2.0/24 overlaps .*network one"):
        ipam.request_pool("n2", "two", subnet="10.1.2.0/24")


def test_addresses_are_sequential_after_the_gateway_and_skip_aux(ipam):
    ipam.request_pool("n1", "one", subnet="10.1.0.0/24", aux_addresses={"printer": "10.1.0.3"})
    assert [ipam.allocate("n1") for _ in range(3)] == ["10.1.0.2", "10.1.0.4", "10.1.0.5"]


def test_ip_range_limits_dynamic_but_not_static_addresses(ipam):
    ipam.request_pool("n1", "one", subnet="10.1.0.0/24", ip_range="10.1.0.128/25")
    assert ipam.allocate("n1") == "10.1.0.128"
    assert ipam.allocate("n1", "10.1.0.7") == "10.1.0.7"


def test_static_address_conflicts_name_the_holder(ipam):
    ipam.request_pool("n1", "one", subnet="10.1.0.0/24")
    ipam.allocate("n1", "10.1.0.9", container="web")
    with pytest.raises(Conflict, match="10.1.0.9 is already in use on network one .by web on host h1"):
        ipam.allocate("n1", "10.1.0.9")
    with pytest.raises(Conflict, match="it is the gateway"):
        ipam.allocate("n1", "10.1.0.1")
    with pytest.raises(BadRequest, match="not a usable address of subnet"):
        ipam.allocate("n1", "10.2.0.9")


def test_exhaustion_and_release(ipam):
    ipam.request_pool("n1", "one", subnet="10.1.0.0/29")   # .1 gateway, .2-.6 for containers
    taken = [ipam.allocate("n1") for _ in range(5)]
    assert taken == [f"10.1.0.{i}" for i in range(2, 7)]
    with pytest.raises(Conflict, match="no free address left in 10.1.0.0/29 .network one.: the pool is exhausted"):
        ipam.allocate("n1")
    ipam.release("n1", "10.1.0.4")
    assert ipam.allocate("n1") == "10.1.0.4"


def test_release_pool_removes_every_key(ipam):
    ipam.request_pool("n1", "one", subnet="10.1.0.0/24")
    ipam.allocate("n1")
    ipam.release_pool("n1")
    pairs, _ = ipam.store.list("netd/ipam/")
    assert pairs == []


def test_lookup_and_usage(ipam):
    ipam.request_pool("n1", "one", subnet="10.1.0.0/24")
    ipam.allocate("n1", "10.1.0.20", container="db", endpoint_id="e1")
    [(pool, allocation)] = ipam.lookup("10.1.0.20")
    assert pool.network_name == "one" and allocation.container == "db"
    [(pool, allocation)] = ipam.lookup("10.1.0.21")
    assert allocation is None
    assert ipam.usage(pool) == (254, 2)   # the gateway counts as used


def test_concurrent_allocations_never_repeat(tmp_path):
    store = open_store(f"sqlite://{tmp_path}/c.db")
    allocators = [IPAM(store, host=f"h{i}") for i in range(8)]   # each with its own view, as hosts
    allocators[0].request_pool("n1", "one", subnet="10.1.0.0/22")
    results: list[str] = []
    lock = threading.Lock()

    def work(ipam):
        mine = [ipam.allocate("n1") for _ in range(100)]
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=work, args=(a,)) for a in allocators]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 800 and len(set(results)) == 800
    store.close()


def test_allocation_within_a_sub_range_skips_its_network_gateway_and_broadcast(ipam):
    """A host's share of a pool (hostgw's lease): its own .0, .1 (gateway) and broadcast stay out."""
    ipam.request_pool("n1", "one", subnet="10.244.0.0/16")
    got = [ipam.allocate("n1", within="10.244.7.0/30") for _ in range(1)]
    assert got == ["10.244.7.2"]
    with pytest.raises(Conflict, match=r"no free address left in 10.244.7.0/30 .*range is exhausted"):
        ipam.allocate("n1", within="10.244.7.0/30")
    assert ipam.allocate("n1", within="10.244.8.0/24") == "10.244.8.2"
    assert ipam.allocate("n1") == "10.244.0.2"          # the whole pool, as before
    ipam.release("n1", "10.244.7.2")
    assert ipam.allocate("n1", within="10.244.7.0/30") == "10.244.7.2"


def test_static_address_must_lie_within_the_sub_range(ipam):
    ipam.request_pool("n1", "one", subnet="10.244.0.0/16")
    assert ipam.allocate("n1", "10.244.3.9", within="10.244.3.0/24") == "10.244.3.9"
    with pytest.raises(BadRequest, match=r"10.244.4.9 is outside 10.244.3.0/24, the part of network one"):
        ipam.allocate("n1", "10.244.4.9", within="10.244.3.0/24")
    with pytest.raises(BadRequest, match=r"range 10.9.0.0/24 is not inside subnet 10.244.0.0/16"):
        ipam.allocate("n1", within="10.9.0.0/24")


def test_reserve_is_idempotent_and_release_reserved_frees_only_its_own(ipam):
    ipam.request_pool("n1", "one", subnet="10.244.0.0/16")
    ipam.reserve("n1", "10.244.5.1", name="lease 10.244.5.0/24")
    ipam.reserve("n1", "10.244.5.1", name="lease 10.244.5.0/24")      # again: nothing changes
    ipam.reserve("n1", "10.244.0.1", name="lease 10.244.0.0/24")      # the pool's own gateway: held already
    endpoint = ipam.allocate("n1", within="10.244.6.0/24")
    with pytest.raises(Conflict, match=f"address {endpoint} is already in use"):
        ipam.reserve("n1", endpoint, name="lease")
    ipam.release_reserved("n1", "10.244.0.1", name="lease 10.244.0.0/24")   # not ours: stays
    ipam.release_reserved("n1", "10.244.5.1", name="lease 10.244.5.0/24")
    held = {a.address: a.kind for a in ipam.allocations("n1")}
    assert held == {"10.244.0.1": "gateway", endpoint: "endpoint"}
