"""The CNM objects (network, endpoint, container) as plain data, and how they are stored.

Each object serializes to a JSON document in a store. The
views that `netd ... inspect` and `ls` print, with Docker's field names so that scripts written
for `docker network inspect` keep working, are built in netd.api.views (IPAM's `to_docker()`
gives its "Config" entry).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network

from netd.contract.errors import BadRequest

NAME_PATTERN = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
MAX_NAME_LENGTH = 64

LOCAL = "local"
GLOBAL = "global"


def new_id() -> str:
    """A 64-hex-digit identifier, as Docker's."""
    return secrets.token_hex(32)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def check_name(kind: str, name: str) -> str:
    if not name or len(name) > MAX_NAME_LENGTH or not NAME_PATTERN.match(name):
        raise BadRequest(
            f"invalid {kind} name {name!r}: use letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return name


@dataclass
class IPAMConfig:
    subnet: str
    gateway: str | None = None
    ip_range: str | None = None
    aux_addresses: dict[str, str] = field(default_factory=dict)

    def to_docker(self) -> dict:
        out = {"Subnet": self.subnet}
        if self.gateway:
            out["Gateway"] = self.gateway
        if self.ip_range:
            out["IPRange"] = self.ip_range
        if self.aux_addresses:
            out["AuxiliaryAddresses"] = dict(self.aux_addresses)
        return out


@dataclass
class Network:
    id: str
    name: str
    driver: str
    scope: str = LOCAL
    internal: bool = False
    ipam: IPAMConfig | None = None       # None for drivers without addresses (host, null)
    options: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    created: str = field(default_factory=now)
    builtin: bool = False                # the default bridge, host and none networks
    removing: bool = False               # a global network on its way out: no new endpoints
    # Driver-owned facts decided once at creation (bridge name, VNI, ...), shared by all hosts.
    driver_state: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Network:
        data = json.loads(text)
        ipam = data.pop("ipam", None)
        return cls(ipam=IPAMConfig(**ipam) if ipam else None, **data)

    @property
    def short_id(self) -> str:
        return self.id[:12]


@dataclass
class Endpoint:
    id: str
    network_id: str
    container_id: str
    container_name: str
    host: str                            # the host (advertise address or host id) it lives on
    ifname: str = ""                     # name inside the container: eth0, eth1, ...
    mac: str = ""
    ipv4: str = ""                       # address with prefix, e.g. 172.18.0.2/16
    aliases: list[str] = field(default_factory=list)
    sandbox: str = ""                    # the container's network namespace path
    host_ifname: str = ""                # driver's name for the host side (veth), if any
    gateway: str = ""                    # the default route this endpoint gave the container
    created: str = field(default_factory=now)
    # What happened to it that the user should know, e.g. "renumbered from 10.0.0.5: another
    # host's container holds it" or "quarantined: ..." (netd ps, inspect).
    note: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Endpoint:
        return cls(**json.loads(text))

    @property
    def address(self) -> str:
        """The IPv4 address without its prefix length."""
        return self.ipv4.split("/")[0] if self.ipv4 else ""


@dataclass
class PortBinding:
    container_port: int
    proto: str = "tcp"
    host_ip: str = ""                    # "" = every address of the host
    host_port: int = 0                   # 0 = choose a free one (-P, or -p PORT)

    def __str__(self) -> str:
        host = f"{self.host_ip or '0.0.0.0'}:{self.host_port}"
        return f"{host}->{self.container_port}/{self.proto}"


@dataclass
class Container:
    id: str
    name: str
    cmd: list[str]
    hostname: str
    network_mode: str                    # "bridge", a network name, "host", "none", "container:ID"
    rootfs: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    detach: bool = False
    auto_remove: bool = False
    ports: list[PortBinding] = field(default_factory=list)
    publish_all: bool = False
    exposed: list[str] = field(default_factory=list)
    state: str = "created"               # created, running, exited
    pid: int = 0
    start_time: int = 0
    exit_code: int | None = None
    started_at: str = ""
    finished_at: str = ""
    netns: str = ""                      # network namespace path; "" in host mode
    networks: list[str] = field(default_factory=list)  # network ids, in the order joined (eth0, eth1, ...)
    created: str = field(default_factory=now)
    capabilities: list[str] | None = None   # what the process keeps (Docker's default set +/- flags); None: all
    # Whose sandbox this is when netd did not make it: "docker" (netd as dockerd's network
    # plugin) or "cni" (netd as a CNI plugin); netd runs no process in it and never removes it.
    external: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Container:
        data = json.loads(text)
        data["ports"] = [PortBinding(**p) for p in data.get("ports", [])]
        return cls(**data)

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def shares_netns_of(self) -> str | None:
        if self.network_mode.startswith("container:"):
            return self.network_mode.split(":", 1)[1]
        return None


def parse_subnet(text: str, what: str = "subnet") -> IPv4Network:
    try:
        net = IPv4Network(text, strict=False)
    except ValueError:
        raise BadRequest(f"invalid {what} {text!r}: expected an IPv4 CIDR such as 172.20.0.0/16") from None
    if "/" not in text:
        raise BadRequest(f"invalid {what} {text!r}: give a prefix length, e.g. {text}/24")
    if str(net) != text:
        raise BadRequest(f"invalid {what} {text}: it has host bits set; did you mean {net}?")
    if net.prefixlen > 30:
        raise BadRequest(f"{what} {text} is too small: it needs room for a gateway and containers (at most /30)")
    return net


def parse_address(text: str, what: str = "address") -> IPv4Address:
    try:
        return IPv4Address(text)
    except ValueError:
        raise BadRequest(f"invalid {what} {text!r}: expected an IPv4 address such as 172.20.0.5") from None
