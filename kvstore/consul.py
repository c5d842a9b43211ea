"""Consul through its HTTP API: KV, /v1/txn, sessions, blocking queries.

- A key's version is its ModifyIndex; a store revision is an X-Consul-Index.
- commit() is one /v1/txn: Create is `cas` at index 0 (or `check-not-exists` then `lock`
  when leased), Update is `cas` at the version read (or `check-index` then `lock`), Delete
  is `delete` or `delete-cas`. A rolled-back txn says which op failed (OpIndex).
- Leases are sessions with Behavior=delete: their keys vanish when they are invalidated.
  Consul counts TTLs from 10 s up and invalidates a session only after twice its TTL; a
  lease's `ttl` is the TTL asked of Consul. LockDelay is 0: a lock freed by a dead holder is
  free at once. Lease ids are the session's UUID folded to an int.
- Consul keeps no history: a watch runs blocking queries on the prefix and diffs
  successive listings, so changes to one key between two listings arrive as one event.
  A watch can start at `start_revision` only if it knows the prefix's state just before
  it: nothing changed since, or a listing at exactly that index is remembered (list() and
  every watch remember theirs). Otherwise it raises Compacted and the caller lists again.

Known differences from etcd: a plain put or update of a key that is held by a session
keeps it attached to that session (Consul only releases a lock through its holder).
"""

from __future__ import annotations

import base64
import collections
import http.client
import json
import threading
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

from kvstore import (
    Check,
    Compacted,
    Create,
    Delete,
    Event,
    HttpClient,
    HttpReply,
    HttpStream,
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
    describe_failure,
)
from kvstore.security import StoreCredentials

CONNECT_TIMEOUT = 2.0
WATCH_WAIT = 30             # seconds a blocking query may wait for a change
REMEMBERED_LISTINGS = 8     # listings kept for watches to resume from (each a whole prefix)


class ConsulStore(KVStore):
    # /v1/txn takes 64 ops (128 in recent Consul versions), and a leased write takes two.
    max_commit_ops = 32

    def __init__(self, host: str, port: int, timeout: float = 5.0, min_session_ttl: float = 10.0,
                 credentials: StoreCredentials | None = None):
        """`min_session_ttl`: Consul refuses TTLs under 10 s (a test double may allow less)."""
        self.url = f"consul://{host}:{port}"
        self.host, self.port = host, port
        self.min_session_ttl = min_session_ttl
        credentials = credentials or StoreCredentials()
        self.tls = credentials.ssl_context()
        self.headers = {"X-Consul-Token": credentials.token} if credentials.token else {}
        self._http = HttpClient(host, port, min(CONNECT_TIMEOUT, timeout), timeout, tls=self.tls, headers=self.headers)
        self._sessions: dict[int, str] = {}     # lease id -> session ID, for the leases granted here
        self._listings: collections.OrderedDict[tuple[str, int], dict[str, KVPair]] = collections.OrderedDict()
        self._listings_lock = threading.Lock()
        self._check_is_consul()

    def _check_is_consul(self) -> None:
        reply = self._request("GET", "/v1/status/leader", timeout=CONNECT_TIMEOUT)
        try:
            leader = reply.json()
        except ValueError:
            leader = None
        if not isinstance(leader, str):
            raise StoreError(f"{self.host}:{self.port} answers, but is not Consul (GET /v1/status/leader)")
        if not leader:
            raise StoreError(f"Consul at {self.host}:{self.port} has no leader")

    # --- reads ------------------------------------------------------------------------------

    def get(self, key: str) -> KVPair | None:
        reply = self._request("GET", f"/v1/kv/{quote(key)}", ok=(200, 404))
        return self._pair(reply.json()[0]) if reply.status_code == 200 else None

    def list(self, prefix: str) -> tuple[list[KVPair], int]:
        reply = self._request("GET", f"/v1/kv/{quote(prefix)}?recurse", ok=(200, 404))
        pairs, index = self._listing(reply.status_code, reply.headers, reply.content)
        self._remember(prefix, index, pairs)
        return sorted(pairs.values(), key=lambda pair: pair.key), index

    def revision(self) -> int:
        # Listing the top level of the keyspace answers with the index of the whole KV store.
        return _index(self._request("GET", "/v1/kv/?keys&separator=/", ok=(200, 404)).headers)

    def _listing(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> tuple[dict[str, KVPair], int]:
        """The pairs of a KV listing (404: none) and its X-Consul-Index."""
        entries = json.loads(body) if status == 200 else []
        return {entry["Key"]: self._pair(entry) for entry in entries or []}, _index(headers)

    # --- writes -----------------------------------------------------------------------------

    def put(self, key: str, value: str, lease: Lease | None = None) -> KVPair:
        lease_id = lease.id if lease else 0
        if lease_id:
            operation = {"Verb": "lock", "Key": key, "Value": _encode(value), "Session": self._session(lease_id)}
        else:
            operation = {"Verb": "set", "Key": key, "Value": _encode(value)}
        # (A set cannot fail; a lock fails only for its lease, which the Create stand-in carries.)
        revision = self._txn([operation], [Create(key, value, lease_id)])
        return KVPair(key, value, revision, lease_id)

    def commit(self, ops: list[Op]) -> int:
        check_ops(ops)
        operations, sources = [], []
        for op in ops:
            for operation in self._operations(op):
                operations.append(operation)
                sources.append(op)
        return self._txn(operations, sources) if operations else self.revision()

    def _operations(self, op: Op) -> list[dict[str, Any]]:
        """The Consul txn ops for one of ours."""
        if isinstance(op, Check):
            return [{"Verb": "check-index", "Key": op.key, "Index": op.version}]
        if isinstance(op, Delete):
            if op.version is None:
                return [{"Verb": "delete", "Key": op.key}]
            return [{"Verb": "delete-cas", "Key": op.key, "Index": op.version}]
        version = 0 if isinstance(op, Create) else op.version
        if not op.lease:
            return [{"Verb": "cas", "Key": op.key, "Value": _encode(op.value), "Index": version}]
        check = ({"Verb": "check-not-exists", "Key": op.key} if isinstance(op, Create)
                 else {"Verb": "check-index", "Key": op.key, "Index": version})
        session = self._session(op.lease)
        release = []
        if isinstance(op, Update):
            # The key may still be locked by the session of an earlier lease (a daemon restarted
            # within its TTL takes its host key over): the caller saw this very version, so it
            # moves the key to the new session, in the same txn as the check.
            holder = self._holder(op.key)
            if holder and holder != session:
                release = [{"Verb": "unlock", "Key": op.key, "Session": holder}]
        return [check, *release, {"Verb": "lock", "Key": op.key, "Value": _encode(op.value), "Session": session}]

    def _holder(self, key: str) -> str | None:
        reply = self._request("GET", f"/v1/kv/{quote(key)}", ok=(200, 404))
        return reply.json()[0].get("Session") if reply.status_code == 200 else None

    def _txn(self, operations: list[dict[str, Any]], sources: list[Op]) -> int:
        """Run a txn; `sources[i]` is our op behind `operations[i]`, to name a failure."""
        reply = self._request("PUT", "/v1/txn", [{"KV": operation} for operation in operations], ok=(200, 409))
        body = reply.json()
        if reply.status_code == 409:
            error = (body.get("Errors") or [{}])[0]
            index = error.get("OpIndex", 0)
            raise _failure(operations[index], sources[index], error.get("What", ""))
        indexes = [result["KV"]["ModifyIndex"] for result in body.get("Results") or [] if "KV" in result]
        # Deletes return no results: then the store's index after the txn stands for it.
        return max(indexes) if indexes else self.revision()

    def delete_prefix(self, prefix: str) -> None:
        self._request("DELETE", f"/v1/kv/{quote(prefix)}?recurse")

    # --- leases -----------------------------------------------------------------------------

    def grant_lease(self, ttl: float) -> Lease:
        ttl = max(ttl, self.min_session_ttl)
        reply = self._request("PUT", "/v1/session/create", {
            "Name": "netd", "TTL": f"{ttl:g}s", "Behavior": "delete", "LockDelay": "0s"})
        session = reply.json()["ID"]
        lease = _ConsulLease(self, session, ttl)
        self._sessions[lease.id] = session
        return lease

    def _session(self, lease_id: int) -> str:
        try:
            return self._sessions[lease_id]
        except KeyError:
            raise LeaseExpired(lease_id) from None

    def _pair(self, entry: dict[str, Any]) -> KVPair:
        session = entry.get("Session")
        return KVPair(entry["Key"], _decode(entry.get("Value")), entry["ModifyIndex"],
                      _lease_id(session) if session else 0)

    # --- watch ------------------------------------------------------------------------------

    def watch(self, prefix: str, start_revision: int) -> Watch:
        return _ConsulWatch(self, prefix, start_revision if start_revision > 0 else self.revision() + 1)

    def _remember(self, prefix: str, index: int, pairs: dict[str, KVPair]) -> None:
        with self._listings_lock:
            self._listings[(prefix, index)] = pairs
            self._listings.move_to_end((prefix, index))
            while len(self._listings) > REMEMBERED_LISTINGS:
                self._listings.popitem(last=False)

    def _remembered(self, prefix: str, index: int) -> dict[str, KVPair] | None:
        with self._listings_lock:
            return self._listings.get((prefix, index))

    # --- plumbing ---------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = (200,),
                 timeout: float | None = None) -> HttpReply:
        try:
            reply = self._http.request(method, path, None if body is None else json.dumps(body).encode(), timeout)
        except OSError as error:    # (requests' exceptions, which HttpClient raises, are OSErrors)
            raise StoreError(f"cannot reach Consul at {self.host}:{self.port}: {error}") from None
        if reply.status_code not in ok:
            raise StoreError(f"Consul at {self.host}:{self.port} answered {method} {path.split('?')[0]} "
                             f"with HTTP {reply.status_code}: {reply.text.strip()[:200]}")
        return reply

    def close(self) -> None:
        self._http.close()


class _ConsulLease(Lease):
    def __init__(self, store: ConsulStore, session: str, ttl: float):
        self._store = store
        self.session = session
        self.id = _lease_id(session)
        self.ttl = ttl

    def refresh(self) -> None:
        reply = self._store._request("PUT", f"/v1/session/renew/{self.session}", ok=(200, 404))
        if reply.status_code == 404:
            raise LeaseExpired(self.id)

    def revoke(self) -> None:
        self._store._request("PUT", f"/v1/session/destroy/{self.session}")
        self._store._sessions.pop(self.id, None)


class _ConsulWatch(Watch):
    """Blocking queries on the prefix, each listing diffed against the one before."""

    def __init__(self, store: ConsulStore, prefix: str, start_revision: int):
        self._store = store
        self._prefix = prefix
        self._start_revision = start_revision
        self._stream = HttpStream(store.host, store.port, CONNECT_TIMEOUT,
                                  read_timeout=WATCH_WAIT * 17 / 16 + 5,   # Consul adds up to wait/16
                                  tls=store.tls, headers=store.headers)
        # Take the starting state now: by the time the caller iterates, the prefix may have
        # changed, and a change we did not see makes the start impossible to reconstruct.
        self._start: tuple[dict[str, KVPair], int] | Exception
        try:
            self._start = self._starting_state()
        except (StoreError, OSError, http.client.HTTPException, ValueError) as error:
            self._start = error

    def cancel(self) -> None:
        self._stream.abort()

    def __iter__(self) -> Iterator[Event]:
        try:
            if isinstance(self._start, Exception):
                raise self._start
            state, index = self._start
            while True:
                new_state, new_index = self._list(f"index={index}&wait={WATCH_WAIT}s")
                if new_index < index:
                    # Consul's index went back (a restored snapshot): history as we knew it is gone.
                    raise Compacted(index + 1)
                yield from _diff(state, new_state, new_index)
                # Only now has the caller taken every event up to new_index.
                self._store._remember(self._prefix, new_index, new_state)
                state, index = new_state, new_index
        except (OSError, http.client.HTTPException, ValueError) as error:
            if not self._stream.aborted:
                raise StoreError(f"lost the watch on Consul at {self._store.host}:{self._store.port}: "
                                 f"{describe_failure(error)}") from None
        finally:
            self._stream.close()

    def _starting_state(self) -> tuple[dict[str, KVPair], int]:
        """The prefix's state just before start_revision, with its index, or Compacted."""
        start = self._start_revision
        remembered = self._store._remembered(self._prefix, start - 1)
        if remembered is not None:
            return remembered, start - 1
        state, index = self._list("")
        if index >= start:
            raise Compacted(start)      # it changed since, and we cannot tell how
        return state, index

    def _list(self, query: str) -> tuple[dict[str, KVPair], int]:
        reply = self._stream.request("GET", f"/v1/kv/{quote(self._prefix)}?recurse&{query}")
        body = reply.read()
        if reply.status not in (200, 404):
            raise StoreError(f"Consul at {self._store.host}:{self._store.port} refused the watch: "
                             f"HTTP {reply.status} {body[:200]!r}")
        return self._store._listing(reply.status, reply.headers, body)


def _diff(old: dict[str, KVPair], new: dict[str, KVPair], index: int) -> list[Event]:
    """Events that turn listing `old` into listing `new` (taken at `index`), in revision order."""
    puts = [Event("put", key, pair.value, pair.version) for key, pair in new.items()
            if key not in old or old[key].version != pair.version]
    deletes = [Event("delete", key, None, index) for key in old if key not in new]
    return sorted(puts, key=lambda event: (event.revision, event.key)) + sorted(deletes, key=lambda event: event.key)


def _failure(operation: dict[str, Any], op: Op, what: str) -> Exception:
    """The error for the txn op that failed."""
    verb = operation["Verb"]
    if verb == "lock":
        if "invalid session" in what.lower():
            return LeaseExpired(op.lease)
        return StoreError(f"key {op.key} is held by another lease")
    if verb == "check-not-exists" or (verb == "cas" and operation["Index"] == 0):
        return KeyExists(op.key)
    return VersionConflict(op.key)


def _index(headers: http.client.HTTPMessage) -> int:
    try:
        return int(headers["X-Consul-Index"])
    except (KeyError, TypeError, ValueError):
        raise StoreError("Consul's reply has no X-Consul-Index") from None


def _lease_id(session: str) -> int:
    return uuid.UUID(session).int >> 65        # 63 bits: a positive int64, like etcd's lease ids


def _encode(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def _decode(data: str | None) -> str:
    return base64.b64decode(data).decode("utf-8", errors="replace") if data else ""
