"""The command line of `netd capture` and `netd trace`: their help and flags.

Kept apart from netd.debug.capture and netd.debug.trace so that building the CLI's parser stays cheap for
every other command; the commands themselves import their modules when they run.
"""

from __future__ import annotations

import argparse

DEFAULT_TIMEOUT = 2.0     # netd.debug.trace's default wait for the answer
DEFAULT_SIZE = 84         # netd.debug.trace's default probe size (IP bytes, as ping's)


def cmd_capture(client, args) -> int:
    from netd.debug.capture import cmd_capture as run

    return run(client, args)


def cmd_trace(client, args) -> int:
    from netd.debug.trace.report import cmd_trace as run

    return run(client, args)


CAPTURE_HELP = """\
Show the packets of a container network, one line each, where netd put them: no need to know
which namespace holds which interface.

TARGET is one of:
  CONTAINER         the container's interfaces (eth0, eth1, ...), inside its namespace
  network:NAME      the network's bridge on this host (for an overlay: br0 in its namespace),
                    which sees every container of the network on this host
  vxlan:NAME        an overlay network's VXLAN device: the frames that go to or come from
                    other hosts, before they are wrapped (inner frames)
  underlay          this host's cluster interface (the --cluster-advertise address): the
                    wrapped VXLAN packets between hosts, shown with their VNI and inner frame

Each line: time, interface, direction (in/out as the interface sees it), addresses with the
names of the containers and networks netd knows beside them, protocol, ports and length.
Stop with Ctrl-C, -c or --timeout; with -w the pcap file is complete however it stops.
"""

CAPTURE_EPILOG = """\
examples:
  netd capture web                          every packet of container web
  netd capture web -f icmp -c 4             four ICMP packets, then stop
  netd capture network:ol1 -w ol1.pcap      the overlay's bridge, into a file for Wireshark
  netd capture underlay --timeout 10        VXLAN between hosts for ten seconds
  netd capture web --format json            one JSON object per packet, for scripts
"""


def add_capture_command(sub) -> None:
    capture = sub.add_parser("capture", help="show the packets of a container, network or the underlay",
                             description=CAPTURE_HELP, epilog=CAPTURE_EPILOG,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    capture.add_argument("target", metavar="TARGET", help="CONTAINER, network:NAME, vxlan:NAME or underlay")
    capture.add_argument("-i", "--interface", metavar="IFACE",
                         help="only this interface of the target (e.g. eth1 of a container)")
    capture.add_argument("-f", "--filter", metavar="FILTER",
                         help="tcpdump filter expression, e.g. 'icmp' or 'tcp port 80' (underlay default: "
                              "'udp port 4789'; -f replaces it)")
    capture.add_argument("-c", "--count", type=int, metavar="COUNT", help="stop after COUNT packets")
    capture.add_argument("--timeout", type=float, metavar="S", help="stop after S seconds")
    capture.add_argument("-w", "--write", metavar="FILE.pcap", help="also write the packets to a pcap file "
                         "(tcpdump -r and Wireshark read it)")
    capture.add_argument("--format", choices=["table", "json"], default="table",
                         help="table: one line per packet (default); json: one JSON object per line")
    capture.set_defaults(run=cmd_capture)


TRACE_HELP = """\
Send one probe from a container and show every place on its way where it (and the answer)
was seen, on this host and on the other hosts it crosses, with the time at each.

netd works out the path from the network's driver: for an overlay, the container's eth0, its
veth, the network's bridge, the VXLAN device and this host's underlay interface, then the same
in reverse on the destination's host; for a bridge, the bridge between the two containers. It
captures on every one of those at once, sends the probe from inside SOURCE, and prints the hops
in order. If the probe or its answer is lost, it says after which hop, and why where netd can
tell: a missing route, a missing FDB entry for the MAC on the VXLAN device, no ARP answer, drop
counters that went up, or a probe larger than a hop's MTU.

SOURCE is a container on this host. DEST is a container name (on one of SOURCE's networks) or an
IPv4 address (a container's, or one outside).
Exit status: 0 when the answer came back, 1 when the probe or its answer was lost.
"""

TRACE_EPILOG = """\
examples:
  netd trace web db                     ICMP echo from web to db
  netd trace web db --proto tcp:5432    a TCP SYN to port 5432 (SYN-ACK or RST is an answer)
  netd trace web 8.8.8.8                out through the network's gateway and this host's NAT
  netd trace web db --size 1500         does a 1500-byte packet (don't fragment) get through?
"""


def add_trace_command(sub) -> None:
    trace = sub.add_parser("trace", help="follow one probe hop by hop from a container to a container or address",
                           description=TRACE_HELP, epilog=TRACE_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    trace.add_argument("source", metavar="SOURCE", help="a container on this host")
    trace.add_argument("dest", metavar="DEST", help="a container name or an IPv4 address")
    trace.add_argument("--proto", default="icmp", metavar="icmp|tcp:PORT|udp:PORT",
                       help="what to send (default icmp: an echo request)")
    trace.add_argument("--size", type=int, metavar="BYTES",
                       help=f"IP packet size of an icmp or udp probe, sent with don't-fragment (default {DEFAULT_SIZE})")
    trace.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                       help=f"seconds to wait for the answer (default {DEFAULT_TIMEOUT:g})")
    trace.add_argument("--format", choices=["table", "json"], default="table")
    trace.set_defaults(run=cmd_trace)
