"""The `host` driver: the container uses the host's own network namespace."""

from netd.contract.driverapi import Driver, JoinInfo
from netd.contract.model import Endpoint, Network


class HostDriver(Driver):
    name = "host"
    has_addresses = False
    namespace_mode = True
    uses_host_namespace = True

    def create_network(self, network: Network) -> None:
        pass

    def delete_network(self, network: Network) -> None:
        pass

    def join(self, network: Network, endpoint: Endpoint, info: JoinInfo) -> None:
        pass  # nothing to plumb: the container runs in the host's namespace

    def leave(self, network: Network, endpoint: Endpoint, sandbox_gone: bool = False) -> None:
        pass

DRIVER = HostDriver
