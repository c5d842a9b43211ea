"""All-or-nothing operations: record how to undo each step; on failure, undo in reverse."""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger("netd.core.undo")


class Undo:
    """Usage:

        with Undo() as undo:
            make_veth(); undo.push(delete_veth)
            allocate();  undo.push(release)
            ...                      # an exception here undoes both, newest first

    Undo steps that fail are logged and skipped, so one broken step cannot hide the
    original error or stop the others from running.
    """

    def __init__(self, after_rollback: Callable[[], object] | None = None) -> None:
        self._steps: list[tuple[Callable[..., object], tuple]] = []
        self._after_rollback = after_rollback

    def push(self, step: Callable[..., object], *args) -> None:
        self._steps.append((step, args))

    def __enter__(self) -> Undo:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.rollback()
        return False

    def rollback(self) -> None:
        while self._steps:
            step, args = self._steps.pop()
            try:
                step(*args)
            except Exception:  # noqa: BLE001 - keep undoing; the original error is what matters
                log.exception("undo step %s failed", getattr(step, "__qualname__", step))
        if self._after_rollback is not None:
            try:
                self._after_rollback()
            except Exception:  # noqa: BLE001
                log.exception("after rollback")

    def discard(self) -> None:
        """Keep what was done (used when an operation commits part-way on purpose)."""
        self._steps.clear()
