"""One folder of a store, seen as a store of its own: keys are relative to the folder.

The controller gives each driver `netd/<driver>/` of the local and cluster stores, so drivers
never know netd's key layout and cannot touch other keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from kvstore import Event, KVPair, KVStore, Lease, Op, Watch


class PrefixedStore(KVStore):
    def __init__(self, store: KVStore, prefix: str):
        self.store = store
        self.prefix = prefix
        self.url = f"{store.url}/{prefix}"
        self.max_commit_ops = store.max_commit_ops

    def _pair(self, pair: KVPair | None) -> KVPair | None:
        return None if pair is None else dataclasses.replace(pair, key=pair.key[len(self.prefix):])

    def get(self, key: str) -> KVPair | None:
        return self._pair(self.store.get(self.prefix + key))

    def list(self, prefix: str) -> tuple[list[KVPair], int]:
        pairs, revision = self.store.list(self.prefix + prefix)
        return [self._pair(p) for p in pairs], revision

    def put(self, key: str, value: str, lease: Lease | None = None) -> KVPair:
        return self._pair(self.store.put(self.prefix + key, value, lease))

    def commit(self, ops: list[Op]) -> int:
        return self.store.commit([dataclasses.replace(op, key=self.prefix + op.key) for op in ops])

    def delete_prefix(self, prefix: str) -> None:
        self.store.delete_prefix(self.prefix + prefix)

    def watch(self, prefix: str, start_revision: int) -> Watch:
        return _PrefixedWatch(self.store.watch(self.prefix + prefix, start_revision), len(self.prefix))

    def grant_lease(self, ttl: float) -> Lease:
        return self.store.grant_lease(ttl)

    def revision(self) -> int:
        return self.store.revision()


class _PrefixedWatch(Watch):
    def __init__(self, watch: Watch, cut: int):
        self.watch, self.cut = watch, cut

    def __iter__(self) -> Iterator[Event]:
        for event in self.watch:
            yield dataclasses.replace(event, key=event.key[self.cut:])

    def cancel(self) -> None:
        self.watch.cancel()
