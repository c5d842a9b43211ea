"""What a request body may hold, route by route: checked before the route runs, so that malformed
or hostile JSON is a 400 with a message naming the field, never a 500 (or a dead thread).

A schema maps a field to its kind: str, bool, int, float ("number"), a list of them, a dict of
str to str, or a nested schema (a dict) / a list of nested schemas. Unknown fields are ignored, as
Docker's API ignores them; a field that is there but null counts as absent.
"""

from __future__ import annotations

from netd.contract.errors import BadRequest

STR_LIST = [str]
STR_MAP = {str: str}
ANY_MAP = {str: object}   # an object whose values are not checked (passed on as they are)

IPAM_CONFIG = {"Subnet": str, "Gateway": str, "IPRange": str, "AuxiliaryAddresses": STR_MAP}
SCHEMAS: dict[tuple[str, str], dict] = {
    ("POST", "/networks/create"): {
        "Name": str, "Driver": str, "Options": STR_MAP, "Labels": STR_MAP, "Internal": bool, "Scope": str,
        "CheckDuplicate": bool, "Attachable": bool, "EnableIPv6": bool,
        "IPAM": {"Driver": str, "Options": STR_MAP, "Config": [IPAM_CONFIG]},
    },
    ("POST", "/networks/{ref}/connect"): {
        "Container": str,
        "EndpointConfig": {"Aliases": STR_LIST, "IPAMConfig": {"IPv4Address": str, "IPv6Address": str}},
    },
    ("POST", "/networks/{ref}/disconnect"): {"Container": str, "Force": bool},
    ("POST", "/containers/run"): {
        "Cmd": STR_LIST, "Name": str, "Hostname": str, "NetworkMode": str, "IPv4Address": str,
        "Aliases": STR_LIST, "Ports": [{"ContainerPort": int, "Proto": str, "HostIp": str, "HostPort": int}],
        "PublishAllPorts": bool, "ExposedPorts": STR_LIST, "Rootfs": str, "Env": STR_MAP, "Detach": bool,
        "AutoRemove": bool, "Attach": bool, "CapAdd": STR_LIST, "CapDrop": STR_LIST, "Privileged": bool,
    },
    ("POST", "/debug/trace"): {"Source": str, "Destination": str, "Proto": str, "Size": int, "Timeout": "number"},
}

# Docker's plugin protocol (netd.api.docker_plugin): one schema per call.
IP_DATA = [{"AddressSpace": str, "Pool": str, "Gateway": str, "AuxAddresses": STR_MAP}]
PORT_MAP = [{"Proto": int, "IP": str, "Port": int, "HostIP": str, "HostPort": int, "HostPortEnd": int}]
SCHEMAS.update({("POST", f"/{call}"): schema for call, schema in {
    "NetworkDriver.CreateNetwork": {"NetworkID": str, "Options": {"com.docker.network.generic": ANY_MAP,
                                                                  "com.docker.network.enable_ipv6": bool},
                                    "IPv4Data": IP_DATA, "IPv6Data": IP_DATA},
    "NetworkDriver.DeleteNetwork": {"NetworkID": str},
    "NetworkDriver.CreateEndpoint": {"NetworkID": str, "EndpointID": str, "Options": ANY_MAP,
                                     "Interface": {"Address": str, "AddressIPv6": str, "MacAddress": str}},
    "NetworkDriver.EndpointOperInfo": {"NetworkID": str, "EndpointID": str},
    "NetworkDriver.DeleteEndpoint": {"NetworkID": str, "EndpointID": str},
    "NetworkDriver.Join": {"NetworkID": str, "EndpointID": str, "SandboxKey": str, "Options": ANY_MAP},
    "NetworkDriver.Leave": {"NetworkID": str, "EndpointID": str},
    "NetworkDriver.ProgramExternalConnectivity": {"NetworkID": str, "EndpointID": str,
                                                  "Options": {"com.docker.network.portmap": PORT_MAP}},
    "NetworkDriver.RevokeExternalConnectivity": {"NetworkID": str, "EndpointID": str},
    "IpamDriver.RequestPool": {"AddressSpace": str, "Pool": str, "SubPool": str, "Options": STR_MAP, "V6": bool},
    "IpamDriver.ReleasePool": {"PoolID": str},
    "IpamDriver.RequestAddress": {"PoolID": str, "Address": str, "Options": STR_MAP},
    "IpamDriver.ReleaseAddress": {"PoolID": str, "Address": str},
}.items()})


def check(method: str, route: str, body: dict) -> None:
    schema = SCHEMAS.get((method, route))
    if schema is not None:
        _check_fields(body, schema, "")


def _check_fields(value: dict, schema: dict, where: str) -> None:
    for field, kind in schema.items():
        if field in value and value[field] is not None:
            _check_value(value[field], kind, f"{where}{field}")


def _check_value(value, kind, name: str) -> None:
    if kind is str:
        ok = isinstance(value, str) and "\0" not in value
        expected = "a string"
    elif kind is bool:
        ok, expected = isinstance(value, bool), "true or false"
    elif kind is int:
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif kind == "number":
        ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(kind, list):
        if not isinstance(value, list):
            raise BadRequest(f"{name} must be a list")
        for index, item in enumerate(value):
            _check_value(item, kind[0], f"{name}[{index}]")
        return
    elif kind == ANY_MAP:
        ok, expected = isinstance(value, dict), "an object"
    elif kind == STR_MAP:
        ok = isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
        expected = "an object of strings"
    elif isinstance(kind, dict):
        if not isinstance(value, dict):
            raise BadRequest(f"{name} must be an object")
        _check_fields(value, kind, f"{name}.")
        return
    else:
        raise AssertionError(kind)
    if not ok:
        raise BadRequest(f"{name} must be {expected}, not {type(value).__name__}")
