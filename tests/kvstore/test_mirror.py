"""Mirror: a live copy of a prefix that survives dropped connections and compaction."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from kvstore import KVPair, KVStore, open_store
from kvstore.embedded import EmbeddedStore
from kvstore.mirror import Mirror
from tests.support.etcd_server import EtcdServer

from .conftest import Backend, wait_until


class Recorder:
    """Callbacks that log every change the mirror reports."""

    def __init__(self):
        self.log: list[tuple[str, str, str | None]] = []

    def on_put(self, pair: KVPair) -> None:
        self.log.append(("put", pair.key, pair.value))

    def on_delete(self, pair: KVPair) -> None:
        self.log.append(("delete", pair.key, None))

    def state(self) -> dict[str, str]:
        state: dict[str, str] = {}
        for kind, key, value in self.log:
            if kind == "put":
                state[key] = value
            else:
                state.pop(key, None)
        return state


def store_state(store: KVStore, prefix: str) -> dict[str, str]:
    return {pair.key: pair.value for pair in store.list(prefix)[0]}


def mirror_state(mirror: Mirror) -> dict[str, str]:
    return {key: pair.value for key, pair in mirror.items().items()}


def in_sync(mirror: Mirror, store: KVStore, recorder: Recorder) -> Callable[[], bool]:
    def check() -> bool:
        expected = store_state(store, mirror.prefix)
        return mirror_state(mirror) == expected and recorder.state() == expected
    return check


def test_mirror_loads_the_prefix_then_follows_it(backend: Backend):
    store, p = backend.store, backend.prefix
    store.put(p + "a", "1")
    store.put(p + "b", "1")
    store.put(p[:-1] + "x", "not mirrored")
    recorder = Recorder()
    mirror = Mirror(store, p, recorder.on_put, recorder.on_delete).start()
    try:
        assert mirror.wait_synced(10)
        assert mirror_state(mirror) == {p + "a": "1", p + "b": "1"}
        assert mirror.get(p + "a").value == "1" and mirror.get(p + "zzz") is None

        store.put(p + "c", "1")
        store.update(p + "a", "2", store.get(p + "a").version)
        store.delete(p + "b")
        assert wait_until(in_sync(mirror, store, recorder))
        assert mirror.connected
        if backend.exact_history:
            assert recorder.log[2:] == [("put", p + "c", "1"), ("put", p + "a", "2"), ("delete", p + "b", None)]
    finally:
        mirror.stop()
    assert not mirror.connected


def test_stop_is_prompt(backend: Backend):
    mirror = Mirror(backend.store, backend.prefix).start()
    assert mirror.wait_synced(10)
    stopper = threading.Thread(target=mirror.stop)
    stopper.start()
    stopper.join(3)
    assert not stopper.is_alive()


def test_a_failing_callback_does_not_stop_the_mirror(tmp_path):
    store = EmbeddedStore(str(tmp_path / "store.db"))
    seen = []

    def on_put(pair: KVPair) -> None:
        seen.append(pair.key)
        raise RuntimeError("a buggy callback")

    mirror = Mirror(store, "p/", on_put).start()
    try:
        store.put("p/1", "x")
        store.put("p/2", "x")
        assert wait_until(lambda: seen == ["p/1", "p/2"])
        assert set(mirror.items()) == {"p/1", "p/2"}
    finally:
        mirror.stop()
        store.close()


def test_mirror_resumes_after_the_store_comes_back(restartable: Backend):
    store, p = restartable.store, restartable.prefix
    store.put(p + "before", "1")
    recorder = Recorder()
    mirror = Mirror(store, p, recorder.on_put, recorder.on_delete, retry_delay=0.05, max_retry_delay=0.3).start()
    try:
        assert mirror.wait_synced(10)
        store.put(p + "a", "1")
        assert wait_until(in_sync(mirror, store, recorder))

        restartable.server.stop()
        assert wait_until(lambda: not mirror.connected, 10)
        restartable.server.start()
        seen = len(recorder.log)
        store.put(p + "b", "1")
        store.delete(p + "a")
        assert wait_until(in_sync(mirror, store, recorder))
        assert wait_until(lambda: mirror.connected, 5)
        # Resumed from where it was: just the two changes, no resync replaying old ones.
        assert recorder.log[seen:] == [("put", p + "b", "1"), ("delete", p + "a", None)]
    finally:
        mirror.stop()


def resync_after_compaction(store: KVStore, prefix: str, break_stream: Callable[[], None],
                            compact: Callable[[int], None]) -> None:
    """Hold the mirror inside a callback while the history it needs next is compacted away."""
    p = prefix
    for key in ("keep", "doomed", "changed"):
        store.put(p + key, "1")
    gate, held = threading.Event(), threading.Event()
    recorder = Recorder()

    def on_put(pair: KVPair) -> None:
        recorder.on_put(pair)
        if pair.key == p + "gate":
            held.set()
            gate.wait(20)

    mirror = Mirror(store, p, on_put, recorder.on_delete, retry_delay=0.05, max_retry_delay=0.3).start()
    try:
        assert mirror.wait_synced(10)
        store.put(p + "gate", "1")
        assert held.wait(10)
        break_stream()
        store.delete(p + "doomed")
        store.put(p + "changed", "2")
        for i in range(10):
            store.put(p + "churn", str(i))
        compact(store.revision())
        seen = len(recorder.log)
        gate.set()
        assert wait_until(in_sync(mirror, store, recorder))
        # A resync, not a replay: the churn arrives as its last value only.
        assert sorted(recorder.log[seen:]) == [("delete", p + "doomed", None), ("put", p + "changed", "2"),
                                               ("put", p + "churn", "9")]
    finally:
        gate.set()
        mirror.stop()


def test_mirror_resyncs_after_compaction_embedded(tmp_path):
    store = EmbeddedStore(str(tmp_path / "store.db"), history_limit=4)
    try:
        resync_after_compaction(store, "m/", lambda: None, store.compact)
    finally:
        store.close()


@pytest.fixture
def own_etcd():
    with EtcdServer() as server:
        yield server


def test_mirror_resyncs_after_compaction_and_an_etcd_restart(own_etcd):
    store = open_store(own_etcd.url)

    def restart() -> None:      # the mirror's stream dies; it must watch again, from compacted history
        own_etcd.stop()
        own_etcd.start()

    try:
        resync_after_compaction(store, "m/", restart, store.compact)
    finally:
        store.close()
