"""The API's routes: `@route(METHOD, PATTERN)` registers a function (server.py's, cni_routes.py's),
and the reply kinds a route may return beside JSON."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

Handler = Callable[..., object]
ROUTES: list[tuple[str, re.Pattern, Handler]] = []


def route(method: str, pattern: str) -> Callable[[Handler], Handler]:
    regex = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$")

    def register(fn: Handler) -> Handler:
        fn.route = pattern   # the key of its body's schema (netd.api.request)
        ROUTES.append((method, regex, fn))
        return fn

    return register


class Text(str):
    """A plain-text reply (Docker's /_ping answers "OK", not JSON)."""


class Stream:
    """A streamed reply: chunks of bytes written as they come, then the connection closes."""

    def __init__(self, chunks: Iterator[bytes], content_type: str = "application/octet-stream"):
        self.chunks = chunks
        self.content_type = content_type
