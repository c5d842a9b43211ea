"""Packets as people read them: scapy dissects a captured frame into a small summary (a JSON
object), and `format_line` prints it as one line, with the names netd knows beside addresses.

    summary = dissect(frame)            # {"Protocol": "ICMP", "Src": "172.16.2.1", ...}
    print(format_line(record, names))   # 12:00:01.123456 test01:eth0 out 172.16.2.1 (test01) > ...

A VXLAN packet (UDP 4789) is decoded down to its inner frame: the summary gets a "VXLAN" member
with the VNI and the inner frame's own summary. `match_probe` tells whether a summary is a
`netd trace` probe or its answer. Only scapy's dissectors and builders are used here: they need
none of scapy's interface or route tables, so this module works the same in any namespace.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

ICMP_TYPES = {0: "echo reply", 3: "unreachable", 5: "redirect", 8: "echo request", 11: "time exceeded"}
ICMP_UNREACHABLE = {0: "net", 1: "host", 2: "protocol", 3: "port", 4: "need to fragment", 9: "net prohibited",
                    10: "host prohibited", 13: "administratively prohibited"}
TCP_FLAGS = "FSRPAUEC"
VXLAN_PORT = 4789


@dataclass
class Names:
    """What netd can name: addresses, MACs and VNIs (the daemon's GET /debug/names)."""

    addresses: dict[str, str] = field(default_factory=dict)
    macs: dict[str, str] = field(default_factory=dict)
    vnis: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict | None) -> Names:
        data = data or {}
        return cls(dict(data.get("Addresses") or {}), dict(data.get("MACs") or {}),
                   {str(k): v for k, v in (data.get("VNIs") or {}).items()})

    def to_json(self) -> dict:
        return {"Addresses": self.addresses, "MACs": self.macs, "VNIs": self.vnis}

    def address(self, address: str | None) -> str:
        return self.addresses.get(address or "", "")


def quiet_scapy() -> None:
    """scapy logs warnings about the namespace it is imported in (no IPv4 route...): netd does not
    use those tables, and its users should not read about them."""
    import logging

    logging.getLogger("scapy").setLevel(logging.ERROR)


def _layers():
    """scapy's layer classes, imported on first use (the CLI's other commands never pay for it)."""
    quiet_scapy()
    from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror, UDPerror
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import ARP, Ether
    from scapy.layers.vxlan import VXLAN
    from scapy.packet import Raw

    return Ether, ARP, IP, IPv6, ICMP, TCP, UDP, VXLAN, Raw, IPerror, TCPerror, UDPerror


def dissect(frame: bytes) -> dict:
    """The summary of one Ethernet frame (see the module docstring)."""
    Ether = _layers()[0]
    try:
        return _summarize(Ether(frame), len(frame))
    except Exception as e:  # noqa: BLE001 - a malformed frame is still a line of output
        return {"Length": len(frame), "Protocol": "?", "Info": f"undecodable frame: {e}"}


def _summarize(pkt, length: int) -> dict:
    Ether, ARP, IP, IPv6, ICMP, TCP, UDP, VXLAN, Raw, IPerror, TCPerror, UDPerror = _layers()
    out: dict = {"Length": length, "SrcMAC": pkt.src, "DstMAC": pkt.dst}
    payload = pkt.payload
    if isinstance(payload, ARP):
        op = {1: "request", 2: "reply"}.get(payload.op, str(payload.op))
        out.update(Protocol="ARP", Src=payload.psrc, Dst=payload.pdst, Info=f"{op}", ArpOp=op,
                   ArpHwsrc=payload.hwsrc)
        return out
    if isinstance(payload, IPv6):
        upper = payload.payload
        while upper.__class__.__name__.startswith("IPv6ExtHdr"):
            upper = upper.payload
        name = upper.__class__.__name__
        if name.startswith("ICMPv6"):
            info = getattr(upper, "name", name)
        elif isinstance(upper, TCP | UDP):
            info = f"{name} {upper.sport} > {upper.dport}"
        else:
            info = f"next header {payload.nh}"
        out.update(Protocol="IPv6", Src=payload.src, Dst=payload.dst, Info=info)
        return out
    if not isinstance(payload, IP):
        out.update(Protocol=f"ethertype 0x{pkt.type:04x}", Info="")
        return out
    ip = payload
    out.update(Src=ip.src, Dst=ip.dst, TTL=ip.ttl, IPLength=ip.len, DF=bool(ip.flags.DF))
    l4 = ip.payload
    if isinstance(l4, ICMP):
        kind = ICMP_TYPES.get(l4.type, f"type {l4.type}")
        out.update(Protocol="ICMP", ICMPType=l4.type, ICMPCode=l4.code)
        if l4.type in (0, 8):
            out.update(ICMPId=l4.id, ICMPSeq=l4.seq, Info=f"{kind} id {l4.id} seq {l4.seq}")
            out["Payload"] = bytes(l4.payload)[:64].hex()
        else:
            detail = f" ({ICMP_UNREACHABLE.get(l4.code, l4.code)})" if l4.type == 3 else ""
            if l4.type == 3 and l4.code == 4:
                out["NextHopMTU"] = l4.nexthopmtu
                detail = f" (need to fragment, mtu {l4.nexthopmtu})"
            out["Info"] = f"{kind}{detail}"
            inner = l4.payload
            if isinstance(inner, IPerror):
                quoted = {"Src": inner.src, "Dst": inner.dst, "Proto": inner.proto}
                sub = inner.payload
                if isinstance(sub, TCPerror | UDPerror):
                    quoted.update(SrcPort=sub.sport, DstPort=sub.dport)
                elif sub.__class__.__name__ == "ICMPerror":
                    quoted.update(ICMPId=getattr(sub, "id", None), ICMPSeq=getattr(sub, "seq", None))
                out["Quoted"] = quoted
                out["Info"] += f" for {inner.src} > {inner.dst}"
        return out
    if isinstance(l4, TCP):
        flags = "".join(f for i, f in enumerate(TCP_FLAGS) if int(l4.flags) & (1 << i))
        out.update(Protocol="TCP", SrcPort=l4.sport, DstPort=l4.dport, TCPFlags=flags, TCPSeq=l4.seq,
                   TCPAck=l4.ack, Info=f"[{flags}] seq {l4.seq}" + (f" ack {l4.ack}" if "A" in flags else ""))
        return out
    if isinstance(l4, UDP):
        out.update(Protocol="UDP", SrcPort=l4.sport, DstPort=l4.dport)
        vxlan = l4.payload
        if isinstance(vxlan, VXLAN) and (l4.dport == VXLAN_PORT or l4.sport == VXLAN_PORT):
            inner = vxlan.payload
            out["Protocol"] = "VXLAN"
            out["VXLAN"] = {"VNI": vxlan.vni}
            if isinstance(inner, Ether):
                out["VXLAN"]["Inner"] = _summarize(inner, len(bytes(inner)))
            out["Info"] = f"vni {vxlan.vni}"
            return out
        data = bytes(l4.payload)
        out["Payload"] = data[:64].hex()
        out["Info"] = f"length {len(data)}"
        return out
    out.update(Protocol=f"IP proto {ip.proto}", Info="")
    return out


# --- one line per packet ------------------------------------------------------------------

def _named(address: str | None, port: int | None, names: Names) -> str:
    text = address or "?"
    if port is not None:
        text += f":{port}"
    name = names.address(address)
    return f"{text} ({name})" if name else text


def describe(summary: dict, names: Names) -> str:
    """`SRC > DST: PROTO INFO` for a summary, VXLAN's inner frame in brackets."""
    proto = summary.get("Protocol", "?")
    if "Src" not in summary:
        src = summary.get("SrcMAC", "?")
        dst = summary.get("DstMAC", "?")
        src_name, dst_name = names.macs.get(src, ""), names.macs.get(dst, "")
        return (f"{src}{f' ({src_name})' if src_name else ''} > {dst}{f' ({dst_name})' if dst_name else ''}: "
                f"{proto} {summary.get('Info', '')}").rstrip()
    if proto == "ARP":
        who = _named(summary["Dst"], None, names)
        tell = _named(summary["Src"], None, names)
        if summary.get("ArpOp") == "reply":
            return f"ARP reply {tell} is at {summary.get('ArpHwsrc')}"
        return f"ARP who-has {who} tell {tell}"
    line = (f"{_named(summary.get('Src'), summary.get('SrcPort'), names)} > "
            f"{_named(summary.get('Dst'), summary.get('DstPort'), names)}: {proto}")
    vxlan = summary.get("VXLAN")
    if vxlan is not None:
        network = names.vnis.get(str(vxlan.get("VNI")), "")
        line += f" vni {vxlan.get('VNI')}" + (f" ({network})" if network else "")
        inner = vxlan.get("Inner")
        if inner:
            line += f" [{describe(inner, names)}]"
        return line
    info = summary.get("Info", "")
    return f"{line} {info}".rstrip()


def format_time(timestamp: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(timestamp)) + f".{int(timestamp % 1 * 1e6):06d}"


def format_line(record: dict, names: Names) -> str:
    """One line for a captured packet: time, interface, direction, addresses, protocol."""
    summary = record["Packet"]
    direction = record.get("Direction") or "-"
    return (f"{format_time(record['Time'])} {record['Interface']} {direction:<3} "
            f"{describe(summary, names)}, length {summary.get('Length', 0)}")


def annotate(summary: dict, names: Names) -> dict:
    """The summary with SrcName/DstName (and the VXLAN network's name) where netd knows them."""
    out = dict(summary)
    for key in ("Src", "Dst"):
        name = names.address(out.get(key))
        if name:
            out[f"{key}Name"] = name
    if "VXLAN" in out:
        vxlan = dict(out["VXLAN"])
        if names.vnis.get(str(vxlan.get("VNI"))):
            vxlan["Network"] = names.vnis[str(vxlan.get("VNI"))]
        if vxlan.get("Inner"):
            vxlan["Inner"] = annotate(vxlan["Inner"], names)
        out["VXLAN"] = vxlan
    return out


# --- trace probes -------------------------------------------------------------------------

@dataclass
class Probe:
    """What `netd trace` sends, and how to recognise it (and its answer) at every hop, also
    after NAT (the request's source address changes, so it is not part of the match) and
    inside VXLAN."""

    proto: str                    # icmp, tcp, udp
    src: str
    dst: str
    icmp_id: int = 0
    icmp_seq: int = 0
    sport: int = 0
    dport: int = 0
    token: str = ""               # hex bytes carried in ICMP and UDP payloads
    size: int = 0                 # IP packet length of the request

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Probe:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def match_probe(summary: dict, probe: Probe) -> tuple[str, str] | None:
    """("request" | "reply", how) if the summary is the probe or its answer, looking inside
    VXLAN; None otherwise. ICMP errors about the probe count as its answer."""
    if summary.get("Protocol") == "VXLAN":
        inner = (summary.get("VXLAN") or {}).get("Inner")
        found = match_probe(inner, probe) if inner else None
        if found:
            return found[0], f"in VXLAN vni {summary['VXLAN']['VNI']}"
        return None
    proto = summary.get("Protocol")
    if proto == "ICMP" and summary.get("ICMPType") in (0, 8) and probe.proto == "icmp":
        if (summary.get("ICMPId"), summary.get("ICMPSeq")) != (probe.icmp_id, probe.icmp_seq):
            return None
        if probe.token and probe.token not in summary.get("Payload", ""):
            return None
        return ("request", "echo request") if summary["ICMPType"] == 8 else ("reply", "echo reply")
    if proto == "ICMP" and "Quoted" in summary:
        quoted = summary["Quoted"]
        if quoted.get("Dst") != probe.dst:
            return None
        same = (probe.proto == "icmp" and quoted.get("ICMPId") in (probe.icmp_id, None)) or (
            probe.proto in ("tcp", "udp") and quoted.get("DstPort") == probe.dport)
        return ("reply", summary.get("Info", "ICMP error")) if same else None
    if proto == "TCP" and probe.proto == "tcp":
        if (summary.get("SrcPort"), summary.get("DstPort")) == (probe.sport, probe.dport) and "S" in summary.get(
                "TCPFlags", "") and "A" not in summary.get("TCPFlags", ""):
            return "request", "SYN"
        if (summary.get("SrcPort"), summary.get("DstPort")) == (probe.dport, probe.sport):
            flags = summary.get("TCPFlags", "")
            return "reply", "SYN-ACK (port open)" if "S" in flags else "RST (port closed)" if "R" in flags else flags
        return None
    if proto == "UDP" and probe.proto == "udp":
        if (summary.get("SrcPort"), summary.get("DstPort")) == (probe.sport, probe.dport) and (
                not probe.token or probe.token in summary.get("Payload", "")):
            return "request", "datagram"
        if (summary.get("SrcPort"), summary.get("DstPort")) == (probe.dport, probe.sport):
            return "reply", "datagram"
    return None


def build_icmp_probe(probe: Probe) -> bytes:
    """The ICMP echo request (without its IP header: a raw ICMP socket adds that)."""
    from scapy.layers.inet import ICMP

    token = bytes.fromhex(probe.token)
    padding = max(0, probe.size - 28 - len(token))
    return bytes(ICMP(type=8, id=probe.icmp_id, seq=probe.icmp_seq) / (token + b"\0" * padding))
