"""IP address management on a key-value store.

One `IPAM` serves one store: the embedded store for local networks, the cluster store for
global ones, so that every host allocates from the same address space.

Layout (all keys under netd/ipam/):
  pools/<network-id>           the pool: subnet, gateway, ip-range, aux addresses
  subnets/<a.b.c.d-len>        reservation of a subnet (create-if-absent: no two networks share one)
  addresses/<network-id>/<ip>  one key per address in use: endpoint, container, host, since

An address is taken by creating its key only if absent (compare-and-swap, no global lock),
so two hosts can never both get it. Each host remembers which addresses it has seen taken
and walks forward from where it last allocated, as Docker does; when it finds an address
another host took a moment ago, it jumps to a random place in the pool and walks on from
there, so hosts allocating at the same time soon stop meeting each other.

Sub-ranges: `allocate(within=CIDR)` takes the address from one part of the pool only, minus that
part's own network, first (its gateway) and broadcast addresses. A driver whose hosts each route
one part of a network (hostgw: each host's lease) gives its endpoints addresses that way, and
holds each part's gateway with `reserve()` so `netd ipam inspect` shows it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import random
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address, IPv4Network

from kvstore import Create, Delete, KeyExists, KVPair, KVStore, StoreError, Update, VersionConflict
from netd.contract.errors import BadRequest, Conflict, NotFound
from netd.contract.model import now, parse_address, parse_subnet  # noqa: F401 - parse_* used by callers of ipam too
from netd.core import keys

log = logging.getLogger(__name__)

PREFIX = keys.IPAM
POOLS = PREFIX + "pools/"
SUBNETS = PREFIX + "subnets/"
SUBNET_INDEX = PREFIX + "subnet-index"     # network id -> subnet, every reserved subnet of the scope (CAS)
ADDRESSES = PREFIX + "addresses/"

# Docker's default address pools: local networks take 172.17-31.0.0/16, then /20s of 192.168/16.
LOCAL_DEFAULT_POOLS = [IPv4Network(f"172.{i}.0.0/16") for i in range(17, 32)] + list(
    IPv4Network("192.168.0.0/16").subnets(new_prefix=20)
)
# Global networks take /24s of 10.0.0.0/8.
GLOBAL_DEFAULT_POOL = IPv4Network("10.0.0.0/8")
GLOBAL_DEFAULT_PREFIX = 24



@dataclass
class Pool:
    network_id: str
    network_name: str
    subnet: str
    gateway: str | None
    ip_range: str | None = None
    aux_addresses: dict[str, str] = field(default_factory=dict)
    scope: str = "local"

    @property
    def net(self) -> IPv4Network:
        return IPv4Network(self.subnet)

    @property
    def allocatable(self) -> IPv4Network:
        return IPv4Network(self.ip_range) if self.ip_range else self.net

    def usable_hosts(self) -> int:
        return _usable_count(self.allocatable, self.net)


@dataclass
class Allocation:
    address: str
    network_id: str
    kind: str = "endpoint"               # endpoint, gateway, aux
    endpoint_id: str = ""
    container: str = ""
    host: str = ""
    since: str = field(default_factory=now)
    name: str = ""                       # aux address name

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def _usable_count(allocatable: IPv4Network, subnet: IPv4Network) -> int:
    count = allocatable.num_addresses
    if subnet.network_address in allocatable:
        count -= 1
    if subnet.broadcast_address in allocatable:
        count -= 1
    return max(count, 0)


def _subnet_key(net: IPv4Network) -> str:
    return SUBNETS + str(net).replace("/", "-")


class _PoolCursor:
    """What this host knows of a pool's addresses, to avoid asking the store for each one."""

    def __init__(self, taken: set[int], first: int, last: int):
        self.taken = taken
        self.first = first
        self.last = last
        self.next = first


class IPAM:
    def __init__(self, store: KVStore, host: str = "", scope: str = "local"):
        self.store = store
        self.host = host
        self.scope = scope
        self._lock = threading.Lock()
        self._cursors: dict[str, _PoolCursor] = {}
        self._pools: dict[str, Pool] = {}     # pools do not change once made: read each once

    # --- pools ------------------------------------------------------------------------------

    def request_pool(
        self,
        network_id: str,
        network_name: str,
        subnet: str | None = None,
        gateway: str | None = None,
        ip_range: str | None = None,
        aux_addresses: dict[str, str] | None = None,
        avoid: Iterable[IPv4Network] = (),
        default_pools: list[IPv4Network] | None = None,
        reserve_gateway: bool = True,
    ) -> Pool:
        """Reserve a subnet for a network (given, or the first free default) and record its pool.

        `avoid` are subnets that must not be overlapped when choosing a default pool
        (the host's routes, pools of the other scope).
        """
        aux_addresses = dict(aux_addresses or {})
        avoid = list(avoid)
        if subnet is None:
            if gateway or ip_range or aux_addresses:
                raise BadRequest("--gateway, --ip-range and --aux-address need --subnet")
            net = None
        else:
            net = parse_subnet(subnet)
        for _attempt in range(64):
            chosen = net or self._choose_default(avoid, default_pools)
            pool = self._validated_pool(network_id, network_name, chosen, gateway, ip_range, aux_addresses)
            try:
                self._reserve(pool, explicit=net is not None)
            except KeyExists:
                if net is not None:
                    raise self._overlap_error(net) from None
                continue  # another host took that default pool a moment ago: next one
            try:
                self._reserve_fixed_addresses(pool, reserve_gateway)
            except Exception:
                self.release_pool(network_id)
                raise
            return pool
        raise Conflict("could not reserve a default address pool: too many concurrent network creations, try again")

    def _validated_pool(self, network_id, network_name, net, gateway, ip_range, aux) -> Pool:
        gw = None
        if gateway:
            gw_addr = parse_address(gateway, "gateway")
            if gw_addr not in net or gw_addr in (net.network_address, net.broadcast_address):
                raise BadRequest(f"gateway {gateway} is not a usable address of subnet {net}")
            gw = str(gw_addr)
        if ip_range:
            rng = parse_subnet(ip_range, "ip-range")
            if not rng.subnet_of(net):
                raise BadRequest(f"ip-range {ip_range} is not inside subnet {net}")
        if gw is None:
            gw = str(net.network_address + 1)
        for name, address in aux.items():
            addr = parse_address(address, f"aux-address {name}")
            if addr not in net:
                raise BadRequest(f"aux-address {name}={address} is not inside subnet {net}")
            if str(addr) == gw:
                raise BadRequest(f"aux-address {name}={address} is the network's gateway: choose another address")
        return Pool(network_id, network_name, str(net), gw, ip_range, aux, self.scope)

    def _choose_default(self, avoid: list[IPv4Network], default_pools) -> IPv4Network:
        in_use = [IPv4Network(p.subnet) for p in self.pools()] + avoid
        if default_pools is not None:
            candidates: Iterable[IPv4Network] = default_pools
        elif self.scope == "global":
            candidates = GLOBAL_DEFAULT_POOL.subnets(new_prefix=GLOBAL_DEFAULT_PREFIX)
        else:
            candidates = LOCAL_DEFAULT_POOLS
        for candidate in candidates:
            if not any(candidate.overlaps(used) for used in in_use):
                return candidate
        raise Conflict("all default address pools are in use: give the network a --subnet")

    def _reserve(self, pool: Pool, explicit: bool) -> None:
        """Claim the subnet atomically: the scope's subnet index (every reserved subnet, one key)
        is updated by compare-and-swap in the same transaction that creates the pool, so two hosts
        creating 10.1.0.0/16 and 10.1.2.0/24 at once cannot both win: the second re-reads the index
        and finds the overlap. (A key per exact CIDR alone only stops the same CIDR twice.)"""
        for _attempt in range(50):
            pair = self.store.get(SUBNET_INDEX)
            index = self._subnet_index(pair)
            for subnet in index.values():
                if IPv4Network(subnet).overlaps(pool.net):
                    if explicit:
                        raise self._overlap_error(pool.net)
                    raise KeyExists(_subnet_key(pool.net))   # a default pool taken meanwhile: the next one
            index[pool.network_id] = str(pool.net)
            value = json.dumps(index, sort_keys=True)
            ops = [Update(SUBNET_INDEX, value, pair.version) if pair else Create(SUBNET_INDEX, value),
                   Create(_subnet_key(pool.net), pool.network_id),
                   Create(POOLS + pool.network_id, json.dumps(asdict(pool), sort_keys=True))]
            try:
                self.store.commit(ops)
                return
            except VersionConflict:
                continue
            except KeyExists as e:
                if e.key == SUBNET_INDEX:
                    continue
                raise
        raise Conflict("could not reserve the subnet: too many concurrent network creations, try again")

    def _subnet_index(self, pair) -> dict[str, str]:
        """network id -> subnet, from the index key; built from the pools if there is none yet."""
        if pair is not None:
            try:
                index = json.loads(pair.value)
                if isinstance(index, dict):
                    return {k: v for k, v in index.items() if isinstance(v, str)}
            except ValueError:
                log.error("the subnet index in the store is damaged: rebuilding it from the pools")
        return {p.network_id: p.subnet for p in self.pools()}

    def _unindex(self, network_id: str) -> None:
        for _attempt in range(50):
            pair = self.store.get(SUBNET_INDEX)
            if pair is None:
                return
            index = self._subnet_index(pair)
            if index.pop(network_id, None) is None:
                return
            op = (Update(SUBNET_INDEX, json.dumps(index, sort_keys=True), pair.version) if index
                  else Delete(SUBNET_INDEX, pair.version))
            try:
                self.store.commit([op])
                return
            except VersionConflict:
                continue

    def _overlap_error(self, net: IPv4Network, other: Pool | None = None) -> Conflict:
        if other is None:
            other = next((p for p in self.pools() if IPv4Network(p.subnet).overlaps(net)), None)
        holder = f" (network {other.network_name}, {other.subnet})" if other else ""
        return Conflict(f"subnet {net} overlaps an address pool already in use{holder}")

    def _reserve_fixed_addresses(self, pool: Pool, reserve_gateway: bool) -> None:
        if reserve_gateway and pool.gateway:
            self._create_allocation(Allocation(pool.gateway, pool.network_id, kind="gateway", host=self.host))
        for name, address in pool.aux_addresses.items():
            self._create_allocation(Allocation(address, pool.network_id, kind="aux", name=name, host=self.host))

    def release_pool(self, network_id: str) -> None:
        pair = self.store.get(POOLS + network_id)
        self.store.delete_prefix(f"{ADDRESSES}{network_id}/")
        self._unindex(network_id)
        if pair is not None:
            pool = Pool(**json.loads(pair.value))
            self.store.delete(_subnet_key(pool.net))
            self.store.delete(pair.key)
        with self._lock:
            for key in [k for k in self._cursors if k.split("/", 1)[0] == network_id]:
                del self._cursors[key]
            self._pools.pop(network_id, None)

    def pool(self, network_id: str) -> Pool:
        cached = self._pools.get(network_id)
        if cached is not None:
            return cached
        pair = self.store.get(POOLS + network_id)
        if pair is None:
            raise NotFound(f"no address pool for network {network_id[:12]}")
        pool = self._pools[network_id] = Pool(**json.loads(pair.value))
        return pool

    def pools(self) -> list[Pool]:
        pairs, _ = self.store.list(POOLS)
        return [pool for p in pairs if (pool := _decoded(Pool, p)) is not None]

    # --- addresses --------------------------------------------------------------------------

    def allocate(self, network_id: str, requested: str | None = None, within: str | None = None,
                 adopt: bool = False, **owner) -> str:
        """Take an address for an endpoint; `requested` is a static --ip. Returns the address.

        `within` (a CIDR inside the pool) restricts this allocation to a sub-range of the pool,
        without its own first (network), second (its gateway) and last (broadcast) addresses: a
        host's share of a network whose hosts each route a part of it (hostgw's lease).
        """
        pool = self.pool(network_id)
        sub = self._sub_range(pool, within) if within else None
        if requested is not None:
            addr = parse_address(requested, "--ip")
            net = pool.net
            if addr not in net or addr in (net.network_address, net.broadcast_address):
                raise BadRequest(f"address {requested} is not a usable address of subnet {net} (network {pool.network_name})")
            if sub is not None and not sub[0] <= int(addr) <= sub[1]:
                raise BadRequest(f"address {requested} is outside {within}, the part of network {pool.network_name} "
                                 "this host gives out: choose an address in it")
            try:
                self._create_allocation(Allocation(str(addr), network_id, host=self.host, **owner))
            except KeyExists:
                if adopt and self._adopt(network_id, str(addr), owner):
                    return str(addr)
                raise Conflict(f"address {requested} is already in use on network {pool.network_name}{self._holder(network_id, addr)}") from None
            self._mark_taken(network_id, int(addr))
            return str(addr)
        return self._allocate_next(pool, owner, sub, within)

    @staticmethod
    def _sub_range(pool: Pool, within: str) -> tuple[int, int]:
        """The first and last address `allocate(within=...)` may give out."""
        rng = parse_subnet(within, "range")
        if not rng.subnet_of(pool.net):
            raise BadRequest(f"range {within} is not inside subnet {pool.subnet} (network {pool.network_name})")
        first = max(int(rng.network_address) + 2, int(pool.allocatable.network_address), int(pool.net.network_address) + 1)
        last = min(int(rng.broadcast_address) - 1, int(pool.allocatable.broadcast_address),
                   int(pool.net.broadcast_address) - 1)
        return first, last

    def _allocate_next(self, pool: Pool, owner: dict, sub: tuple[int, int] | None = None, within: str | None = None) -> str:
        refresh = False
        for _pass in range(2):  # the second pass re-reads the store: others may have released
            while True:
                with self._lock:
                    cursor = self._cursor(pool, refresh, sub)
                    refresh = False
                    candidate = self._pick(cursor)
                if candidate is None:
                    break
                address = str(IPv4Address(candidate))
                try:
                    self._create_allocation(Allocation(address, pool.network_id, host=self.host, **owner))
                except KeyExists:
                    with self._lock:  # another host was faster: remember, and move away from it
                        cursor.taken.add(candidate)
                        cursor.next = random.randint(cursor.first, cursor.last)
                    continue
                with self._lock:
                    cursor.taken.add(candidate)
                    cursor.next = candidate + 1
                return address
            refresh = True
        raise Conflict(
            f"no free address left in {within or pool.ip_range or pool.subnet} (network {pool.network_name}): "
            f"the {'range' if within else 'pool'} is exhausted"
        )

    def _cursor(self, pool: Pool, refresh: bool, sub: tuple[int, int] | None = None) -> _PoolCursor:
        key = pool.network_id if sub is None else f"{pool.network_id}/{sub[0]}-{sub[1]}"
        cursor = self._cursors.get(key)
        if cursor is None or refresh:
            pairs, _ = self.store.list(f"{ADDRESSES}{pool.network_id}/")
            taken = {int(IPv4Address(p.key.rsplit("/", 1)[1])) for p in pairs}
            if sub is None:
                rng, net = pool.allocatable, pool.net
                first = max(int(rng.network_address), int(net.network_address) + 1)
                last = min(int(rng.broadcast_address), int(net.broadcast_address) - 1)
            else:
                first, last = sub
            fresh = _PoolCursor(taken, first, last)
            if cursor is not None:
                fresh.next = cursor.next
            cursor = self._cursors[key] = fresh
        return cursor

    def _cursors_of(self, network_id: str) -> list[_PoolCursor]:
        """The cursors of a pool: the whole pool's and its sub-ranges'. Hold self._lock."""
        return [c for key, c in self._cursors.items() if key.split("/", 1)[0] == network_id]

    @staticmethod
    def _pick(cursor: _PoolCursor) -> int | None:
        """The first free address at or after the cursor, wrapping around once."""
        size = cursor.last - cursor.first + 1
        start = min(max(cursor.next, cursor.first), cursor.last + 1) - cursor.first
        for offset in range(size):
            candidate = cursor.first + (start + offset) % size
            if candidate not in cursor.taken:
                return candidate
        return None

    def _mark_taken(self, network_id: str, address: int) -> None:
        with self._lock:
            for cursor in self._cursors_of(network_id):
                cursor.taken.add(address)

    def _adopt(self, network_id: str, address: str, owner: dict) -> bool:
        """Take over an address handed out with no endpoint yet (by netd's IPAM plugin to
        dockerd, which then asks netd's network driver for the endpoint): compare-and-swap."""
        key = f"{ADDRESSES}{network_id}/{address}"
        pair = self.store.get(key)
        if pair is None or not _unclaimed(pair):
            return False
        try:
            self.store.update(key, Allocation(address, network_id, host=self.host, **owner).to_json(), pair.version)
        except VersionConflict:
            return False
        return True

    def release_unclaimed(self, network_id: str, address: str) -> None:
        """Release `address` if it is held with no endpoint (what the IPAM plugin handed out and
        no endpoint took over)."""
        self._release_if(network_id, address, _unclaimed)

    def _release_if(self, network_id: str, address: str, holds: Callable[[KVPair], bool]) -> None:
        """Release `address` only while `holds` says its allocation is still the one meant
        (another host may have taken it again since): a compare-and-swap delete."""
        key = f"{ADDRESSES}{network_id}/{address}"
        pair = self.store.get(key)
        if pair is None or not holds(pair):
            return
        with contextlib.suppress(VersionConflict):
            self.store.delete(key, pair.version)
        self._mark_free(network_id, address)

    def _create_allocation(self, allocation: Allocation) -> None:
        self.store.create(f"{ADDRESSES}{allocation.network_id}/{allocation.address}", allocation.to_json())

    def _holder(self, network_id: str, addr: IPv4Address) -> str:
        try:
            pair = self.store.get(f"{ADDRESSES}{network_id}/{addr}")
        except StoreError:
            return ""
        if pair is None:
            return ""
        held = json.loads(pair.value)
        if held.get("kind") == "gateway":
            return " (it is the gateway)"
        if held.get("kind") == "aux":
            return f" (it is the auxiliary address {held.get('name')})"
        who = held.get("container") or held.get("endpoint_id", "")[:12]
        return f" (by {who} on host {held.get('host')})" if held.get("host") else f" (by {who})"

    def release(self, network_id: str, address: str) -> None:
        self.store.delete(f"{ADDRESSES}{network_id}/{address}")
        self._mark_free(network_id, address)

    def _mark_free(self, network_id: str, address: str) -> None:
        with self._lock:
            for cursor in self._cursors_of(network_id):
                cursor.taken.discard(int(IPv4Address(address)))

    def release_owned(self, network_id: str, address: str, endpoint_id: str) -> None:
        """Release `address` only if `endpoint_id` still holds it."""
        self._release_if(network_id, address, lambda pair: json.loads(pair.value).get("endpoint_id") == endpoint_id)

    def reserve(self, network_id: str, address: str, kind: str = "gateway", name: str = "") -> None:
        """Hold an address that no endpoint may get (e.g. the gateway of a host's sub-range).
        Nothing happens if it is already held as `kind`; held otherwise, it is a Conflict."""
        pool = self.pool(network_id)
        addr = parse_address(address)
        if addr not in pool.net:
            raise BadRequest(f"address {address} is not inside subnet {pool.subnet} (network {pool.network_name})")
        try:
            self._create_allocation(Allocation(str(addr), network_id, kind=kind, name=name, host=self.host))
        except KeyExists:
            pair = self.store.get(f"{ADDRESSES}{network_id}/{addr}")
            if pair is None or json.loads(pair.value).get("kind") != kind:
                raise Conflict(f"address {address} is already in use on network {pool.network_name}"
                               f"{self._holder(network_id, addr)}") from None
        self._mark_taken(network_id, int(addr))

    def release_reserved(self, network_id: str, address: str, name: str) -> None:
        """Release what reserve() took under `name`, only if it is still held so."""
        self._release_if(network_id, address, lambda pair: json.loads(pair.value).get("name") == name)

    def allocations(self, network_id: str) -> list[Allocation]:
        pairs, _ = self.store.list(f"{ADDRESSES}{network_id}/")
        allocations = [a for p in pairs if (a := _decoded(Allocation, p)) is not None]
        return sorted(allocations, key=lambda a: int(IPv4Address(a.address)))

    def lookup(self, address: str) -> list[tuple[Pool, Allocation | None]]:
        """Every pool holding `address`, with its allocation (None: in the pool, but free)."""
        addr = parse_address(address)
        found = []
        for pool in self.pools():
            if addr in pool.net:
                pair = self.store.get(f"{ADDRESSES}{pool.network_id}/{addr}")
                found.append((pool, _decoded(Allocation, pair) if pair else None))
        return found

    def usage(self, pool: Pool) -> tuple[int, int]:
        """(size, used) of a pool, counting only addresses containers can get."""
        pairs, _ = self.store.list(f"{ADDRESSES}{pool.network_id}/")
        allocatable = pool.allocatable
        used = sum(1 for p in pairs if ipaddress.IPv4Address(p.key.rsplit("/", 1)[1]) in allocatable)
        return pool.usable_hosts(), used


def _unclaimed(pair: KVPair) -> bool:
    """An endpoint's allocation that no endpoint took yet (handed out by the IPAM plugin)."""
    held = _decoded(Allocation, pair)
    return held is not None and held.kind == "endpoint" and not held.endpoint_id


def _decoded(cls, pair):
    """A Pool or Allocation from the store, or None (logged) for a value that is not one: garbage
    written by hand must not stop `ipam ls`, allocation or reclaim."""
    try:
        value = cls(**json.loads(pair.value))
        if cls is Allocation:
            IPv4Address(value.address)
        else:
            IPv4Network(value.subnet)
        return value
    except (ValueError, TypeError, AttributeError) as e:
        log.error("ignoring a bad value at %s in the store: %s", pair.key, e)
        return None
