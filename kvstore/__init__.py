"""The key-value store contract, and `open_store(url)` to pick a backend.

Every backend (embedded SQLite, etcd, Consul) offers the same operations:

- `get`, `list` (by prefix, with the revision the listing was taken at), `put`;
- `create` (only if absent), `update` (compare-and-swap on the version read),
  `delete` (optionally only at a version), and `commit` for several of those at once,
  all or nothing;
- `watch(prefix, start_revision)`: every change from that revision on, in order;
- leases: keys that vanish when their holder stops renewing them (TTL);
- `lock(name)`: a cluster-wide mutex built on create + lease + watch.

Values are text (JSON by convention). Versions and revisions are integers that only
grow: a key's `version` is the store revision of its last change (etcd's mod_revision,
Consul's ModifyIndex, the embedded store's counter).

Callers that want a live copy of a prefix use `Mirror` (kvstore.mirror): it lists, watches,
resumes after a dropped connection and resyncs after compaction, for every backend alike.

Consul keeps no history, so its watch diffs successive listings: changes to one key between two
listings arrive as one event, and a delete carries the revision of the listing that showed it.
"""

from __future__ import annotations

import abc
import contextlib
import http.client
import json
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import requests

log = logging.getLogger(__name__)


# --- errors ---------------------------------------------------------------------------------

class KVError(Exception):
    """Base of the store's errors. kvstore imports nothing of netd: the daemon's API maps these
    to its own kinds (StoreConfigError -> 400, KeyExists/VersionConflict -> 409, StoreError -> 503)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class StoreConfigError(KVError):
    """The caller's mistake: a bad store URL or option, a malformed commit."""


class StoreError(KVError):
    """The store could not be reached or answered with an error."""


class KeyExists(KVError):
    """`create` of a key that is already there."""

    def __init__(self, key: str):
        super().__init__(f"key {key} already exists")
        self.key = key


class VersionConflict(KVError):
    """A compare-and-swap lost: the key changed (or vanished) since it was read."""

    def __init__(self, key: str):
        super().__init__(f"key {key} was modified concurrently")
        self.key = key


class LeaseExpired(StoreError):
    """The lease is gone (expired or revoked): grant a new one; refreshing will not help."""

    def __init__(self, lease_id: int):
        super().__init__(f"lease {lease_id} has expired")
        self.lease_id = lease_id


class Compacted(StoreError):
    """A watch asked for history the store no longer has: the caller must list again."""

    def __init__(self, revision: int):
        super().__init__(f"revision {revision} has been compacted")
        self.revision = revision


# --- values ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class KVPair:
    key: str
    value: str
    version: int          # revision of the key's last change
    lease: int = 0        # id of the lease the key is attached to, 0 for none


@dataclass(frozen=True)
class Event:
    kind: str             # "put" or "delete"
    key: str
    value: str | None     # None for a delete
    revision: int


@dataclass(frozen=True)
class Create:
    """commit() op: write `key` only if it does not exist."""
    key: str
    value: str
    lease: int = 0


@dataclass(frozen=True)
class Update:
    """commit() op: write `key` only if its version is still `version`."""
    key: str
    value: str
    version: int
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    """commit() op: delete `key`; with a version, only if it is still at that version."""
    key: str
    version: int | None = None


@dataclass(frozen=True)
class Check:
    """commit() op: only if `key` is still at `version`; writes nothing (VersionConflict otherwise).
    E.g. an endpoint is stored only while its network is not being removed."""
    key: str
    version: int


Op = Create | Update | Delete | Check


class Lease(abc.ABC):
    """A TTL that keys can be attached to; the keys vanish when it expires or is revoked."""

    id: int
    ttl: float

    @abc.abstractmethod
    def refresh(self) -> None:
        """Renew the lease for another TTL; raises LeaseExpired if it already expired,
        StoreError if the store cannot be reached."""

    @abc.abstractmethod
    def revoke(self) -> None:
        """End the lease now; its keys are deleted."""


class Watch(abc.ABC):
    """An iterator of Events under a prefix; `cancel()` ends it (quietly) from any thread.

    Iteration raises Compacted if the start revision is gone, and StoreError if the
    connection drops (the caller resumes with a new watch from the last revision + 1).
    All events of one revision are delivered before iteration can raise, so resuming from
    the last revision seen + 1 loses nothing.
    """

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Event]: ...

    @abc.abstractmethod
    def cancel(self) -> None: ...


# --- the contract ---------------------------------------------------------------------------

class KVStore(abc.ABC):
    """One interface for every backend. All methods are thread-safe."""

    url: str
    max_commit_ops: int = 1000   # ops one commit() is sure to accept (etcd: 128, Consul: fewer)

    @abc.abstractmethod
    def get(self, key: str) -> KVPair | None: ...

    @abc.abstractmethod
    def list(self, prefix: str) -> tuple[list[KVPair], int]:
        """Every key under prefix, sorted by key, and the store revision of the listing."""

    @abc.abstractmethod
    def put(self, key: str, value: str, lease: Lease | None = None) -> KVPair: ...

    @abc.abstractmethod
    def commit(self, ops: list[Op]) -> int:
        """Apply ops atomically; return the new revision.

        Raises KeyExists (a Create found the key) or VersionConflict (an Update or a
        versioned Delete found another version, or no key) naming the first failing key.
        """

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Delete every key under prefix, all at once."""

    @abc.abstractmethod
    def watch(self, prefix: str, start_revision: int) -> Watch:
        """Changes under prefix from start_revision (inclusive) on; 0 means from now on."""

    @abc.abstractmethod
    def grant_lease(self, ttl: float) -> Lease: ...

    @abc.abstractmethod
    def revision(self) -> int:
        """The store's current revision."""

    def close(self) -> None:  # noqa: B027 - optional for backends without resources
        pass

    # Conveniences built on commit(): one place, every backend.

    def create(self, key: str, value: str, lease: Lease | None = None) -> KVPair:
        revision = self.commit([Create(key, value, lease.id if lease else 0)])
        return KVPair(key, value, revision, lease.id if lease else 0)

    def update(self, key: str, value: str, version: int, lease: Lease | None = None) -> KVPair:
        revision = self.commit([Update(key, value, version, lease.id if lease else 0)])
        return KVPair(key, value, revision, lease.id if lease else 0)

    def delete(self, key: str, version: int | None = None) -> None:
        """Delete key (no error if absent, unless a version was given)."""
        self.commit([Delete(key, version)])

    @contextlib.contextmanager
    def lock(self, name: str, ttl: float = 15.0, timeout: float = 30.0) -> Iterator[None]:
        """Hold the cluster-wide lock `name` for the duration of the block.

        The lock is a key created only if absent and tied to a lease, so a holder that
        dies releases it when its lease lapses; waiters watch the key for its deletion.
        """
        key = f"netd/locks/{name}"
        lease = self.grant_lease(ttl)
        # Refresh from the start: waiting for the lock may take longer than the TTL.
        keeper = LeaseKeeper(lease).start()
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    self.create(key, "locked", lease)
                    break
                except KeyExists:
                    pass
                holder = self.get(key)
                if holder is None:
                    continue
                if time.monotonic() > deadline:
                    raise StoreError(f"timed out after {timeout:.0f}s waiting for lock {name}")
                self._wait_for_delete(key, holder.version + 1, deadline)
            try:
                yield
            finally:
                with contextlib.suppress(StoreError):
                    self.delete(key)
        finally:
            keeper.stop()
            with contextlib.suppress(StoreError):
                lease.revoke()

    def _wait_for_delete(self, key: str, start_revision: int, deadline: float) -> None:
        watch = self.watch(key, start_revision)
        timer = threading.Timer(max(0.0, deadline - time.monotonic()), watch.cancel)
        timer.daemon = True
        timer.start()
        try:
            for event in watch:
                if event.key == key and event.kind == "delete":
                    return
        except Compacted:
            return
        finally:
            timer.cancel()
            watch.cancel()


class LeaseKeeper:
    """Refreshes a lease at a third of its TTL from a background thread.

    A failed refresh is retried at the same pace while the lease may still be alive. Once it
    is known to be gone (LeaseExpired, or a whole TTL without a successful refresh),
    `on_lost` is called once and the keeper stops: the holder must grant a new lease.
    """

    def __init__(self, lease: Lease, on_lost: Callable[[], None] | None = None):
        self.lease = lease
        self.on_lost = on_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{lease.id}", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        last_refresh = time.monotonic()
        while not self._stop.wait(max(0.1, self.lease.ttl / 3)):
            try:
                self.lease.refresh()
                last_refresh = time.monotonic()
            except LeaseExpired:
                break
            except StoreError as error:
                if time.monotonic() - last_refresh < self.lease.ttl:
                    log.warning("could not refresh lease %s, retrying: %s", self.lease.id, error)
                    continue
                break
        else:
            return
        log.warning("lease %s is lost", self.lease.id)
        if self.on_lost:
            self.on_lost()


# --- for backends ---------------------------------------------------------------------------

def resolve_unanswered_commit(store: KVStore, ops: list[Op], error: StoreError, attempts: int = 3,
                              interval: float = 0.5, get: Callable[[str], KVPair | None] | None = None) -> int:
    """A commit whose answer never came (a timeout after it was sent) may have happened. Read back
    who owns its keys: every Create/Update key holding exactly the value written (the values netd
    writes name their owner) and every Delete gone means it committed; the store's revision is
    returned. Anything else means it did not: `error` is raised, and retrying is safe. While the
    store does not answer, try again a few times; then the outcome is unknown: `error` is raised."""
    writes = [op for op in ops if not isinstance(op, Check)]
    get = get or store.get
    for attempt in range(attempts):
        if attempt:
            time.sleep(interval)
        try:
            for op in writes:
                pair = get(op.key)
                if isinstance(op, Delete) and pair is not None:
                    raise error
                if isinstance(op, (Create, Update)) and (pair is None or pair.value != op.value):
                    raise error
            log.warning("a commit answered late was applied (read back): %s", ", ".join(op.key for op in writes[:3]))
            return store.revision()
        except StoreError as again:
            if again is error:
                raise
            continue
    raise error


def check_ops(ops: list[Op]) -> None:
    """Reject what no backend can do atomically: two ops on one key in one commit."""
    keys = [op.key for op in ops]
    if len(set(keys)) != len(keys):
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise StoreConfigError(f"commit touches key {duplicate} more than once")


class HttpReply:
    def __init__(self, status: int, reason: str, headers: http.client.HTTPMessage, body: bytes):
        self.status_code = status
        self.reason = reason
        self.headers = headers
        self.content = body

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


class HttpClient:
    """Keep-alive HTTP/1.1 requests, one connection per thread, each request written at once.

    Go servers (etcd's gateway, Consul) wake up once per write: requests writes a POST's
    headers and its body apart, which halves etcd's throughput (measured, 8 threads: 410
    txn/s with requests, 930 with this). `post` and `get` are the part of requests.Session
    that etcd3gw uses, and failures raise requests' exceptions, which etcd3gw maps.
    """

    def __init__(self, host: str, port: int, connect_timeout: float = 2.0, read_timeout: float = 5.0,
                 tls: ssl.SSLContext | None = None, headers: dict[str, str] | None = None):
        self.host, self.port = host, port
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.tls = tls
        self.headers = headers if headers is not None else {}   # sent with every request (credentials)
        self._local = threading.local()
        # The breaker: after TIMEOUTS_TO_OPEN timeouts in a row the server is "not answering" for
        # QUIET seconds and calls fail at once, so that callers never pile up behind a frozen
        # store (each would wait the full timeout); the first call after that tries again.
        self._timeouts = 0
        self._quiet_until = 0.0

    TIMEOUTS_TO_OPEN = 2
    QUIET = 3.0

    def request(self, method: str, path: str, body: bytes | None = None,
                timeout: float | None = None, breaker: bool = True) -> HttpReply:
        """`path` may be a whole URL; only its path and query are used. `breaker=False`: ask even
        while the breaker is open (reading back an unanswered commit)."""
        if breaker and time.monotonic() < self._quiet_until:
            raise requests.exceptions.ConnectionError(
                f"not answering ({self._timeouts} timeouts in a row; trying again shortly)")
        parsed = urlparse(path)
        target = (parsed.path or "/") + (f"?{parsed.query}" if parsed.query else "")
        connection = self._connection()
        sent = False
        try:
            connection.sock.settimeout(timeout or self.read_timeout)
            headers = {"Content-Type": "application/json"} if body is not None else {}
            connection.request(method, target, body=body, headers={**self.headers, **headers})
            sent = True
            reply = connection.getresponse()
            self._timeouts, self._quiet_until = 0, 0.0
            return HttpReply(reply.status, reply.reason, reply.headers, reply.read())
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            self._local.connection = None
            if isinstance(error, TimeoutError):
                self._timed_out()
                raise (requests.exceptions.ReadTimeout if sent else requests.exceptions.ConnectTimeout)(
                    "timed out waiting for an answer") from None
            raise requests.exceptions.ConnectionError(describe_failure(error)) from None

    def _timed_out(self) -> None:
        self._timeouts += 1
        if self._timeouts >= self.TIMEOUTS_TO_OPEN:
            self._quiet_until = time.monotonic() + self.QUIET

    def _connection(self) -> http.client.HTTPConnection:
        """This thread's connection, connected; a new one if the server closed the old one."""
        connection = getattr(self._local, "connection", None)
        if connection is not None and _closed_by_peer(connection.sock):
            connection.close()
            connection = None
        if connection is None:
            connection = (http.client.HTTPSConnection(self.host, self.port, timeout=self.connect_timeout, context=self.tls)
                          if self.tls is not None else
                          http.client.HTTPConnection(self.host, self.port, timeout=self.connect_timeout))
            try:
                connection.connect()
            except TimeoutError:
                self._timed_out()
                raise requests.exceptions.ConnectTimeout(
                    f"no answer to connecting within {self.connect_timeout:g}s") from None
            except OSError as error:
                raise requests.exceptions.ConnectionError(describe_failure(error)) from None
            connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._local.connection = connection
        return connection

    def post(self, url: str, json: Any = None, timeout: Any = None, breaker: bool = True, **_ignored: Any) -> HttpReply:
        return self.request("POST", url, _json_body(json), _read_timeout(timeout), breaker)

    def get(self, url: str, timeout: Any = None, **_ignored: Any) -> HttpReply:
        return self.request("GET", url, None, _read_timeout(timeout))

    def close(self) -> None:
        """Close the calling thread's connection (others close when their threads end)."""
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None


def describe_failure(error: Exception) -> str:
    """A short, plain reason for a failed connection ("connection refused")."""
    if isinstance(error, ssl.SSLError):
        return f"TLS handshake failed: {error.reason or error}".replace("_", " ").lower().replace("tls", "TLS")
    if isinstance(error, http.client.RemoteDisconnected):
        return "the connection closed without an answer"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror[0].lower() + error.strerror[1:]
    return str(error) or type(error).__name__


def _closed_by_peer(sock: socket.socket | None) -> bool:
    """An idle keep-alive connection that has something to read was closed by the server."""
    if sock is None:
        return True
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def _json_body(value: Any) -> bytes | None:
    return None if value is None else json.dumps(value).encode()


def _read_timeout(timeout: Any) -> float | None:
    """requests' timeout may be a (connect, read) pair."""
    return timeout[1] if isinstance(timeout, tuple) else timeout


class HttpStream:
    """HTTP requests on a connection of their own, for watches that block reading for long.

    `abort()` (from any thread) shuts the socket down so that a blocked read returns at once:
    closing a socket from another thread does not wake a blocked recv. TCP keepalive notices a
    peer that vanished without closing the connection.
    """

    def __init__(self, host: str, port: int, connect_timeout: float = 2.0,
                 read_timeout: float | None = None, tls: ssl.SSLContext | None = None,
                 headers: dict[str, str] | None = None):
        self._connection = (http.client.HTTPSConnection(host, port, timeout=connect_timeout, context=tls)
                            if tls is not None else http.client.HTTPConnection(host, port, timeout=connect_timeout))
        self._read_timeout = read_timeout
        self.headers = headers if headers is not None else {}
        self._lock = threading.Lock()
        self.aborted = False

    def request(self, method: str, path: str, body: bytes | None = None) -> http.client.HTTPResponse:
        """Send the request and return the response (headers read, body not). Raises OSError.

        Read the whole body before the next request: the connection is kept alive.
        """
        if self._connection.sock is None:
            self._connect()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        self._connection.request(method, path, body=body, headers={**self.headers, **headers})
        return self._connection.getresponse()

    def _connect(self) -> None:
        self._connection.connect()
        sock = self._connection.sock
        sock.settimeout(self._read_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        with self._lock:
            if self.aborted:   # abort() came while we were connecting
                sock.shutdown(socket.SHUT_RDWR)

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            if self._connection.sock is not None:
                with contextlib.suppress(OSError):
                    self._connection.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._connection.close()


# --- opening a store by URL -----------------------------------------------------------------

def open_store(url: str, **options) -> KVStore:
    """Open `sqlite:///path/to/file.db`, `etcd://host:port` or `consul://host:port`.

    A plain path is an embedded store too. Options go to the backend's constructor.
    """
    parsed = urlparse(url)
    if parsed.scheme in ("sqlite", "embedded", "file", ""):
        if parsed.netloc or not parsed.path:
            raise StoreConfigError(f"store URL {url!r} names no file: use sqlite:///ABSOLUTE/PATH")
        from kvstore.embedded import EmbeddedStore
        return EmbeddedStore(parsed.path, **options)
    if parsed.scheme == "etcd":
        from kvstore.etcd import EtcdStore
        return EtcdStore(*_host_port(parsed, url, 2379), **options)
    if parsed.scheme == "consul":
        from kvstore.consul import ConsulStore
        return ConsulStore(*_host_port(parsed, url, 8500), **options)
    raise StoreConfigError(f"unknown store URL {url!r}: use etcd://HOST:PORT, consul://HOST:PORT or sqlite:///FILE")


def _host_port(parsed, url: str, default_port: int) -> tuple[str, int]:
    usage = f"use {parsed.scheme}://HOST:PORT"
    if not parsed.hostname:
        raise StoreConfigError(f"store URL {url!r} has no host: {usage}")
    if parsed.path not in ("", "/") or parsed.query:
        raise StoreConfigError(f"store URL {url!r} has a path or query, which {parsed.scheme} takes none of: {usage}")
    try:
        port = parsed.port
    except ValueError:
        raise StoreConfigError(f"store URL {url!r} has a bad port: {usage}") from None
    return parsed.hostname, port or default_port
