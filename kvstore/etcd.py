"""etcd v3 through its HTTP/JSON gateway (etcd3gw for the plumbing, our own watch reader).

Keys and values travel base64-encoded; integers (revisions, lease ids) come back as JSON
strings, and fields at their zero value are left out (no `value` for "", no `succeeded`
for a failed txn, no `type` for a PUT event).

A key's version is its mod_revision. commit() is one txn: its compares guard the ops, and
its failure branch reads back every guarded key so that we can name the one that failed.
"""

from __future__ import annotations

import base64
import http.client
import json
import math
from collections.abc import Iterator
from typing import Any

import requests
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import ConnectionFailedError, ConnectionTimeoutError, Etcd3Exception

from kvstore import (
    Check,
    Compacted,
    Create,
    Delete,
    Event,
    HttpClient,
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
    resolve_unanswered_commit,
)
from kvstore.security import StoreCredentials

CONNECT_TIMEOUT = 2.0
LIST_PAGE = 5000            # keys per range request when listing a prefix


class EtcdStore(KVStore):
    max_commit_ops = 128    # etcd's default --max-txn-ops

    def __init__(self, host: str, port: int, timeout: float = 5.0, credentials: StoreCredentials | None = None):
        self.url = f"etcd://{host}:{port}"
        self.host, self.port = host, port
        self.credentials = credentials or StoreCredentials()
        self.tls = self.credentials.ssl_context()
        self.headers: dict[str, str] = {}      # the auth token, shared with the watches' connections
        self._http = HttpClient(host, port, min(CONNECT_TIMEOUT, timeout), timeout, tls=self.tls, headers=self.headers)
        self._client = Etcd3Client(host, port, protocol="https" if self.tls else "http", timeout=timeout,
                                   api_path="/v3/", session=self._http)
        self._check_is_etcd()
        if self.credentials.username:
            self._authenticate()

    def _authenticate(self) -> None:
        """etcd's authentication: a token for the user, sent with every request; taken again when
        etcd says it expired."""
        self.headers.pop("Authorization", None)
        try:
            reply = self._client.post(self._client.get_url("/auth/authenticate"),
                                      json={"name": self.credentials.username, "password": self.credentials.password})
        except (ConnectionFailedError, ConnectionTimeoutError) as error:
            raise StoreError(f"cannot reach etcd at {self.host}:{self.port}: {_gateway_message(error)}") from None
        except Etcd3Exception as error:
            raise StoreError(f"etcd at {self.host}:{self.port} refused user {self.credentials.username!r}: "
                             f"{_gateway_message(error)}") from None
        self.headers["Authorization"] = reply["token"]

    def _check_is_etcd(self) -> None:
        """Fail now, clearly, if nothing answers there or what answers is not etcd."""
        try:
            reply = self._http.get("/version", timeout=CONNECT_TIMEOUT)
            version = reply.json()["etcdserver"]
            major_minor = tuple(int(part) for part in version.split(".")[:2])
        except requests.RequestException as error:
            raise StoreError(f"cannot reach etcd at {self.host}:{self.port}: {error}") from None
        except (ValueError, KeyError, TypeError, AttributeError):
            raise StoreError(f"{self.host}:{self.port} answers, but is not etcd "
                             f"(GET /version: HTTP {reply.status_code})") from None
        if major_minor < (3, 4):
            raise StoreError(f"etcd at {self.host}:{self.port} is version {version}; netd needs 3.4 or later")

    # --- reads ------------------------------------------------------------------------------

    def get(self, key: str) -> KVPair | None:
        reply = self._post("/kv/range", {"key": _encode(key)})
        kvs = reply.get("kvs", [])
        return _pair(kvs[0]) if kvs else None

    def list(self, prefix: str) -> tuple[list[KVPair], int]:
        """Page through the prefix, every page read at the revision of the first."""
        start, end = _range(prefix)
        pairs: list[KVPair] = []
        revision = 0
        while True:
            request = {"key": start, "range_end": end, "limit": LIST_PAGE, "sort_order": "ASCEND",
                       "sort_target": "KEY"}
            if revision:
                request["revision"] = revision
            reply = self._post("/kv/range", request)
            revision = revision or _header_revision(reply)
            kvs = reply.get("kvs", [])
            pairs.extend(_pair(kv) for kv in kvs)
            if not reply.get("more"):
                return pairs, revision
            start = _encode_bytes(base64.b64decode(kvs[-1]["key"]) + b"\0")

    def revision(self) -> int:
        return _header_revision(self._post("/kv/range", {"key": _encode("\0"), "count_only": True}))

    # --- writes -----------------------------------------------------------------------------

    def put(self, key: str, value: str, lease: Lease | None = None) -> KVPair:
        request = {"key": _encode(key), "value": _encode(value)}
        if lease:
            request["lease"] = lease.id
        reply = self._post("/kv/put", request, lease_id=lease.id if lease else 0)
        return KVPair(key, value, _header_revision(reply), lease.id if lease else 0)

    def commit(self, ops: list[Op]) -> int:
        check_ops(ops)
        guarded = [op for op in ops if _compare(op)]
        leases = [op.lease for op in ops if getattr(op, "lease", 0)]
        try:
            reply = self._post("/kv/txn", {
                "compare": [_compare(op) for op in guarded],
                "success": [_write(op) for op in ops if not isinstance(op, Check)],
                # On failure, read back every guarded key to tell which compare failed.
                "failure": [{"request_range": {"key": _encode(op.key)}} for op in guarded],
            }, lease_id=leases[0] if leases else 0)
        except LeaseExpired:
            raise
        except StoreError as error:
            if "timed out" not in str(error):
                raise
            # Read back quickly: the caller may hold its operation lock meanwhile.
            return resolve_unanswered_commit(self, ops, error, get=self._quick_get)
        if not reply.get("succeeded"):
            _raise_failed_compare(guarded, reply.get("responses", []))
        return _header_revision(reply)

    def _quick_get(self, key: str) -> KVPair | None:
        """get() with a short timeout, for reading back an unanswered commit."""
        try:
            reply = self._http.post(self._client.get_url("/kv/range"), json={"key": _encode(key)}, timeout=1.0,
                                    breaker=False)
            if reply.status_code != 200:
                raise StoreError(f"etcd at {self.host}:{self.port} answered HTTP {reply.status_code}")
            kvs = reply.json().get("kvs", [])
        except (requests.RequestException, ValueError) as e:
            raise StoreError(f"cannot reach etcd at {self.host}:{self.port}: {e}") from None
        return _pair(kvs[0]) if kvs else None

    def delete_prefix(self, prefix: str) -> None:
        start, end = _range(prefix)
        self._post("/kv/deleterange", {"key": start, "range_end": end})

    def compact(self, revision: int) -> None:
        """Forget the history before `revision` (watches from older revisions get Compacted)."""
        self._post("/kv/compaction", {"revision": revision, "physical": True})

    # --- leases -----------------------------------------------------------------------------

    def grant_lease(self, ttl: float) -> Lease:
        # etcd counts whole seconds; the reply says what it granted (it has a minimum).
        reply = self._post("/lease/grant", {"TTL": max(1, math.ceil(ttl)), "ID": 0})
        return _EtcdLease(self, int(reply["ID"]), float(reply["TTL"]))

    # --- watch ------------------------------------------------------------------------------

    def watch(self, prefix: str, start_revision: int) -> Watch:
        return _EtcdWatch(self, prefix, start_revision if start_revision > 0 else self.revision() + 1)

    # --- plumbing ---------------------------------------------------------------------------

    def _post(self, path: str, request: dict[str, Any], lease_id: int = 0) -> dict[str, Any]:
        """POST to the gateway, turning every failure into StoreError (LeaseExpired for a lost lease)."""
        try:
            try:
                return self._client.post(self._client.get_url(path), json=request)
            except Etcd3Exception as error:
                if not (self.credentials.username and "token" in _gateway_message(error).lower()):
                    raise
                self._authenticate()   # the token expired (etcd's --auth-token-ttl): once more with a new one
                return self._client.post(self._client.get_url(path), json=request)
        except (ConnectionFailedError, ConnectionTimeoutError) as error:
            raise StoreError(f"cannot reach etcd at {self.host}:{self.port}: {_gateway_message(error)}") from None
        except Etcd3Exception as error:
            message = _gateway_message(error)
            if "lease not found" in message:
                raise LeaseExpired(lease_id) from None
            raise StoreError(f"etcd at {self.host}:{self.port} refused {path}: {message}") from None
        except ValueError:      # a reply that is not JSON
            raise StoreError(f"etcd at {self.host}:{self.port} sent a malformed reply to {path}") from None

    def close(self) -> None:
        self._http.close()


class _EtcdLease(Lease):
    def __init__(self, store: EtcdStore, lease_id: int, ttl: float):
        self._store = store
        self.id = lease_id
        self.ttl = ttl

    def refresh(self) -> None:
        reply = self._store._post("/lease/keepalive", {"ID": self.id})
        # An expired lease comes back without a TTL.
        if int(reply.get("result", {}).get("TTL", 0)) <= 0:
            raise LeaseExpired(self.id)

    def revoke(self) -> None:
        try:
            self._store._post("/kv/lease/revoke", {"ID": self.id}, lease_id=self.id)
        except LeaseExpired:
            pass


class _EtcdWatch(Watch):
    """Reads the gateway's watch stream: one JSON message per line."""

    def __init__(self, store: EtcdStore, prefix: str, start_revision: int):
        self._store = store
        self._prefix = prefix
        self._start_revision = start_revision
        self._stream = HttpStream(store.host, store.port, CONNECT_TIMEOUT, tls=store.tls, headers=store.headers)

    def cancel(self) -> None:
        self._stream.abort()

    def __iter__(self) -> Iterator[Event]:
        start, end = _range(self._prefix)
        request = {"key": start, "range_end": end, "start_revision": self._start_revision}
        where = f"etcd at {self._store.host}:{self._store.port}"
        try:
            reply = self._stream.request("POST", "/v3/watch", json.dumps({"create_request": request}).encode())
            if reply.status != 200:
                raise StoreError(f"{where} refused the watch: HTTP {reply.status} {reply.read(500)!r}")
            for line in iter(reply.readline, b""):
                if line.strip():
                    yield from self._events(json.loads(line), where)
        except (OSError, http.client.HTTPException) as error:
            if not self._stream.aborted:
                raise StoreError(f"lost the watch on {where}: {describe_failure(error)}") from None
        except ValueError:
            raise StoreError(f"{where} sent a malformed watch message") from None
        finally:
            self._stream.close()
        if not self._stream.aborted:
            raise StoreError(f"lost the watch on {where}: the connection closed")

    def _events(self, message: dict[str, Any], where: str) -> Iterator[Event]:
        if "error" in message:
            raise StoreError(f"{where} ended the watch: {message['error'].get('message', message['error'])}")
        result = message.get("result", {})
        if int(result.get("compact_revision", 0)):
            raise Compacted(self._start_revision)
        if result.get("canceled"):
            raise StoreError(f"{where} canceled the watch: {result.get('cancel_reason', 'no reason given')}")
        for event in result.get("events", []):
            kv = event["kv"]
            if event.get("type") == "DELETE":
                yield Event("delete", _decode(kv["key"]), None, int(kv["mod_revision"]))
            else:
                yield Event("put", _decode(kv["key"]), _decode(kv.get("value", "")), int(kv["mod_revision"]))


def _compare(op: Op) -> dict[str, Any] | None:
    """The txn compare that guards op, if it has one."""
    if isinstance(op, Create):
        return {"key": _encode(op.key), "target": "CREATE", "result": "EQUAL", "create_revision": 0}
    if isinstance(op, (Update, Check)) or op.version is not None:
        return {"key": _encode(op.key), "target": "MOD", "result": "EQUAL", "mod_revision": op.version}
    return None


def _write(op: Op) -> dict[str, Any]:
    if isinstance(op, Delete):
        return {"request_delete_range": {"key": _encode(op.key)}}
    return {"request_put": {"key": _encode(op.key), "value": _encode(op.value), "lease": op.lease}}


def _raise_failed_compare(guarded: list[Op], responses: list[dict[str, Any]]) -> None:
    """Name the first guarded op whose key no longer matches (from the failure branch's reads)."""
    for op, response in zip(guarded, responses, strict=False):
        kvs = response.get("response_range", {}).get("kvs", [])
        current = int(kvs[0]["mod_revision"]) if kvs else 0
        if isinstance(op, Create):
            if current:
                raise KeyExists(op.key)
        elif current != op.version:
            raise VersionConflict(op.key)
    # Not reached: the reads run in the same txn, at the same revision, as the compares.
    first = guarded[0]
    raise KeyExists(first.key) if isinstance(first, Create) else VersionConflict(first.key)


def _pair(kv: dict[str, Any]) -> KVPair:
    return KVPair(_decode(kv["key"]), _decode(kv.get("value", "")), int(kv["mod_revision"]),
                  int(kv.get("lease", 0)))


def _header_revision(reply: dict[str, Any]) -> int:
    return int(reply["header"]["revision"])


def _range(prefix: str) -> tuple[str, str]:
    """etcd's key range for a prefix: [prefix, prefix with its last byte bumped)."""
    if not prefix:
        return _encode("\0"), _encode("\0")      # "\0" to "\0" means every key
    end = bytearray(prefix.encode())
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return _encode(prefix), _encode("\0")    # no upper bound: to the end of the keyspace
    end[-1] += 1
    return _encode(prefix), _encode_bytes(bytes(end))


def _encode(text: str) -> str:
    return _encode_bytes(text.encode())


def _encode_bytes(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _decode(data: str) -> str:
    """Text of a key or value. Bytes that are not UTF-8 (garbage written by hand) become U+FFFD:
    the value then fails its JSON check and is skipped by whoever reads it, instead of killing a
    watch, which would retry the same revision forever."""
    return base64.b64decode(data).decode("utf-8", errors="replace")


def _gateway_message(error: Etcd3Exception) -> str:
    """The gateway's own message out of an etcd3gw exception (its JSON body), or the reason."""
    try:
        return json.loads(error.detail_text)["message"]
    except (TypeError, ValueError, KeyError):
        return str(error.detail_text or (error.args[0] if error.args else "") or type(error).__name__)
