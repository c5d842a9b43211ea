"""Fixtures for the kvstore suite: one `backend` fixture, parametrized over every backend.

- embedded: a SQLite file in the test's temp dir.
- etcd: a real etcd (tests.support.etcd_server), one for the session; tests that stop
  it get one of their own (`restartable`).
- consul: the agent named by NETD_TEST_CONSUL=http://HOST:PORT if set, otherwise the test
  double tests.support.fake_consul (no Consul server can be installed on these machines).

Each test works under a prefix of its own, so tests can share a server.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlparse

import pytest

from kvstore import Event, KVStore, StoreError, Watch, open_store
from kvstore.embedded import EmbeddedStore
from kvstore.security import StoreCredentials
from tests.support.certs import make_certificates
from tests.support.etcd_server import EtcdServer
from tests.support.fake_consul import FakeConsul

REAL_CONSUL = os.environ.get("NETD_TEST_CONSUL")
# The double accepts short session TTLs so that expiry tests take a second, not twenty.
FAKE_CONSUL_MIN_TTL = 0.5


@dataclass
class Backend:
    name: str
    store: KVStore
    prefix: str                          # every key a test writes starts with it
    short_ttl: float                     # a lease TTL this backend expires quickly
    exact_history: bool                  # False: changes between two polls coalesce (Consul)
    connect: Callable[[], KVStore]       # another client of the same data
    server: EtcdServer | FakeConsul | None = None
    clients: list[KVStore] = field(default_factory=list)

    def client(self) -> KVStore:
        store = self.connect()
        if store is not self.store:
            self.clients.append(store)
        return store

    def compact(self, revision: int) -> None:
        """Make the history before `revision` unavailable to watches."""
        if self.name in ("embedded", "etcd", "etcd-tls"):
            self.store.compact(revision)
        # Consul keeps no history at all: nothing to do.

    def close(self) -> None:
        """Remove what the test wrote (a real Consul agent outlives the suite), then disconnect."""
        with contextlib.suppress(StoreError):
            self.store.delete_prefix(self.prefix)
        for store in [*self.clients, self.store]:
            store.close()


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


@pytest.fixture(scope="session")
def etcd_tls_server(tmp_path_factory) -> Iterator[EtcdServer]:
    """etcd with client TLS (--client-cert-auth: a client certificate of its CA or nothing)."""
    certs = make_certificates(str(tmp_path_factory.mktemp("certs")))
    with EtcdServer(certs=certs) as server:
        yield server


def tls_options(server: EtcdServer) -> dict:
    return {"credentials": StoreCredentials.from_options(server.certs.options())}


@pytest.fixture(scope="session")
def consul_address() -> Iterator[tuple[str, int, float]]:
    """(host, port, minimum session TTL) of the agent, or of a test double."""
    if REAL_CONSUL:
        url = urlparse(REAL_CONSUL)
        yield url.hostname, url.port or 8500, 10.0
        return
    with FakeConsul(min_session_ttl=FAKE_CONSUL_MIN_TTL) as fake:
        yield "127.0.0.1", fake.port, FAKE_CONSUL_MIN_TTL


def _unique_prefix() -> str:
    return f"test/{uuid.uuid4().hex[:10]}/"


@pytest.fixture(params=["embedded", "etcd", "etcd-tls", "consul"])
def backend(request, tmp_path) -> Iterator[Backend]:
    backend = _make_backend(request.param, request, tmp_path)
    yield backend
    backend.close()


def _make_backend(name: str, request, tmp_path) -> Backend:
    prefix = _unique_prefix()
    if name == "embedded":
        store = EmbeddedStore(str(tmp_path / "store.db"))
        return Backend(name, store, prefix, 0.3, True, lambda: store)
    if name == "etcd":
        server = request.getfixturevalue("etcd_server")
        return Backend(name, open_store(server.url), prefix, 1.0, True, lambda: open_store(server.url), server)
    if name == "etcd-tls":   # the same suite over TLS, with a client certificate and a password
        server = request.getfixturevalue("etcd_tls_server")
        options = tls_options(server)
        return Backend(name, open_store(server.url, **options), prefix, 1.0, True,
                       lambda: open_store(server.url, **options), server)
    host, port, min_ttl = request.getfixturevalue("consul_address")

    def connect() -> KVStore:
        return open_store(f"consul://{host}:{port}", min_session_ttl=min_ttl)
    return Backend(name, connect(), prefix, min_ttl, False, connect)


@pytest.fixture(params=["etcd", "consul"])
def restartable(request) -> Iterator[Backend]:
    """A backend on a server of its own that the test may stop and start again."""
    if request.param == "etcd":
        server = EtcdServer()
        backend = Backend("etcd", open_store(server.url), _unique_prefix(), 1.0, True,
                          lambda: open_store(server.url), server)
    else:
        if REAL_CONSUL:
            pytest.skip("cannot restart a real Consul agent from a test")
        server = FakeConsul(min_session_ttl=FAKE_CONSUL_MIN_TTL)
        url = server.url

        def connect() -> KVStore:
            return open_store(url, min_session_ttl=FAKE_CONSUL_MIN_TTL)
        backend = Backend("consul", connect(), _unique_prefix(), FAKE_CONSUL_MIN_TTL, False, connect, server)
    yield backend
    backend.close()
    server.close()


# --- helpers --------------------------------------------------------------------------------

class Collector:
    """Iterates a watch in a thread, keeping the events and whatever error ended it."""

    def __init__(self, watch: Watch):
        self.watch = watch
        self.events: list[Event] = []
        self.error: BaseException | None = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for event in self.watch:
                with self._changed:
                    self.events.append(event)
                    self._changed.notify_all()
        except BaseException as error:  # noqa: BLE001 - handed over to the test
            self.error = error
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[list[Event]], bool], timeout: float = 10.0) -> list[Event]:
        """Wait until predicate(events) holds (or the watch ended); the events so far."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self.events) and self._thread.is_alive():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            return list(self.events)

    def take(self, count: int, timeout: float = 10.0) -> list[Event]:
        events = self.wait_for(lambda events: len(events) >= count, timeout)
        if len(events) < count and self.error:
            raise self.error
        assert len(events) >= count, f"got {len(events)} of {count} events in {timeout}s: {events}"
        return events[:count]

    def ended(self, timeout: float = 10.0) -> BaseException | None:
        """Wait for the watch to end; the error that ended it."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the watch did not end within {timeout}s"
        return self.error

    def cancel(self) -> None:
        self.watch.cancel()
        self._thread.join(10)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def replay(events: list[Event], state: dict[str, str] | None = None) -> dict[str, str]:
    """The state that applying events to `state` gives."""
    state = dict(state or {})
    for event in events:
        if event.kind == "put":
            state[event.key] = event.value
        else:
            state.pop(event.key, None)
    return state
