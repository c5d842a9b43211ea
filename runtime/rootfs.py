"""A minimal root filesystem from Debian's static busybox (package busybox-static)."""

from __future__ import annotations

import os
import shutil
import subprocess

BUSYBOX = "/bin/busybox"


def make_busybox_rootfs(path: str, busybox: str = BUSYBOX) -> None:
    """Build a rootfs at `path`: bin/ (busybox and a link per applet), etc/, proc/, sys/, dev/, tmp/.

    Enough for `--rootfs` in tests and the demo: sh, ls, cat, ip, ping, wget, nc, ...
    The busybox must be static: the rootfs holds no libraries.
    """
    if not os.path.exists(busybox):
        raise FileNotFoundError(f"{busybox} not found: install the busybox-static package")
    for directory in ("bin", "etc", "proc", "sys", "dev", "tmp", "root", "run"):
        os.makedirs(os.path.join(path, directory), exist_ok=True)
    os.chmod(os.path.join(path, "tmp"), 0o1777)
    shutil.copy2(busybox, os.path.join(path, "bin", "busybox"))
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        link = os.path.join(path, "bin", applet)
        if applet != "busybox" and not os.path.lexists(link):
            os.symlink("busybox", link)
    # Tools look in sbin and usr/bin too; one bin/ serves them all.
    for alias, target in (("sbin", "bin"), ("usr", ".")):
        link = os.path.join(path, alias)
        if not os.path.lexists(link):
            os.symlink(target, link)
    files = {
        "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        "etc/group": "root:x:0:\nnogroup:x:65534:\n",
        # Mount points for the files the runtime bind-mounts in.
        "etc/hosts": "",
        "etc/resolv.conf": "",
        "etc/hostname": "",
    }
    for name, content in files.items():
        with open(os.path.join(path, name), "w") as f:
            f.write(content)
