"""The controller's in-memory tables and paths: where a container's files are, the endpoints on this host."""

from __future__ import annotations

import os
from dataclasses import dataclass

from netd.contract.model import Endpoint

DEFAULT_BRIDGE_NETWORK = "bridge"
BUILTIN_NETWORKS = {"bridge": "bridge", "host": "host", "none": "null"}   # name -> driver
STOP_TIMEOUT = 10.0


@dataclass
class Paths:
    run_dir: str
    data_dir: str

    def netns(self, container_id: str) -> str:
        return os.path.join(self.run_dir, "netns", container_id[:12])

    def container_run_dir(self, container_id: str) -> str:
        return os.path.join(self.run_dir, "containers", container_id)

    def container_data_dir(self, container_id: str) -> str:
        return os.path.join(self.data_dir, "containers", container_id)

    def log_file(self, container_id: str) -> str:
        return os.path.join(self.container_data_dir(container_id), "container.log")


class EndpointTable:
    """The endpoints on this host, findable by id, by container and by network in O(1): the
    attach path asks several times, and a host may hold thousands."""

    def __init__(self) -> None:
        self._by_id: dict[str, Endpoint] = {}
        self._by_container: dict[str, dict[str, Endpoint]] = {}
        self._by_network: dict[str, dict[str, Endpoint]] = {}

    def add(self, endpoint: Endpoint) -> None:
        self.remove(endpoint.id)
        self._by_id[endpoint.id] = endpoint
        self._by_container.setdefault(endpoint.container_id, {})[endpoint.id] = endpoint
        self._by_network.setdefault(endpoint.network_id, {})[endpoint.id] = endpoint

    def remove(self, endpoint_id: str) -> Endpoint | None:
        endpoint = self._by_id.pop(endpoint_id, None)
        if endpoint is not None:
            for index, key in ((self._by_container, endpoint.container_id), (self._by_network, endpoint.network_id)):
                index[key].pop(endpoint_id, None)
                if not index[key]:
                    del index[key]
        return endpoint

    def __contains__(self, endpoint_id: str) -> bool:
        return endpoint_id in self._by_id

    def __getitem__(self, endpoint_id: str) -> Endpoint:
        return self._by_id[endpoint_id]

    def get(self, endpoint_id: str) -> Endpoint | None:
        return self._by_id.get(endpoint_id)

    def all(self) -> list[Endpoint]:
        return list(self._by_id.values())

    def ids(self) -> set[str]:
        return set(self._by_id)

    def of_container(self, container_id: str) -> list[Endpoint]:
        return list(self._by_container.get(container_id, {}).values())

    def of_network(self, network_id: str) -> list[Endpoint]:
        return list(self._by_network.get(network_id, {}).values())
