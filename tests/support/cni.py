"""A CNI runtime in small, for tests: it runs plugins exactly as libcni does — one exec per call,
the executable named by `type` found on CNI_PATH, the CNI_* environment, the config on stdin —
from a test host's namespace (tests.support.hosts.NetdHost), where a real runtime runs them.

    rt = CniRuntime(host)
    ns = rt.namespace()                         # a container namespace, removed by rt.cleanup()
    result = rt.add(config, "c1", ns)           # a single plugin's config, or a conflist
    rt.delete(config, "c1", ns)

For a conflist it chains as libcni does: each plugin gets the list's cniVersion and name, the
previous plugin's result as prevResult, and runtimeConfig for the capabilities it declares; DEL
and CHECK get the cached result of the whole ADD, DEL runs the list in reverse.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

REFERENCE_PLUGINS = "/usr/lib/cni"
NETD = os.path.join(os.path.dirname(sys.executable), "netd")    # the installed launcher
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CLONE_NEWNET = 0x40000000


@dataclass
class Reply:
    code: int              # the exit status
    reply: dict            # what the plugin printed (a result, an error, or {})
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.code == 0 and "code" not in self.reply

    @property
    def error_code(self) -> int | None:
        return self.reply.get("code")


def _setns_preexec(path: str):
    libc = ctypes.CDLL("libc.so.6", use_errno=True)

    def enter() -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {path}")
        finally:
            os.close(fd)
    return enter


class CniRuntime:
    def __init__(self, host, plugin_dirs: tuple[str, ...] | None = None):
        self.host = host
        self.tmp = tempfile.mkdtemp(prefix=f"{host.name}-cni-")
        self.bin_dir = os.path.join(self.tmp, "bin")
        os.makedirs(self.bin_dir)
        os.symlink(NETD, os.path.join(self.bin_dir, "netd"))   # as `netd cni install` links it
        self.plugin_dirs = plugin_dirs or (self.bin_dir, REFERENCE_PLUGINS)
        self.namespaces: list[str] = []
        self.cache: dict[tuple[str, str, str], dict] = {}      # libcni's result cache

    # --- namespaces -------------------------------------------------------------------------

    def namespace(self) -> str:
        """A new container namespace (its path), removed at cleanup."""
        name = f"{self.host.name}-c{secrets.token_hex(3)}"
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
        self.namespaces.append(name)
        return f"/run/netns/{name}"

    def in_ns(self, netns: str, command: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        result = subprocess.run(["nsenter", f"--net={netns}", "sh", "-c", command], capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"in {netns}: {command} failed: {result.stderr.strip() or result.stdout.strip()}")
        return result

    def cleanup(self) -> None:
        for name in self.namespaces:
            for pid in _pids_in(f"/run/netns/{name}"):
                with contextlib.suppress(OSError):
                    os.kill(pid, 9)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.namespaces.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # --- one plugin, one exec -----------------------------------------------------------------

    def exec(self, command: str, config: dict | bytes | None, container_id: str = "", netns: str = "",
             ifname: str = "eth0", args: str = "", env: dict | None = None, plugin: str | None = None,
             timeout: float = 60) -> Reply:
        """One call of one plugin, as a runtime makes it."""
        stdin = config if isinstance(config, bytes) else json.dumps(config or {}).encode()
        kind = plugin or (config.get("type") if isinstance(config, dict) else None) or "netd"
        path = self.find(kind)
        environment = {"CNI_COMMAND": command, "CNI_PATH": ":".join(self.plugin_dirs), "PATH": SYSTEM_PATH}
        for key, value in (("CNI_CONTAINERID", container_id), ("CNI_NETNS", netns), ("CNI_IFNAME", ifname),
                           ("CNI_ARGS", args)):
            if value:
                environment[key] = value
        environment.update(env or {})
        result = subprocess.run([path], input=stdin, capture_output=True, env=environment, timeout=timeout,
                                preexec_fn=_setns_preexec(f"/run/netns/{self.host.name}"))
        out = result.stdout.decode(errors="replace")
        try:
            reply = json.loads(out) if out.strip() else {}
        except ValueError:
            reply = {"unparsable": out}
        return Reply(result.returncode, reply, out, result.stderr.decode(errors="replace"))

    def find(self, kind: str) -> str:
        for directory in self.plugin_dirs:
            path = os.path.join(directory, kind)
            if os.access(path, os.X_OK):
                return path
        raise AssertionError(f"no CNI plugin {kind!r} on {':'.join(self.plugin_dirs)}")

    # --- libcni's network and list operations ---------------------------------------------------

    @staticmethod
    def plugins_of(config: dict) -> list[dict]:
        if "plugins" not in config:
            return [config]
        return [{"cniVersion": config["cniVersion"], "name": config["name"], **plugin} for plugin in config["plugins"]]

    @staticmethod
    def _with_runtime(plugin: dict, capability_args: dict | None) -> dict:
        plugin = dict(plugin)
        wanted = {k: v for k, v in (capability_args or {}).items() if (plugin.get("capabilities") or {}).get(k)}
        if wanted:
            plugin["runtimeConfig"] = wanted
        return plugin

    def add(self, config: dict, container_id: str, netns: str, ifname: str = "eth0",
            capability_args: dict | None = None, args: str = "", env: dict | None = None) -> dict:
        """ADD through every plugin; the final result (cached). Fails the test on an error."""
        reply = self.try_add(config, container_id, netns, ifname, capability_args, args, env)
        assert reply.ok, f"ADD failed: {reply.stdout} {reply.stderr}"
        return reply.reply

    def try_add(self, config: dict, container_id: str, netns: str, ifname: str = "eth0",
                capability_args: dict | None = None, args: str = "", env: dict | None = None) -> Reply:
        prev = None
        reply = None
        for plugin in self.plugins_of(config):
            plugin = self._with_runtime(plugin, capability_args)
            if prev is not None:
                plugin["prevResult"] = prev
            reply = self.exec("ADD", plugin, container_id, netns, ifname, args=args, env=env)
            if not reply.ok:
                return reply
            prev = reply.reply
        self.cache[(config["name"], container_id, ifname)] = prev
        return reply

    def delete(self, config: dict, container_id: str, netns: str = "", ifname: str = "eth0",
               capability_args: dict | None = None, env: dict | None = None) -> Reply:
        prev = self.cache.get((config["name"], container_id, ifname))
        reply = Reply(0, {}, "", "")
        for plugin in reversed(self.plugins_of(config)):
            plugin = self._with_runtime(plugin, capability_args)
            if prev is not None:
                plugin["prevResult"] = prev
            reply = self.exec("DEL", plugin, container_id, netns, ifname, env=env)
            if not reply.ok:
                return reply
        self.cache.pop((config["name"], container_id, ifname), None)
        return reply

    def check(self, config: dict, container_id: str, netns: str, ifname: str = "eth0",
              capability_args: dict | None = None) -> Reply:
        prev = self.cache.get((config["name"], container_id, ifname))
        reply = Reply(0, {}, "", "")
        for plugin in self.plugins_of(config):
            plugin = self._with_runtime(plugin, capability_args)
            if prev is not None:
                plugin["prevResult"] = prev
            reply = self.exec("CHECK", plugin, container_id, netns, ifname)
            if not reply.ok:
                return reply
        return reply


def _pids_in(netns: str) -> list[int]:
    try:
        target = os.stat(netns)
    except OSError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                st = os.stat(f"/proc/{entry}/ns/net")
                if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                    pids.append(int(entry))
    return pids


# --- what the tests check on the daemon's side -------------------------------------------------------

_subnets = iter(range(10, 250))


def unique(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(2)}"


def subnet() -> str:
    return f"10.79.{next(_subnets)}.0/24"


def make_network(host, driver: str = "bridge") -> tuple[str, str]:
    name, net = unique("cni"), subnet()
    host.netd("network", "create", "-d", driver, "--subnet", net, name)
    return name, net


def netd_config(host, network: str, version: str = "1.0.0", **extra) -> dict:
    return {"cniVersion": version, "name": network, "type": "netd", "socket": host.socket, **extra}


def cni_sandboxes(host) -> list[str]:
    return [c["Names"][0] for c in json.loads(host.netd("ps", "-a", "--format", "json")) if c["Command"] == "(cni sandbox)"]


def cni_allocations(host, network: str) -> list[dict]:
    return [a for a in json.loads(host.netd("ipam", "inspect", network, "--format", "json"))
            if a["Container"].startswith("cni-")]


def host_veths(host) -> list[str]:
    out = host.sh("ip -o link show").stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ": vnd" in line]


def eventually(check, timeout: float = 3.0):
    """netd deletes the interfaces of a DEL in the background, in batches (the container's side
    is renamed out of the way at once): wait for them."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def assert_nothing_left(host, *networks: str) -> None:
    assert cni_sandboxes(host) == []
    for network in networks:
        assert cni_allocations(host, network) == []
    assert eventually(lambda: host_veths(host) == []), host_veths(host)
    from netd.api.client import Client
    assert Client(f"unix://{host.socket}").request("GET", "/cni/attachments") == []
