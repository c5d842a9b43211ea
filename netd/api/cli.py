"""The `netd` command: Docker's verbs and flags, talking to the daemon over its socket.

Tables for people, `--format json` for scripts; errors on stderr in one line, exit code
non-zero. Heavy modules (pyroute2, the daemon) are imported only by the commands that need
them, so that every other command starts fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from netd.api.client import Client, q
from netd.api.cluster_cli import add_cluster_commands
from netd.api.output import print_json, print_table
from netd.contract import VERSION as __version__
from netd.contract.errors import BadRequest, NetdError

# `netd run` exit codes for failures of netd itself, as `docker run` (125: the daemon refused).
EXIT_RUN_FAILED = 125


# --- output helpers -----------------------------------------------------------------------

def parse_key_values(items: list[str] | None, flag: str) -> dict[str, str]:
    result = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BadRequest(f"invalid {flag} {item!r}: expected KEY=VALUE")
        result[key] = value
    return result


def parse_publish(spec: str) -> dict:
    """-p [IP:]HOSTPORT:PORT[/udp], -p IP::PORT, -p PORT (random host port)."""
    main, _, proto = spec.partition("/")
    proto = proto or "tcp"
    if proto not in ("tcp", "udp"):
        raise BadRequest(f"invalid -p {spec!r}: protocol must be tcp or udp")
    parts = main.split(":")
    if len(parts) == 1:
        host_ip, host_port, port = "", "", parts[0]
    elif len(parts) == 2:
        host_ip, (host_port, port) = "", parts
    elif len(parts) == 3:
        host_ip, host_port, port = parts
    else:
        raise BadRequest(f"invalid -p {spec!r}: expected [IP:]HOSTPORT:PORT[/udp]")
    for value, what in ((port, "container port"), (host_port or "1", "host port")):
        if not value.isdigit() or not 0 < int(value) < 65536:
            raise BadRequest(f"invalid -p {spec!r}: {what} must be a number from 1 to 65535")
    return {"ContainerPort": int(port), "HostPort": int(host_port or 0), "HostIp": host_ip, "Proto": proto}


# --- network ------------------------------------------------------------------------------

def cmd_network_create(client: Client, args) -> int:
    config = {}
    if args.subnet:
        config["Subnet"] = args.subnet
    if args.gateway:
        config["Gateway"] = args.gateway
    if args.ip_range:
        config["IPRange"] = args.ip_range
    if args.aux_address:
        config["AuxiliaryAddresses"] = parse_key_values(args.aux_address, "--aux-address")
    body = {
        "Name": args.name,
        "Driver": args.driver,
        "IPAM": {"Config": [config] if config else []},
        "Options": parse_key_values(args.opt, "-o"),
        "Labels": parse_key_values(args.label, "--label"),
        "Internal": args.internal,
    }
    if args.scope:
        body["Scope"] = args.scope
    reply = client.request("POST", "/networks/create", body)
    if reply.get("Warning"):
        print(f"warning: {reply['Warning']}", file=sys.stderr)
    print(reply["Id"])
    return 0


def cmd_network_ls(client: Client, args) -> int:
    networks = client.request("GET", "/networks")
    if args.quiet:
        for n in networks:
            print(n["Id"][:12])
    elif args.format == "json":
        print_json(networks)
    else:
        print_table(["NETWORK ID", "NAME", "DRIVER", "SCOPE"],
                    [[n["Id"][:12], n["Name"], n["Driver"], n["Scope"]] for n in networks])
    return 0


def cmd_network_inspect(client: Client, args) -> int:
    return for_each(args.names, lambda name: client.request("GET", f"/networks/{q(name)}"), collect=True)


def cmd_network_rm(client: Client, args) -> int:
    def remove(name):
        client.request("DELETE", f"/networks/{q(name)}")
        print(name)
    return for_each(args.names, remove)


def cmd_network_prune(client: Client, args) -> int:
    reply = client.request("POST", "/networks/prune")
    if reply["NetworksDeleted"]:
        print("Deleted Networks:")
        for name in reply["NetworksDeleted"]:
            print(name)
    return 0


def cmd_network_connect(client: Client, args) -> int:
    config: dict = {"Aliases": args.alias or []}
    if args.ip:
        config["IPAMConfig"] = {"IPv4Address": args.ip}
    client.request("POST", f"/networks/{q(args.network)}/connect", {"Container": args.container, "EndpointConfig": config})
    return 0


def cmd_network_disconnect(client: Client, args) -> int:
    client.request("POST", f"/networks/{q(args.network)}/disconnect", {"Container": args.container, "Force": args.force})
    return 0


def for_each(names: list[str], action: Callable[[str], object], collect: bool = False) -> int:
    """Apply to each name; report each failure on its own line and go on, as Docker does."""
    status, results = 0, []
    for name in names:
        try:
            result = action(name)
            if collect:
                results.append(result)
        except NetdError as e:
            print(f"netd: {e}", file=sys.stderr)
            status = 1
    if collect and (results or status == 0):
        print_json(results)
    return status


# --- containers ---------------------------------------------------------------------------

def cmd_run(client: Client, args) -> int:
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        raise BadRequest("no command given: netd run [OPTIONS] [--] CMD [ARG...]")
    body = {
        "Cmd": cmd,
        "Name": args.name,
        "Hostname": args.hostname,
        "NetworkMode": args.network,
        "IPv4Address": args.ip,
        "Aliases": args.network_alias or [],
        "Ports": [parse_publish(p) for p in args.publish or []],
        "PublishAllPorts": args.publish_all,
        "ExposedPorts": args.expose or [],
        "Rootfs": os.path.abspath(args.rootfs) if args.rootfs else None,
        "CapAdd": args.cap_add or [],
        "CapDrop": args.cap_drop or [],
        "Privileged": args.privileged,
        "Env": parse_key_values([e if "=" in e else f"{e}={os.environ.get(e, '')}" for e in args.env or []], "-e"),
        "Detach": args.detach,
        "AutoRemove": args.rm,
    }
    if args.detach:
        reply = client.request("POST", "/containers/run", body)
        print(reply["Id"])
        return 0
    exit_code = 255
    for message in client.lines("POST", "/containers/run", {**body, "Attach": True}):
        if "Out" in message:
            sys.stdout.write(message["Out"])
            sys.stdout.flush()
        elif "ExitCode" in message:
            exit_code = 255 if message["ExitCode"] is None else message["ExitCode"]
    return exit_code


def cmd_ps(client: Client, args) -> int:
    containers = client.request("GET", "/containers/json", query={"all": int(args.all)})
    if args.quiet:
        for c in containers:
            print(c["Id"][:12])
        return 0
    if args.format == "json":
        print_json(containers)
        return 0
    rows = []
    for c in containers:
        ports = ", ".join(f"{p['IP']}:{p['PublicPort']}->{p['PrivatePort']}/{p['Type']}" for p in c["Ports"])
        command = c["Command"] if len(c["Command"]) <= 30 else c["Command"][:27] + "..."
        rows.append([c["Id"][:12], f'"{command}"', c["Status"], ports, ",".join(c["Networks"]), c["Names"][0]])
    print_table(["CONTAINER ID", "COMMAND", "STATUS", "PORTS", "NETWORKS", "NAMES"], rows)
    return 0


def cmd_inspect(client: Client, args) -> int:
    return for_each(args.names, lambda name: client.request("GET", f"/containers/{q(name)}/json"), collect=True)


def cmd_logs(client: Client, args) -> int:
    query = {"follow": 1} if args.follow else {}
    if args.tail != "all":
        query["tail"] = args.tail
    for chunk in client.stream("GET", f"/containers/{q(args.name)}/logs", query=query):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
    return 0


def cmd_exec(client: Client, args) -> int:
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        raise BadRequest("no command given: netd exec CONTAINER [--] CMD [ARG...]")
    info = client.request("GET", f"/containers/{q(args.name)}/json")
    if not info["State"]["Running"]:
        raise BadRequest(f"container {info['Name']} is not running")
    from runtime.process import exec_argv

    argv = exec_argv(info["State"]["Pid"], cmd, rootfs=bool(info.get("Rootfs")))
    sys.stdout.flush()
    os.execvp(argv[0], argv)
    return 127  # not reached


def cmd_port(client: Client, args) -> int:
    info = client.request("GET", f"/containers/{q(args.name)}/json")
    for spec, bindings in sorted(info["NetworkSettings"]["Ports"].items()):
        if args.port and spec not in (args.port, f"{args.port}/tcp"):
            continue
        for binding in bindings or []:
            print(f"{spec} -> {binding['HostIp']}:{binding['HostPort']}")
    return 0


def cmd_stop(client: Client, args) -> int:
    def stop(name):
        client.request("POST", f"/containers/{q(name)}/stop", query={"t": args.time})
        print(name)
    return for_each(args.names, stop)


def cmd_rm(client: Client, args) -> int:
    def remove(name):
        client.request("DELETE", f"/containers/{q(name)}", query={"force": int(args.force)})
        print(name)
    return for_each(args.names, remove)


def cmd_info(client: Client, args) -> int:
    info = client.request("GET", "/info")
    if args.format == "json":
        print_json(info)
        return 0
    for key, value in info.items():
        if isinstance(value, list):
            print(f"{key}:")
            for item in value:
                print(f"  {item}")
        elif isinstance(value, dict):
            print(f"{key}:")
            for name, state in value.items():
                print(f"  {name}: {state}")
        else:
            print(f"{key}: {value}")
    return 0


def cmd_cleanup(args) -> int:
    from netd.api.cleanup import cmd_cleanup as run

    return run(args)


def cmd_version(client: Client, args) -> int:
    print(f"Client: netd {__version__}")
    try:
        server = client.request("GET", "/version")
        print(f"Server: netd {server['Version']} (API {server['ApiVersion']})")
    except NetdError as e:
        print(f"Server: not reachable ({e})")
    return 0


def cmd_daemon(args) -> int:
    from netd.api.daemon import run_daemon

    return run_daemon(args)


# --- the parser ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="netd", description="netd: container networking, Docker's verbs, many hosts.")
    parser.add_argument("--version", action="version", version=f"netd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    daemon = sub.add_parser("daemon", help="run the daemon (foreground)")
    daemon.add_argument("--store", help="local store URL (default: sqlite file in the data dir)")
    daemon.add_argument("--cluster-store", help="cluster store: etcd://HOST:PORT or consul://HOST:PORT")
    daemon.add_argument("--cluster-advertise", help="this host's underlay IP address, as peers reach it")
    daemon.add_argument("--cluster-store-opt", action="append", metavar="KEY=VALUE",
                        help="TLS and credentials for the cluster store: kv.cacertfile, kv.certfile, kv.keyfile, "
                             "kv.username, kv.password (etcd), kv.token (Consul)")
    daemon.add_argument("--run-dir", default=None, help="runtime state: socket, namespaces (default /run/netd)")
    daemon.add_argument("--data-dir", default=None, help="persistent state: store, logs (default /var/lib/netd)")
    daemon.add_argument("--config-file", default="/etc/netd/daemon.json", help="daemon.json settings (default %(default)s)")
    daemon.add_argument("--host-ttl", type=float, default=None,
                        help="seconds this host stays alive in the cluster after it stops renewing (default 15)")
    daemon.add_argument("--reclaim-after", type=float, default=None,
                        help="seconds a dead host's addresses are kept before they are freed (default 3600; 0: only `netd host rm`)")
    daemon.add_argument("--docker-plugins", action="store_true",
                        help="be dockerd's network drivers (netd-bridge, netd-overlay, ...) and IPAM driver (netd)")
    daemon.add_argument("--docker-plugin-dir", default=None,
                        help="where dockerd looks for plugin sockets (default /run/docker/plugins)")
    daemon.add_argument("--debug", action="store_true", help="log more")
    daemon.set_defaults(run=cmd_daemon, needs_client=False)

    add_network_commands(sub)
    add_container_commands(sub)
    add_cluster_commands(sub)
    add_debug_commands(sub)
    from netd.api.cni import add_cni_commands
    add_cni_commands(sub)

    info = sub.add_parser("info", help="daemon, stores, cluster and firewall status")
    info.add_argument("--format", choices=["table", "json"], default="table")
    info.set_defaults(run=cmd_info)
    sub.add_parser("version", help="client and daemon versions").set_defaults(run=cmd_version)
    cleanup = sub.add_parser("cleanup", help="remove what a crashed daemon left (namespaces, interfaces, firewall)")
    cleanup.add_argument("--run-dir", default="/run/netd", help="the dead daemon's run dir (default %(default)s)")
    cleanup.set_defaults(run=cmd_cleanup, needs_client=False)
    return parser


def add_network_commands(sub) -> None:
    network = sub.add_parser("network", help="manage networks").add_subparsers(dest="network_command", metavar="COMMAND")
    network.required = True

    create = network.add_parser("create", help="create a network")
    create.add_argument("-d", "--driver", default="bridge", help="bridge, overlay, macvlan, hostgw (default bridge)")
    create.add_argument("--subnet", help="CIDR, e.g. 172.20.0.0/16")
    create.add_argument("--gateway", help="gateway address inside the subnet")
    create.add_argument("--ip-range", help="allocate container addresses from this sub-range")
    create.add_argument("--aux-address", action="append", metavar="NAME=IP", help="an address the IPAM must not hand out")
    create.add_argument("-o", "--opt", action="append", metavar="KEY=VALUE", help="driver option")
    create.add_argument("--label", action="append", metavar="KEY=VALUE")
    create.add_argument("--internal", action="store_true", help="no route to the outside")
    create.add_argument("--scope", choices=["local", "global"], help="override the driver's scope (macvlan: global)")
    create.add_argument("name")
    create.set_defaults(run=cmd_network_create)

    ls = network.add_parser("ls", aliases=["list"], help="list networks")
    ls.add_argument("-q", "--quiet", action="store_true", help="only IDs")
    ls.add_argument("--format", choices=["table", "json"], default="table")
    ls.set_defaults(run=cmd_network_ls)

    inspect = network.add_parser("inspect", help="details of networks (JSON)")
    inspect.add_argument("--format", choices=["json"], default="json")
    inspect.add_argument("names", nargs="+")
    inspect.set_defaults(run=cmd_network_inspect)

    rm = network.add_parser("rm", aliases=["remove"], help="remove networks")
    rm.add_argument("names", nargs="+")
    rm.set_defaults(run=cmd_network_rm)

    network.add_parser("prune", help="remove networks no container uses").set_defaults(run=cmd_network_prune)

    connect = network.add_parser("connect", help="connect a running container to a network")
    connect.add_argument("--ip", help="static IPv4 address")
    connect.add_argument("--alias", action="append", help="extra DNS name on this network")
    connect.add_argument("network")
    connect.add_argument("container")
    connect.set_defaults(run=cmd_network_connect)

    disconnect = network.add_parser("disconnect", help="disconnect a container from a network")
    disconnect.add_argument("-f", "--force", action="store_true")
    disconnect.add_argument("network")
    disconnect.add_argument("container")
    disconnect.set_defaults(run=cmd_network_disconnect)


def add_container_commands(sub) -> None:
    run = sub.add_parser("run", help="run a command in a new container", add_help=False)
    run.add_argument("--help", action="help", help="show this help")
    run.add_argument("-d", "--detach", action="store_true", help="run in the background, print the container ID")
    run.add_argument("--rm", action="store_true", help="remove the container when it exits")
    run.add_argument("--name")
    run.add_argument("-h", "--hostname")
    run.add_argument("--network", "--net", default="bridge",
                     help="bridge (default), host, none, container:NAME, or a network name")
    run.add_argument("--ip", help="static IPv4 address on the network")
    run.add_argument("--network-alias", "--alias", action="append", dest="network_alias", help="extra DNS name")
    run.add_argument("-p", "--publish", action="append", metavar="[IP:]HOSTPORT:PORT[/udp]")
    run.add_argument("-P", "--publish-all", action="store_true", help="publish every --expose'd port on a random host port")
    run.add_argument("--expose", action="append", metavar="PORT[/udp]")
    run.add_argument("--rootfs", help="directory to chroot into (default: the host's files)")
    run.add_argument("--cap-add", action="append", metavar="CAP", help="add a Linux capability (e.g. NET_ADMIN, ALL)")
    run.add_argument("--cap-drop", action="append", metavar="CAP", help="drop a Linux capability (e.g. NET_RAW, ALL)")
    run.add_argument("--privileged", action="store_true", help="every capability (as Docker's --privileged)")
    run.add_argument("-e", "--env", action="append", metavar="KEY=VALUE")
    run.add_argument("command", nargs=argparse.REMAINDER)
    run.set_defaults(run=cmd_run)

    ps = sub.add_parser("ps", help="list containers")
    ps.add_argument("-a", "--all", action="store_true", help="also exited ones")
    ps.add_argument("-q", "--quiet", action="store_true")
    ps.add_argument("--format", choices=["table", "json"], default="table")
    ps.set_defaults(run=cmd_ps)

    exec_ = sub.add_parser("exec", help="run a command in a running container")
    exec_.add_argument("name")
    exec_.add_argument("command", nargs=argparse.REMAINDER)
    exec_.set_defaults(run=cmd_exec)

    logs = sub.add_parser("logs", help="output of a container")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing what the container writes")
    logs.add_argument("-n", "--tail", default="all", metavar="N", help="only the last N lines (default all)")
    logs.add_argument("name")
    logs.set_defaults(run=cmd_logs)

    inspect = sub.add_parser("inspect", help="details of containers (JSON)")
    inspect.add_argument("--format", choices=["json"], default="json")
    inspect.add_argument("names", nargs="+")
    inspect.set_defaults(run=cmd_inspect)

    port = sub.add_parser("port", help="published ports of a container")
    port.add_argument("name")
    port.add_argument("port", nargs="?")
    port.set_defaults(run=cmd_port)

    stop = sub.add_parser("stop", help="stop containers (SIGTERM, then SIGKILL)")
    stop.add_argument("-t", "--time", type=float, default=10, help="seconds before SIGKILL (default 10)")
    stop.add_argument("names", nargs="+")
    stop.set_defaults(run=cmd_stop)

    rm = sub.add_parser("rm", help="remove containers")
    rm.add_argument("-f", "--force", action="store_true", help="kill running ones")
    rm.add_argument("names", nargs="+")
    rm.set_defaults(run=cmd_rm)


def add_debug_commands(sub) -> None:
    """netd capture and netd trace (netd.debug.commands; the work is in netd.debug.capture and netd.debug.trace)."""
    from netd.debug.commands import add_capture_command, add_trace_command

    add_capture_command(sub)
    add_trace_command(sub)


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("CNI_COMMAND"):   # run by a CNI runtime: the plugin (netd.api.cni)
        from netd.api.cni import main as cni_main
        return cni_main()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if not getattr(args, "needs_client", True):
            return args.run(args)
        client = Client()
        try:
            return args.run(client, args)
        finally:
            client.close()
    except NetdError as e:
        print(f"netd: {e}", file=sys.stderr)
        return EXIT_RUN_FAILED if args.run is cmd_run else e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
