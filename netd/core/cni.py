"""What netd does for a CNI runtime (podman, containerd): the meaning of the CNI plugin's calls.

netd.api.cni is the plugin executable (one exec per call, it only talks to the daemon);
netd.api.cni_routes the daemon's routes that land here. The daemon owns all state.

- As the main plugin (`"type": "netd"`), ADD joins the runtime's namespace to a netd network of
  any driver (`"network": NAME`; with `"driver"` and `"subnet"` the network is made on first use)
  through the Controller's external sandboxes: one record per container (kind "cni", key
  CNI_CONTAINERID), one endpoint per network, its interface named CNI_IFNAME.
- As an IPAM plugin (`"ipam": {"type": "netd", "network": NAME}`) for another main plugin, ADD
  takes an address from the pool of netd network NAME (cluster-wide for a global network: no
  address twice across hosts), held as kind "cni" by "cni-<id12>".
- Each attachment is also recorded under the spec's key (network name, container id, ifname),
  so that DEL, CHECK and GC find what ADD made even when the config changed meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
from dataclasses import asdict, dataclass
from ipaddress import IPv4Interface, IPv4Network

from kvstore import KVError, VersionConflict
from netd.contract.errors import BadRequest, Conflict, NetdError, NotFound
from netd.contract.model import Endpoint, Network, check_name, parse_subnet
from netd.core.external import external_id
from netd.core.ipam import ADDRESSES
from netd.core.keys import CNI_ATTACHMENTS as ATTACHMENTS

log = logging.getLogger("netd.cni")

KIND = "cni"
PLUGIN, IPAM_MODE = "plugin", "ipam"
CONTAINER_ID = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")
IFNAME_BAD = re.compile(r"[/:\s]")


class CheckFailed(NetdError):
    """CHECK found the attachment other than ADD left it (HTTP 412; CNI code 100)."""

    status = 412


@dataclass
class Attachment:
    name: str               # the CNI network name (the config's "name")
    container_id: str       # CNI_CONTAINERID
    ifname: str             # CNI_IFNAME
    network_id: str         # the netd network it is on, or whose pool gave the address
    mode: str = PLUGIN      # plugin (an endpoint) or ipam (an address only)
    address: str = ""       # ipam mode: the address held
    netns: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Attachment:
        data = json.loads(text)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    @property
    def owner(self) -> str:
        """What the address's allocation is named by in ipam mode (checked before releasing it)."""
        return f"cni:{self.name}/{self.container_id}/{self.ifname}"


def check_ids(name: str, container_id: str, ifname: str) -> None:
    check_name("CNI network", name)
    if not container_id or not CONTAINER_ID.match(container_id) or len(container_id) > 256:
        raise BadRequest(f"invalid CNI_CONTAINERID {container_id!r}: letters, digits, '_', '.', '-', starting with a "
                         "letter or digit")
    if not ifname or len(ifname) > 15 or ifname in (".", "..") or IFNAME_BAD.search(ifname):
        raise BadRequest(f"invalid CNI_IFNAME {ifname!r}: 1 to 15 characters, no '/', ':' or spaces")


class CniSide:
    def __init__(self, ctl):
        self.ctl = ctl
        self._lock = threading.RLock()   # one CNI change at a time (a network made on first use, its records)

    # --- records ------------------------------------------------------------------------------

    @staticmethod
    def _key(name: str, container_id: str, ifname: str) -> str:
        return f"{ATTACHMENTS}{name}/{container_id}/{ifname}"

    def attachment(self, name: str, container_id: str, ifname: str) -> Attachment | None:
        pair = self.ctl.local_store.get(self._key(name, container_id, ifname))
        if pair is None:
            return None
        try:
            return Attachment.from_json(pair.value)
        except (ValueError, TypeError, KeyError) as e:
            log.error("ignoring corrupt CNI attachment at %s: %s", pair.key, e)
            return None

    def attachments(self, name: str | None = None) -> list[Attachment]:
        pairs, _ = self.ctl.local_store.list(ATTACHMENTS + (f"{name}/" if name else ""))
        found = []
        for pair in pairs:
            with contextlib.suppress(ValueError, TypeError, KeyError):
                found.append(Attachment.from_json(pair.value))
        return found

    def _save(self, attachment: Attachment) -> None:
        self.ctl.local_store.put(self._key(attachment.name, attachment.container_id, attachment.ifname),
                                 attachment.to_json())

    def _forget(self, attachment: Attachment) -> None:
        self.ctl.local_store.delete(self._key(attachment.name, attachment.container_id, attachment.ifname))

    def _endpoint(self, attachment: Attachment) -> Endpoint | None:
        container = self.ctl.external_container(KIND, attachment.container_id)
        if container is None:
            return None
        return next((e for e in self.ctl.container_endpoints(container)
                     if e.network_id == attachment.network_id and e.ifname == attachment.ifname), None)

    # --- networks ---------------------------------------------------------------------------

    def network_for(self, name: str, network_ref: str, driver: str, subnet: str, gateway: str,
                    options: dict[str, str]) -> Network:
        """The netd network a config names; made on first use when it gives a driver and a subnet."""
        wanted = network_ref or name
        network = self.ctl._find_network(wanted)
        if network is not None:
            if driver and network.driver != driver:
                raise BadRequest(f"netd network {network.name} is of driver {network.driver}, the CNI config says {driver}")
            if subnet and network.ipam is not None and network.ipam.subnet != str(parse_subnet(subnet)):
                raise BadRequest(f"netd network {network.name} has subnet {network.ipam.subnet}, the CNI config says {subnet}")
            return network
        if not (driver or subnet):
            raise BadRequest(f"netd has no network {wanted}: create it (netd network create {wanted}) or give "
                             "\"driver\" and \"subnet\" in the CNI config to have it made on first use")
        with self.ctl.lock:
            network = self.ctl._find_network(wanted)
            if network is None:
                network = self.ctl.create_network(name=wanted, driver=driver or "bridge", subnet=subnet or None,
                                                  gateway=gateway or None, options=options,
                                                  labels={"netd.cni": name})
                log.info("made network %s (%s, %s) for CNI network %s", network.name, network.driver,
                         network.ipam.subnet if network.ipam else "-", name)
        return network

    def _gateway(self, network: Network, endpoint: Endpoint | None = None) -> str:
        if endpoint is not None and endpoint.gateway:
            return endpoint.gateway
        impl = self.ctl.drivers.get(network.driver)
        return (impl.default_gateway(network) if impl is not None else None) or (
            network.ipam.gateway if network.ipam is not None else "") or ""

    # --- the main plugin ----------------------------------------------------------------------

    def add(self, name: str, container_id: str, netns: str, ifname: str, network_ref: str = "", driver: str = "",
            subnet: str = "", gateway: str = "", options: dict[str, str] | None = None, ip: str = "",
            mac: str = "") -> dict:
        check_ids(name, container_id, ifname)
        if not netns or not os.path.isabs(netns) or not os.path.exists(netns):
            raise BadRequest(f"CNI_NETNS {netns!r}: no such network namespace")
        with self._lock:
            known = self.attachment(name, container_id, ifname)
            if known is not None:
                endpoint = self._endpoint(known) if known.mode == PLUGIN else None
                network = self.ctl.network_by_id(known.network_id)
                if endpoint is not None and network is not None and endpoint.sandbox == netns:
                    return self._result(network, endpoint)   # ADD again: what the first one made
                self.delete(name, container_id, ifname)
            network = self.network_for(name, network_ref, driver, subnet, gateway, options or {})
            endpoint = self.ctl.attach_external(KIND, container_id, netns, network.id, name=self._name(container_id),
                                                ifname=ifname, ip=ip or None, mac=mac)
            try:
                self._save(Attachment(name, container_id, ifname, network.id, PLUGIN, netns=netns))
            except Exception:
                self.ctl.detach_external(KIND, container_id, network.id)
                raise
            return self._result(network, endpoint)

    def _name(self, container_id: str) -> str:
        """"cni-<first 12 of the id>", as netd names its own; when another container's id starts
        alike (runtimes other than podman do not all use random ids), "cni-<12 of a hash>"."""
        name = f"cni-{container_id[:12]}"
        holder = self.ctl._container_names.get(name)
        if holder is not None and holder != external_id(KIND, container_id):
            name = f"cni-{external_id(KIND, container_id)[:12]}"
        return name

    def _result(self, network: Network, endpoint: Endpoint) -> dict:
        """The CNI result (its cniVersion is the plugin's to add): the host side first when it
        is in the host's namespace (bandwidth looks for it there), then the container's."""
        interfaces = []
        host_side = self._host_interface(endpoint)
        if host_side is not None:
            interfaces.append(host_side)
        interfaces.append({"name": endpoint.ifname, "mac": endpoint.mac, "sandbox": endpoint.sandbox})
        result: dict = {"interfaces": interfaces, "ips": [], "routes": []}
        if endpoint.ipv4:
            entry = {"address": endpoint.ipv4, "interface": len(interfaces) - 1}
            gateway = self._gateway(network, endpoint)
            if gateway:
                entry["gateway"] = gateway
            result["ips"].append(entry)
        if endpoint.gateway:
            result["routes"].append({"dst": "0.0.0.0/0", "gw": endpoint.gateway})
        return result

    @staticmethod
    def _host_interface(endpoint: Endpoint) -> dict | None:
        if not endpoint.host_ifname:
            return None
        try:
            from netd.kernel import netlink
            with netlink.netns_socket(None) as ipr:
                links = ipr.link("get", ifname=endpoint.host_ifname)
        except Exception:  # noqa: BLE001 - not in this namespace (overlay, macvlan): not listed
            return None
        if not links:
            return None
        return {"name": endpoint.host_ifname, "mac": links[0].get_attr("IFLA_ADDRESS") or ""}

    def delete(self, name: str, container_id: str, ifname: str, network_ref: str = "") -> bool:
        """Idempotent: what ADD made goes; nothing there is no error. True if something went."""
        check_ids(name, container_id, ifname)
        with self._lock:
            known = self.attachment(name, container_id, ifname)
            if known is not None:
                if known.mode == IPAM_MODE:
                    self._release(known)
                else:
                    self.ctl.detach_external(KIND, container_id, known.network_id)
                self._forget(known)
                return True
            # No record (lost in a crash between the join and its record): the endpoint on the
            # config's network with this interface name, if there is one.
            network = self.ctl._find_network(network_ref or name)
            container = self.ctl.external_container(KIND, container_id)
            if network is None or container is None:
                return False
            if any(e.network_id == network.id and e.ifname == ifname for e in self.ctl.container_endpoints(container)):
                return self.ctl.detach_external(KIND, container_id, network.id)
            return False

    def sweep(self) -> int:
        """Let go what a runtime attached and whose namespace is gone without a DEL (`ctr run -d
        --cni` never sends one; a runtime may crash; netd may have been down): at start and from
        the daemon's maintenance, now and then. The number let go."""
        gone = 0
        for known in self.attachments():
            container = self.ctl.external_container(KIND, known.container_id)
            netns = container.netns if container is not None and known.mode == PLUGIN else known.netns
            if netns and not os.path.exists(netns):
                log.info("CNI attachment %s/%s/%s: its namespace %s is gone; letting it go", known.name,
                         known.container_id[:12], known.ifname, netns)
                with contextlib.suppress(NetdError, KVError):
                    gone += self.delete(known.name, known.container_id, known.ifname)
        return gone

    def check(self, name: str, container_id: str, ifname: str, netns: str, prev_result: dict | None) -> None:
        check_ids(name, container_id, ifname)
        known = self.attachment(name, container_id, ifname)
        if known is None:
            raise NotFound(f"container {container_id[:12]} has no attachment {ifname} on CNI network {name}")
        if known.mode == IPAM_MODE:
            self._check_allocation(known, prev_result)
            return
        network = self.ctl.network_by_id(known.network_id)
        endpoint = self._endpoint(known)
        if network is None or endpoint is None:
            raise CheckFailed(f"the endpoint of {container_id[:12]} on CNI network {name} is gone")
        prev = prev_result or {}
        listed = [ip.get("address") for ip in prev.get("ips") or [] if isinstance(ip, dict)]
        if endpoint.ipv4 and listed and endpoint.ipv4 not in listed:
            raise CheckFailed(f"prevResult lists {', '.join(map(str, listed))}, but netd gave {endpoint.ipv4}")
        mac = endpoint.mac
        for interface in prev.get("interfaces") or []:
            if isinstance(interface, dict) and interface.get("name") == ifname and interface.get("sandbox"):
                mac = interface.get("mac") or mac   # a later plugin (tuning) may have set another one
        _check_interface(netns or endpoint.sandbox, ifname, mac, endpoint.ipv4)
        if endpoint.host_ifname and any(isinstance(i, dict) and i.get("name") == endpoint.host_ifname
                                        for i in prev.get("interfaces") or []):
            if self._host_interface(endpoint) is None:
                raise CheckFailed(f"the host side {endpoint.host_ifname} of {ifname} is gone")

    def gc(self, name: str, valid: list[tuple[str, str]]) -> list[str]:
        """Remove the attachments of CNI network `name` that are not in `valid` (container id,
        ifname); returns what went."""
        check_name("CNI network", name)
        keep = set(valid)
        removed = []
        for attachment in self.attachments(name):
            if (attachment.container_id, attachment.ifname) in keep:
                continue
            self.delete(attachment.name, attachment.container_id, attachment.ifname)
            removed.append(f"{attachment.container_id[:12]}/{attachment.ifname}")
        if removed:
            log.info("CNI GC of %s removed %s", name, ", ".join(removed))
        return removed

    def status(self, name: str, network_ref: str = "", driver: str = "", subnet: str = "") -> None:
        """Ready for ADD: the network is there, or can be made."""
        check_name("CNI network", name)
        wanted = network_ref or name
        network = self.ctl._find_network(wanted)
        if network is None:
            if not (driver or subnet):
                raise NotFound(f"netd has no network {wanted} (and the config gives no driver and subnet to make it)")
            if (driver or "bridge") not in self.ctl.drivers:
                raise BadRequest(f"netd has no driver {driver}")
            return
        if network.removing:
            raise Conflict(f"network {network.name} is being removed")

    # --- IPAM -------------------------------------------------------------------------------

    def _pool_network(self, network_ref: str) -> Network:
        if not network_ref:
            raise BadRequest("the ipam section needs \"network\": the netd network whose pool gives the addresses")
        network = self.ctl._find_network(network_ref)
        if network is None:
            raise BadRequest(f"netd has no network {network_ref} (ipam \"network\"): create it with netd network create")
        impl = self.ctl.drivers.get(network.driver)
        if network.ipam is None or impl is None or not impl.has_addresses:
            raise BadRequest(f"netd network {network.name} ({network.driver}) has no address pool")
        return network

    def ipam_add(self, name: str, container_id: str, ifname: str, network_ref: str, ip: str = "") -> dict:
        check_ids(name, container_id, ifname)
        with self._lock:
            network = self._pool_network(network_ref)
            known = self.attachment(name, container_id, ifname)
            if known is not None and known.mode == IPAM_MODE and known.network_id == network.id and self._held(known):
                return self._ipam_result(network, known.address)
            if known is not None:
                self.delete(name, container_id, ifname)
            impl = self.ctl.drivers[network.driver]
            attachment = Attachment(name, container_id, ifname, network.id, IPAM_MODE)
            ipam = self.ctl.ipam[network.scope]
            address = ipam.allocate(network.id, ip.split("/")[0] if ip else None, within=impl.address_range(network),
                                    kind=KIND, container=f"cni-{container_id[:12]}", name=attachment.owner)
            attachment.address = address
            try:
                self._save(attachment)
            except Exception:
                ipam.release_reserved(network.id, address, attachment.owner)
                raise
            log.info("CNI network %s: %s for %s/%s from %s", name, address, container_id[:12], ifname, network.name)
            return self._ipam_result(network, address)

    def _ipam_result(self, network: Network, address: str) -> dict:
        prefix = IPv4Network(network.ipam.subnet).prefixlen
        entry = {"address": f"{address}/{prefix}"}
        gateway = self._gateway(network)
        if gateway:
            entry["gateway"] = gateway
        return {"ips": [entry]}

    def _held(self, attachment: Attachment) -> bool:
        network = self.ctl.network_by_id(attachment.network_id)
        if network is None:
            return False
        pair = self.ctl.ipam[network.scope].store.get(f"{ADDRESSES}{network.id}/{attachment.address}")
        return pair is not None and json.loads(pair.value).get("name") == attachment.owner

    def _release(self, attachment: Attachment) -> None:
        network = self.ctl.network_by_id(attachment.network_id)
        if network is None or not attachment.address:
            return   # the network (and its pool) went: nothing to release
        with contextlib.suppress(VersionConflict, NotFound):
            self.ctl.ipam[network.scope].release_reserved(network.id, attachment.address, attachment.owner)

    def _check_allocation(self, attachment: Attachment, prev_result: dict | None) -> None:
        if not self._held(attachment):
            raise CheckFailed(f"address {attachment.address} is no longer held for {attachment.container_id[:12]}")
        listed = [str(IPv4Interface(ip["address"]).ip) for ip in (prev_result or {}).get("ips") or []
                  if isinstance(ip, dict) and isinstance(ip.get("address"), str) and "." in ip["address"]]
        if listed and attachment.address not in listed:
            raise CheckFailed(f"prevResult lists {', '.join(listed)}, but netd gave {attachment.address}")


def _check_interface(netns: str, ifname: str, mac: str, ipv4: str) -> None:
    """The container's interface as ADD left it: there, up, its MAC, its address."""
    from netd.kernel import netlink

    if not netns or not os.path.exists(netns):
        raise CheckFailed(f"the network namespace {netns} is gone")
    try:
        with netlink.netns_socket(netns) as ipr:
            links = ipr.link("get", ifname=ifname)
            link = links[0]
            index = link["index"]
            addresses = {f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr(index=index, family=2)}
    except (OSError, KVError, IndexError) as e:
        raise CheckFailed(f"interface {ifname} is missing in {netns}: {e}") from None
    except Exception as e:  # noqa: BLE001 - pyroute2's NetlinkError for a missing link
        raise CheckFailed(f"interface {ifname} is missing in {netns}: {e}") from None
    if not link["flags"] & 1:   # IFF_UP
        raise CheckFailed(f"interface {ifname} in {netns} is down")
    if mac and (link.get_attr("IFLA_ADDRESS") or "").lower() != mac.lower():
        raise CheckFailed(f"interface {ifname} has MAC {link.get_attr('IFLA_ADDRESS')}, not {mac}")
    if ipv4 and ipv4 not in addresses:
        raise CheckFailed(f"interface {ifname} lacks its address {ipv4} (it has {', '.join(sorted(addresses)) or 'none'})")
