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
"""

from __future__ import annotations

import abc
import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlparse

from netd.errors import BadRequest, Conflict, Unavailable


# --- errors ---------------------------------------------------------------------------------

class StoreError(Unavailable):
    """The store could not be reached or answered with an error."""


class KeyExists(Conflict):
    """`create` of a key that is already there."""

    def __init__(self, key: str):
        super().__init__(f"key {key} already exists")
        self.key = key


class VersionConflict(Conflict):
    """A compare-and-swap lost: the key changed (or vanished) since it was read."""

    def __init__(self, key: str):
        super().__init__(f"key {key} was modified concurrently")
        self.key = key


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


Op = Create | Update | Delete


class Lease(abc.ABC):
    """A TTL that keys can be attached to; the keys vanish when it expires or is revoked."""

    id: int
    ttl: float

    @abc.abstractmethod
    def refresh(self) -> None:
        """Renew the lease for another TTL; raises StoreError if it already expired."""

    @abc.abstractmethod
    def revoke(self) -> None:
        """End the lease now; its keys are deleted."""


class Watch(abc.ABC):
    """An iterator of Events under a prefix; `cancel()` ends it from another thread.

    Iteration raises Compacted if the start revision is gone, and StoreError if the
    connection drops (the caller resumes with a new watch from the last revision + 1).
    """

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Event]: ...

    @abc.abstractmethod
    def cancel(self) -> None: ...


# --- the contract ---------------------------------------------------------------------------

class KVStore(abc.ABC):
    """One interface for every backend. All methods are thread-safe."""

    url: str

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
    def watch(self, prefix: str, start_revision: int) -> Watch:
        """Changes under prefix from start_revision (inclusive) on."""

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

    def delete_prefix(self, prefix: str) -> None:
        pairs, _ = self.list(prefix)
        for pair in pairs:
            self.delete(pair.key)

    @contextlib.contextmanager
    def lock(self, name: str, ttl: float = 15.0, timeout: float = 30.0) -> Iterator[None]:
        """Hold the cluster-wide lock `name` for the duration of the block.

        The lock is a key created only if absent and tied to a lease, so a holder that
        dies releases it when its lease lapses; waiters watch the key for its deletion.
        """
        key = f"netd/locks/{name}"
        lease = self.grant_lease(ttl)
        keeper = LeaseKeeper(lease)
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
            keeper.start()
            try:
                yield
            finally:
                keeper.stop()
                with contextlib.suppress(StoreError):
                    self.delete(key)
        finally:
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
    """Refreshes a lease at a third of its TTL from a background thread."""

    def __init__(self, lease: Lease, on_lost=None):
        self.lease = lease
        self.on_lost = on_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{lease.id}", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(max(0.2, self.lease.ttl / 3)):
            try:
                self.lease.refresh()
            except StoreError:
                if self.on_lost:
                    self.on_lost()
                if self._lease_is_gone():
                    return

    def _lease_is_gone(self) -> bool:
        return False


# --- opening a store by URL -----------------------------------------------------------------

def open_store(url: str, **options) -> KVStore:
    """Open `sqlite:///path/to/file.db`, `etcd://host:port` or `consul://host:port`."""
    parsed = urlparse(url)
    if parsed.scheme in ("sqlite", "embedded", "file", ""):
        from kvstore.embedded import EmbeddedStore
        return EmbeddedStore(parsed.path or url, **options)
    if parsed.scheme == "etcd":
        from kvstore.etcd import EtcdStore
        return EtcdStore(_host(parsed, url), parsed.port or 2379, **options)
    if parsed.scheme == "consul":
        from kvstore.consul import ConsulStore
        return ConsulStore(_host(parsed, url), parsed.port or 8500, **options)
    raise BadRequest(f"unknown store URL {url!r}: use etcd://HOST:PORT, consul://HOST:PORT or sqlite:///FILE")


def _host(parsed, url: str) -> str:
    if not parsed.hostname:
        raise BadRequest(f"store URL {url!r} has no host: use etcd://HOST:PORT or consul://HOST:PORT")
    return parsed.hostname
