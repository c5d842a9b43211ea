"""What netd does for dockerd when it is dockerd's network and IPAM plugin (netd.api.docker_plugin
speaks the protocol; this is the meaning).

- A Docker network on a netd driver is a netd network whose id is derived from its subnet: the
  same `docker network create -d netd-overlay --subnet S` on every host's dockerd is one netd
  network (dockerd 20.10 takes only local-scope remote drivers without swarm, so each dockerd
  has its own network id; netd's store makes them one). Hosts whose dockerd uses it are recorded
  beside it; the last one to remove it removes the netd network.
- An endpoint is made whole at CreateEndpoint, in a scratch namespace by the driver's own join,
  then its interface is moved to the daemon's namespace for dockerd to take (the plugin
  protocol hands over an interface by name); Join records dockerd's sandbox, Leave undoes all.
- The IPAM driver's pools are netd IPAM pools with the same subnet-derived ids (in the cluster's
  IPAM when there is one: no address twice across hosts); a netd network made for the subnet
  takes its pool over, and an endpoint takes over the address dockerd got for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from ipaddress import IPv4Network

from netd.contract.errors import BadRequest, Conflict, NotFound, Unavailable
from netd.contract.model import GLOBAL, LOCAL, PortBinding, new_id, parse_subnet
from netd.core.ipam import IPAM, Pool
from netd.core.keys import DOCKER_NETWORKS, DOCKER_USERS, NETWORKS
from netd.kernel.rtnl import Rtnl, retire_named

log = logging.getLogger("netd.docker")

KIND = "docker"
GATEWAY_REQUEST = "com.docker.network.gateway"
PROTOCOLS = {6: "tcp", 17: "udp"}
NUMBERS = {name: number for number, name in PROTOCOLS.items()}
HOST_NAMESPACE = "/proc/self/ns/net"   # the daemon's own (the main thread's, whichever thread asks)


def network_id_for(subnet: str) -> str:
    return hashlib.sha256(f"docker-subnet:{IPv4Network(subnet, strict=False)}".encode()).hexdigest()


def interface_name(endpoint_id: str) -> str:
    """The name of an endpoint's interface while it waits in the daemon's namespace for dockerd."""
    return "nd" + endpoint_id[:11]


class DockerSide:
    def __init__(self, ctl):
        self.ctl = ctl
        self._lock = threading.Lock()

    # --- networks -----------------------------------------------------------------------------

    def create_network(self, docker_id: str, driver: str, ipv4_data: list[dict], options: dict) -> None:
        if options.get("com.docker.network.enable_ipv6"):
            raise BadRequest("netd's networks are IPv4 only: drop --ipv6")
        if not ipv4_data or not ipv4_data[0].get("Pool"):
            raise BadRequest("netd needs an IPv4 pool for the network (give --subnet)")
        data = ipv4_data[0]
        subnet = str(parse_subnet(data["Pool"]))
        generic = {str(k): str(v) for k, v in (options.get("com.docker.network.generic") or {}).items()}
        name = generic.pop("netd.name", "")
        nid = network_id_for(subnet)
        with self._lock:
            network = self.ctl.network_by_id(nid) or self._another_hosts_network(nid)
            if network is None:
                self._free_plugin_pool(nid)
                network = self.ctl.create_network(
                    name=name or f"docker-{nid[:12]}", driver=driver, subnet=subnet,
                    gateway=_chosen_gateway(subnet, data.get("Gateway")),
                    aux_addresses={k: _address(v) for k, v in (data.get("AuxAddresses") or {}).items()},
                    options=generic, labels={"netd.docker": "true"}, network_id=nid)
            elif network.driver != driver:
                raise Conflict(f"subnet {subnet} is netd network {network.name} of driver {network.driver}, "
                               f"not {driver}")
            users = self.ctl._store(network.scope)
            mine = users.get(f"{DOCKER_USERS}{nid}/{self.ctl.host_key}")
            if mine is not None and mine.value != docker_id and self.ctl.local_store.get(DOCKER_NETWORKS + mine.value):
                raise Conflict(f"subnet {subnet} is already another network of this dockerd ({mine.value[:12]})")
            self.ctl.local_store.put(DOCKER_NETWORKS + docker_id, nid)
            users.put(f"{DOCKER_USERS}{nid}/{self.ctl.host_key}", docker_id)
        log.info("dockerd's network %s is netd network %s", docker_id[:12], network.name)

    def _another_hosts_network(self, nid: str, wait: float = 5.0):
        """A network another host's dockerd made a moment ago may not have reached this host's
        copy of the cluster yet: if the store has it, wait for it."""
        if self.ctl.cluster_store is None or self.ctl.cluster_store.get(NETWORKS + nid) is None:
            return None
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            network = self.ctl.network_by_id(nid)
            if network is not None:
                return network
            time.sleep(0.05)
        raise Unavailable(f"network {nid[:12]} is in the cluster store but not yet on this host: try again")

    def delete_network(self, docker_id: str) -> None:
        pair = self.ctl.local_store.get(DOCKER_NETWORKS + docker_id)
        if pair is None:
            return
        nid = pair.value
        network = self.ctl.network_by_id(nid)
        with self._lock:
            if network is not None:
                store = self.ctl._store(network.scope)
                store.delete(f"{DOCKER_USERS}{nid}/{self.ctl.host_key}")
                others, _ = store.list(f"{DOCKER_USERS}{nid}/")
                if not others:
                    try:
                        self.ctl.remove_network(nid)
                    except NotFound:
                        pass
                    except Conflict as e:   # another host's endpoints: the network stays for them
                        log.info("netd network %s stays: %s", network.name, e)
            self.ctl.local_store.delete(DOCKER_NETWORKS + docker_id)

    def network_of(self, docker_id: str) -> str:
        pair = self.ctl.local_store.get(DOCKER_NETWORKS + docker_id)
        if pair is None or self.ctl.network_by_id(pair.value) is None:
            raise NotFound(f"network {docker_id[:12]} is not known to netd (was it made while netd was away?)")
        return pair.value

    # --- endpoints ----------------------------------------------------------------------------

    def create_endpoint(self, docker_network: str, endpoint_id: str, address: str, mac: str) -> str:
        """Make the endpoint and its interface; returns its MAC address. The driver makes the
        interface right in the daemon's namespace, named as dockerd will look for it, and leaves
        address and routes to dockerd (moving an interface between namespaces costs the kernel
        10-30 ms: dockerd's move into the container is the only one)."""
        nid = self.network_of(docker_network)
        # Until Join the endpoint's interface is where the record says: in the daemon's namespace.
        endpoint = self.ctl.attach_external(KIND, endpoint_id, HOST_NAMESPACE, nid, name=f"docker-{endpoint_id[:12]}",
                                            ifname=interface_name(endpoint_id), ip=_address(address) or None,
                                            adopt=True, mac=mac, configure=False)
        return endpoint.mac

    def endpoint(self, endpoint_id: str):
        container = self.ctl.external_container(KIND, endpoint_id)
        endpoints = self.ctl.container_endpoints(container) if container is not None else []
        if not endpoints:
            raise NotFound(f"endpoint {endpoint_id[:12]} is not known to netd")
        return container, endpoints[0]

    def join(self, endpoint_id: str, sandbox_key: str, dockerd_pid: int | None) -> dict:
        _container, endpoint = self.endpoint(endpoint_id)
        # dockerd's namespaces are files in its own mount namespace (a private one in tests and
        # in some installs): reach them through its root when they are not visible here.
        sandbox = sandbox_key
        if dockerd_pid and not os.path.exists(sandbox_key):
            sandbox = f"/proc/{dockerd_pid}/root{sandbox_key}"
        self.ctl.relocate_external(KIND, endpoint_id, sandbox, "")
        threading.Thread(target=self._learn_ifname, args=(endpoint_id, sandbox, endpoint.mac),
                         name="docker-ifname", daemon=True).start()
        return {"InterfaceName": {"SrcName": interface_name(endpoint_id), "DstPrefix": "eth"},
                "Gateway": endpoint.gateway, "StaticRoutes": [], "DisableGatewayService": True}

    def _learn_ifname(self, endpoint_id: str, sandbox: str, mac: str) -> None:
        """dockerd names the interface in the sandbox (eth0, eth1, ...) after Join answered:
        learn the name, for capture and trace."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.1)
            with contextlib.suppress(OSError), Rtnl(sandbox) as inside:
                for _index, name, link_mac in inside.links():
                    if link_mac == mac.lower():
                        self.ctl.relocate_external(KIND, endpoint_id, sandbox, name)
                        return
        log.warning("endpoint %s: its interface did not appear in %s", endpoint_id[:12], sandbox)

    def leave(self, endpoint_id: str) -> None:
        """dockerd has moved the interface back to the daemon's namespace: undo the endpoint."""
        self.ctl.unpublish_external(KIND, endpoint_id)
        self.ctl.detach_external(KIND, endpoint_id, sandbox_gone=True)
        # dockerd gave the interface back under its first name; a veth went with its pair
        # already, a macvlan is deleted here (in the background, as every retired interface)
        with contextlib.suppress(OSError), Rtnl() as host:
            retire_named(host, interface_name(endpoint_id))

    def oper_info(self, endpoint_id: str) -> dict:
        container, endpoint = self.endpoint(endpoint_id)
        return {"com.docker.network.endpoint.macaddress": endpoint.mac,
                "com.docker.network.portmap": [_docker_port(p) for p in container.ports]}

    def program_external(self, endpoint_id: str, options: dict) -> None:
        ports = []
        for spec in options.get("com.docker.network.portmap") or []:
            proto = PROTOCOLS.get(spec.get("Proto"))
            if proto is None:
                raise BadRequest(f"netd publishes tcp and udp ports only, not protocol {spec.get('Proto')}")
            if spec.get("HostPortEnd") and spec.get("HostPortEnd") != spec.get("HostPort"):
                raise BadRequest("netd publishes one host port per container port: give a single host port")
            ports.append(PortBinding(int(spec["Port"]), proto, spec.get("HostIP") or "", int(spec.get("HostPort") or 0)))
        if ports:
            self.ctl.publish_external(KIND, endpoint_id, ports)

    def revoke_external(self, endpoint_id: str) -> None:
        self.ctl.unpublish_external(KIND, endpoint_id)

    # --- IPAM -----------------------------------------------------------------------------------

    def _pool_ipam(self) -> IPAM:
        """Where the IPAM driver's pools live: the cluster's, when there is one."""
        return self.ctl.ipam.get(GLOBAL) or self.ctl.ipam[LOCAL]

    def _find_pool(self, pool_id: str) -> tuple[IPAM, Pool]:
        for scope in (GLOBAL, LOCAL):
            ipam = self.ctl.ipam.get(scope)
            if ipam is not None:
                with contextlib.suppress(NotFound):
                    return ipam, ipam.pool(pool_id)
        raise NotFound(f"netd has no address pool {pool_id[:12]}")

    def request_pool(self, pool: str, sub_pool: str, v6: bool) -> dict:
        if v6:
            raise BadRequest("netd's IPAM gives IPv4 addresses only: drop --ipv6")
        if sub_pool:
            raise BadRequest("netd's IPAM plugin takes no --ip-range")
        ipam = self._pool_ipam()
        with self._lock:
            if not pool:   # a default pool: let IPAM choose, then hold it under the subnet's id
                scope = GLOBAL if GLOBAL in self.ctl.ipam else LOCAL
                chosen = ipam.request_pool("docker-pending-" + new_id()[:12], "docker", None,
                                           avoid=self.ctl._subnets_to_avoid(scope))
                ipam.release_pool(chosen.network_id)
                pool = chosen.subnet
            subnet = str(parse_subnet(pool))
            pid = network_id_for(subnet)
            with contextlib.suppress(NotFound):
                self._find_pool(pid)   # already there: another host's dockerd, or a netd network
                return {"PoolID": pid, "Pool": subnet, "Data": {}}
            ipam.request_pool(pid, f"docker {subnet}", subnet, reserve_gateway=False)
        return {"PoolID": pid, "Pool": subnet, "Data": {}}

    def release_pool(self, pool_id: str) -> None:
        if self.ctl.network_by_id(pool_id) is not None:
            return   # a netd network took it over: it goes with the network
        with contextlib.suppress(NotFound):
            ipam, _pool = self._find_pool(pool_id)
            if not any(a.endpoint_id for a in ipam.allocations(pool_id)):
                ipam.release_pool(pool_id)

    def _free_plugin_pool(self, pool_id: str) -> None:
        """A netd network is being made for the subnet of an IPAM-plugin pool: the network takes
        the subnet, so the pool (nothing but its gateway yet) makes way."""
        with contextlib.suppress(NotFound):
            ipam, pool = self._find_pool(pool_id)
            if any(a.kind == "endpoint" for a in ipam.allocations(pool_id)):
                raise Conflict(f"addresses of {pool.subnet} are in use: the pool cannot become a network")
            ipam.release_pool(pool_id)

    def request_address(self, pool_id: str, address: str, options: dict) -> dict:
        ipam, pool = self._find_pool(pool_id)
        prefix = pool.net.prefixlen
        if (options or {}).get("RequestAddressType") == GATEWAY_REQUEST:
            gateway = address or pool.gateway or str(pool.net.network_address + 1)
            ipam.reserve(pool_id, gateway, kind="gateway")
            return {"Address": f"{gateway}/{prefix}", "Data": {}}
        network = self.ctl.network_by_id(pool_id)
        # hostgw: each host gives out its own part of the network only
        within = self.ctl.drivers[network.driver].address_range(network) if network is not None else None
        given = ipam.allocate(pool_id, address or None, within=within, container="docker")
        return {"Address": f"{given}/{prefix}", "Data": {}}

    def release_address(self, pool_id: str, address: str) -> None:
        with contextlib.suppress(NotFound):
            ipam, pool = self._find_pool(pool_id)
            if address != pool.gateway:
                ipam.release_unclaimed(pool_id, address)


def _chosen_gateway(subnet: str, gateway: str | None) -> str | None:
    """The gateway dockerd passes, unless it is only its default (the first address): the
    driver's own default then (hostgw's is per host), as with `netd network create`."""
    address = _address(gateway)
    return address if address and address != str(IPv4Network(subnet).network_address + 1) else None


def _address(text: str | None) -> str:
    """An address without its prefix length ("10.0.0.1/24" -> "10.0.0.1")."""
    return (text or "").split("/")[0]


def _docker_port(port: PortBinding) -> dict:
    return {"Proto": NUMBERS[port.proto], "IP": "", "Port": port.container_port, "HostIP": port.host_ip,
            "HostPort": port.host_port, "HostPortEnd": port.host_port}
