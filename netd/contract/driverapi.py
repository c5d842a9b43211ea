"""The contract between the controller and network drivers (libnetwork's driverapi, in small).

A driver owns the data plane of its networks. The controller owns the objects (networks,
endpoints, containers), their storage and IPAM; it calls the driver at each step of the CNM
lifecycle: create network -> create endpoint -> join sandbox -> leave -> delete endpoint
-> delete network. Every call either completes or raises and leaves nothing behind.
"""

from __future__ import annotations

import abc
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from kvstore import KVStore
from netd.contract.errors import BadRequest
from netd.contract.model import Endpoint, Network


def option_flag(value: str, option: str) -> bool:
    """A true/false driver option (`-o host_access=true`), or a clear error."""
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise BadRequest(f"option {option} takes true or false, not {value!r}")


@dataclass
class HostInfo:
    id: str                      # stable id of this host (kept in the data dir)
    name: str                    # hostname
    address: str = ""            # --cluster-advertise: this host's underlay address

    @property
    def key(self) -> str:
        """How endpoints, allocations and leases name this host: its advertise address in a
        cluster, its hostname alone."""
        return self.address or self.name


@dataclass
class Held:
    """An address a driver holds for itself in a network's pool (a part's gateway, a shim)."""

    address: str
    kind: str                    # gateway, aux, or endpoint (held by the controller for a container)
    name: str                    # who holds it, e.g. "hostgw 10.5.1.0/24", "host-access 192.168.1.2"
    host: str                    # the host key of the host that took it


class AddressBook(abc.ABC):
    """Addresses a driver takes for itself from a network's pool (the controller owns IPAM:
    drivers never construct it). Global networks' addresses are unique across the cluster."""

    @abc.abstractmethod
    def held(self, network: Network) -> list[Held]:
        """Every address of the network's pool that is in use, by whom."""

    @abc.abstractmethod
    def take(self, network: Network, name: str, kind: str = "aux", address: str | None = None,
             within: str | None = None) -> str:
        """Hold `address` (or the next free one, inside the CIDR `within` if given) under `name`."""

    @abc.abstractmethod
    def give_back(self, network: Network, address: str, name: str) -> None:
        """Release what `take` held; nothing happens if `name` does not hold it."""


@dataclass
class DriverContext:
    """What a driver may use. Drivers never reach into the API layer or the controller, never
    construct IPAM and never see netd's key layout: `local_store` and `cluster_store` are the
    driver's own folders of the stores (keys relative to them, e.g. "leases/<network id>/...")."""

    host: HostInfo
    local_store: KVStore
    cluster_store: KVStore | None
    firewall: object             # netd.kernel.firewall.Firewall
    run_dir: str
    lock: threading.RLock        # the controller's lock: hold it when changing shared state from a thread
    addresses: AddressBook | None = None
    # The underlay addresses of the cluster's live members (None: no cluster): peers are
    # programmed only for them, whatever the store says.
    members: Callable[[], list[str]] | None = None
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("netd.driver"))


@dataclass
class JoinInfo:
    """What the controller tells a driver when an endpoint joins a sandbox."""

    netns: str                   # the sandbox's network namespace path
    ifname: str                  # eth0, eth1, ...
    set_default_route: bool      # this network provides the container's default gateway
    # False: only make the interface (in `netns`, named `ifname`); its runtime sets the address
    # and routes (dockerd, which moves it into the container itself).
    configure: bool = True


@dataclass
class CapturePoint:
    """An interface on this host where a network's packets can be seen (netd capture, trace)."""

    kind: str                    # container, veth, bridge, vxlan, transit, underlay, uplink, ...
    ifname: str
    netns: str | None = None     # the namespace that holds it (a path); None: the daemon's own
    label: str = ""              # how people see it, e.g. "br0 in ov-4096"
    vni: int | None = None
    # What `netd trace` may check here when a probe stops after this point: "fdb" (the VXLAN
    # device knows the destination MAC), "route" (this namespace routes the destination).
    checks: tuple[str, ...] = ()


@dataclass
class Hop:
    """One step of a packet's path across the cluster, as a driver sees it (netd trace)."""

    host: str                    # the host key (advertise address) the hop is on
    kind: str                    # a CapturePoint kind
    endpoint: str = ""           # the endpoint id, for container and veth hops


class Driver(abc.ABC):
    name: str = ""
    scope: str = "local"                 # the default scope of its networks
    scopes: tuple[str, ...] = ("local",)  # the scopes it can make (--scope)
    # Options the driver understands (`-o KEY=VALUE`); others are refused with the list.
    known_options: frozenset[str] = frozenset()
    has_addresses: bool = True   # whether endpoints get IP addresses (host and null do not)
    supports_ports: bool = False
    # The network is a choice of namespace, nothing to plumb (host, null): one built-in network
    # of it, chosen at `run` only, no ports, no --ip, no interface.
    # UDP ports its hosts exchange traffic on (the overlay's VXLAN): accepted only from live members.
    underlay_udp_ports: tuple[int, ...] = ()
    namespace_mode: bool = False
    uses_host_namespace: bool = False   # the container runs in the host's namespace (host)

    def __init__(self, ctx: DriverContext):
        self.ctx = ctx
        self.log = logging.getLogger(f"netd.driver.{self.name}")

    def validate(self, network: Network) -> None:
        """Check options before anything is made; raise BadRequest on what is wrong."""
        unknown = sorted(set(network.options) - self.known_options)
        if unknown:
            known = ", ".join(sorted(self.known_options)) or "none"
            raise BadRequest(f"unknown option {unknown[0]!r} for driver {self.name} (it knows: {known})")

    @abc.abstractmethod
    def create_network(self, network: Network) -> None: ...

    @abc.abstractmethod
    def delete_network(self, network: Network) -> None: ...

    def create_endpoint(self, network: Network, endpoint: Endpoint) -> None:  # noqa: B027
        """Decide driver facts of the endpoint (MAC, host interface name); no kernel state yet."""

    def delete_endpoint(self, network: Network, endpoint: Endpoint) -> None:  # noqa: B027
        pass

    @abc.abstractmethod
    def join(self, network: Network, endpoint: Endpoint, info: JoinInfo) -> None:
        """Plumb the endpoint into the sandbox: interface, address, routes."""

    @abc.abstractmethod
    def leave(self, network: Network, endpoint: Endpoint, sandbox_gone: bool = False) -> None:
        """Undo join. `sandbox_gone`: the container's namespace is being deleted (it exited),
        so whatever was inside it goes with it."""

    def restore(self, network: Network, endpoints: list[Endpoint]) -> None:  # noqa: B027
        """After a daemon restart: verify or rebuild kernel state for the network and its
        local endpoints, without disturbing what already works."""

    def default_gateway(self, network: Network) -> str | None:
        """The gateway this host's containers on `network` take their default route from
        (None: the network gives no way out, e.g. --internal)."""
        if network.internal or network.ipam is None:
            return None
        return network.ipam.gateway

    def peer_joined(self, network: Network, endpoint: Endpoint) -> None:  # noqa: B027
        """A global network's endpoint on another (live) host appeared: program the path to it."""

    def peer_left(self, network: Network, endpoint: Endpoint) -> None:  # noqa: B027
        """That endpoint went away, or its host stopped renewing its lease: unprogram it."""

    def restore_done(self) -> None:  # noqa: B027
        """Every network was restored: remove kernel state no network claimed (left by a crash,
        or by networks removed while this daemon was down)."""

    def release_network(self, network: Network) -> None:  # noqa: B027
        """The network is gone everywhere (its records deleted): free what it held cluster-wide,
        e.g. an overlay's VNI. Called last, on the host that removed it, so that a removal cut
        short never leaves a live network whose VNI a new one could get."""

    def host_gone(self, network: Network, address: str) -> None:  # noqa: B027
        """The host at `address` died and its endpoints were reclaimed: free what this driver
        held cluster-wide for that host (e.g. a per-host gateway or shim address)."""

    def address_range(self, network: Network) -> str | None:
        """The part of the network's pool (a CIDR) this host's endpoints take addresses from;
        None: all of it. Asked before each endpoint's address is allocated. hostgw answers with
        this host's lease, taken then if this is its first endpoint."""
        return None

    def release_address_range(self, network: Network) -> None:  # noqa: B027
        """Undo of address_range() when the endpoint that asked did not come to be: give back
        what it took, if no endpoint uses it."""

    def network_warning(self, network: Network) -> str:
        """Something the user should know about a network that was just created (the CLI prints
        it), e.g. macvlan: another host has a local network on the same subnet."""
        return ""

    def default_host_ip(self, network: Network) -> str:
        """The host address published ports bind to when the user names none ("": all)."""
        return ""

    def publish_ports(self, network: Network, endpoint: Endpoint, ports: list) -> None:
        raise BadRequest(f"driver {self.name} cannot publish ports")

    def unpublish_ports(self, network: Network, endpoint: Endpoint, ports: list) -> None:  # noqa: B027
        pass

    def inspect(self, network: Network) -> dict:
        """Driver facts for `network inspect` (e.g. the bridge name on this host)."""
        return {}

    def capture_point(self, network: Network, kind: str, endpoint: Endpoint | None = None) -> CapturePoint | None:
        """Where `kind` of the network (its "bridge", "vxlan", an endpoint's "veth", ...) is on
        this host, or None if it has no such thing here. "container", "underlay" and "uplink" are
        the same for every driver and need no answer here (netd.debug.trace finds them)."""
        return None

    def trace_path(self, network: Network, source: Endpoint, dest: Endpoint | None) -> list[Hop]:
        """The hops a packet from `source` to `dest` crosses, in order (`dest` None: it leaves
        the network through its gateway, to an address outside). The default knows only the
        two containers; drivers name what lies between (see the bridge and overlay drivers)."""
        if dest is None:
            return [Hop(source.host, "container", source.id), Hop(source.host, "uplink")]
        return [Hop(source.host, "container", source.id), Hop(dest.host, "container", dest.id)]

    def close(self) -> None:  # noqa: B027
        """The daemon is stopping: stop threads, keep kernel state (containers keep running)."""
