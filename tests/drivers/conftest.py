"""Drivers tested alone, as the CNI plugins test theirs: each in a scratch "host" namespace with a
small DriverContext (an embedded store in the driver's own folder, an in-memory AddressBook, a
real nftables Firewall in that namespace), and containers as scratch namespaces. No daemon.

The test's thread enters the host namespace for the whole test (drivers work in "the daemon's own
namespace", which is the calling thread's), and every namespace is removed even when a test fails.
"""

from __future__ import annotations

import gc
import ipaddress
import os
import secrets
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

import drivers
from kvstore.embedded import EmbeddedStore
from kvstore.prefixed import PrefixedStore
from netd.contract.driverapi import AddressBook, DriverContext, Held, HostInfo
from netd.contract.model import Endpoint, IPAMConfig, Network
from netd.kernel.rtnl import flush_retired, stop_retirer
from runtime.namespaces import create_netns, delete_netns, entered_netns, pids_in_netns

HOST_ADDRESS = "192.0.2.10"     # the scratch host's "underlay" address (TEST-NET-1), on a veth of its own


class Book(AddressBook):
    """The controller's role, in memory: addresses drivers take for themselves."""

    def __init__(self):
        self.taken: dict[str, dict[str, Held]] = {}

    def held(self, network: Network) -> list[Held]:
        return list(self.taken.get(network.id, {}).values())

    def take(self, network, name, kind="aux", address=None, within=None) -> str:
        taken = self.taken.setdefault(network.id, {})
        if address is None:
            pool = ipaddress.IPv4Network(within or network.ipam.subnet)
            address = next(str(a) for a in list(pool.hosts())[1:] if str(a) not in taken
                           and str(a) != network.ipam.gateway)
        taken[address] = Held(address, kind, name, HOST_ADDRESS)
        return address

    def give_back(self, network, address, name) -> None:
        held = self.taken.get(network.id, {}).get(address)
        if held is not None and held.name == name:
            del self.taken[network.id][address]


@dataclass
class Scratch:
    """A scratch host namespace, its store and firewall, and the container namespaces made in it."""

    tmp: str
    host: str
    store: EmbeddedStore
    firewall: object
    book: Book = field(default_factory=Book)
    containers: list[str] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def context(self, driver: str, cluster: bool = True) -> DriverContext:
        folder = PrefixedStore(self.store, f"netd/{driver}/")
        return DriverContext(HostInfo("host-1", "scratch", HOST_ADDRESS), folder, folder if cluster else None,
                             self.firewall, os.path.join(self.tmp, "run"), self.lock, addresses=self.book)

    def driver(self, name: str, cluster: bool = True):
        return drivers.driver_classes()[name](self.context(name, cluster))

    def container(self) -> str:
        path = os.path.join(self.tmp, f"c{len(self.containers)}")
        create_netns(path)
        self.containers.append(path)
        return path

    def sh(self, netns: str, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", f"--net={netns}", "sh", "-c", command], capture_output=True, text=True,
                              timeout=30)

    def links(self) -> str:
        flush_retired()
        return self.sh(self.host, "ip -o link show").stdout


def network(driver: str, subnet: str = "10.123.0.0/24", gateway: str | None = "10.123.0.1", **options) -> Network:
    return Network(id=secrets.token_hex(32), name=f"t{secrets.token_hex(2)}", driver=driver,
                   scope="global" if driver in ("overlay", "hostgw") else "local",
                   ipam=IPAMConfig(subnet, gateway), options={k: str(v) for k, v in options.items()})


def endpoint(net: Network, address: str, name: str = "c") -> Endpoint:
    prefix = net.ipam.subnet.split("/")[1]
    return Endpoint(id=secrets.token_hex(32), network_id=net.id, container_id=secrets.token_hex(32),
                    container_name=name, host=HOST_ADDRESS, ipv4=f"{address}/{prefix}")


@pytest.fixture
def scratch(tmp_path) -> Iterator[Scratch]:
    from netd.kernel.firewall import Firewall

    host = str(tmp_path / "host")
    stop_retirer()
    create_netns(host)
    made: Scratch | None = None
    try:
        with entered_netns(host):
            subprocess.run(["nsenter", f"--net={host}", "sh", "-c",
                            f"ip link add underlay0 type veth peer name underlay1 && ip addr add {HOST_ADDRESS}/24 "
                            "dev underlay0 && ip link set underlay0 up && ip link set underlay1 up"], check=True)
            firewall = Firewall(table=f"netdt{secrets.token_hex(3)}")
            firewall.setup()
            store = EmbeddedStore(str(tmp_path / "store.db"))
            made = Scratch(str(tmp_path), host, store, firewall)
            yield made
            # The retirer's thread works in the namespace it was started in: one per test.
            stop_retirer()
    finally:
        if made is not None:
            for path in made.containers:
                delete_netns(path)
            made.store.close()
            with entered_netns(host):
                made.firewall.teardown()
                made.firewall.close()
        gc.collect()
        for pid in pids_in_netns([host]):
            os.kill(pid, 9)
        delete_netns(host)
