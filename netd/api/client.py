"""The CLI's side of the API: HTTP over the daemon's Unix socket.

`NETD_HOST` names the socket (as DOCKER_HOST does): `unix:///run/netd/netd.sock` or a path.
Kept free of heavy imports: every CLI command pays for them at start.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator

from netd.contract.errors import NetdError, Unavailable, error_for_status

DEFAULT_SOCKET = "/run/netd/netd.sock"
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~")


def socket_path(host: str | None = None) -> str:
    host = host or os.environ.get("NETD_HOST") or DEFAULT_SOCKET
    if host.startswith("unix://"):
        return host[len("unix://"):]
    if "://" in host:
        raise NetdError(f"NETD_HOST={host}: only unix:// sockets are supported (the API has no TCP listener)")
    return host


class Reply:
    """One HTTP/1.1 reply read off a Unix socket: status, and a body of Content-Length bytes
    or, for a stream, everything until the daemon closes the connection."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            data = sock.recv(65536)
            if not data:
                raise Unavailable("the netd daemon closed the connection without an answer")
            self.buffer += data
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = self.headers.get("content-length")
        self.remaining = int(length) - len(self.buffer) if length is not None else None

    def read1(self) -> bytes:
        """The next chunk of the body as it arrives; b"" at its end."""
        if self.buffer:
            chunk, self.buffer = self.buffer, b""
            return chunk
        if self.remaining is not None and self.remaining <= 0:
            return b""
        chunk = self.sock.recv(65536)
        if self.remaining is not None:
            self.remaining -= len(chunk)
        return chunk

    def read(self) -> bytes:
        parts = []
        while chunk := self.read1():
            parts.append(chunk)
        return b"".join(parts)


class Client:
    """HTTP over the daemon's Unix socket, one connection per request: nothing but `socket` and
    `json`, so that a command starts in a few milliseconds (http.client alone costs ~15 ms)."""

    def __init__(self, host: str | None = None, timeout: float | None = None):
        self.path = socket_path(host)
        self.timeout = timeout
        self.sock: socket.socket | None = None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def request(self, method: str, path: str, body: dict | None = None, query: dict | None = None):
        response = self._send(method, path, body, query)
        data = response.read()
        self.close()
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
        try:
            while chunk := response.read1():
                yield chunk
        finally:
            self.close()

    def lines(self, method: str, path: str, body: dict | None = None) -> Iterator[dict]:
        """A streamed reply of JSON lines, one object at a time."""
        buffer = b""
        for chunk in self.stream(method, path, body):
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.strip():
                    yield json.loads(line)

    def _connect(self) -> socket.socket:
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
        return sock

    def _send(self, method: str, path: str, body: dict | None, query: dict | None) -> Reply:
        url = path + ("?" + "&".join(f"{q(str(k))}={q(str(v))}" for k, v in query.items()) if query else "")
        payload = json.dumps(body).encode() if body is not None else b""
        head = f"{method} {url} HTTP/1.1\r\nHost: netd\r\nConnection: close\r\nContent-Length: {len(payload)}\r\n"
        if body is not None:
            head += "Content-Type: application/json\r\n"
        self.close()
        self.sock = self._connect()
        try:
            self.sock.sendall(head.encode() + b"\r\n" + payload)
            return Reply(self.sock)
        except (BrokenPipeError, ConnectionResetError) as e:
            self.close()
            raise Unavailable(f"the netd daemon at {self.path} went away: {e}") from None

    @staticmethod
    def _error(status: int, data: bytes) -> NetdError:
        try:
            message = json.loads(data).get("message") or data.decode()
        except ValueError:
            message = data.decode(errors="replace") or f"HTTP {status}"
        return error_for_status(status, message)


def q(part: str) -> str:
    """Quote one path segment or query value (a name or id given by the user)."""
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in part.encode())
