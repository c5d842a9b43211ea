"""Typed errors, shared by every layer (a leaf module: it imports nothing of netd).

Each kind maps once to an HTTP status (the API) and an exit code (the CLI).
Messages are one line that says what was wrong and, where it helps, what to do.
"""


class NetdError(Exception):
    """Base of every error netd reports to a user."""

    status = 500
    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class BadRequest(NetdError):
    """The request itself is wrong: malformed, out of range, contradictory."""

    status = 400


class NotFound(NetdError):
    status = 404


class Conflict(NetdError):
    """The request is well formed but clashes with existing state."""

    status = 409


class Unavailable(NetdError):
    """Something netd needs (the cluster store, a peer daemon) cannot be reached now."""

    status = 503


class Internal(NetdError):
    status = 500


ERRORS_BY_STATUS: dict[int, type[NetdError]] = {
    cls.status: cls for cls in (BadRequest, NotFound, Conflict, Unavailable, Internal)
}


def error_for_status(status: int, message: str) -> NetdError:
    """Rebuild a typed error from an API reply (the CLI side of the mapping)."""
    return ERRORS_BY_STATUS.get(status, NetdError)(message)
