"""JSON views of netd's objects, with Docker's field names where Docker has the field, so that
scripts written for `docker network inspect` / `docker inspect` keep working."""

from __future__ import annotations

from datetime import UTC, datetime

from netd.contract.model import Container, Endpoint, Network
from netd.core.controller import Controller


def network_view(ctl: Controller, network: Network, verbose: bool = True) -> dict:
    view = {
        "Name": network.name,
        "Id": network.id,
        "Created": network.created,
        "Scope": network.scope,
        "Driver": network.driver,
        "EnableIPv6": False,
        "IPAM": {
            "Driver": "default",
            "Options": {},
            "Config": [network.ipam.to_docker()] if network.ipam else [],
        },
        "Internal": network.internal,
        "Attachable": True,
        "Ingress": False,
        "Options": dict(network.options),
        "Labels": dict(network.labels),
    }
    if verbose:
        view["Containers"] = {
            e.container_id: endpoint_view(e) for e in ctl.network_endpoints(network)
        }
        driver = ctl.driver_of(network)
        if driver is not None:
            view["Netd"] = driver.inspect(network)
    return view


def endpoint_view(endpoint: Endpoint) -> dict:
    return {
        "Name": endpoint.container_name,
        "EndpointID": endpoint.id,
        "MacAddress": endpoint.mac,
        "IPv4Address": endpoint.ipv4,
        "IPv6Address": "",
        "Host": endpoint.host,
        "Aliases": list(endpoint.aliases),
    }


def container_summary(ctl: Controller, container: Container) -> dict:
    return {
        "Id": container.id,
        "Names": [container.name],
        "Command": " ".join(container.cmd),
        "Created": container.created,
        "State": container.state,
        "Status": _status(container) + "".join(
            f" ({e.note.split(':')[0]} on {n.name if (n := ctl.network_by_id(e.network_id)) else e.network_id[:12]})"
            for e in ctl.container_endpoints(container) if e.note),
        "Ports": [port_view(p) for p in container.ports],
        "Networks": [n.name for nid in container.networks if (n := ctl.network_by_id(nid)) is not None] or [container.network_mode],
    }


def _status(container: Container) -> str:
    """Docker's wording: "Up 5 minutes", "Exited (0) 2 hours ago"."""
    if container.state == "running":
        return f"Up {_since(container.started_at)}"
    if container.state == "exited":
        code = "?" if container.exit_code is None else container.exit_code
        return f"Exited ({code}) {_since(container.finished_at)} ago"
    return container.state.capitalize()


def _since(timestamp: str) -> str:
    try:
        then = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return "a while"
    seconds = max(0, int((datetime.now(UTC) - then).total_seconds()))
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = seconds // size
            return f"{count} {unit}{'s' if count > 1 else ''}"
    return "less than a second" if seconds < 1 else f"{seconds} seconds"


def port_view(port) -> dict:
    return {"IP": port.host_ip or "0.0.0.0", "PublicPort": port.host_port, "PrivatePort": port.container_port,
            "Type": port.proto}


def container_view(ctl: Controller, container: Container) -> dict:
    networks = {}
    for endpoint in ctl.container_endpoints(container):
        network = ctl.network_by_id(endpoint.network_id)
        address, _, prefix = endpoint.ipv4.partition("/")
        networks[network.name if network else endpoint.network_id] = {
            "NetworkID": endpoint.network_id,
            "EndpointID": endpoint.id,
            "Gateway": endpoint.gateway,
            "IPAddress": address,
            "IPPrefixLen": int(prefix) if prefix else 0,
            "MacAddress": endpoint.mac,
            "Aliases": list(endpoint.aliases),
            "Interface": endpoint.ifname,
            "Note": endpoint.note,
        }
    ports: dict[str, list | None] = {}
    for port in container.ports:
        ports.setdefault(f"{port.container_port}/{port.proto}", []).append(
            {"HostIp": port.host_ip or "0.0.0.0", "HostPort": str(port.host_port)}
        )
    return {
        "Id": container.id,
        "Name": container.name,
        "Created": container.created,
        "Path": container.cmd[0] if container.cmd else "",
        "Args": container.cmd[1:],
        "State": {
            "Status": container.state,
            "Running": container.state == "running",
            "Pid": container.pid if container.state == "running" else 0,
            "ExitCode": container.exit_code,
            "StartedAt": container.started_at,
            "FinishedAt": container.finished_at,
        },
        "Config": {"Hostname": container.hostname, "Cmd": list(container.cmd), "Env": [f"{k}={v}" for k, v in container.env.items()],
                   "ExposedPorts": {p: {} for p in container.exposed}},
        "HostConfig": {"NetworkMode": container.network_mode, "AutoRemove": container.auto_remove,
                       "PublishAllPorts": container.publish_all, "Privileged": container.capabilities is None,
                       "CapAdd": None, "CapDrop": None,
                       "Capabilities": container.capabilities},
        "Rootfs": container.rootfs or "",
        "NetworkSettings": {
            "SandboxKey": container.netns,
            "Ports": ports,
            "Networks": networks,
        },
    }
