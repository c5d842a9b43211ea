"""The CLI's cluster commands: `netd ipam ...` (pools, allocations, lookups) and `netd host ...`."""

from __future__ import annotations

from netd.api.client import Client, q
from netd.api.output import print_json, print_table

# --- ipam ---------------------------------------------------------------------------------

def cmd_ipam_ls(client: Client, args) -> int:
    pools = client.request("GET", "/ipam/pools")
    if args.format == "json":
        print_json(pools)
        return 0
    print_table(["NETWORK", "SCOPE", "SUBNET", "IP RANGE", "GATEWAY", "SIZE", "USED", "FREE"],
                [[p["Network"], p["Scope"], p["Subnet"], p["IPRange"] or "-", p["Gateway"] or "-",
                  str(p["Size"]), str(p["Used"]), str(p["Free"])] for p in pools])
    return 0


def cmd_ipam_inspect(client: Client, args) -> int:
    allocations = client.request("GET", f"/ipam/networks/{q(args.network)}")
    if args.format == "json":
        print_json(allocations)
        return 0
    print_table(["ADDRESS", "KIND", "CONTAINER", "ENDPOINT", "HOST", "SINCE"],
                [[a["Address"], a["Kind"], a["Container"] or "-", a["Endpoint"][:12] or "-", a["Host"] or "-",
                  a["Since"]] for a in allocations])
    return 0


def cmd_ipam_lookup(client: Client, args) -> int:
    results = client.request("GET", f"/ipam/lookup/{q(args.address)}")
    if args.format == "json":
        print_json(results)
        return 0
    if not results:
        print(f"{args.address}: free (in no netd address pool)")
        return 0
    for r in results:
        if r["State"] == "free":
            print(f"{args.address}: free (in pool {r['Subnet']} of network {r['Network']})")
        elif r["Kind"] == "endpoint":
            print(f"{args.address}: in use by container {r['Container']} on host {r['Host']} "
                  f"(network {r['Network']}, endpoint {r['Endpoint'][:12]}, since {r['Since']})")
        else:
            print(f"{args.address}: reserved as {r['Kind']} {r['Container']} of network {r['Network']}".rstrip())
    return 0


# --- system -------------------------------------------------------------------------------

# --- hosts ----------------------------------------------------------------------------------

def cmd_host_ls(client: Client, args) -> int:
    hosts = client.request("GET", "/hosts")
    if args.format == "json":
        print_json(hosts)
        return 0
    print_table(["ADDRESS", "NAME", "ALIVE", "ID", "SINCE"],
                [[h.get("Address", ""), h.get("Name", ""), "yes" if h.get("Alive") else "no", str(h.get("ID", ""))[:12],
                  h.get("Since", "")] for h in hosts])
    return 0


def cmd_host_rm(client: Client, args) -> int:
    for address in args.address:
        result = client.request("DELETE", f"/hosts/{q(address)}")
        print(f"{address}: reclaimed {result['Reclaimed']} endpoint(s)")
    return 0


def add_ipam_commands(sub) -> None:
    ipam = sub.add_parser("ipam", help="address pools and who holds which address").add_subparsers(
        dest="ipam_command", metavar="COMMAND")
    ipam.required = True
    ls = ipam.add_parser("ls", help="every pool: subnet, size, used, free")
    ls.add_argument("--format", choices=["table", "json"], default="table")
    ls.set_defaults(run=cmd_ipam_ls)
    inspect = ipam.add_parser("inspect", help="every allocation of a network")
    inspect.add_argument("--format", choices=["table", "json"], default="table")
    inspect.add_argument("network")
    inspect.set_defaults(run=cmd_ipam_inspect)
    lookup = ipam.add_parser("lookup", help="who holds an address, anywhere in the cluster")
    lookup.add_argument("--format", choices=["table", "json"], default="table")
    lookup.add_argument("address")
    lookup.set_defaults(run=cmd_ipam_lookup)


def add_host_commands(sub) -> None:
    host = sub.add_parser("host", help="the cluster's hosts: who is alive, remove one gone for good").add_subparsers(
        dest="host_command", metavar="COMMAND")
    host.required = True
    ls = host.add_parser("ls", help="every host the cluster knows, alive or not")
    ls.add_argument("--format", choices=["table", "json"], default="table")
    ls.set_defaults(run=cmd_host_ls)
    rm = host.add_parser("rm", help="a dead host is gone for good: free its addresses and names now")
    rm.add_argument("address", nargs="+", metavar="ADDRESS", help="its --cluster-advertise address")
    rm.set_defaults(run=cmd_host_rm)


def add_cluster_commands(sub) -> None:
    add_ipam_commands(sub)
    add_host_commands(sub)
