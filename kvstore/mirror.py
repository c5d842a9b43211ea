"""Mirror: a live local copy of one prefix of a store, for any backend.

    nodes = Mirror(store, "netd/nodes/", on_put=add_peer, on_delete=remove_peer).start()
    nodes.wait_synced(5)
    for key, pair in nodes.items().items(): ...

It lists the prefix, then watches from the listing's revision + 1. When the watch fails
(StoreError: the store went away) it retries with backoff and resumes from the last
revision it applied + 1, so nothing is lost; when the store no longer has that history
(Compacted) it lists again and diffs the listing against its copy. Either way the callbacks
see each change once, as a put (the new KVPair) or a delete (the last KVPair known), and
always in the mirror's thread. A callback that raises is logged and does not stop the mirror.

The copy holds keys, values and versions; not leases (watch events do not carry them), so
every mirrored KVPair has lease 0.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from kvstore import Compacted, Event, KVPair, KVStore, StoreError, Watch

log = logging.getLogger(__name__)


class Mirror:
    def __init__(self, store: KVStore, prefix: str,
                 on_put: Callable[[KVPair], None] | None = None,
                 on_delete: Callable[[KVPair], None] | None = None,
                 retry_delay: float = 0.1, max_retry_delay: float = 5.0):
        self.store = store
        self.prefix = prefix
        self.on_put = on_put
        self.on_delete = on_delete
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        self.connected = False          # the store answered since the last failure
        self.revision = 0               # the last revision applied
        self._pairs: dict[str, KVPair] = {}
        self._lock = threading.Lock()   # guards _pairs and _watch
        self._watch: Watch | None = None
        self._synced = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"mirror {prefix}", daemon=True)

    # --- the caller's side ------------------------------------------------------------------

    def start(self) -> Mirror:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
            if self._watch is not None:
                self._watch.cancel()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait until the first listing has been loaded; False on timeout."""
        return self._synced.wait(timeout)

    def items(self) -> dict[str, KVPair]:
        """A snapshot of the copy: key -> KVPair."""
        with self._lock:
            return dict(self._pairs)

    def get(self, key: str) -> KVPair | None:
        with self._lock:
            return self._pairs.get(key)

    # --- the mirror's thread ----------------------------------------------------------------

    def _run(self) -> None:
        delay = self.retry_delay
        must_list = True
        while not self._stopping.is_set():
            try:
                if must_list:
                    self._resync()
                    must_list = False
                else:
                    self.store.revision()   # is the store back? then resume where we left off
                self.connected = True
                delay = self.retry_delay
                self._follow()
            except Compacted:
                log.info("mirror of %s: history compacted, listing again", self.prefix)
                must_list = True
            except Exception as error:  # noqa: BLE001 - the mirror's thread must never die
                self.connected = False
                if self._stopping.is_set():
                    break
                if not isinstance(error, StoreError):   # garbage in the store, a bug: list afresh
                    log.exception("mirror of %s failed; listing again in %.2fs", self.prefix, delay)
                    must_list = True
                else:
                    log.warning("mirror of %s: %s; retrying in %.2fs", self.prefix, error, delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, self.max_retry_delay)
        self.connected = False

    @property
    def alive(self) -> bool:
        """The mirror's thread runs (it has not died, and it was started)."""
        return self._thread.is_alive()

    def _resync(self) -> None:
        """List the prefix and turn the copy into the listing, with callbacks for the difference."""
        pairs, revision = self.store.list(self.prefix)
        listed = {pair.key: KVPair(pair.key, pair.value, pair.version) for pair in pairs}
        for key, pair in self.items().items():
            if key not in listed:
                self._apply_delete(pair)
        for key, pair in listed.items():
            known = self.get(key)
            if known is None or known.version != pair.version:
                self._apply_put(pair)
        self.revision = revision
        self._synced.set()

    def _follow(self) -> None:
        """Apply the watch's events until it is cancelled (stop) or raises."""
        watch = self.store.watch(self.prefix, self.revision + 1)
        with self._lock:
            if self._stopping.is_set():
                return
            self._watch = watch
        try:
            for event in watch:
                self._apply(event)
        finally:
            with self._lock:
                self._watch = None
        if not self._stopping.is_set():
            raise StoreError(f"the watch on {self.prefix} ended")

    def _apply(self, event: Event) -> None:
        known = self.get(event.key)
        # Skip what the copy already has (a resumed watch may repeat an event).
        if event.kind == "put" and (known is None or known.version < event.revision):
            self._apply_put(KVPair(event.key, event.value or "", event.revision))
        elif event.kind == "delete" and known is not None and known.version < event.revision:
            self._apply_delete(known)
        self.revision = max(self.revision, event.revision)

    def _apply_put(self, pair: KVPair) -> None:
        with self._lock:
            self._pairs[pair.key] = pair
        self._call(self.on_put, pair)

    def _apply_delete(self, pair: KVPair) -> None:
        with self._lock:
            self._pairs.pop(pair.key, None)
        self._call(self.on_delete, pair)

    def _call(self, callback: Callable[[KVPair], None] | None, pair: KVPair) -> None:
        if callback is None:
            return
        try:
            callback(pair)
        except Exception:
            log.exception("mirror of %s: callback for %s failed", self.prefix, pair.key)
