"""Container logs, bounded: rotated by size (copy-truncate, as logrotate does), read from the tail.

The container writes its log with O_APPEND, so truncating the file in place is safe: its next write
lands at the new end. The previous part is kept as LOG.1 (one generation).
"""

from __future__ import annotations

import os
import shutil

MAX_LOG_BYTES = 16 * 1024 * 1024


def rotate_if_large(path: str, limit: int = MAX_LOG_BYTES) -> bool:
    """Copy the log to PATH.1 and truncate it when it is over `limit` bytes; True if it was."""
    try:
        if os.path.getsize(path) <= limit:
            return False
        shutil.copyfile(path, path + ".1")
        os.chmod(path + ".1", 0o600)
        os.truncate(path, 0)
        return True
    except FileNotFoundError:
        return False


def tail(path: str, lines: int, block: int = 65536) -> bytes:
    """The last `lines` lines of the file (all of it if it has fewer), read from the end."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return b""
    with f:
        end = f.seek(0, os.SEEK_END)
        data, position = b"", end
        while position > 0 and data.count(b"\n") <= lines:
            step = min(block, position)
            position -= step
            f.seek(position)
            data = f.read(step) + data
        parts = data.split(b"\n")
        trailing = parts[-1] == b""
        kept = parts[-(lines + 1):] if trailing else parts[-lines:]
        return b"\n".join(kept) if lines > 0 else b""
