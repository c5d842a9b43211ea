"""Hostile JSON at every route: a seeded fuzz posts generated bodies (wrong types, nulls, huge and
odd strings, nested junk) and odd query values; the daemon answers every one with a status below
500 and a message, stays alive, and once what the valid ones made is removed, nothing is left."""

from __future__ import annotations

import json
import os
import random
import socket

import pytest

from tests.support.hosts import NetdHost

pytestmark = pytest.mark.timeout(300)
SEED = int(os.environ.get("NETD_FUZZ_SEED", "7"))   # fixed in CI; any other seed explores
ROUNDS = int(os.environ.get("NETD_FUZZ_ROUNDS", "400"))

ROUTES = [("POST", "/networks/create"), ("POST", "/networks/fz/connect"), ("POST", "/networks/fz/disconnect"),
          ("POST", "/containers/run"), ("POST", "/containers/fz/stop"), ("DELETE", "/containers/fz"),
          ("DELETE", "/networks/fz"), ("POST", "/debug/trace"), ("GET", "/containers/fz/logs"),
          ("GET", "/ipam/lookup/fz"), ("POST", "/networks/prune"), ("GET", "/networks/fz")]
FIELDS = ["Name", "Driver", "Options", "IPAM", "Scope", "Internal", "Labels", "Container", "EndpointConfig",
          "Force", "Cmd", "NetworkMode", "Ports", "Env", "IPv4Address", "Aliases", "CapAdd", "Detach", "Source",
          "Destination", "Size", "Timeout", "PublishAllPorts", "ExposedPorts", "Hostname", "Rootfs"]


def junk(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 65536, 2**63, 3.5, -0.0])
    if kind == 3:
        return rng.choice(["", "fz", "a" * 5000, "10.0.0.0/8", "abc:80:80", "\u00e9\u0000x", "../../etc", "-1",
                           "bridge", "overlay", "none", "host", "container:fz", "tcp", "1.2.3.4"])
    if kind in (4, 5):
        return rng.choice(["fz", "1.2.3.4", "x" * 20])
    if kind == 6:
        return [junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 7:
        return {rng.choice(FIELDS + ["Config", "Subnet", "ContainerPort", "HostPort", "HostIp", "Proto"]):
                junk(rng, depth + 1) for _ in range(rng.randrange(4))}
    return {"Config": [{"Subnet": junk(rng, depth + 1), "Gateway": junk(rng, depth + 1),
                        "AuxiliaryAddresses": junk(rng, depth + 1)}]}


def raw_request(path: str, method: str, route: str, body: bytes, query: str = "") -> tuple[int, bytes]:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(60)
    sock.connect(path)
    sock.sendall(f"{method} {route}{query} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
        if route.endswith("/logs") is False and b"\r\n\r\n" in data:
            head, _, rest = data.partition(b"\r\n\r\n")
            length = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
            if length and len(rest) >= length[0]:
                break
    sock.close()
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


def test_hostile_bodies_get_a_4xx_and_leave_nothing(busybox_rootfs):
    rng = random.Random(SEED)
    print(f"seed {SEED}")
    with NetdHost(prefix="netdt") as host:
        host.netd("network", "create", "--subnet", "10.93.0.0/24", "fz")
        host.netd("run", "-d", "--name", "fz", "--network", "fz", "sleep", "100000")
        failures = []
        for _ in range(ROUNDS):
            method, route = rng.choice(ROUTES)
            body = {rng.choice(FIELDS): junk(rng) for _ in range(rng.randrange(6))}
            if rng.random() < 0.05:
                raw = rng.choice([b"{", b"[1,2]", b"null", b"\xff\xfe", b'"x"', b"1e999"])
            else:
                raw = json.dumps(body).encode()
            query = rng.choice(["", "?t=abc", "?t=-5", "?tail=x", "?all=zz", "?tail=2", "?t=1e309"])
            if route.endswith("/stop") and "t=" not in query:
                query = "?t=0"
            status, reply = raw_request(host.socket, method, route, raw if method != "GET" else b"", query)
            if status >= 500:
                failures.append(f"{method} {route}{query} {raw[:200]!r} -> {status} {reply[:200]!r}")
            if route == "/containers/fz/stop" or (route == "/containers/fz" and method == "DELETE"):
                host.cli("rm", "-f", "fz", check=False)
                host.cli("run", "-d", "--name", "fz", "--network", "fz", "sleep", "100000", check=False)
        assert not failures, f"seed {SEED}: {len(failures)} answers of 500 or more:\n" + "\n".join(failures[:10])
        assert host.cli("info").returncode == 0
        for container in host.netd("ps", "-a", "-q").split():
            host.netd("rm", "-f", container)
        for network in json.loads(host.netd("network", "ls", "--format", "json")):
            if network["Name"] not in ("bridge", "host", "none"):
                host.netd("network", "rm", network["Name"])
        assert [e for e in os.listdir(os.path.join(host.run_dir, "netns")) if not e.startswith("ov-")] == []
        links = host.sh("ip -o link show").stdout
        assert "vnd" not in links, links
