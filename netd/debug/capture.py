"""`netd capture` (the command): sniff where a container network's packets are, without `nsenter ... tcpdump`.

Where the packets are. The CLI asks the daemon (GET /debug/capture-targets/TARGET) where it is:
a list of capture points, each an interface name and the path of the network namespace that holds
it (a container's namespace, an overlay's `ov-<VNI>`, or the daemon's own as /proc/PID/ns/net).
Drivers answer for their own devices (Driver.capture_point), so a new driver adds one method.

Where scapy runs, and why its caches do not matter. scapy reads the interface and route tables of
the namespace it is imported in, once. netd does not use those tables at all: for each capture point
the sniffer enters the point's namespace with setns(2) in the calling thread (runtime.namespaces.
entered_netns), opens a plain AF_PACKET socket there, and leaves; a packet socket stays bound to the
namespace it was created in, so one process can listen in a container, in an overlay's namespace
and on the host at once (which `netd trace` needs). The BPF filter is compiled by libpcap through
scapy (`compile_filter`, linktype Ethernet, no interface needed) and attached before the socket is
bound, so no unfiltered packet slips in. scapy then only dissects frames (netd.debug.packets), builds
probes, and writes pcap files: none of that depends on any namespace.

Who runs it. `netd capture` sniffs in the CLI process itself (it is root, and in a Mininet lab it
runs in the lab host's mount namespace, so the daemon's /run/netd paths resolve the same). The
daemon never imports scapy: for `netd trace` it starts this module as a small worker process
(netd.debug.worker) that dies with it.

Stopping. Ctrl-C, -c COUNT or --timeout end the capture; the pcap file is written through scapy's
RawPcapWriter unbuffered, packet by packet, so it is complete whenever the capture stops.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys

from netd.contract.errors import BadRequest
from netd.debug.sniffer import Frame, PcapFile, Point, Sniffer, compile_filter


def cmd_capture(client, args) -> int:
    """Ask the daemon where TARGET is, sniff there, print a line per packet, write pcap."""
    from urllib.parse import quote

    from netd.debug import packets

    if args.count is not None and args.count < 1:
        raise BadRequest(f"invalid -c {args.count}: give a number of packets, 1 or more")
    if args.timeout is not None and args.timeout <= 0:
        raise BadRequest(f"invalid --timeout {args.timeout}: give a number of seconds above 0")
    if os.geteuid() != 0:
        raise BadRequest("netd capture needs root: it opens packet sockets in netd's namespaces (try sudo)")
    query = {"iface": args.interface} if args.interface else None
    target = client.request("GET", f"/debug/capture-targets/{quote(args.target, safe='')}", query=query)
    names = packets.Names.from_json(client.request("GET", "/debug/names"))
    expression = args.filter if args.filter is not None else target.get("Filter", "")
    # Lines name a container's interface "web:eth0", any other by its own name (br0, vxlan0, eth0).
    points = [Point(p["Netns"], p["Interface"], p["Label"] if p.get("Kind") == "container" else p["Interface"],
                    expression) for p in target["Points"]]
    described = ", ".join(p["Label"] for p in target["Points"])
    if expression:
        compile_filter(expression)   # a bad filter is one line of error, before anything is opened
    sniffer = Sniffer(points).open()
    pcap = None
    count = 0
    stop = Interrupts().install()
    try:
        pcap = PcapFile(args.write) if args.write else None
        print(f"capturing on {target['Description']}: {described}"
              + (f", filter {expression!r}" if expression else "")
              + (f", writing {args.write}" if args.write else "") + " (Ctrl-C to stop)", file=sys.stderr, flush=True)
        for frame in sniffer.frames(timeout=args.timeout, wake=stop.fd):
            count += 1
            show(frame, pcap, names, args.format)
            if args.count and count >= args.count:
                break
        if stop.interrupted and not (args.count and count >= args.count):
            # Frames queued before Ctrl-C were seen before the user stopped: they belong in the
            # output and the pcap.
            for frame in sniffer.drain():
                if args.count and count >= args.count:
                    break
                count += 1
                show(frame, pcap, names, args.format)
    finally:
        stop.ignore()
        sniffer.close()
        if pcap is not None:
            pcap.close()
    print(f"{count} packet{'s' if count != 1 else ''} captured", file=sys.stderr)
    return 0


class Interrupts:
    """Ctrl-C (and SIGTERM) end a capture between two packets, never while one is being
    received or written: the handler only notes the signal and wakes the sniffer's select()
    through a pipe, so no frame already taken off a socket is lost."""

    def __init__(self):
        self.interrupted = False
        self.fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)

    def install(self) -> Interrupts:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)
        return self

    def ignore(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)

    def _handle(self, signum, frame) -> None:
        self.interrupted = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._write_fd, b"x")


def show(frame: Frame, pcap: PcapFile | None, names, output: str) -> None:
    """One captured frame: into the pcap file, and a line (or a JSON object) on stdout."""
    from netd.debug import packets

    if pcap is not None:
        pcap.write(frame)
    summary = packets.dissect(frame.data)
    record = {"Time": frame.time, "Interface": frame.label, "Direction": frame.direction, "Packet": summary}
    if output == "json":
        print(json.dumps({**record, "Packet": packets.annotate(summary, names)}), flush=True)
    else:
        print(packets.format_line(record, names), flush=True)
