"""The store contract, the same tests for every backend (see conftest.py for the backends)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from kvstore import (
    Check,
    Compacted,
    Create,
    Delete,
    KeyExists,
    LeaseExpired,
    LeaseKeeper,
    StoreConfigError,
    StoreError,
    Update,
    VersionConflict,
    open_store,
)
from kvstore.embedded import EmbeddedStore
from tests.support.etcd_server import free_port

from .conftest import Backend, Collector, replay, wait_until

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --- reads and writes -----------------------------------------------------------------------

def test_get_put_and_sorted_list_stay_within_the_prefix(backend: Backend):
    store, p = backend.store, backend.prefix
    assert store.get(p + "missing") is None
    for key in ["b", "a", "c/2", "c/1", "ü"]:
        store.put(p + key, f"value of {key}")
    store.put(p[:-1] + "x", "sibling, not under the prefix")     # "test/abc/" vs "test/abcx"
    store.put(p + "c", "")                                        # an empty value is a value

    pair = store.get(p + "ü")
    assert (pair.key, pair.value) == (p + "ü", "value of ü")
    assert store.get(p + "c").value == ""

    pairs, revision = store.list(p)
    assert [pair.key for pair in pairs] == [p + key for key in ["a", "b", "c", "c/1", "c/2", "ü"]]
    assert revision >= max(pair.version for pair in pairs)
    assert [pair.key for pair in store.list(p + "c/")[0]] == [p + "c/1", p + "c/2"]
    assert store.list(p + "nothing/")[0] == []


def test_versions_grow_with_every_change(backend: Backend):
    store, key = backend.store, backend.prefix + "k"
    first = store.put(key, "1")
    second = store.put(key, "2")
    assert second.version > first.version
    assert store.get(key).version == second.version
    assert store.revision() >= second.version


def test_create_only_if_absent(backend: Backend):
    store, key = backend.store, backend.prefix + "k"
    created = store.create(key, "first")
    assert store.get(key) == created
    with pytest.raises(KeyExists) as raised:
        store.create(key, "second")
    assert raised.value.key == key
    assert store.get(key).value == "first"


def test_update_is_compare_and_swap(backend: Backend):
    store, key = backend.store, backend.prefix + "k"
    read = store.put(key, "1")
    updated = store.update(key, "2", read.version)
    assert store.get(key) == updated and updated.version > read.version
    with pytest.raises(VersionConflict) as raised:
        store.update(key, "3", read.version)        # stale version
    assert raised.value.key == key
    assert store.get(key).value == "2"
    with pytest.raises(VersionConflict):
        store.update(backend.prefix + "absent", "x", 1)


def test_delete_plain_and_at_a_version(backend: Backend):
    store, key = backend.store, backend.prefix + "k"
    store.delete(key)                                # absent: no error
    pair = store.put(key, "1")
    with pytest.raises(VersionConflict):
        store.delete(key, pair.version + 1000)
    assert store.get(key) is not None
    store.delete(key, pair.version)
    assert store.get(key) is None
    with pytest.raises(VersionConflict):
        store.delete(key, pair.version)              # gone: the version cannot match
    store.put(key, "again")
    store.delete(key)
    assert store.get(key) is None


# --- commit: all or nothing -----------------------------------------------------------------

def test_commit_applies_every_op_at_one_revision(backend: Backend):
    store, p = backend.store, backend.prefix
    old = store.put(p + "old", "1")
    doomed = store.put(p + "doomed", "x")
    revision = store.commit([Create(p + "new", "n"), Update(p + "old", "2", old.version),
                             Delete(p + "doomed", doomed.version), Delete(p + "never-was")])
    assert store.get(p + "new").value == "n" and store.get(p + "old").value == "2"
    assert store.get(p + "doomed") is None
    assert store.get(p + "new").version == store.get(p + "old").version == revision


@pytest.mark.parametrize("failing", ["create", "update", "versioned delete"])
def test_a_failing_op_means_no_op_applied_and_names_its_key(backend: Backend, failing: str):
    store, p = backend.store, backend.prefix
    existing = store.put(p + "existing", "1")
    victim = store.put(p + "victim", "v")
    bad = {"create": Create(p + "existing", "x"),
           "update": Update(p + "existing", "x", existing.version + 1000),
           "versioned delete": Delete(p + "existing", existing.version + 1000)}[failing]
    ops = [Create(p + "fresh", "f"), Delete(p + "victim"), bad, Update(p + "victim-2", "x", 1)]
    with pytest.raises(KeyExists if failing == "create" else VersionConflict) as raised:
        store.commit(ops)
    assert raised.value.key == p + "existing"        # the first failing key, not victim-2
    assert store.get(p + "fresh") is None
    assert store.get(p + "victim") == victim
    assert store.get(p + "existing") == existing


def test_commit_refuses_two_ops_on_one_key(backend: Backend):
    key = backend.prefix + "k"
    with pytest.raises(StoreConfigError, match="more than once"):
        backend.store.commit([Create(key, "1"), Delete(key)])


# --- concurrency ----------------------------------------------------------------------------

def increment(store, key: str, times: int) -> int:
    """Add 1 to the counter at key `times` times, retrying lost races; returns the conflicts."""
    conflicts = 0
    for _ in range(times):
        while True:
            pair = store.get(key)
            try:
                store.update(key, str(int(pair.value) + 1), pair.version)
                break
            except VersionConflict:
                conflicts += 1
    return conflicts


def test_cas_race_between_threads_loses_no_increment(backend: Backend):
    key, writers, times = backend.prefix + "counter", 6, 30
    backend.store.put(key, "0")
    clients = [backend.client() for _ in range(writers)]
    conflicts: list[int] = []
    threads = [threading.Thread(target=lambda c=client: conflicts.append(increment(c, key, times)))
               for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert backend.store.get(key).value == str(writers * times)
    assert len(conflicts) == writers


WORKER = """
import sys
from kvstore import open_store
from tests.kvstore.test_conformance import increment
increment(open_store(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
"""


def test_cas_race_between_processes_loses_no_increment(etcd_server):
    store = open_store(etcd_server.url)
    key, writers, times = "test/processes/counter", 4, 25
    store.put(key, "0")
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, etcd_server.url, key, str(times)], cwd=REPO)
               for _ in range(writers)]
    try:
        assert [worker.wait(60) for worker in workers] == [0] * writers
    finally:
        for worker in workers:
            worker.kill()
    assert store.get(key).value == str(writers * times)


# --- watch ----------------------------------------------------------------------------------

def test_watch_sees_every_change_in_order(backend: Backend):
    store, p = backend.store, backend.prefix
    store.put(p + "before", "old")
    start = store.revision() + 1
    watch = Collector(store.watch(p, start))
    store.put(p[:-1] + "x", "not under the prefix")
    expected = []
    for i in range(10):
        pair = store.put(p + f"k{i}", str(i))
        expected.append(("put", pair.key, pair.value, pair.version))
    pair = store.update(p + "k3", "three", store.get(p + "k3").version)
    expected.append(("put", p + "k3", "three", pair.version))
    revision = store.commit([Delete(p + "k5"), Delete(p + "before"), Create(p + "k10", "10")])
    expected += [("delete", p + "k5", None, revision), ("delete", p + "before", None, revision),
                 ("put", p + "k10", "10", revision)]
    final = {pair.key: pair.value for pair in store.list(p)[0]}

    if backend.exact_history:
        events = watch.take(len(expected))
        assert [(e.kind, e.key, e.value, e.revision) for e in events] == expected
    else:
        # Consul diffs listings: what arrives, replayed, is the final state, in revision order.
        events = watch.wait_for(lambda events: replay(events, {p + "before": "old"}) == final)
        assert replay(events, {p + "before": "old"}) == final
        assert [e.revision for e in events] == sorted(e.revision for e in events)
    watch.cancel()
    assert watch.error is None


def test_watch_resumes_from_a_revision_without_losing_or_repeating(backend: Backend):
    store, p = backend.store, backend.prefix
    first = Collector(store.watch(p, store.revision() + 1))
    for i in range(6):
        store.put(p + f"k{i}", str(i))
    seen = first.wait_for(lambda events: replay(events) == {f"{p}k{i}": str(i) for i in range(6)})
    first.cancel()
    if backend.exact_history:
        seen = seen[:3]     # a store with history resumes from any revision, even mid-way
    # (Consul resumes from where a watch left off: it remembers that listing.)
    resumed = Collector(store.watch(p, seen[-1].revision + 1))
    for i in range(6, 9):
        store.put(p + f"k{i}", str(i))
    final = {f"{p}k{i}": str(i) for i in range(9)}
    rest = resumed.wait_for(lambda events: replay(seen + events) == final)
    resumed.cancel()
    assert [e.key for e in seen + rest] == [f"{p}k{i}" for i in range(9)]


def test_consul_cannot_watch_from_a_revision_it_cannot_reconstruct(backend: Backend):
    if backend.name != "consul":
        pytest.skip("Consul only: the others keep history")
    store, p = backend.store, backend.prefix
    first = store.put(p + "a", "1")
    store.put(p + "a", "2")
    assert isinstance(Collector(store.watch(p, first.version)).ended(5), Compacted)


def test_watch_from_now_on(backend: Backend):
    store, p = backend.store, backend.prefix
    store.put(p + "old", "1")
    watch = Collector(store.watch(p, 0))
    store.put(p + "new", "2")
    assert [(e.kind, e.key) for e in watch.take(1)] == [("put", p + "new")]
    watch.cancel()


def test_cancel_ends_a_waiting_watch_quietly(backend: Backend):
    watch = Collector(backend.store.watch(backend.prefix, 0))
    time.sleep(0.1)
    started = time.monotonic()
    watch.cancel()
    assert watch.ended(5) is None
    assert time.monotonic() - started < 2


def test_watch_resumes_across_a_store_restart(restartable: Backend):
    store, p = restartable.store, restartable.prefix
    watch = Collector(store.watch(p, store.revision() + 1))
    for i in range(5):
        store.put(p + f"k{i}", str(i))
    seen = watch.wait_for(lambda events: replay(events) == {f"{p}k{i}": str(i) for i in range(5)})

    restartable.server.stop()
    assert isinstance(watch.ended(10), StoreError)
    with pytest.raises(StoreError, match="cannot reach"):
        store.get(p + "k0")
    restartable.server.start()

    for i in range(5, 10):
        store.put(p + f"k{i}", str(i))
    resumed = Collector(store.watch(p, seen[-1].revision + 1))
    final = {f"{p}k{i}": str(i) for i in range(10)}
    rest = resumed.wait_for(lambda events: replay(seen + events) == final)
    resumed.cancel()
    assert [e.key for e in rest] == [f"{p}k{i}" for i in range(5, 10)]


def test_watch_from_compacted_history_raises_compacted(backend: Backend):
    store, p = backend.store, backend.prefix
    first = store.put(p + "a", "1")
    store.put(p + "a", "2")
    store.put(p + "b", "3")
    backend.compact(store.revision())
    watch = Collector(store.watch(p, first.version))
    assert isinstance(watch.ended(10), Compacted)


def test_embedded_store_keeps_a_bounded_history(tmp_path):
    store = EmbeddedStore(str(tmp_path / "store.db"), history_limit=8)
    try:
        for i in range(40):
            store.put(f"k{i}", "v")
        recent = Collector(store.watch("", 40 - 8 + 1))
        assert [e.key for e in recent.take(8)] == [f"k{i}" for i in range(32, 40)]
        recent.cancel()
        assert isinstance(Collector(store.watch("", 1)).ended(5), Compacted)
    finally:
        store.close()


# --- leases ---------------------------------------------------------------------------------

def test_expired_lease_deletes_its_keys_and_a_refreshed_one_keeps_them(backend: Backend):
    store, p, ttl = backend.store, backend.prefix, backend.short_ttl
    kept, lapsed = store.grant_lease(ttl), store.grant_lease(ttl)
    assert kept.id != lapsed.id and kept.ttl >= ttl
    watch = Collector(store.watch(p, store.revision() + 1))
    store.put(p + "kept", "1", kept)
    store.create(p + "lapsed", "1", lapsed)
    assert store.get(p + "lapsed").lease == lapsed.id
    keeper = LeaseKeeper(kept).start()
    try:
        # Consul invalidates a session only after twice its TTL.
        gone = watch.wait_for(lambda events: any(e.kind == "delete" for e in events), 2 * lapsed.ttl + 5)
        assert [(e.kind, e.key) for e in gone if e.kind == "delete"] == [("delete", p + "lapsed")]
        assert store.get(p + "lapsed") is None
        time.sleep(kept.ttl)
        assert store.get(p + "kept").value == "1"   # a TTL and more past its expiry, without the keeper
    finally:
        keeper.stop()
    kept.revoke()
    assert [(e.kind, e.key) for e in watch.take(4)[2:]] == [("delete", p + "lapsed"), ("delete", p + "kept")]
    assert store.get(p + "kept") is None
    watch.cancel()


def test_an_expired_lease_cannot_be_refreshed_or_used(backend: Backend):
    store = backend.store
    lease = store.grant_lease(backend.short_ttl)
    lease.revoke()
    with pytest.raises(LeaseExpired):
        lease.refresh()
    with pytest.raises(LeaseExpired):
        store.put(backend.prefix + "k", "v", lease)
    with pytest.raises(LeaseExpired):
        store.create(backend.prefix + "k", "v", lease)
    assert store.get(backend.prefix + "k") is None


def test_lease_keeper_reports_a_lost_lease(backend: Backend):
    lease = backend.store.grant_lease(backend.short_ttl)
    lost = threading.Event()
    keeper = LeaseKeeper(lease, on_lost=lost.set).start()
    lease.revoke()
    assert lost.wait(lease.ttl + 5)
    keeper.stop()


# --- locks ----------------------------------------------------------------------------------

def test_lock_admits_one_holder_at_a_time(backend: Backend):
    name = backend.prefix.replace("/", "-") + "exclusive"
    inside, most_inside, entries = [0], [0], [0]
    guard = threading.Lock()

    def worker(store) -> None:
        for _ in range(4):
            with store.lock(name, timeout=30):
                with guard:
                    inside[0] += 1
                    most_inside[0] = max(most_inside[0], inside[0])
                time.sleep(0.005)
                with guard:
                    inside[0] -= 1
                    entries[0] += 1

    threads = [threading.Thread(target=worker, args=(backend.client(),)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert entries[0] == 16
    assert most_inside[0] == 1


def test_lock_of_a_dead_holder_frees_when_its_lease_lapses(backend: Backend):
    store = backend.store
    name = backend.prefix.replace("/", "-") + "orphan"
    dead_holder = store.grant_lease(backend.short_ttl)
    store.create(f"netd/locks/{name}", "locked", dead_holder)      # and then it died
    started = time.monotonic()
    with store.lock(name, timeout=2 * dead_holder.ttl + 10):
        assert time.monotonic() - started >= dead_holder.ttl * 0.9
    assert store.get(f"netd/locks/{name}") is None


def test_lock_wait_times_out(backend: Backend):
    store = backend.store
    name = backend.prefix.replace("/", "-") + "busy"
    with store.lock(name):
        started = time.monotonic()
        with pytest.raises(StoreError, match="timed out"):
            with backend.client().lock(name, timeout=0.5):
                pass
        assert time.monotonic() - started < 5


# --- scale ----------------------------------------------------------------------------------

def test_ten_thousand_keys_list_correctly(backend: Backend):
    store, p, count = backend.store, backend.prefix + "big/", 10_000
    keys = [f"{p}{i:05d}" for i in range(count)]
    batch = store.max_commit_ops
    for start in range(0, count, batch):
        store.commit([Create(key, f"v{key[-5:]}") for key in keys[start:start + batch]])
    store.put(backend.prefix + "big0", "sibling")
    pairs, revision = store.list(p)
    assert [pair.key for pair in pairs] == keys
    assert all(pair.value == f"v{pair.key[-5:]}" for pair in pairs)
    assert revision >= max(pair.version for pair in pairs)
    store.delete_prefix(p)
    assert store.list(p)[0] == []
    assert store.get(backend.prefix + "big0").value == "sibling"


def test_embedded_create_is_fast(tmp_path):
    """The target is 5,000 creates/s from one thread; fail only far below it (shared CI machines)."""
    store = EmbeddedStore(str(tmp_path / "store.db"))
    try:
        started = time.perf_counter()
        for i in range(2000):
            store.create(f"k/{i}", "v")
        assert 2000 / (time.perf_counter() - started) > 2000
    finally:
        store.close()


# --- bad addresses --------------------------------------------------------------------------

@pytest.mark.parametrize("scheme,name", [("etcd", "etcd"), ("consul", "Consul")])
def test_nothing_listening_fails_fast_and_clearly(scheme: str, name: str):
    port = free_port()
    started = time.monotonic()
    with pytest.raises(StoreError, match=f"cannot reach {name} at 127.0.0.1:{port}: connection refused"):
        open_store(f"{scheme}://127.0.0.1:{port}")
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("scheme,name", [("etcd", "etcd"), ("consul", "Consul")])
def test_a_host_that_drops_connections_fails_within_the_connect_timeout(scheme: str, name: str):
    # A listener whose accept queue is full drops new SYNs: connecting hangs, as to a dead host.
    with socket.create_server(("127.0.0.1", 0), backlog=0) as full:
        port = full.getsockname()[1]
        queued = []
        for _ in range(3):
            client = socket.socket()
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", port))
            queued.append(client)
        started = time.monotonic()
        try:
            with pytest.raises(StoreError, match=f"cannot reach {name} at 127.0.0.1:{port}: no answer"):
                open_store(f"{scheme}://127.0.0.1:{port}")
        finally:
            for client in queued:
                client.close()
        assert time.monotonic() - started < 4


class NotAStore(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "17")
        self.end_headers()
        self.wfile.write(b"<html>hi</html>\r\n")

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("scheme,name", [("etcd", "etcd"), ("consul", "Consul")])
def test_a_web_server_is_not_a_store(scheme: str, name: str):
    server = HTTPServer(("127.0.0.1", 0), NotAStore)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(StoreError, match=f"answers, but is not {name}"):
            open_store(f"{scheme}://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("scheme", ["etcd", "consul"])
def test_a_port_that_never_answers_fails_fast(scheme: str):
    with socket.create_server(("127.0.0.1", 0)) as silent:        # accepts, never replies
        started = time.monotonic()
        with pytest.raises(StoreError):
            open_store(f"{scheme}://127.0.0.1:{silent.getsockname()[1]}")
        assert time.monotonic() - started < 5


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379", "etcd://", "etcd://:2379", "etcd://host:port", "etcd://host:99999",
    "consul://host:8500/v1/kv", "etcd://host:2379?x=1", "sqlite://relative.db", "sqlite://",
])
def test_open_store_refuses_bad_urls(url: str):
    with pytest.raises(StoreConfigError):
        open_store(url)


def test_open_store_opens_sqlite_urls_and_paths(tmp_path):
    for url in (f"sqlite://{tmp_path}/a.db", str(tmp_path / "b.db")):
        store = open_store(url)
        try:
            assert isinstance(store, EmbeddedStore)
            store.put("k", "v")
            assert store.get("k").value == "v"
        finally:
            store.close()


def test_every_process_is_gone_after_a_server_is_closed():
    from tests.support.etcd_server import EtcdServer
    server = EtcdServer()
    pid = server.process.pid
    server.close()
    assert not os.path.exists(f"/proc/{pid}") or wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 5)
    assert not os.path.exists(server.data_root)


def test_check_guards_a_commit_and_writes_nothing(backend: Backend):
    guard, key = backend.prefix + "guard", backend.prefix + "guarded"
    pair = backend.store.put(guard, "open")
    backend.store.commit([Check(guard, pair.version), Create(key, "1")])
    assert backend.store.get(key).value == "1" and backend.store.get(guard).version == pair.version
    backend.store.put(guard, "closing")
    with pytest.raises(VersionConflict):
        backend.store.commit([Check(guard, pair.version), Create(key + "2", "1")])
    assert backend.store.get(key + "2") is None
