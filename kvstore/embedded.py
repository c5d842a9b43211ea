"""The embedded store: one SQLite file, for a single host's state. No server needed.

One connection, guarded by a lock, serves every thread (SQLite in WAL mode with
synchronous=NORMAL: a commit is durable against a crash of netd, and costs no fsync).
Every change bumps one global revision and is recorded in a history table, so a watch can
resume from any revision that has not been compacted away. Watches run in-process: they
sleep on a condition that every commit notifies. Leases are rows with an expiry time; a
reaper thread deletes the keys of expired leases at the moment they expire.

The file belongs to one process: other processes may read it (and their writes are safe),
but only the owning process's watches see changes.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from kvstore import (
    Check,
    Compacted,
    Create,
    Delete,
    Event,
    KeyExists,
    KVPair,
    KVStore,
    Lease,
    LeaseExpired,
    Op,
    StoreError,
    Update,
    VersionConflict,
    Watch,
    check_ops,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key     TEXT PRIMARY KEY,
    value   TEXT NOT NULL,
    version INTEGER NOT NULL,
    lease   INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_by_lease ON kv (lease) WHERE lease != 0;
CREATE TABLE IF NOT EXISTS history (
    revision INTEGER NOT NULL,
    seq      INTEGER NOT NULL,      -- order of the changes within one revision
    kind     TEXT NOT NULL,         -- 'put' or 'delete'
    key      TEXT NOT NULL,
    value    TEXT,
    PRIMARY KEY (revision, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases (
    id      INTEGER PRIMARY KEY,
    ttl     REAL NOT NULL,
    expires REAL NOT NULL           -- wall-clock time: it must survive a restart of netd
);
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
-- The current revision is the newest in history, or the compacted one if history is empty:
-- no counter row to rewrite at every commit (WITHOUT ROWID tables: one page per write each).
INSERT OR IGNORE INTO meta VALUES ('compacted', 0);
"""

WATCH_BATCH = 1000          # history rows a watch reads at a time


@dataclass(frozen=True)
class _Put:
    """Internal op: an unconditional write (put())."""
    key: str
    value: str
    lease: int = 0


class EmbeddedStore(KVStore):
    def __init__(self, path: str, history_limit: int = 10_000):
        """`history_limit`: how many revisions of history watches can resume from (at least)."""
        self.url = f"sqlite://{path}"
        self.history_limit = history_limit
        try:
            # Private from the start (SQLite gives its -wal and -shm files the database's mode):
            # the store holds every container's command line and environment.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            os.chmod(path, 0o600)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(SCHEMA)
        except sqlite3.Error as error:
            raise StoreError(f"cannot open the store file {path}: {error}") from None
        self._lock = threading.Lock()               # guards the connection
        self._changed = threading.Condition()       # notified after every commit
        self._head = self._revisions()[0]         # latest revision, for watches to wait on
        self._new_head = 0
        self._closed = False
        self._leases_changed = threading.Condition()
        self._reaper = threading.Thread(target=self._reap_expired_leases, name="kvstore-lease-reaper",
                                        daemon=True)
        self._reaper.start()

    # --- reads ------------------------------------------------------------------------------

    def get(self, key: str) -> KVPair | None:
        with self._reading() as db:
            row = db.execute("SELECT key, value, version, lease FROM kv WHERE key = ?", (key,)).fetchone()
        return KVPair(*row) if row else None

    def list(self, prefix: str) -> tuple[list[KVPair], int]:
        where, args = _prefix_clause(prefix)
        with self._reading() as db:
            rows = db.execute(f"SELECT key, value, version, lease FROM kv WHERE {where} ORDER BY key",
                              args).fetchall()
            revision, _ = self._revisions()
        return [KVPair(*row) for row in rows], revision

    def revision(self) -> int:
        with self._reading():
            return self._revisions()[0]

    # --- writes -----------------------------------------------------------------------------

    def put(self, key: str, value: str, lease: Lease | None = None) -> KVPair:
        lease_id = lease.id if lease else 0
        revision = self._apply([_Put(key, value, lease_id)])
        return KVPair(key, value, revision, lease_id)

    def commit(self, ops: list[Op]) -> int:
        check_ops(ops)
        return self._apply(ops)

    def _apply(self, ops: list[Op | _Put]) -> int:
        """Check every op, then apply them all at one new revision (or none, raising)."""
        with self._writing() as db:
            revision, _ = self._revisions()
            now = time.time()
            for op in ops:
                row = db.execute("SELECT version FROM kv WHERE key = ?", (op.key,)).fetchone()
                if isinstance(op, Create) and row:
                    raise KeyExists(op.key)
                if isinstance(op, (Update, Check)) and (not row or row[0] != op.version):
                    raise VersionConflict(op.key)
                if isinstance(op, Delete) and op.version is not None and (not row or row[0] != op.version):
                    raise VersionConflict(op.key)
                lease = getattr(op, "lease", 0)
                if lease and not db.execute("SELECT 1 FROM leases WHERE id = ? AND expires > ?",
                                            (lease, now)).fetchone():
                    raise LeaseExpired(lease)
            changes = []
            for op in ops:
                if isinstance(op, Check):
                    continue
                if isinstance(op, Delete):
                    if db.execute("DELETE FROM kv WHERE key = ?", (op.key,)).rowcount:
                        changes.append(("delete", op.key, None))
                else:
                    db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?)",
                               (op.key, op.value, revision + 1, op.lease))
                    changes.append(("put", op.key, op.value))
            if not changes:
                return revision
            return self._record(db, revision + 1, changes)

    def delete_prefix(self, prefix: str) -> None:
        where, args = _prefix_clause(prefix)
        with self._writing() as db:
            keys = [row[0] for row in db.execute(f"SELECT key FROM kv WHERE {where} ORDER BY key", args)]
            if keys:
                db.execute(f"DELETE FROM kv WHERE {where}", args)
                self._record(db, self._revisions()[0] + 1, [("delete", key, None) for key in keys])

    def _record(self, db: sqlite3.Connection, revision: int, changes: list[tuple[str, str, str | None]]) -> int:
        """Within a write transaction: log the changes at `revision` and make it the head."""
        for seq, (kind, key, value) in enumerate(changes):
            db.execute("INSERT INTO history VALUES (?, ?, ?, ?, ?)", (revision, seq, kind, key, value))
        # Compact in batches, every quarter of the limit, rather than a row at every commit.
        if revision % max(1, self.history_limit // 4) == 0 and revision > self.history_limit:
            self._compact(db, revision - self.history_limit)
        self._new_head = revision
        return revision

    def compact(self, revision: int) -> None:
        """Forget the history up to and including `revision` (etcd's compaction)."""
        with self._writing() as db:
            head, compacted = self._revisions()
            if revision > compacted:
                self._compact(db, min(revision, head))

    def _compact(self, db: sqlite3.Connection, revision: int) -> None:
        db.execute("DELETE FROM history WHERE revision <= ?", (revision,))
        db.execute("UPDATE meta SET value = ? WHERE name = 'compacted'", (revision,))

    # --- leases -----------------------------------------------------------------------------

    def grant_lease(self, ttl: float) -> Lease:
        with self._writing() as db:
            lease_id = db.execute("INSERT INTO leases (ttl, expires) VALUES (?, ?)",
                                  (ttl, time.time() + ttl)).lastrowid
        with self._leases_changed:      # the reaper may have to wake up sooner
            self._leases_changed.notify()
        return _EmbeddedLease(self, lease_id, ttl)

    def _refresh_lease(self, lease_id: int, ttl: float) -> None:
        with self._writing() as db:
            now = time.time()
            if not db.execute("UPDATE leases SET expires = ? WHERE id = ? AND expires > ?",
                              (now + ttl, lease_id, now)).rowcount:
                raise LeaseExpired(lease_id)

    def _end_leases(self, where: str, args: tuple) -> None:
        """Delete the leases matching `where` and their keys, at one new revision."""
        with self._writing() as db:
            lease_ids = [row[0] for row in db.execute(f"SELECT id FROM leases WHERE {where}", args)]
            if not lease_ids:
                return
            marks = ",".join("?" * len(lease_ids))
            keys = [row[0] for row in db.execute(f"SELECT key FROM kv WHERE lease IN ({marks}) ORDER BY key",
                                                 lease_ids)]
            db.execute(f"DELETE FROM kv WHERE lease IN ({marks})", lease_ids)
            db.execute(f"DELETE FROM leases WHERE id IN ({marks})", lease_ids)
            if keys:
                self._record(db, self._revisions()[0] + 1, [("delete", key, None) for key in keys])

    def _reap_expired_leases(self) -> None:
        """Background thread: sleep until the next lease expires, then delete its keys."""
        while True:
            with self._leases_changed:
                if self._closed:
                    return
                with self._reading() as db:
                    next_expiry = db.execute("SELECT MIN(expires) FROM leases").fetchone()[0]
                if next_expiry is None or next_expiry > time.time():
                    # grant_lease notifies under this condition, so no wake-up is lost.
                    self._leases_changed.wait(None if next_expiry is None else next_expiry - time.time())
                    continue
            with contextlib.suppress(StoreError):
                self._end_leases("expires <= ?", (time.time(),))

    # --- watch ------------------------------------------------------------------------------

    def watch(self, prefix: str, start_revision: int) -> Watch:
        return _EmbeddedWatch(self, prefix, start_revision if start_revision > 0 else self.revision() + 1)

    def _events_from(self, prefix: str, revision: int) -> tuple[list[Event], int]:
        """Events under prefix from `revision` on (a batch), and the revision to read from next."""
        where, args = _prefix_clause(prefix)
        query = f"SELECT revision, kind, key, value FROM history WHERE revision >= ? AND {where}"
        with self._reading() as db:
            head, compacted = self._revisions()
            if revision <= compacted:
                raise Compacted(revision)
            rows = db.execute(f"{query} ORDER BY revision, seq LIMIT {WATCH_BATCH}", (revision, *args)).fetchall()
            next_revision = head + 1
            if len(rows) == WATCH_BATCH:
                # The last revision read may go on beyond the batch: leave it for the next
                # batch, or, if it fills the whole batch, read all of it now.
                last = rows[-1][0]
                rows = [row for row in rows if row[0] < last] or db.execute(
                    f"{query} AND revision = ? ORDER BY seq", (revision, *args, last)).fetchall()
                next_revision = rows[-1][0] + 1
        return [Event(kind, key, value, rev) for rev, kind, key, value in rows], next_revision

    def _wait_for_revision(self, revision: int, watch: _EmbeddedWatch) -> None:
        with self._changed:
            while self._head < revision and not watch.cancelled and not self._closed:
                self._changed.wait()
        if self._closed and not watch.cancelled:
            raise StoreError(f"the store {self.url} is closed")

    def _wake_watches(self) -> None:
        with self._changed:
            self._changed.notify_all()

    # --- plumbing ---------------------------------------------------------------------------

    def close(self) -> None:
        with self._leases_changed:
            self._closed = True
            self._leases_changed.notify()
        self._wake_watches()
        self._reaper.join()
        with self._lock:
            self._db.close()

    def _revisions(self) -> tuple[int, int]:
        """The current revision and the last compacted one, in one query."""
        compacted = "(SELECT value FROM meta WHERE name = 'compacted')"
        return self._db.execute(f"SELECT max(ifnull((SELECT max(revision) FROM history), 0), {compacted}),"
                                f" {compacted}").fetchone()

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._closed:
                raise StoreError(f"the store {self.url} is closed")
            try:
                yield self._db
            except sqlite3.Error as error:
                raise StoreError(f"the store {self.url} failed: {error}") from None

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; rolled back if the block raises. Wakes watches after."""
        with self._reading() as db:
            # IMMEDIATE: take the write lock now, so reads inside see what we will write over.
            db.execute("BEGIN IMMEDIATE")
            self._new_head = 0          # set by _record()
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            new_head = self._new_head
        if new_head:
            with self._changed:
                self._head = new_head
                self._changed.notify_all()


class _EmbeddedLease(Lease):
    def __init__(self, store: EmbeddedStore, lease_id: int, ttl: float):
        self._store = store
        self.id = lease_id
        self.ttl = ttl

    def refresh(self) -> None:
        self._store._refresh_lease(self.id, self.ttl)

    def revoke(self) -> None:
        self._store._end_leases("id = ?", (self.id,))


class _EmbeddedWatch(Watch):
    def __init__(self, store: EmbeddedStore, prefix: str, start_revision: int):
        self._store = store
        self._prefix = prefix
        self._start_revision = start_revision
        self.cancelled = False

    def __iter__(self) -> Iterator[Event]:
        store = self._store
        revision = self._start_revision
        while not self.cancelled:
            events, revision = store._events_from(self._prefix, revision)
            for event in events:
                if self.cancelled:
                    return
                yield event
            store._wait_for_revision(revision, self)

    def cancel(self) -> None:
        self.cancelled = True
        self._store._wake_watches()


def _prefix_clause(prefix: str) -> tuple[str, tuple[object, ...]]:
    """SQL matching keys that start with prefix, as a range so that the index serves it."""
    if not prefix:
        return "1", ()
    # The least string above every string starting with prefix: bump its last character,
    # skipping the surrogates. (SQLite compares text as UTF-8 bytes: code point order.)
    bumped = ord(prefix[-1]) + 1
    if 0xD800 <= bumped <= 0xDFFF:
        bumped = 0xE000
    if bumped > 0x10FFFF:
        return "substr(key, 1, ?) = ?", (len(prefix), prefix)
    return "key >= ? AND key < ?", (prefix, prefix[:-1] + chr(bumped))
