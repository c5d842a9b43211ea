"""The one place where the lower layers' errors become netd's kinds (HTTP status, exit code).

kvstore and runtime own their error types and import nothing of netd; the server and the daemon
entry point report any error through `reported()`.
"""

from __future__ import annotations

from kvstore import KeyExists, KVError, StoreConfigError, StoreError, VersionConflict
from netd.contract.errors import BadRequest, Conflict, Internal, NetdError, Unavailable
from runtime.errors import BadSpec, RuntimeFailure

KNOWN = (NetdError, KVError, RuntimeFailure)


def reported(error: BaseException) -> NetdError | None:
    """`error` as the NetdError a user sees, or None for an unexpected one (a bug: log it)."""
    if isinstance(error, NetdError):
        return error
    for foreign, kind in ((StoreConfigError, BadRequest), ((KeyExists, VersionConflict), Conflict),
                          (StoreError, Unavailable), (BadSpec, BadRequest), (RuntimeFailure, Internal)):
        if isinstance(error, foreign):
            return kind(str(error))
    return None
