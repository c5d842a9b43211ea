"""runtime.logs: the tail of a log without reading it whole, and rotation by size (copy-truncate)."""

import os

from runtime.logs import rotate_if_large, tail


def test_tail_gives_the_last_lines(tmp_path):
    path = tmp_path / "container.log"
    path.write_bytes(b"".join(f"line {i}\n".encode() for i in range(100_000)))
    assert tail(str(path), 3, block=1000) == b"line 99997\nline 99998\nline 99999\n"
    assert tail(str(path), 0) == b""
    short = tmp_path / "short.log"
    short.write_bytes(b"a\nb")
    assert tail(str(short), 5) == b"a\nb"
    assert tail(str(tmp_path / "none.log"), 5) == b""


def test_rotation_keeps_one_generation_and_the_writer_goes_on(tmp_path):
    path = tmp_path / "container.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.write(fd, b"x" * 2000)
    assert not rotate_if_large(str(path), limit=5000)
    os.write(fd, b"y" * 4000)
    assert rotate_if_large(str(path), limit=5000)
    os.write(fd, b"after\n")                  # the container keeps writing, at the new end
    os.close(fd)
    assert path.read_bytes() == b"after\n"
    assert (tmp_path / "container.log.1").stat().st_size == 6000
