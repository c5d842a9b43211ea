"""The runtime's errors. runtime imports nothing of netd: the daemon maps BadSpec to a user's
mistake (400) and RuntimeFailure to an internal error (500)."""


class RuntimeFailure(Exception):
    """The runtime could not do what was asked (a helper that did not answer, a kill that failed)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class BadSpec(RuntimeFailure):
    """The caller's mistake: an executable that is not there, a bad working directory or hostname."""
