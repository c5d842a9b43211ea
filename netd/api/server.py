"""The daemon's REST API on a Unix socket (Docker Engine API paths and field names where
Docker has them). One function per route, each taking the request's JSON body or query.

Errors are typed (netd.contract.errors) and mapped once, here, to HTTP statuses with a JSON body
`{"message": "..."}` as Docker's API does.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socketserver
import sys
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, unquote, urlparse

from netd.api import cni_routes, request, views  # noqa: F401 - cni_routes: its routes register themselves
from netd.api.errors import reported
from netd.api.routing import ROUTES, Stream, Text, route
from netd.contract import API_VERSION, MIN_API_VERSION, VERSION
from netd.contract.errors import BadRequest, Internal, NotFound
from netd.contract.model import PortBinding, parse_address
from netd.core.controller import Controller
from netd.core.ports import parse_port_proto
from runtime import logs

log = logging.getLogger("netd.api.server")

# --- system -------------------------------------------------------------------------------

@route("GET", "/_ping")
@route("HEAD", "/_ping")
def ping(ctl: Controller, query, body):
    return Text("OK")


@route("GET", "/version")
def version(ctl: Controller, query, body):
    """Docker's shape, so that the docker CLI and docker-py negotiate API_VERSION with netd."""
    uname = os.uname()
    return {"Version": VERSION, "ApiVersion": API_VERSION, "MinAPIVersion": MIN_API_VERSION, "Os": "linux",
            "Arch": {"x86_64": "amd64", "aarch64": "arm64"}.get(uname.machine, uname.machine),
            "KernelVersion": uname.release, "GoVersion": f"python{sys.version.split()[0]}",
            "GitCommit": "", "BuildTime": "", "Experimental": False,
            "Platform": {"Name": f"netd {VERSION}"},
            "Components": [{"Name": "netd", "Version": VERSION, "Details": {"ApiVersion": API_VERSION}}]}


@route("GET", "/info")
def info(ctl: Controller, query, body):
    return ctl.info()


# --- networks -----------------------------------------------------------------------------

@route("GET", "/networks")
def network_list(ctl: Controller, query, body):
    wanted = views.network_filters(query.get("filters"))
    return [views.network_view(ctl, n, verbose=False) for n in ctl.list_networks() if views.network_matches(n, wanted)]


@route("POST", "/networks/create")
def network_create(ctl: Controller, query, body):
    configs = (body.get("IPAM") or {}).get("Config") or []
    if len(configs) > 1:
        raise BadRequest("netd supports one IPv4 subnet per network")
    config = configs[0] if configs else {}
    network = ctl.create_network(
        name=_required(body, "Name"),
        driver=body.get("Driver") or "bridge",
        subnet=config.get("Subnet"),
        gateway=config.get("Gateway"),
        ip_range=config.get("IPRange"),
        aux_addresses=config.get("AuxiliaryAddresses"),
        options=body.get("Options"),
        labels=body.get("Labels"),
        internal=bool(body.get("Internal")),
        scope=body.get("Scope") or None,
    )
    return 201, {"Id": network.id, "Warning": ctl.network_warning(network)}


@route("GET", "/networks/{ref}")
def network_inspect(ctl: Controller, query, body, ref):
    return views.network_view(ctl, ctl.get_network(ref))


@route("DELETE", "/networks/{ref}")
def network_remove(ctl: Controller, query, body, ref):
    ctl.remove_network(ref)
    return 204, None


@route("POST", "/networks/prune")
def network_prune(ctl: Controller, query, body):
    wanted = views.network_filters(query.get("filters"), allowed=("label", "label!", "until"))
    return {"NetworksDeleted": ctl.prune_networks(lambda n: views.network_matches(n, wanted))}


@route("POST", "/networks/{ref}/connect")
def network_connect(ctl: Controller, query, body, ref):
    config = body.get("EndpointConfig") or {}
    ip = (config.get("IPAMConfig") or {}).get("IPv4Address") or None
    endpoint = ctl.connect(ref, _required(body, "Container"), ip=ip, aliases=config.get("Aliases") or [])
    return views.endpoint_view(endpoint)


@route("POST", "/networks/{ref}/disconnect")
def network_disconnect(ctl: Controller, query, body, ref):
    ctl.disconnect(ref, _required(body, "Container"), force=bool(body.get("Force")))
    return 200, None


# --- containers ---------------------------------------------------------------------------

@route("POST", "/containers/run")
def container_run(ctl: Controller, query, body):
    ports = []
    for spec in body.get("Ports") or []:
        if spec.get("ContainerPort") is None:
            raise BadRequest("Ports[]: ContainerPort is missing")
        port, proto = parse_port_proto(f"{spec['ContainerPort']}/{spec.get('Proto') or 'tcp'}")
        host_ip = spec.get("HostIp") or ""
        if host_ip:
            parse_address(host_ip, "host IP of a published port")
        ports.append(PortBinding(port, proto, host_ip, int(spec.get("HostPort") or 0)))
    container = ctl.run(
        cmd=body.get("Cmd") or [],
        name=body.get("Name") or None,
        hostname=body.get("Hostname") or None,
        network=body.get("NetworkMode") or "bridge",
        ip=body.get("IPv4Address") or None,
        aliases=body.get("Aliases") or [],
        ports=ports,
        publish_all=bool(body.get("PublishAllPorts")),
        expose=body.get("ExposedPorts") or [],
        rootfs=body.get("Rootfs") or None,
        env=body.get("Env") or {},
        detach=bool(body.get("Detach")),
        auto_remove=bool(body.get("AutoRemove")),
        hold_removal=bool(body.get("Attach")),
        cap_add=body.get("CapAdd") or [],       # lists of strings: checked by the request's schema
        cap_drop=body.get("CapDrop") or [],
        privileged=bool(body.get("Privileged")),
    )
    if not body.get("Attach"):
        return 201, {"Id": container.id, "Name": container.name}
    return Stream(_attached_run(ctl, container.id, container.name), "application/x-ndjson")


def _attached_run(ctl: Controller, container_id: str, name: str) -> Iterator[bytes]:
    """A foreground `netd run`: the id, the output as it comes, then the exit code."""
    try:
        yield _line({"Id": container_id, "Name": name})
        for chunk in _follow_log(ctl, container_id):
            yield _line({"Out": chunk.decode(errors="replace")})
        container = ctl.wait(container_id)
        yield _line({"ExitCode": container.exit_code})
    finally:
        ctl.release_removal(container_id)  # --rm waits until the output was delivered


def _line(obj: dict) -> bytes:
    return json.dumps(obj).encode() + b"\n"


@route("GET", "/containers/json")
def container_list(ctl: Controller, query, body):
    all_states = query.get("all", "0") in ("1", "true")
    return [views.container_summary(ctl, c) for c in ctl.list_containers(all_states)]


@route("GET", "/containers/{ref}/json")
def container_inspect(ctl: Controller, query, body, ref):
    return views.container_view(ctl, ctl.get_container(ref))


@route("GET", "/containers/{ref}/logs")
def container_logs(ctl: Controller, query, body, ref):
    container = ctl.get_container(ref)
    path = ctl.paths.log_file(container.id)
    lines = query.get("tail", "all")
    if lines != "all" and not (lines.isdigit()):
        raise BadRequest(f"invalid tail {lines!r}: give a number of lines or all")
    start = logs.tail(path, int(lines)) if lines != "all" else _read(path)
    if query.get("follow", "0") in ("1", "true"):
        return Stream(_follow_log(ctl, container.id, start, skip_to_end=lines != "all"))
    return Stream(iter([start]))


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def _follow_log(ctl: Controller, container_id: str, start: bytes = b"", skip_to_end: bool = False) -> Iterator[bytes]:
    """What is there (or its tail), then what comes, until the container stops; a log rotated
    meanwhile (truncated) is followed from its new start."""
    path = ctl.paths.log_file(container_id)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, the generator may be long-lived
    except FileNotFoundError:
        return
    with f:
        if skip_to_end:
            f.seek(0, os.SEEK_END)
            if start:
                yield start
        while True:
            chunk = f.read(65536)
            if chunk:
                yield chunk
                continue
            if os.fstat(f.fileno()).st_size < f.tell():   # rotated: truncated under us
                f.seek(0)
                continue
            container = ctl.container_by_id(container_id)
            if container is None or container.state != "running":
                rest = f.read()
                if rest:
                    yield rest
                return
            time.sleep(0.02)


@route("POST", "/containers/{ref}/wait")
def container_wait(ctl: Controller, query, body, ref):
    container = ctl.wait(ref)
    return {"StatusCode": container.exit_code}


@route("POST", "/containers/{ref}/stop")
def container_stop(ctl: Controller, query, body, ref):
    ctl.stop(ref, _seconds(query.get("t", "10"), "t"))
    return 204, None


@route("DELETE", "/containers/{ref}")
def container_remove(ctl: Controller, query, body, ref):
    ctl.remove(ref, force=query.get("force", "0") in ("1", "true"))
    return 204, None


# --- IPAM ---------------------------------------------------------------------------------

@route("GET", "/ipam/pools")
def ipam_pools(ctl: Controller, query, body):
    return ctl.ipam_pools()


@route("GET", "/ipam/networks/{ref}")
def ipam_network(ctl: Controller, query, body, ref):
    return ctl.ipam_allocations(ref)


@route("GET", "/ipam/lookup/{address}")
def ipam_lookup(ctl: Controller, query, body, address):
    return ctl.ipam_lookup(address)


# --- hosts ------------------------------------------------------------------------------------

@route("GET", "/hosts")
def host_list(ctl: Controller, query, body):
    return ctl.host_list()


@route("DELETE", "/hosts/{address}")
def host_remove(ctl: Controller, query, body, address):
    return {"Reclaimed": ctl.remove_host(address)}


# --- debugging: netd capture and netd trace (netd.debug.points, netd.debug.trace) -----------------------

@route("GET", "/debug/capture-targets/{target}")
def debug_capture_target(ctl: Controller, query, body, target):
    from netd.debug import points as debug
    return debug.capture_target(ctl, target, query.get("iface") or None)


@route("GET", "/debug/names")
def debug_names(ctl: Controller, query, body):
    from netd.debug import points as debug
    return debug.names(ctl)


@route("POST", "/debug/trace")
def debug_trace(ctl: Controller, query, body):
    from netd.debug import trace
    return trace.run_trace(ctl, _required(body, "Source"), _required(body, "Destination"),
                           proto=body.get("Proto") or "icmp", size=body.get("Size"), timeout=body.get("Timeout"))


def _seconds(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 3600:
        raise BadRequest(f"invalid {name} {text!r}: give seconds from 0 to 3600")
    return value


def _required(body: dict, field: str) -> str:
    value = body.get(field)
    if not value:
        raise BadRequest(f"missing {field} in the request")
    return value


# --- the server ---------------------------------------------------------------------------

def dispatch(ctl: Controller, method: str, path: str, query: dict, body: dict) -> tuple[int, object]:
    for route_method, regex, fn in ROUTES:
        match = regex.match(path)
        if match and route_method == method:
            params = {k: unquote(v) for k, v in match.groupdict().items()}
            request.check(method, fn.route, body)
            result = fn(ctl, query, body, **params)
            if isinstance(result, tuple):
                return result
            return 200, result
    raise NotFound(f"no API route {method} {path}")


class RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ApiServer

    def _handle(self, method: str) -> None:
        started = time.perf_counter()
        url = urlparse(self.path)
        path = re.sub(r"^/v[0-9.]+", "", url.path)  # accept Docker-style versioned paths
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                raise BadRequest("the request body is not valid JSON") from None
            if not isinstance(body, dict):
                raise BadRequest("the request body must be a JSON object")
            status, result = dispatch(self.server.controller, method, path, query, body)
        except Exception as e:  # noqa: BLE001 - report, keep serving
            error = reported(e)
            if error is None:
                log.exception("%s %s failed", method, path)
                error = Internal(f"internal error: {e}")
            status, result = error.status, {"message": error.message}
        if isinstance(result, Stream):
            self._send_stream(status, result)
        else:
            self._send_json(status, result)
        log.debug("%s %s -> %d in %.2f ms", method, path, status, (time.perf_counter() - started) * 1000)

    def _send_json(self, status: int, result: object) -> None:
        if isinstance(result, Text):
            data, content_type = result.encode(), "text/plain; charset=utf-8"
        else:
            data, content_type = (b"" if result is None else json.dumps(result).encode()), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def end_headers(self) -> None:
        # What Docker's clients read to choose the API version (and the OS) to speak.
        self.send_header("Api-Version", API_VERSION)
        self.send_header("Ostype", "linux")
        self.send_header("Docker-Experimental", "false")
        super().end_headers()

    def version_string(self) -> str:
        return f"netd/{VERSION} (linux)"

    def _send_stream(self, status: int, stream: Stream) -> None:
        self.send_response(status)
        self.send_header("Content-Type", stream.content_type)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            for chunk in stream.chunks:
                self.wfile.write(chunk)
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (Ctrl-C on `netd run`): the container keeps running

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle("HEAD")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        log.debug("api: " + format, *args)


class ApiServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, controller: Controller, group: str | None = "netd"):
        self.controller = controller
        self.path = path
        if os.path.exists(path):
            os.unlink(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        old_umask = os.umask(0o117)  # born root-only (rw for owner and group): no window of exposure
        try:
            super().__init__(path, RequestHandler)
        finally:
            os.umask(old_umask)
        gid = _group_id(group)
        if gid is not None:
            os.chown(path, 0, gid)
        # Who may drive the daemon (as root): `netd info` says it.
        self.access = f"root and group {group} (mode 0660)" if gid is not None else "root only (mode 0660, no group netd)"

    def server_close(self) -> None:
        super().server_close()
        if os.path.exists(self.path):
            os.unlink(self.path)


def _group_id(group: str | None) -> int | None:
    if not group:
        return None
    import grp
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        return None

