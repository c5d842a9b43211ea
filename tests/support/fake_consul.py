"""FakeConsul: a TEST DOUBLE of Consul's HTTP API, in-process.

It exists only because no Consul server can be installed on these machines. Where
`NETD_TEST_CONSUL=http://HOST:PORT` names a real agent, the kvstore suite runs against that
agent instead. It answers just what kvstore.consul uses, following Consul's documented
semantics (and its state store's behaviour where the documentation is silent):

- KV: GET (one key, `?recurse`, `?keys` with `?separator`), PUT (`?cas`, `?acquire`,
  `?release`, `?flags`), DELETE (`?recurse`, `?cas`); entries with CreateIndex, ModifyIndex,
  LockIndex, Flags, Session and base64 Value; 404 for nothing found.
- X-Consul-Index: a listing's index is the highest ModifyIndex or tombstone index under its
  prefix, else the index of the whole KV table; blocking queries (`?index=&wait=`) answer
  when that index passes the one given, or when the wait (default 5m, at most 10m) ends.
- /v1/txn: KV verbs set, cas, lock, unlock, get, get-tree, check-index, check-session,
  check-not-exists, delete, delete-tree, delete-cas; all or nothing at one index; 409 with
  Errors (OpIndex, What) when rolled back; no results for deletes and check-not-exists.
- Sessions: create (TTL, Behavior release|delete, LockDelay accepted but not modelled),
  renew (404 once invalid), destroy, info. A session is invalidated twice its TTL after its
  last renewal, as Consul's servers do, and its locks are released or its keys deleted.
  TTLs restart when the server does (as on a Consul leader change).
- /v1/status/leader.

Deviations, for the tests' sake: TTLs under Consul's 10 s minimum are accepted down to
`min_session_ttl`; one node, no ACLs, no datacenters, no consistency modes.

`stop()` drops every connection and stops answering (the data stays); `start()` serves
again on the same port: "the store went away and came back".
"""

from __future__ import annotations

import base64
import json
import re
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ns|us|ms|s|m|h)$")
SECONDS_PER_UNIT = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class ConsulError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_duration(text: str) -> float:
    """A Go duration as Consul takes them ("10s", "1.5s", "500ms"); a bare number is seconds."""
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    match = DURATION.match(text)
    if not match:
        raise ConsulError(400, f"invalid duration {text!r}")
    return float(match.group(1)) * SECONDS_PER_UNIT[match.group(2)]


class FakeConsul:
    def __init__(self, min_session_ttl: float = 10.0):
        self.min_session_ttl = min_session_ttl
        self._state = threading.Condition()     # guards everything below; notified on every change
        self._index = 1                         # the raft index: one step per write
        self._kv_index = 1                      # index of the last KV change
        self._kv: dict[str, dict[str, Any]] = {}
        self._tombstones: dict[str, int] = {}
        self._sessions: dict[str, dict[str, Any]] = {}
        self._deadlines: dict[str, float] = {}
        self._serving = False
        self._closed = False
        self._server: ThreadingHTTPServer | None = None
        self.tokens: set[str] = set()           # the X-Consul-Token values clients sent (ACL tokens)
        self._connections: set[socket.socket] = set()
        self.port = 0
        self.start()
        self._reaper = threading.Thread(target=self._expire_sessions, name="fake-consul-sessions", daemon=True)
        self._reaper.start()

    @property
    def url(self) -> str:
        return f"consul://127.0.0.1:{self.port}"

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> FakeConsul:
        if self._server is not None:
            return self
        fake = self

        class Handler(_Handler):
            consul = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        with self._state:
            self._serving = True
            now = time.monotonic()
            for session_id in self._deadlines:
                self._deadlines[session_id] = now + 2 * self._sessions[session_id]["ttl"]
            self._state.notify_all()
        threading.Thread(target=self._server.serve_forever, name="fake-consul", daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop answering and drop every connection; the data stays."""
        if self._server is None:
            return
        with self._state:
            self._serving = False
            self._state.notify_all()            # blocking queries end
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        with self._state:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.stop()
        with self._state:
            self._closed = True
            self._state.notify_all()
        self._reaper.join()

    def __enter__(self) -> FakeConsul:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- KV ---------------------------------------------------------------------------------

    def _index_of(self, key: str, recurse: bool) -> int:
        """Consul's X-Consul-Index for a read of key, or of the prefix (state lock held): the
        highest ModifyIndex or tombstone under the prefix, else the whole KV table's."""
        if not recurse or not key:
            return self._kv_index
        index = max([entry["ModifyIndex"] for k, entry in self._kv.items() if k.startswith(key)]
                    + [i for k, i in self._tombstones.items() if k.startswith(key)], default=0)
        return index or self._kv_index

    def _read(self, key: str, query: dict[str, str], client_gone: Callable[[], bool]) -> tuple[int, Any]:
        """GET /v1/kv/<key>: (index, body or None for 404), blocking if asked to."""
        recurse = "recurse" in query or "keys" in query
        min_index = int(query.get("index", 0))
        deadline = time.monotonic() + min(parse_duration(query.get("wait", "5m")), 600.0)
        with self._state:
            index = self._index_of(key, recurse)
            while min_index and index <= min_index and self._serving and not client_gone():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                # Wake now and then to notice a client that gave up (a cancelled watch).
                self._state.wait(min(remaining, 0.5))
                index = self._index_of(key, recurse)
            if recurse:
                entries = [dict(entry) for k, entry in sorted(self._kv.items()) if k.startswith(key)]
            else:
                entries = [dict(self._kv[key])] if key in self._kv else []
        if not entries:
            return index, None
        if "keys" in query:
            return index, _keys(key, [entry["Key"] for entry in entries], query.get("separator", ""))
        return index, entries

    def _write_kv(self, key: str, value: bytes, query: dict[str, str]) -> bool:
        """PUT /v1/kv/<key>: one write, through the same code as a txn op."""
        verb, operation = "set", {"Key": key, "Value": base64.b64encode(value).decode(),
                                  "Flags": int(query.get("flags", 0))}
        if "cas" in query:
            verb, operation["Index"] = "cas", int(query["cas"])
        if "acquire" in query:
            verb, operation["Session"] = "lock", query["acquire"]
        if "release" in query:
            verb, operation["Session"] = "unlock", query["release"]
        return self._txn([{"KV": {"Verb": verb, **operation}}])[0] == 200

    def _delete_kv(self, key: str, query: dict[str, str]) -> bool:
        if "recurse" in query:
            operation = {"Verb": "delete-tree", "Key": key}
        elif "cas" in query:
            operation = {"Verb": "delete-cas", "Key": key, "Index": int(query["cas"])}
        else:
            operation = {"Verb": "delete", "Key": key}
        return self._txn([{"KV": operation}])[0] == 200

    # --- transactions -----------------------------------------------------------------------

    def _txn(self, operations: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
        """Apply KV ops all or nothing, at one new index; (status, body) as /v1/txn answers."""
        with self._state:
            index = self._index + 1
            work = _Working(self._kv)
            results, errors = [], []
            for op_index, operation in enumerate(operations):
                try:
                    results.extend(self._kv_op(work, index, operation.get("KV") or {}))
                except ConsulError as error:
                    errors.append({"OpIndex": op_index, "What": str(error)})
            if errors:
                return 409, {"Results": None, "Errors": errors}
            if work.writes:
                for key, entry in work.writes.items():
                    if entry is None:
                        self._kv.pop(key, None)
                        self._tombstones[key] = index
                    else:
                        self._kv[key] = entry
                        self._tombstones.pop(key, None)
                self._index = self._kv_index = index
                self._state.notify_all()
            return 200, {"Results": [{"KV": entry} for entry in results], "Errors": None}

    def _kv_op(self, work: _Working, index: int, op: dict[str, Any]) -> list[dict[str, Any]]:
        """One txn KV op on the txn's working view; returns its results, raises ConsulError."""
        verb, key = op.get("Verb"), op.get("Key", "")
        existing = work.get(key)
        if verb in ("set", "cas", "lock", "unlock"):
            if verb == "cas" and (existing["ModifyIndex"] if existing else 0) != op.get("Index", 0):
                raise ConsulError(409, f"failed to set key {key!r}, index is stale")
            session = existing.get("Session") if existing else None
            lock_index = existing["LockIndex"] if existing else 0
            if verb == "lock":
                if op.get("Session") not in self._sessions:
                    raise ConsulError(409, f"invalid session {op.get('Session')!r}")
                if session and session != op["Session"]:
                    raise ConsulError(409, f"failed to lock key {key!r}, lock is already held")
                if session != op["Session"]:
                    lock_index += 1
                session = op["Session"]
            if verb == "unlock":
                if not session or session != op.get("Session"):
                    raise ConsulError(409, f"failed to unlock key {key!r}, lock isn't held, or is held by "
                                           "another session")
                session = None
            entry = {"Key": key, "Value": op.get("Value"), "Flags": op.get("Flags", 0), "LockIndex": lock_index,
                     "CreateIndex": existing["CreateIndex"] if existing else index, "ModifyIndex": index}
            if session:
                entry["Session"] = session
            work.writes[key] = entry
            return [{**entry, "Value": None}]
        if verb in ("get", "check-index", "check-session"):
            if existing is None:
                raise ConsulError(409, f"key {key!r} doesn't exist")
            if verb == "check-index" and existing["ModifyIndex"] != op.get("Index"):
                raise ConsulError(409, f"current modify index {existing['ModifyIndex']} != {op.get('Index')}")
            if verb == "check-session" and existing.get("Session") != op.get("Session"):
                raise ConsulError(409, "lock isn't held, or is held by another session")
            return [dict(existing) if verb == "get" else {**existing, "Value": None}]
        if verb == "get-tree":
            return [dict(work.get(k)) for k in work.keys_under(key)]
        if verb == "check-not-exists":
            if existing is not None:
                raise ConsulError(409, f"key {key!r} exists")
            return []
        if verb in ("delete", "delete-cas", "delete-tree"):
            if verb == "delete-cas" and (existing["ModifyIndex"] if existing else 0) != op.get("Index"):
                raise ConsulError(409, f"failed to delete key {key!r}, index is stale")
            for doomed in work.keys_under(key) if verb == "delete-tree" else [key] if existing else []:
                work.writes[doomed] = None
            return []
        raise ConsulError(400, f"unknown KV verb {verb!r}")

    # --- sessions ---------------------------------------------------------------------------

    def _create_session(self, spec: dict[str, Any]) -> dict[str, str]:
        ttl = parse_duration(spec["TTL"]) if spec.get("TTL") else 0.0
        if ttl and not self.min_session_ttl <= ttl <= 86400:
            raise ConsulError(400, f"Invalid Session TTL '{spec['TTL']}', must be between "
                                   f"[{self.min_session_ttl:g}s=24h0m0s]")
        behavior = spec.get("Behavior", "release")
        if behavior not in ("release", "delete"):
            raise ConsulError(400, f"Invalid Behavior setting '{behavior}'")
        with self._state:
            self._index += 1
            session_id = str(uuid.uuid4())
            self._sessions[session_id] = {
                "ID": session_id, "Name": spec.get("Name", ""), "Node": "fake-consul", "Behavior": behavior,
                "TTL": spec.get("TTL", ""), "LockDelay": int(parse_duration(spec.get("LockDelay", "15s")) * 1e9),
                "NodeChecks": ["serfHealth"], "ServiceChecks": None,
                "CreateIndex": self._index, "ModifyIndex": self._index, "ttl": ttl}
            if ttl:
                self._deadlines[session_id] = time.monotonic() + 2 * ttl
            self._state.notify_all()
        return {"ID": session_id}

    def _renew_session(self, session_id: str) -> list[dict[str, Any]] | None:
        with self._state:
            session = self._sessions.get(session_id)
            if session is None:
                return None
            if session["ttl"]:
                self._deadlines[session_id] = time.monotonic() + 2 * session["ttl"]
            return [_public_session(session)]

    def _session_info(self, session_id: str) -> list[dict[str, Any]]:
        with self._state:
            session = self._sessions.get(session_id)
            return [_public_session(session)] if session else []

    def _destroy_session(self, session_id: str) -> None:
        """Invalidate a session: release its locks or delete its keys (Behavior)."""
        with self._state:
            session = self._sessions.pop(session_id, None)
            self._deadlines.pop(session_id, None)
            if session is None:
                return
            self._index += 1
            held = [key for key, entry in self._kv.items() if entry.get("Session") == session_id]
            for key in held:
                if session["Behavior"] == "delete":
                    del self._kv[key]
                    self._tombstones[key] = self._index
                else:
                    entry = dict(self._kv[key], ModifyIndex=self._index)
                    del entry["Session"]
                    self._kv[key] = entry
            if held:
                self._kv_index = self._index
            self._state.notify_all()

    def _expire_sessions(self) -> None:
        """Background thread: invalidate sessions whose TTL ran out (only while serving)."""
        with self._state:
            while not self._closed:
                now = time.monotonic()
                expired = [sid for sid, deadline in self._deadlines.items() if deadline <= now]
                if self._serving and expired:
                    self._state.release()
                    try:
                        for session_id in expired:
                            self._destroy_session(session_id)
                    finally:
                        self._state.acquire()
                    continue
                upcoming = min(self._deadlines.values(), default=None)
                self._state.wait(None if upcoming is None or not self._serving else max(0.0, upcoming - now))


class _Working:
    """A txn's view of the KV table: its own writes over the committed entries, so that a
    rolled-back txn has changed nothing (and a txn costs what it touches, not the table)."""

    def __init__(self, kv: dict[str, dict[str, Any]]):
        self.kv = kv
        self.writes: dict[str, dict[str, Any] | None] = {}     # None: deleted

    def get(self, key: str) -> dict[str, Any] | None:
        return self.writes[key] if key in self.writes else self.kv.get(key)

    def keys_under(self, prefix: str) -> list[str]:
        keys = {key for key in self.kv if key.startswith(prefix)}
        keys |= {key for key in self.writes if key.startswith(prefix)}
        return sorted(key for key in keys if self.get(key) is not None)


class _Handler(BaseHTTPRequestHandler):
    consul: FakeConsul
    protocol_version = "HTTP/1.1"       # keep-alive, as Consul's agent
    disable_nagle_algorithm = True      # headers and body go out in two writes

    def setup(self) -> None:
        super().setup()
        with self.consul._state:
            self.consul._connections.add(self.connection)

    def finish(self) -> None:
        with self.consul._state:
            self.consul._connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        url = urlparse(self.path)
        query = {name: values[-1] for name, values in parse_qs(url.query, keep_blank_values=True).items()}
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        consul = self.consul
        consul.tokens.add(self.headers.get("X-Consul-Token") or "")
        try:
            path = url.path
            if path == "/v1/status/leader" and method == "GET":
                return self._reply(200, "127.0.0.1:8300")
            if path.startswith("/v1/kv/"):
                key = unquote(path[len("/v1/kv/"):])
                if method == "GET":
                    index, found = consul._read(key, query, self._client_gone)
                    return self._reply(200 if found is not None else 404, found if found is not None else "",
                                       index=index)
                if method == "PUT":
                    return self._reply(200, consul._write_kv(key, body, query))
                if method == "DELETE":
                    return self._reply(200, consul._delete_kv(key, query))
            if path == "/v1/txn" and method == "PUT":
                status, reply = consul._txn(json.loads(body or b"[]"))
                return self._reply(status, reply)
            if path == "/v1/session/create" and method == "PUT":
                return self._reply(200, consul._create_session(json.loads(body or b"{}")))
            if path.startswith("/v1/session/renew/") and method == "PUT":
                session_id = path.rsplit("/", 1)[1]
                renewed = consul._renew_session(session_id)
                if renewed is None:
                    return self._reply(404, f"Session id '{session_id}' not found")
                return self._reply(200, renewed)
            if path.startswith("/v1/session/destroy/") and method == "PUT":
                consul._destroy_session(path.rsplit("/", 1)[1])
                return self._reply(200, True)
            if path.startswith("/v1/session/info/") and method == "GET":
                return self._reply(200, consul._session_info(path.rsplit("/", 1)[1]))
            return self._reply(404, "404 page not found")
        except ConsulError as error:
            return self._reply(error.status, str(error))
        except (ValueError, KeyError) as error:
            return self._reply(400, f"bad request: {error}")

    def _client_gone(self) -> bool:
        """While we owe an answer, the client sends nothing: readable means closed."""
        readable, _, _ = select.select([self.connection], [], [], 0)
        return bool(readable)

    def _reply(self, status: int, body: Any, index: int | None = None) -> None:
        """200 answers are JSON; errors are plain text, except a rolled-back txn's (JSON)."""
        as_text = isinstance(body, str) and status != 200
        data = body.encode() if as_text else json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if as_text else "application/json")
            self.send_header("Content-Length", str(len(data)))
            if index is not None:
                self.send_header("X-Consul-Index", str(index))
                self.send_header("X-Consul-KnownLeader", "true")
                self.send_header("X-Consul-LastContact", "0")
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True     # the client went away, or stop() dropped us


def _public_session(session: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in session.items() if name != "ttl"}


def _keys(prefix: str, keys: list[str], separator: str) -> list[str]:
    """?keys: the keys under prefix, cut after the first separator past the prefix."""
    if not separator:
        return keys
    listed: list[str] = []
    for key in keys:
        cut = key.find(separator, len(prefix))
        name = key if cut < 0 else key[:cut + len(separator)]
        if not listed or listed[-1] != name:
            listed.append(name)
    return listed
