"""The installed `netd` command: a launcher that starts commands fast.

Most commands only talk to the daemon: they need `socket`, `json` and `argparse`, not the virtual
environment's site packages. Python's own start-up with them (site, the editable-install finder,
pyroute2's and scapy's paths) costs more than the command. So the launcher runs those in an
isolated interpreter without site packages (`-I -S`, netd's source first on sys.path), and hands
the commands that need the environment (the daemon, capture, trace, cleanup) to the virtual
environment's Python. A CNI runtime's call (CNI_COMMAND set) goes straight to the plugin
(netd.api.cni), without the CLI's parser. `make install` writes it over pip's console script:

    python -m netd.api.launcher .venv/bin/netd
"""

from __future__ import annotations

import os
import sys

FULL = ("daemon", "capture", "trace", "cleanup")   # commands that need the site packages

TEMPLATE = """#!{python} -IS
# netd's launcher, written by `python -m netd.api.launcher` (see netd/api/launcher.py).
import sys
if "CNI_COMMAND" in __import__("os").environ:   # run by a CNI runtime: the plugin, nothing else
    sys.path.insert(0, {root!r})
    from netd.api.cni import main
    sys.exit(main())
words = [a for a in sys.argv[1:] if not a.startswith("-")]
if words and words[0] in {full!r}:
    import os
    os.execv({python!r}, [{python!r}, "-m", "netd", *sys.argv[1:]])
sys.path.insert(0, {root!r})
from netd.api.cli import main
sys.exit(main())
"""


def write(path: str, python: str = sys.executable) -> None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    text = TEMPLATE.format(python=python, full=FULL, root=root)
    temporary = path + ".new"
    with open(temporary, "w") as f:
        f.write(text)
    os.chmod(temporary, 0o755)
    os.replace(temporary, path)


if __name__ == "__main__":
    write(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(sys.executable), "netd"))
