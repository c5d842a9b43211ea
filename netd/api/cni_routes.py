"""The daemon's routes for the CNI plugin (netd.api.cni, one exec per runtime call): each CNI
command is one POST; what it means is netd.core.cni's. Errors are netd's kinds (HTTP statuses);
the plugin turns them into CNI error codes."""

from __future__ import annotations

from netd.api import request
from netd.api.routing import route
from netd.contract.errors import BadRequest
from netd.core.cni import CniSide

_IDS = {"Name": str, "ContainerID": str, "IfName": str}
request.SCHEMAS.update({
    ("POST", "/cni/add"): {**_IDS, "Netns": str, "Network": str, "Driver": str, "Subnet": str, "Gateway": str,
                           "Options": request.STR_MAP, "IP": str, "MAC": str},
    ("POST", "/cni/del"): {**_IDS, "Network": str},
    ("POST", "/cni/check"): {**_IDS, "Netns": str, "PrevResult": {}},
    ("POST", "/cni/status"): {"Name": str, "Network": str, "Driver": str, "Subnet": str},
    ("POST", "/cni/gc"): {"Name": str, "Valid": [{"ContainerID": str, "IfName": str}]},
    ("POST", "/cni/ipam/add"): {**_IDS, "Network": str, "IP": str},
})


def side(ctl) -> CniSide:
    return ctl.cni


def _ids(body: dict) -> tuple[str, str, str]:
    return body.get("Name") or "", body.get("ContainerID") or "", body.get("IfName") or ""


@route("POST", "/cni/add")
def cni_add(ctl, query, body):
    name, container_id, ifname = _ids(body)
    return side(ctl).add(name, container_id, body.get("Netns") or "", ifname, network_ref=body.get("Network") or "",
                         driver=body.get("Driver") or "", subnet=body.get("Subnet") or "",
                         gateway=body.get("Gateway") or "", options=body.get("Options") or {},
                         ip=body.get("IP") or "", mac=body.get("MAC") or "")


@route("POST", "/cni/del")
def cni_del(ctl, query, body):
    name, container_id, ifname = _ids(body)
    return {"Removed": side(ctl).delete(name, container_id, ifname, network_ref=body.get("Network") or "")}


@route("POST", "/cni/check")
def cni_check(ctl, query, body):
    name, container_id, ifname = _ids(body)
    prev = body.get("PrevResult")
    if prev is not None and not isinstance(prev, dict):
        raise BadRequest("PrevResult must be an object")
    side(ctl).check(name, container_id, ifname, body.get("Netns") or "", prev)
    return {}


@route("POST", "/cni/status")
def cni_status(ctl, query, body):
    side(ctl).status(body.get("Name") or "", network_ref=body.get("Network") or "",
                     driver=body.get("Driver") or "", subnet=body.get("Subnet") or "")
    return {}


@route("POST", "/cni/gc")
def cni_gc(ctl, query, body):
    valid = [(v.get("ContainerID") or "", v.get("IfName") or "") for v in body.get("Valid") or []]
    return {"Removed": side(ctl).gc(body.get("Name") or "", valid)}


@route("POST", "/cni/ipam/add")
def cni_ipam_add(ctl, query, body):
    name, container_id, ifname = _ids(body)
    return side(ctl).ipam_add(name, container_id, ifname, body.get("Network") or "", ip=body.get("IP") or "")


@route("GET", "/cni/attachments")
def cni_attachments(ctl, query, body):
    return [{"Name": a.name, "ContainerID": a.container_id, "IfName": a.ifname, "Network": a.network_id,
             "Mode": a.mode, "Address": a.address, "Netns": a.netns}
            for a in side(ctl).attachments(query.get("name") or None)]
