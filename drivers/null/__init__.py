"""The `null` driver (network `none`): a namespace of its own with only `lo`."""

from netd.contract.driverapi import Driver, JoinInfo
from netd.contract.model import Endpoint, Network


class NullDriver(Driver):
    name = "null"
    has_addresses = False
    namespace_mode = True

    def create_network(self, network: Network) -> None:
        pass

    def delete_network(self, network: Network) -> None:
        pass

    def join(self, network: Network, endpoint: Endpoint, info: JoinInfo) -> None:
        pass  # the sandbox already has lo up; nothing else belongs there

    def leave(self, network: Network, endpoint: Endpoint, sandbox_gone: bool = False) -> None:
        pass

DRIVER = NullDriver
