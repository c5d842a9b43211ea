"""Linux capabilities of a container's process, as Docker sets them: a default set (Docker's), with
`--cap-add`, `--cap-drop` (names with or without CAP_, or ALL) and `--privileged` (every one).

The process keeps only its set in its bounding set (so neither it nor anything it execs can
regain the others) and runs with no_new_privs (setuid programs gain nothing). Imported by the
daemon to check the names, and by the entry helper (enter.py) to apply them.
"""

from __future__ import annotations

NAMES = ["CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
         "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER",
         "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
         "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
         "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF",
         "CHECKPOINT_RESTORE"]
NUMBERS = {name: number for number, name in enumerate(NAMES)}
# Docker's default set (moby's oci/caps/defaults.go).
DOCKER_DEFAULT = ("CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID", "SETFCAP",
                  "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE")


class UnknownCapability(ValueError):
    pass


def normalize(name: str) -> str:
    """"net_admin", "CAP_NET_ADMIN" -> "NET_ADMIN"; "all" -> "ALL"; unknown names raise."""
    upper = name.strip().upper()
    upper = upper[4:] if upper.startswith("CAP_") else upper
    if upper != "ALL" and upper not in NUMBERS:
        raise UnknownCapability(f"unknown capability {name!r} (e.g. NET_ADMIN, SYS_ADMIN, ALL)")
    return upper


def effective(cap_add: list[str], cap_drop: list[str], privileged: bool = False) -> list[str]:
    """The container's capabilities, by name, from Docker's default set and the flags."""
    if privileged:
        return list(NAMES)
    add = {normalize(n) for n in cap_add}
    drop = {normalize(n) for n in cap_drop}
    chosen = set(NAMES) if "ALL" in add else set(DOCKER_DEFAULT) | (add - {"ALL"})
    chosen = set() if "ALL" in drop else chosen - drop
    return [n for n in NAMES if n in chosen]
