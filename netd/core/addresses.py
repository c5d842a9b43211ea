"""The AddressBook drivers get in their DriverContext: their own addresses (a part's gateway, a
host-access shim) from the controller's IPAM, in the network's scope. One IPAM, one cursor cache."""

from __future__ import annotations

from netd.contract.driverapi import AddressBook, Held
from netd.contract.model import Network
from netd.core.ipam import IPAM


class IpamAddressBook(AddressBook):
    def __init__(self, ipam: dict[str, IPAM]):
        self.ipam = ipam          # scope -> IPAM: the controller's own table (a global one appears with the store)

    def held(self, network: Network) -> list[Held]:
        return [Held(a.address, a.kind, a.name, a.host) for a in self.ipam[network.scope].allocations(network.id)]

    def take(self, network: Network, name: str, kind: str = "aux", address: str | None = None,
             within: str | None = None) -> str:
        ipam = self.ipam[network.scope]
        if address is not None:
            ipam.reserve(network.id, address, kind=kind, name=name)
            return address
        return ipam.allocate(network.id, within=within, kind=kind, name=name)

    def give_back(self, network: Network, address: str, name: str) -> None:
        self.ipam[network.scope].release_reserved(network.id, address, name)
