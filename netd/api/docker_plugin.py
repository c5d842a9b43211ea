"""netd as dockerd's remote network drivers and IPAM driver: Docker's plugin protocol
(libnetwork's docs/remote.md and docs/ipam.md) on Unix sockets in /run/docker/plugins.

One socket per plugin name: `netd-bridge`, `netd-overlay`, `netd-macvlan`, `netd-hostgw` (network
drivers) and `netd` (the IPAM driver). Each call is a POST of one JSON object, answered with one;
one function per call, as kuryr-libnetwork does. What the calls mean is netd.core.docker's.
Errors answer {"Err": "..."} with the status of netd's error kind; an unknown call gets 404.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler

from netd.api import request
from netd.api.errors import reported
from netd.contract.errors import BadRequest, Internal
from netd.core.docker import DockerSide

log = logging.getLogger("netd.api.docker_plugin")

DEFAULT_PLUGIN_DIR = "/run/docker/plugins"
CONTENT_TYPE = "application/vnd.docker.plugins.v1.2+json"
IPAM_PLUGIN = "netd"
# dockerd sees netd's drivers that plumb addresses; host and null are dockerd's own.
NETWORK_DRIVERS = ("bridge", "overlay", "macvlan", "hostgw")
CROSS_HOST = ("overlay", "hostgw")

Call = Callable[[DockerSide, str, dict, int | None], dict]
NETWORK_CALLS: dict[str, Call] = {}
IPAM_CALLS: dict[str, Call] = {}


def call(table: dict[str, Call], name: str):
    def register(fn: Call) -> Call:
        table[name] = fn
        return fn
    return register


def _field(body: dict, name: str, kind: type = str):
    value = body.get(name)
    if not isinstance(value, kind) or (kind is str and not value):
        raise BadRequest(f"missing or malformed {name} in the request")
    return value


# --- network driver -------------------------------------------------------------------------

@call(NETWORK_CALLS, "NetworkDriver.GetCapabilities")
def capabilities(side, driver, body, pid):
    # Local scope: dockerd 20.10 takes only those without swarm; netd's store spans the hosts.
    return {"Scope": "local", "ConnectivityScope": "global" if driver in CROSS_HOST else "local"}


@call(NETWORK_CALLS, "NetworkDriver.CreateNetwork")
def create_network(side, driver, body, pid):
    side.create_network(_field(body, "NetworkID"), driver, body.get("IPv4Data") or [], body.get("Options") or {})
    return {}


@call(NETWORK_CALLS, "NetworkDriver.DeleteNetwork")
def delete_network(side, driver, body, pid):
    side.delete_network(_field(body, "NetworkID"))
    return {}


@call(NETWORK_CALLS, "NetworkDriver.AllocateNetwork")
@call(NETWORK_CALLS, "NetworkDriver.FreeNetwork")
@call(NETWORK_CALLS, "NetworkDriver.DiscoverNew")
@call(NETWORK_CALLS, "NetworkDriver.DiscoverDelete")
def nothing_to_do(side, driver, body, pid):
    return {}   # swarm's and discovery's: netd's store already tells every host


@call(NETWORK_CALLS, "NetworkDriver.CreateEndpoint")
def create_endpoint(side, driver, body, pid):
    interface = body.get("Interface") or {}
    if interface.get("AddressIPv6"):
        raise BadRequest("netd's networks are IPv4 only")
    mac = side.create_endpoint(_field(body, "NetworkID"), _field(body, "EndpointID"),
                               interface.get("Address") or "", interface.get("MacAddress") or "")
    # What dockerd gave stays dockerd's; only what it left empty is answered.
    return {"Interface": {} if interface.get("MacAddress") else {"MacAddress": mac}}


@call(NETWORK_CALLS, "NetworkDriver.EndpointOperInfo")
def endpoint_info(side, driver, body, pid):
    return {"Value": side.oper_info(_field(body, "EndpointID"))}


@call(NETWORK_CALLS, "NetworkDriver.DeleteEndpoint")
@call(NETWORK_CALLS, "NetworkDriver.Leave")
def leave(side, driver, body, pid):
    side.leave(_field(body, "EndpointID"))
    return {}


@call(NETWORK_CALLS, "NetworkDriver.Join")
def join(side, driver, body, pid):
    return side.join(_field(body, "EndpointID"), _field(body, "SandboxKey"), pid)


@call(NETWORK_CALLS, "NetworkDriver.ProgramExternalConnectivity")
def program_external(side, driver, body, pid):
    side.program_external(_field(body, "EndpointID"), body.get("Options") or {})
    return {}


@call(NETWORK_CALLS, "NetworkDriver.RevokeExternalConnectivity")
def revoke_external(side, driver, body, pid):
    side.revoke_external(_field(body, "EndpointID"))
    return {}


# --- IPAM driver ----------------------------------------------------------------------------

@call(IPAM_CALLS, "IpamDriver.GetCapabilities")
def ipam_capabilities(side, driver, body, pid):
    return {"RequiresMACAddress": False, "RequiresRequestReplay": False}


@call(IPAM_CALLS, "IpamDriver.GetDefaultAddressSpaces")
def address_spaces(side, driver, body, pid):
    return {"LocalDefaultAddressSpace": "netd-local", "GlobalDefaultAddressSpace": "netd-global"}


@call(IPAM_CALLS, "IpamDriver.RequestPool")
def request_pool(side, driver, body, pid):
    return side.request_pool(body.get("Pool") or "", body.get("SubPool") or "", bool(body.get("V6")))


@call(IPAM_CALLS, "IpamDriver.ReleasePool")
def release_pool(side, driver, body, pid):
    side.release_pool(_field(body, "PoolID"))
    return {}


@call(IPAM_CALLS, "IpamDriver.RequestAddress")
def request_address(side, driver, body, pid):
    return side.request_address(_field(body, "PoolID"), body.get("Address") or "", body.get("Options") or {})


@call(IPAM_CALLS, "IpamDriver.ReleaseAddress")
def release_address(side, driver, body, pid):
    side.release_address(_field(body, "PoolID"), _field(body, "Address"))
    return {}


# --- the servers ----------------------------------------------------------------------------

class PluginHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: PluginServer

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        started = time.perf_counter()
        name = self.path.lstrip("/")
        server = self.server
        status, reply, raw = 200, {}, b""
        try:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw.strip() else {}
            except ValueError:
                raise BadRequest("the request body is not valid JSON") from None
            if not isinstance(body, dict):
                raise BadRequest("the request body must be a JSON object")
            if name == "Plugin.Activate":
                reply = {"Implements": [server.implements]}
            else:
                fn = server.calls.get(name)
                if fn is None:
                    status, reply = 404, {"Err": f"netd plugin {server.name}: unknown call {name}"}
                else:
                    request.check("POST", "/" + name, body)
                    reply = fn(server.side, server.driver, body, self._peer_pid())
        except Exception as e:  # noqa: BLE001 - answer, keep serving
            error = reported(e)
            if error is None:
                log.exception("%s %s failed", server.name, name)
                error = Internal(f"internal error: {e}")
            status, reply = error.status, {"Err": error.message}
            log.info("%s %s: %s", server.name, name, error.message)
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        log.debug("%s %s %s -> %d %s in %.2f ms", server.name, name, raw[:2000].decode(errors="replace"), status,
                  data[:2000].decode(errors="replace"), (time.perf_counter() - started) * 1000)

    def _peer_pid(self) -> int | None:
        try:
            creds = self.connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return None
        return struct.unpack("3i", creds)[0] or None

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        log.debug("plugin: " + format, *args)


class PluginServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, name: str, side: DockerSide, driver: str | None):
        self.path, self.name, self.side, self.driver = path, name, side, driver
        self.implements = "IpamDriver" if driver is None else "NetworkDriver"
        self.calls = IPAM_CALLS if driver is None else NETWORK_CALLS
        if os.path.exists(path):
            os.unlink(path)
        old_umask = os.umask(0o177)   # root only: dockerd runs as root
        try:
            super().__init__(path, PluginHandler)
        finally:
            os.umask(old_umask)

    def server_close(self) -> None:
        super().server_close()
        if os.path.exists(self.path):
            os.unlink(self.path)


class DockerPlugins:
    """All of netd's plugin sockets in `directory`, served until close()."""

    def __init__(self, controller, directory: str = DEFAULT_PLUGIN_DIR):
        os.makedirs(directory, mode=0o755, exist_ok=True)
        side = DockerSide(controller)
        available = [d for d in NETWORK_DRIVERS if d in controller.drivers]
        self.servers = [PluginServer(os.path.join(directory, f"netd-{d}.sock"), f"netd-{d}", side, d) for d in available]
        self.servers.append(PluginServer(os.path.join(directory, f"{IPAM_PLUGIN}.sock"), IPAM_PLUGIN, side, None))
        self.names = [s.name for s in self.servers]
        for server in self.servers:
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                             name=f"plugin-{server.name}", daemon=True).start()

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()
