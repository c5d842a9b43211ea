"""hostgw's facts: options and key names, a host's part of the subnet (its lease, bridge and gateway),
another host's part as a route sees it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Network

from kvstore import Lease, LeaseKeeper
from netd.contract.model import Network
from netd.kernel import netlink

log = logging.getLogger("netd.driver.hostgw")


OPT_SUBNET_LEN = "subnet_len"
OPT_LEASE_TTL = "lease_ttl"
DEFAULT_SUBNET_LEN = 24
DEFAULT_LEASE_TTL = 30
MIN_LEASE_TTL, MAX_LEASE_TTL = 2, 86400
LEASES = "leases/"                  # in the driver's own folder of the cluster store
RTPROT_HOSTGW = 110            # "proto 110" in `ip route`: routes to other hosts' parts
BRIDGE_PREFIX = "hg-"
RECONCILE_INTERVAL = 2.0


def lease_key(network_id: str, subnet: IPv4Network) -> str:
    return f"{LEASES}{network_id}/{subnet.network_address}-{subnet.prefixlen}"


def key_subnet(key: str) -> IPv4Network | None:
    try:
        return IPv4Network(key.rsplit("/", 1)[1].replace("-", "/"))
    except ValueError:
        return None


def bridge_name(network: Network) -> str:
    return netlink.interface_name(BRIDGE_PREFIX, network.id)


def gateway_name(subnet: IPv4Network) -> str:
    return f"hostgw {subnet}"


@dataclass
class Part:
    """This host's part of one hostgw network: its lease, its bridge, its endpoints."""

    network: Network
    subnet: IPv4Network
    lease: Lease
    keeper: LeaseKeeper
    endpoints: set[str] = field(default_factory=set)
    lost: bool = False          # the store lease lapsed (the store was away too long): take it again
    problem: str = ""           # why this host's part is not in order, for inspect
    bridge_index: int = 0
    rounds: int = 0             # reconciliations so far
    since: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> str:
        return lease_key(self.network.id, self.subnet)

    @property
    def gateway(self) -> str:
        return str(self.subnet.network_address + 1)

    @property
    def bridge(self) -> str:
        return bridge_name(self.network)


@dataclass
class Peer:
    subnet: str
    address: str
    host: str
    route: str                  # "via 10.10.0.2 dev eth0", or why there is none
    oif: int = 0                # 0: not routed
