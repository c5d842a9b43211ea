"""`netd trace` on the command line: the request, and the report as a table."""

from __future__ import annotations

import json

from netd.debug.trace.plan import parse_proto


def cmd_trace(client, args) -> int:
    parse_proto(args.proto)   # a bad --proto is refused before anything runs
    body = {"Source": args.source, "Destination": args.dest, "Proto": args.proto, "Size": args.size,
            "Timeout": args.timeout}
    report = client.request("POST", "/debug/trace", body)
    if args.format == "json":
        print(json.dumps(report, indent=4))
    else:
        print(format_report(report))
    return 0 if report["Result"] == "ok" else 1


def format_report(report: dict) -> str:
    src, dst, net, probe = report["Source"], report["Destination"], report["Network"], report["Probe"]
    what = {"icmp": "ICMP echo", "tcp": f"TCP SYN to port {probe['dport']}",
            "udp": f"UDP to port {probe['dport']}"}[probe["proto"]]
    dest = f"{dst['Container']} ({dst['Address']}, host {dst['Host']})" if dst["Container"] else dst["Address"]
    vni = f" VNI {net['VNI']}" if net.get("VNI") is not None else ""
    lines = [f"trace {src['Container']} ({src['Address']}, host {src['Host']}) -> {dest}",
             f"  over network {net['Name']} ({net['Driver']}{vni}), {what}, {probe['size']} bytes"]
    if report.get("Note"):
        lines.append(f"  note: {report['Note']}")
    if len({hop["Host"] for hop in report["Hops"]}) > 1:
        lines.append("  (times: since the probe was sent, read on each host's own clock)")
    lines.append("")
    rows = []
    for hop in report["Hops"]:
        rows.append([str(hop["Index"]), hop["Host"] or "-", hop["Label"] if not hop["Error"] or hop["Interface"]
                     else f"{hop['Kind']} ({hop['Error']})", _cell(hop["Request"]), _cell(hop["Reply"])])
    headers = ["HOP", "HOST", "WHERE", "PROBE", "ANSWER"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    for row in [headers, *rows]:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    lines.append("")
    result = report["Result"]
    if result == "ok":
        back = report["Hops"][0]["Reply"]
        lines.append(f"answer back at {src['Container']} after {back['Ms']:.3f} ms ({back['How']}): the path works")
    elif result == "not sent":
        lines.append("the probe was not sent")
    else:
        lines.append(_verdict(report))
    for reason in report["Reasons"]:
        lines.append(f"  - {reason}")
    return "\n".join(lines)


def _verdict(report: dict) -> str:
    """Where it stopped, in words: "probe lost after hop 4 (vxlan0 on 10.10.0.1), before hop 5 (...)"."""
    after, hops, result = report["LostAfterHop"] or 0, report["Hops"], report["Result"]

    def hop(number: int) -> str:
        return f"hop {number} ({hops[number - 1]['Label']} on {hops[number - 1]['Host']})"

    if result == "refused":
        where = f"got as far as {hop(after)}" if after else "never appeared on the way"
        return f"the probe {where}; the answer was an ICMP error"
    if result == "request lost":
        if after == 0:
            return f"probe lost before {hop(1)}: the container did not send it out"
        return f"probe lost after {hop(after)}" + (f", before {hop(after + 1)}" if after < len(hops) else "")
    if hops[after - 1]["Reply"] is None:
        return f"the probe reached {hop(after)}, but no answer came back"
    return f"answer lost after {hop(after)}" + (f", before {hop(after - 1)}" if after > 1 else "")


def _cell(seen: dict | None) -> str:
    if seen is None:
        return "-"
    text = f"{seen['Ms']:+.3f} ms {seen['Direction']}" if seen.get("Ms") is not None else seen["Direction"]
    if seen.get("VNI") is not None:
        text += f" vni {seen['VNI']}"
    return text
