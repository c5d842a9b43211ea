"""Runs inside a container for bench/convergence.py: pings each target address in turn, as fast
as the network allows, and prints `ADDRESS TIME` when the first reply comes back.

    python3 prober.py 172.18.1.1 172.18.1.2 ...

Standard library only (it runs with the host's python3 inside a container)."""

import os
import select
import socket
import struct
import sys
import time


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def echo(ident: int, seq: int) -> bytes:
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    return struct.pack("!BBHHH", 8, 0, checksum(header), ident, seq)


def main(targets: list[str], timeout: float = 30.0) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    print("ready", flush=True)   # the benchmark starts containers only now
    seq = 0
    for target in targets:
        deadline = time.monotonic() + timeout
        answered = False
        while not answered and time.monotonic() < deadline:
            seq = (seq + 1) & 0xFFFF
            try:
                sock.sendto(echo(ident, seq), (target, 0))
            except OSError:
                pass   # no neighbour yet: try again
            ready, _, _ = select.select([sock], [], [], 0.001)
            while ready:
                packet, (source, _) = sock.recvfrom(2048)
                kind, = struct.unpack_from("!B", packet, (packet[0] & 0x0F) * 4)
                if source == target and kind == 0:
                    print(f"{target} {time.time():.6f}", flush=True)
                    answered = True
                    break
                ready, _, _ = select.select([sock], [], [], 0)
        if not answered:
            print(f"{target} timeout", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
