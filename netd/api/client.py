"""The CLI's side of the API: HTTP over the daemon's Unix socket.

`NETD_HOST` names the socket (as DOCKER_HOST does): `unix:///run/netd/netd.sock` or a path.
Kept free of heavy imports: every CLI command pays for them at start.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Iterator
from urllib.parse import quote, urlencode

from netd.contract.errors import NetdError, Unavailable, error_for_status

DEFAULT_SOCKET = "/run/netd/netd.sock"


def socket_path(host: str | None = None) -> str:
    host = host or os.environ.get("NETD_HOST") or DEFAULT_SOCKET
    if host.startswith("unix://"):
        return host[len("unix://"):]
    if "://" in host:
        raise NetdError(f"NETD_HOST={host}: only unix:// sockets are supported (the API has no TCP listener)")
    return host


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None = None):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if self.timeout is not None:
            sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise Unavailable(
                f"cannot connect to the netd daemon at {self.path}: is it running? Start it with `netd daemon` "
                "(or set NETD_HOST to its socket)"
            ) from None
        except PermissionError:
            sock.close()
            raise Unavailable(f"permission denied on {self.path}: run as root or as a member of group netd") from None
        self.sock = sock


class Client:
    def __init__(self, host: str | None = None, timeout: float | None = None):
        self.path = socket_path(host)
        self.conn = UnixConnection(self.path, timeout)

    def close(self) -> None:
        self.conn.close()

    def request(self, method: str, path: str, body: dict | None = None, query: dict | None = None):
        response = self._send(method, path, body, query)
        data = response.read()
        if response.status >= 400:
            raise self._error(response.status, data)
        if not data:
            return None
        return json.loads(data)

    def stream(self, method: str, path: str, body: dict | None = None, query: dict | None = None) -> Iterator[bytes]:
        """The raw chunks of a streamed reply, as they arrive."""
        response = self._send(method, path, body, query)
        if response.status >= 400:
            raise self._error(response.status, response.read())
        while True:
            chunk = response.read1(65536) if hasattr(response, "read1") else response.read(65536)
            if not chunk:
                break
            yield chunk
        self.conn.close()

    def lines(self, method: str, path: str, body: dict | None = None) -> Iterator[dict]:
        """A streamed reply of JSON lines, one object at a time."""
        buffer = b""
        for chunk in self.stream(method, path, body):
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.strip():
                    yield json.loads(line)

    def _send(self, method: str, path: str, body: dict | None, query: dict | None):
        url = path + ("?" + urlencode(query) if query else "")
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        try:
            self.conn.request(method, url, body=payload, headers=headers)
            return self.conn.getresponse()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            # a kept-alive connection the daemon closed (e.g. it restarted): try once more
            self.conn.close()
            self.conn.request(method, url, body=payload, headers=headers)
            return self.conn.getresponse()

    @staticmethod
    def _error(status: int, data: bytes) -> NetdError:
        try:
            message = json.loads(data).get("message") or data.decode()
        except ValueError:
            message = data.decode(errors="replace") or f"HTTP {status}"
        return error_for_status(status, message)


def q(part: str) -> str:
    """Quote one path segment (a name or id given by the user)."""
    return quote(part, safe="")
