"""`netd` as a CNI plugin (spec 1.0.0 and 1.1.0; 0.3.x and 0.4.0 results too): the executable
runs as one when CNI_COMMAND is set. It keeps no state: each call is one request to the running
daemon (netd.api.cni_routes -> netd.core.cni), which owns it all.

As the main plugin (`"type": "netd"`):

    {"cniVersion": "1.0.0", "name": "web", "type": "netd", "network": "web"}
    {"cniVersion": "1.0.0", "name": "web", "type": "netd", "driver": "bridge", "subnet": "10.88.5.0/24"}

`network` names an existing netd network (any driver; default: the config's `name`); with
`driver` and `subnet` the network is made on first use (`gateway`, `options` too). As an IPAM
plugin for another main plugin: `"ipam": {"type": "netd", "network": NAME, "routes": [...]}`.
The daemon's socket: `"socket"` in the config (or the ipam section), else NETD_HOST, else
/run/netd/netd.sock. Static addresses and MACs: runtimeConfig `ips` / `mac` (capabilities),
`args.cni.ips`, or CNI_ARGS `IP=` / `MAC=`.

Errors are CNI error objects on stdout with a non-zero exit: 1 unsupported cniVersion, 2 an
unsupported field, 3 unknown container (CHECK), 4 a missing environment variable or no daemon
running, 6 stdin is not JSON, 7 invalid config, 11 try again later (the daemon is busy or its
store does not answer), 50 not available (STATUS), 100 CHECK found the attachment changed,
999 anything else. The plugin starts for every call: it imports nothing but `os`, `sys` and the C
halves of `json` and `socket` (the modules themselves pull in `re` and `enum`: 9 ms of a ~20 ms call).

`netd cni install NETWORK` (add_cni_commands) writes the link and a conflist for people who do
not want to write JSON.
"""

from __future__ import annotations

import os
import sys

try:   # the C halves of `json` and `socket`: the modules themselves import re and enum (~9 ms a call)
    import _json
    import _socket
except ImportError:  # pragma: no cover - not CPython
    _json = _socket = None

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = "1.1.0"
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")
VALID_ATTACHMENTS = "cni.dev/valid-attachments"
DEFAULT_SOCKET = "/run/netd/netd.sock"

# CNI error codes (SPEC.md "Error codes"; 999 is libcni's "internal").
INCOMPATIBLE_VERSION, UNSUPPORTED_FIELD, UNKNOWN_CONTAINER, BAD_ENVIRONMENT = 1, 2, 3, 4
DECODING_FAILURE, INVALID_CONFIG, TRY_AGAIN_LATER, NOT_AVAILABLE = 6, 7, 11, 50
CHECK_FAILED, INTERNAL = 100, 999
# The daemon's HTTP statuses as CNI codes (412: CHECK found a difference).
CODES_BY_STATUS = {400: INVALID_CONFIG, 404: UNKNOWN_CONTAINER, 412: CHECK_FAILED, 503: TRY_AGAIN_LATER}


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


class DaemonDown(Exception):
    pass


class DaemonError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# --- JSON and HTTP without the json and socket modules --------------------------------------------

class _Scanning:
    """What _json's scanner reads off its context: json.JSONDecoder's defaults."""
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    memo: dict = {}

    @staticmethod
    def parse_constant(name: str) -> float:
        return {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}[name]


if _json is not None:
    _scan = _json.make_scanner(_Scanning())
    _encode = _json.make_encoder(None, None, _json.encode_basestring_ascii, None, ": ", ", ", False, False, True)

    def loads(text: str):
        start = len(text) - len(text.lstrip())
        try:
            value, end = _scan(text, start)
            if not text[end:].strip():
                return value
        except Exception:  # noqa: BLE001, S110 - not JSON: json itself says why, below
            pass
        import json
        return json.loads(text)

    def dumps(value) -> str:
        return "".join(_encode(value, 0))
else:  # pragma: no cover
    from json import dumps, loads


def socket_path(host: str | None = None) -> str:
    """As netd.api.client.socket_path: NETD_HOST, `unix://PATH` or a path."""
    host = host or os.environ.get("NETD_HOST") or DEFAULT_SOCKET
    if host.startswith("unix://"):
        return host[len("unix://"):]
    if "://" in host:
        raise CniError(INVALID_CONFIG, f"socket {host}: only unix:// sockets are supported")
    return host


class PluginClient:
    """One POST to the daemon, one connection (as the CLI's client), over _socket."""

    def __init__(self, host: str | None = None, timeout: float = 120):
        self.path = socket_path(host)
        self.timeout = timeout

    def call(self, path: str, body: dict) -> dict:
        payload = dumps(body).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: netd\r\nConnection: close\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n").encode()
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM) if _socket else __import__("socket").socket(1, 1)
        sock.settimeout(self.timeout)
        try:
            try:
                sock.connect(self.path)
            except (FileNotFoundError, ConnectionRefusedError):
                raise DaemonDown(f"cannot connect to the netd daemon at {self.path}: is it running? Start it with "
                                 "`netd daemon` (or give its socket: \"socket\" in the config, or NETD_HOST)") from None
            except PermissionError:
                raise DaemonDown(f"permission denied on {self.path}: run as root or as a member of group netd") from None
            sock.sendall(head + payload)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            raise CniError(TRY_AGAIN_LATER, f"the netd daemon at {self.path} did not answer in time") from None
        except (BrokenPipeError, ConnectionResetError) as e:
            raise DaemonDown(f"the netd daemon at {self.path} went away: {e}") from None
        finally:
            sock.close()
        data = b"".join(chunks)
        head_part, _, content = data.partition(b"\r\n\r\n")
        try:
            status = int(head_part.split(b"\r\n", 1)[0].split()[1])
        except (IndexError, ValueError):
            raise DaemonDown(f"the netd daemon at {self.path} gave no answer") from None
        try:
            reply = loads(content.decode()) if content.strip() else {}
        except ValueError:
            reply = {"message": content.decode(errors="replace")}
        if status >= 400:
            raise DaemonError(status, (reply or {}).get("message") or f"HTTP {status}")
        return reply


# --- the plugin ---------------------------------------------------------------------------------

def main() -> int:
    command = os.environ.get("CNI_COMMAND", "")
    version = LATEST
    try:
        raw = sys.stdin.buffer.read() if not sys.stdin.isatty() else b""
        if command == "VERSION":
            _print({"cniVersion": LATEST, "supportedVersions": list(SUPPORTED_VERSIONS)})
            return 0
        if command not in COMMANDS:
            raise CniError(BAD_ENVIRONMENT, f"CNI_COMMAND={command!r}: netd knows {', '.join(COMMANDS)}")
        config = _decode(raw)
        version = _version(config)
        result = run(command, config, version)
        if result is not None:
            _print(_for_version(result, version))
        return 0
    except CniError as e:
        error = {"cniVersion": version, "code": e.code, "msg": e.msg}
        if e.details:
            error["details"] = e.details
        _print(error)
        return 1
    except Exception as e:  # noqa: BLE001 - a runtime reads stdout: never a traceback there
        _print({"cniVersion": version, "code": INTERNAL, "msg": f"netd: internal error: {e}"})
        return 1


def _print(obj: dict) -> None:
    sys.stdout.write(dumps(obj) + "\n")
    sys.stdout.flush()


def _decode(raw: bytes) -> dict:
    try:
        config = loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise CniError(DECODING_FAILURE, f"the network configuration on stdin is not JSON: {e}") from None
    if not isinstance(config, dict):
        raise CniError(DECODING_FAILURE, "the network configuration on stdin must be a JSON object")
    return config


def _version(config: dict) -> str:
    version = config.get("cniVersion")
    if version is None and isinstance(config.get("cniVersions"), list):   # 1.1: a list to choose from
        ours = [v for v in config["cniVersions"] if v in SUPPORTED_VERSIONS]
        version = max(ours, key=lambda v: tuple(int(p) for p in v.split("."))) if ours else config["cniVersions"]
    if version is None:
        raise CniError(INVALID_CONFIG, "the network configuration has no cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(INCOMPATIBLE_VERSION, f"netd does not support CNI version {version}",
                       f"supported: {', '.join(SUPPORTED_VERSIONS)}")
    return version


def _for_version(result: dict, version: str) -> dict:
    result = {"cniVersion": version, **result}
    if version < "1.0.0":   # 0.3.x and 0.4.0 results name each address's IP version
        result["ips"] = [{"version": "4", **ip} for ip in result.get("ips") or []]
    return result


def _env(name: str, required: bool = True) -> str:
    value = os.environ.get(name, "")
    if required and not value:
        raise CniError(BAD_ENVIRONMENT, f"{name} is not set")
    return value


def _text(section: dict, key: str, where: str = "") -> str:
    value = section.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CniError(INVALID_CONFIG, f"{where}{key} must be a string, not {type(value).__name__}")
    return value


def _cni_args() -> dict[str, str]:
    pairs = {}
    for item in os.environ.get("CNI_ARGS", "").split(";"):
        key, sep, value = item.partition("=")
        if sep and key:
            pairs[key.strip()] = value.strip()
    return pairs


def _static(config: dict) -> tuple[str, str]:
    """A static IPv4 address and MAC the runtime asked for (capabilities, args, CNI_ARGS)."""
    runtime = config.get("runtimeConfig") if isinstance(config.get("runtimeConfig"), dict) else {}
    args = config.get("args") if isinstance(config.get("args"), dict) else {}
    cni = args.get("cni") if isinstance(args.get("cni"), dict) else {}
    env = _cni_args()
    ips = [i for i in (runtime.get("ips") or cni.get("ips") or []) if isinstance(i, str) and "." in i]
    ip = (ips[0] if ips else env.get("IP", "")).split("/")[0]
    mac = runtime.get("mac") or cni.get("mac") or env.get("MAC", "")
    return ip, mac if isinstance(mac, str) else ""


def run(command: str, config: dict, version: str) -> dict | None:
    name = _text(config, "name")
    if not name:
        raise CniError(INVALID_CONFIG, "the network configuration has no name")
    kind = _text(config, "type")
    ipam = config.get("ipam")
    if ipam is not None and not isinstance(ipam, dict):
        raise CniError(INVALID_CONFIG, "ipam must be an object")
    if kind == "netd":
        section, mode, where = config, "plugin", ""
        if ipam and ipam.get("type") not in (None, "", "netd"):
            raise CniError(UNSUPPORTED_FIELD, f"netd gives addresses from its own IPAM, not {ipam.get('type')}: "
                           "drop the ipam section")
    elif ipam and ipam.get("type") == "netd":
        section, mode, where = ipam, "ipam", "ipam."
    else:
        raise CniError(INVALID_CONFIG, f"this is the netd plugin, but the config's type is {kind!r} and its ipam "
                       "type is not netd")
    network = _text(section, "network", where)
    options = section.get("options") or {}
    if not isinstance(options, dict) or not all(isinstance(v, str) for v in options.values()):
        raise CniError(INVALID_CONFIG, f"{where}options must be an object of strings")
    host = _text(section, "socket", where) or _text(config, "socket")
    client = PluginClient(host or None, timeout=120)
    try:
        return _dispatch(client, command, config, section, mode, name, network, options, where)
    except DaemonDown as e:
        code = NOT_AVAILABLE if command == "STATUS" else BAD_ENVIRONMENT
        raise CniError(code, f"netd: {e}", f"socket {client.path}") from None
    except DaemonError as e:
        code = CODES_BY_STATUS.get(e.status, INTERNAL)
        if command == "STATUS" and code != INVALID_CONFIG:
            code = NOT_AVAILABLE
        raise CniError(code, f"netd: {e.message}") from None


def _dispatch(client: PluginClient, command: str, config: dict, section: dict, mode: str, name: str,
              network: str, options: dict, where: str) -> dict | None:
    if command == "STATUS":
        client.call("/cni/status", {"Name": name, "Network": network,
                                    "Driver": _text(section, "driver", where), "Subnet": _text(section, "subnet", where)})
        return None
    if command == "GC":
        valid = config.get(VALID_ATTACHMENTS)
        if not isinstance(valid, list) or not all(isinstance(v, dict) for v in valid):
            raise CniError(INVALID_CONFIG, f"GC needs {VALID_ATTACHMENTS}: a list of {{containerID, ifname}}")
        client.call("/cni/gc", {"Name": name, "Valid": [{"ContainerID": str(v.get("containerID") or ""),
                                                         "IfName": str(v.get("ifname") or "")} for v in valid]})
        return None
    ids = {"Name": name, "ContainerID": _env("CNI_CONTAINERID"), "IfName": _env("CNI_IFNAME")}
    if command == "DEL":
        client.call("/cni/del", {**ids, "Network": network})
        return None
    netns = _env("CNI_NETNS")
    if not os.path.isabs(netns):
        netns = os.path.abspath(netns)
    if command == "CHECK":
        prev = config.get("prevResult")
        if prev is not None and not isinstance(prev, dict):
            raise CniError(INVALID_CONFIG, "prevResult must be an object")
        client.call("/cni/check", {**ids, "Netns": netns, "PrevResult": prev})
        return None
    # ADD
    if not os.path.exists(netns):
        raise CniError(BAD_ENVIRONMENT, f"CNI_NETNS={netns}: no such network namespace")
    ip, mac = _static(config)
    if mode == "ipam":
        routes = section.get("routes")
        if routes is not None and (not isinstance(routes, list) or not all(
                isinstance(r, dict) and isinstance(r.get("dst"), str) for r in routes)):
            raise CniError(INVALID_CONFIG, "ipam.routes must be a list of {\"dst\": CIDR, \"gw\": IP}")
        result = client.call("/cni/ipam/add", {**ids, "Network": network, "IP": ip})
        if routes:
            result["routes"] = routes
    else:
        result = client.call("/cni/add", {**ids, "Netns": netns, "Network": network, "IP": ip, "MAC": mac,
                                          "Driver": _text(section, "driver"), "Subnet": _text(section, "subnet"),
                                          "Gateway": _text(section, "gateway"), "Options": options})
    dns = section.get("dns") or config.get("dns")
    if isinstance(dns, dict) and dns:
        result["dns"] = dns
    return result


# --- netd cni install ---------------------------------------------------------------------------

DEFAULT_BIN_DIR = "/opt/cni/bin"
DEFAULT_CONF_DIR = "/etc/cni/net.d"
CONFLIST_VERSION = "1.0.0"   # what the reference plugins chained after netd (portmap 1.1.1) speak


def add_cni_commands(sub) -> None:
    cni = sub.add_parser("cni", help="netd as a CNI plugin (podman, containerd)").add_subparsers(
        dest="cni_command", metavar="COMMAND")
    cni.required = True
    install = cni.add_parser("install", help="link netd into a CNI plugin dir and write a conflist (netd + portmap)")
    install.add_argument("--bin-dir", default=DEFAULT_BIN_DIR, help="CNI plugin dir for the link (default %(default)s)")
    install.add_argument("--conf-dir", default=DEFAULT_CONF_DIR, help="CNI config dir (default %(default)s)")
    install.add_argument("--socket", help="the daemon's socket, written into the config (default: NETD_HOST, "
                                          "else /run/netd/netd.sock at run time)")
    install.add_argument("-d", "--driver", help="make the network on first use with this driver (with --subnet)")
    install.add_argument("--subnet", help="make the network on first use with this subnet")
    install.add_argument("network", help="the netd network (and the CNI network's name)")
    install.set_defaults(run=cmd_cni_install, needs_client=False)


def _netd_executable() -> str:
    """The installed `netd` (the launcher), whichever way this command was started."""
    from netd.contract.errors import NetdError

    candidates = [sys.argv[0]] if os.path.basename(sys.argv[0]) == "netd" else []
    candidates.append(os.path.join(os.path.dirname(sys.executable), "netd"))
    for path in candidates:
        real = os.path.realpath(path)
        if os.path.isfile(real) and os.access(real, os.X_OK):
            return real
    raise NetdError("cannot find the netd executable: run the installed netd (make install writes .venv/bin/netd)")


def conflist(network: str, socket: str = "", driver: str = "", subnet: str = "") -> dict:
    plugin: dict = {"type": "netd", "network": network, "capabilities": {"ips": True, "mac": True}}
    if socket:
        plugin["socket"] = socket
    if driver or subnet:
        plugin["driver"] = driver or "bridge"
        if subnet:
            plugin["subnet"] = subnet
    return {"cniVersion": CONFLIST_VERSION, "name": network,
            "plugins": [plugin, {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True}]}


def cmd_cni_install(args) -> int:
    import json
    import re

    from netd.api.client import socket_path as client_socket_path
    from netd.contract.errors import BadRequest, NetdError

    if not re.match(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$", args.network) or len(args.network) > 64:
        raise BadRequest(f"invalid network name {args.network!r}: use letters, digits, '_', '.' or '-'")
    if args.driver and not args.subnet:
        raise BadRequest("--driver makes the network on first use: give --subnet too")
    socket = args.socket or os.environ.get("NETD_HOST", "")
    if socket:
        socket = client_socket_path(socket)
    _check_network(args.network, socket, bool(args.subnet))
    target = _netd_executable()
    link = os.path.join(args.bin_dir, "netd")
    path = os.path.join(args.conf_dir, f"netd-{args.network}.conflist")
    if os.path.lexists(link) and not os.path.islink(link):
        raise BadRequest(f"{link} exists and is not a link: remove it first")
    for directory in (args.bin_dir, args.conf_dir):
        if not os.path.isdir(directory):
            raise BadRequest(f"{directory} does not exist (or is not a directory): create it first")
    made_link = not os.path.lexists(link)
    _replace(link, lambda tmp: os.symlink(target, tmp))
    try:
        text = json.dumps(conflist(args.network, socket, args.driver or "", args.subnet or ""), indent=2) + "\n"
        _replace(path, lambda tmp: _write(tmp, text))
    except NetdError:
        if made_link:
            os.unlink(link)
        raise
    print(f"{link} -> {target}")
    print(f"{path}: {args.network} (netd, portmap)")
    return 0


def _check_network(network: str, socket: str, made_on_first_use: bool) -> None:
    """The network should exist (unless it is made on first use); a daemon that is not running
    only earns a warning: the files may be written before it starts."""
    from netd.api.client import Client, q
    from netd.contract.errors import NetdError, NotFound

    try:
        Client(socket or None).request("GET", f"/networks/{q(network)}")
    except NotFound:
        if not made_on_first_use:
            raise NotFound(f"netd has no network {network}: create it (netd network create {network}) "
                           "or give --subnet to have it made on first use") from None
    except NetdError as e:
        print(f"netd: warning: could not check network {network}: {e}", file=sys.stderr)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o644)


def _replace(path: str, make) -> None:
    """Make `path` anew beside it, then rename it over the old one: never half written."""
    from netd.contract.errors import NetdError

    temporary = f"{path}.netd-{os.getpid()}"
    try:
        make(temporary)
        os.replace(temporary, path)
    except OSError as e:
        if os.path.lexists(temporary):
            os.unlink(temporary)
        raise NetdError(f"cannot write {path}: {e.strerror or e}") from None
