"""Published ports: reserving host ports (a socket held, as docker-proxy does), programming them through
the network's driver, releasing them."""


import logging
import socket

from netd.contract.errors import BadRequest, Conflict
from netd.contract.model import (
    Container,
    Network,
    PortBinding,
)
from netd.core.undo import Undo

log = logging.getLogger(__name__)



class Ports:
    """The Controller's published ports: reserved host ports, programmed through the driver."""

    # --- published ports --------------------------------------------------------------------

    def _publish(self, container: Container, network: Network, undo: Undo) -> None:
        impl = self.drivers[network.driver]
        ports = list(container.ports)
        if container.publish_all:
            listed = {(p.container_port, p.proto) for p in ports}
            for spec in container.exposed:
                port, proto = parse_port_proto(spec)
                if (port, proto) not in listed:
                    ports.append(PortBinding(port, proto))
        for port in ports:
            if not port.host_ip:
                port.host_ip = impl.default_host_ip(network)
        self._reserve_ports(container, ports)
        undo.push(self._release_port_reservations, container)
        container.ports = ports
        endpoint = next(e for e in self._container_endpoints(container) if e.network_id == network.id)
        impl.publish_ports(network, endpoint, ports)
        undo.push(impl.unpublish_ports, network, endpoint, ports)

    def _program_ports(self, container: Container, ports: list[PortBinding]) -> None:
        """Re-install a running container's port rules (after a restart)."""
        for endpoint in self._container_endpoints(container):
            network = self.networks.get(endpoint.network_id)
            if network and self.drivers[network.driver].supports_ports and ports:
                try:
                    self.drivers[network.driver].publish_ports(network, endpoint, ports)
                except Exception as e:  # noqa: BLE001
                    log.error("could not restore published ports of %s: %s", container.name, e)
                return

    def _reserve_ports(self, container: Container, ports: list[PortBinding], restoring: bool = False) -> None:
        """Hold each published host port with a bound socket, as Docker's proxy does: no other
        program can take it, and a port already in use is refused up front."""
        taken: list[tuple[str, str, int]] = []
        try:
            for port in ports:
                key = (port.proto, port.host_ip, port.host_port)
                if port.host_port and key in self._port_reservations and not restoring:
                    holder = self._port_holder(port)
                    raise Conflict(f"port {port.host_port}/{port.proto} is already published by container {holder}")
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM if port.proto == "tcp" else socket.SOCK_DGRAM)
                try:
                    sock.bind((port.host_ip or "0.0.0.0", port.host_port))
                except OSError as e:
                    sock.close()
                    if restoring:
                        log.warning("port %s/%s could not be reserved again: %s", port.host_port, port.proto, e)
                        continue
                    where = f"{port.host_ip}:" if port.host_ip else ""
                    raise Conflict(f"port {where}{port.host_port}/{port.proto} is already in use on the host: {e.strerror}") from None
                port.host_port = sock.getsockname()[1]
                key = (port.proto, port.host_ip, port.host_port)
                self._port_reservations[key] = sock
                taken.append(key)
        except Exception:
            for key in taken:
                self._port_reservations.pop(key).close()
            raise

    def _port_holder(self, port: PortBinding) -> str:
        for c in self.containers.values():
            if any((p.proto, p.host_ip, p.host_port) == (port.proto, port.host_ip, port.host_port) for p in c.ports):
                return c.name
        return "another container"

    def _release_port_reservations(self, container: Container) -> None:
        for port in container.ports:
            sock = self._port_reservations.pop((port.proto, port.host_ip, port.host_port), None)
            if sock is not None:
                sock.close()

def parse_port_proto(spec: str) -> tuple[int, str]:
    port, _, proto = spec.partition("/")
    proto = proto or "tcp"
    if proto not in ("tcp", "udp") or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadRequest(f"invalid port {spec!r}: expected PORT[/tcp|/udp] with PORT from 1 to 65535")
    return int(port), proto
