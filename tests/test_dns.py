"""The embedded resolver's DNS codec, checked against replies parsed back field by field."""

import socket
import struct

from netd.core.dns import TYPE_A, TYPE_PTR, build_reply, parse_question, reverse_address


def query(name: str, qtype: int, ident: int = 0x1234) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + labels + struct.pack("!HH", qtype, 1)


def test_parse_question():
    ident, flags, name, qtype, end = parse_question(query("web.mynet", TYPE_A))
    assert (ident, flags, name, qtype) == (0x1234, 0x0100, "web.mynet", TYPE_A)
    assert end == len(query("web.mynet", TYPE_A))


def test_a_reply_carries_every_address_and_echoes_the_question():
    q = query("web", TYPE_A)
    reply = build_reply(q, len(q), ["10.0.0.2", "10.0.1.2"])
    ident, flags, qd, an, ns, ar = struct.unpack("!HHHHHH", reply[:12])
    assert ident == 0x1234 and flags & 0x8000 and flags & 0x0F == 0 and (qd, an) == (1, 2)
    assert reply[12:len(q)] == q[12:]
    first = reply[len(q):len(q) + 16]
    _ptr, rtype, _cls, _ttl, length = struct.unpack("!HHHIH", first[:12])
    assert (rtype, length) == (TYPE_A, 4) and socket.inet_ntoa(first[12:]) == "10.0.0.2"


def test_ptr_reply_names_the_container():
    q = query("2.0.0.10.in-addr.arpa", TYPE_PTR)
    reply = build_reply(q, len(q), [], ptr_name="web.mynet")
    assert struct.unpack("!H", reply[6:8])[0] == 1
    assert reply.endswith(b"\x03web\x05mynet\x00")


def test_servfail_and_reverse_addresses():
    q = query("example.org", TYPE_A)
    assert struct.unpack("!H", build_reply(q, len(q), [], rcode=2)[2:4])[0] & 0x0F == 2
    assert reverse_address("4.3.2.1.in-addr.arpa.") == "1.2.3.4"
    assert reverse_address("example.org") is None
