"""Name resolution for the embedded DNS: container names and aliases on the asker's networks, and
reverse lookups."""


import logging

from netd.contract.model import (
    Container,
    Network,
)

log = logging.getLogger(__name__)



class Resolution:
    """The Controller's answers to the embedded DNS: names and addresses on the asker's networks."""

    # --- name resolution --------------------------------------------------------------------
    # No lock: DNS answers from the tables as they are (each read in one step), so a slow store
    # or a long operation never stops name resolution for every container on the host.

    def _resolvable_networks(self, asker: Container) -> list[Network]:
        """Networks whose names the container sees: its user-defined ones (as Docker)."""
        networks = [n for e in self._container_endpoints(asker) if (n := self.networks.get(e.network_id))]
        return [n for n in networks if not n.builtin and n.ipam]

    def resolve_name(self, container_id: str, name: str) -> list[str] | None:
        """Addresses of `name` as seen by container_id (None: not a name netd knows).

        A name may be a container name, an alias or a short container id; `name.network`
        picks one network.
        """
        asker = self.containers.get(container_id)
        if asker is None:
            return None
        networks = self._resolvable_networks(asker)
        wanted, only = name, None
        for network in networks:
            suffix = "." + network.name.lower()
            if name.endswith(suffix):
                wanted, only = name[: -len(suffix)], network.id
        found: list[str] = []
        for network in networks:
            if only and network.id != only:
                continue
            for endpoint in self.network_endpoints(network):
                names = {endpoint.container_name.lower(), endpoint.container_id[:12]}
                names.update(a.lower() for a in endpoint.aliases)
                if wanted in names and endpoint.address and endpoint.address not in found:
                    found.append(endpoint.address)
        return found or None

    def resolve_address(self, container_id: str, address: str) -> str | None:
        """The name of the container holding `address` on one of the asker's networks, as
        `name.network` (Docker's PTR answer)."""
        asker = self.containers.get(container_id)
        if asker is None:
            return None
        for network in self._resolvable_networks(asker):
            for endpoint in self.network_endpoints(network):
                if endpoint.address == address:
                    return f"{endpoint.container_name}.{network.name}"
        return None
