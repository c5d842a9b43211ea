"""A container's /etc/hosts, /etc/resolv.conf and /etc/hostname, kept as files in the run
dir and bind-mounted into the container. They are rewritten in place (same inode), so a
change shows inside a running container."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

EMBEDDED_DNS = "127.0.0.11"


@dataclass
class ResolvConf:
    nameservers: list[str] = field(default_factory=list)
    search: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)

    def render(self) -> str:
        lines = [f"nameserver {ns}" for ns in self.nameservers]
        if self.search:
            lines.append("search " + " ".join(self.search))
        if self.options:
            lines.append("options " + " ".join(self.options))
        return "\n".join(lines) + "\n"


def read_resolv_conf(path: str = "/etc/resolv.conf") -> ResolvConf:
    conf = ResolvConf()
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return conf
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) < 2:
            continue
        if words[0] == "nameserver":
            conf.nameservers.append(words[1])
        elif words[0] in ("search", "domain"):
            conf.search = words[1:]
        elif words[0] == "options":
            conf.options.extend(words[1:])
    return conf


def embedded_resolv_conf(host: ResolvConf) -> ResolvConf:
    """Point the container at netd's resolver (127.0.0.11 inside its namespace), keeping the
    host's search domains; ndots:0 as Docker does, so single names are tried as they are."""
    return ResolvConf([EMBEDDED_DNS], list(host.search), ["ndots:0"])


def render_hosts(hostname: str, addresses: list[str]) -> str:
    lines = ["127.0.0.1\tlocalhost"]   # no IPv6 lines: netd's containers have IPv6 off
    lines += [f"{address}\t{hostname}" for address in addresses]
    return "\n".join(lines) + "\n"


def write_in_place(path: str, content: str) -> None:
    """Rewrite a file keeping its inode, so bind mounts of it see the new content."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        data = content.encode()
        os.pwrite(fd, data, 0)
        if os.fstat(fd).st_size > len(data):   # truncating costs a journal write: only when shrinking
            os.ftruncate(fd, len(data))
    finally:
        os.close(fd)
