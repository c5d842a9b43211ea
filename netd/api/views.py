"""JSON views of netd's objects, with Docker's field names where Docker has the field, so that
scripts written for `docker network inspect` / `docker inspect` keep working."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

from netd.contract.errors import BadRequest
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
            "Options": None,      # as dockerd says when no --ipam-opt was given
            "Config": [network.ipam.to_docker()] if network.ipam else [],
        },
        "Internal": network.internal,
        "Attachable": False,      # a swarm notion: every netd network takes any container
        "Ingress": False,
        "ConfigFrom": {"Network": ""},
        "ConfigOnly": False,
        "Containers": {},
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
        "Command": " ".join(container.cmd) if not container.external else f"({container.external} sandbox)",
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


NETWORK_FILTERS = ("name", "id", "driver", "scope", "type", "label", "label!", "until")


def network_filters(text: str | None, allowed: tuple[str, ...] = NETWORK_FILTERS) -> dict[str, list[str]]:
    """Docker's `filters` query parameter, in either of its forms: {"name": {"x": true}} or
    {"name": ["x"]}."""
    if not text:
        return {}
    try:
        raw = json.loads(text)
    except ValueError:
        raise BadRequest("invalid filters: not JSON") from None
    if not isinstance(raw, dict):
        raise BadRequest("invalid filters: expected an object")
    wanted: dict[str, list[str]] = {}
    for key, values in raw.items():
        if key not in allowed:
            raise BadRequest(f"invalid filter '{key}'")
        if isinstance(values, dict):
            values = [v for v, on in values.items() if on]
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise BadRequest(f"invalid filter '{key}': expected strings")
        wanted[key] = values
    return wanted


def network_matches(network: Network, wanted: dict[str, list[str]]) -> bool:
    """Docker's rules: any value of a key may match, every key must."""
    def label_matches(spec: str) -> bool:
        key, eq, value = spec.partition("=")
        return key in network.labels and (not eq or network.labels[key] == value)

    tests = {
        "name": lambda v: _search(v, network.name),
        "id": lambda v: network.id.startswith(v),
        "driver": lambda v: network.driver == v,
        "scope": lambda v: network.scope == v,
        "type": lambda v: (v == "builtin") == network.builtin if v in ("builtin", "custom") else _bad_type(v),
        "label": label_matches,
        "until": lambda v: True,   # accepted for `network prune --filter until=`: netd keeps no age limit
    }
    for key, values in wanted.items():
        if key == "label!":
            if any(label_matches(v) for v in values):
                return False
        elif values and not any(tests[key](v) for v in values):
            return False
    return True


def _search(pattern: str, text: str) -> bool:
    try:
        return re.search(pattern, text) is not None
    except re.error:
        return pattern in text


def _bad_type(value: str) -> bool:
    raise BadRequest(f"invalid filter 'type={value}': use builtin or custom")
