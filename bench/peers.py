"""The peers netd's attach benchmark is measured against: Docker's bridge driver and the CNI
reference bridge plugin, each behind the same small interface (`AttachPeer`).

    python -m bench.peers docker --n 20          # one peer alone, for debugging
    python -m bench.peers docker --n 20 --cli    # time `docker network connect` instead
    python -m bench.peers cni --n 20

Neither peer touches the machine's own network namespace:

- DockerBridgePeer starts Debian's `dockerd` (20.10) inside a network namespace it creates, in a
  private mount namespace (fresh /sys for that netns, a tmpfs on /run, /etc/docker hidden), with
  its data root, exec root, pid file, config file and API socket in a temp dir and
  containers under a cgroup parent of its own. So docker0, its iptables rules and its FORWARD
  policy of DROP stay in that namespace, and every mount it makes dies with its mount namespace.
  dockerd starts its own containerd (state under the temp dir). The image is built offline by
  importing a tar of busybox-static. Attach/detach are `POST /networks/{id}/connect|disconnect`
  over the Engine API on the Unix socket (a kept-alive connection; no CLI start-up in the
  figure), or with use_cli=True `docker network connect|disconnect` as a user types it.
- CniBridgePeer runs `/usr/lib/cni/bridge` (host-local IPAM) from a private "host" namespace,
  one exec per ADD or DEL, as a CNI runtime does; the containers are bare network namespaces.

stop() removes everything, also after a failure, and checks nothing is left (processes,
mounts, namespaces, cgroups); leftovers are reported as an error.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import ctypes
import errno
import http.client
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlencode

from bench.stats import print_table, summarize

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class PeerUnavailable(RuntimeError):
    """The peer cannot run on this machine (missing package, daemon refuses to start...)."""


class PeerError(RuntimeError):
    """The peer ran but an operation failed (error reply from Docker or a CNI plugin)."""


class LeftoverError(RuntimeError):
    """stop() could not remove everything the peer made."""


@runtime_checkable
class AttachPeer(Protocol):
    name: str

    def start(self) -> None:
        """Set up: daemon, network, config."""

    def make_sandboxes(self, n: int) -> None:
        """Have n containers/namespaces ready to attach (not attached); adds to what exists."""

    def attach(self, i: int) -> float:
        """Attach sandbox i to the network; seconds it took."""
        ...

    def detach(self, i: int) -> float:
        """Detach sandbox i from the network; seconds it took."""
        ...

    def memory_rss_bytes(self) -> int | None:
        """The daemon's RSS, where there is a daemon."""
        ...

    def stop(self) -> None:
        """Remove everything it made, also after a failure."""


# --- small system helpers ------------------------------------------------------------------


def _run(argv: list[str], check: bool = True, timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess:
    env = kwargs.pop("env", None) or {**os.environ, "PATH": SYSTEM_PATH}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, **kwargs)
    if check and result.returncode != 0:
        raise PeerError(f"{' '.join(argv)} failed ({result.returncode}): "
                        f"{result.stderr.strip() or result.stdout.strip()}")
    return result


def timed_command(argv: list[str], env: dict[str, str], what: str) -> float:
    """Seconds one command takes end to end, as a user runs it (fork, start-up, the call)."""
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise PeerError(f"{what}: {result.stderr.strip()}")
    return elapsed


def _token() -> str:
    return secrets.token_hex(3)


def netns_add(name: str) -> None:
    _run(["ip", "netns", "add", name])
    _run(["ip", "-n", name, "link", "set", "lo", "up"])


def netns_exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, name))


def netns_pids(name: str) -> list[int]:
    """PIDs of processes whose network namespace is the named one (compared by inode)."""
    try:
        target = os.stat(os.path.join(NETNS_DIR, name))
    except FileNotFoundError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            pids.append(int(entry))
    return pids


def netns_delete(name: str) -> None:
    if netns_exists(name):
        result = _run(["ip", "netns", "del", name], check=False)
        if result.returncode != 0 and netns_exists(name):
            raise PeerError(f"ip netns del {name}: {result.stderr.strip()}")


def kill_pids(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until none of pids exists (zombies count as gone); return those still alive."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive:
        alive = [p for p in alive if _alive(p)]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return alive


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def mounts_under(path: str, pids: list[int] | None = None) -> list[str]:
    """Mount points at or below path, as seen by this process and by each of pids."""
    path = os.path.realpath(path)
    found: set[str] = set()
    for pid in ["self"] + [str(p) for p in (pids or [])]:
        try:
            with open(f"/proc/{pid}/mountinfo") as f:
                for line in f:
                    point = line.split()[4].replace("\\040", " ")
                    if point == path or point.startswith(path + "/"):
                        found.add(point)
        except OSError:
            continue
    return sorted(found)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _setns_preexec(fd: int):
    """A preexec_fn moving the child into the network namespace open at fd."""
    libc = _libc()

    def enter() -> None:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns: {os.strerror(err)}")

    return enter


# --- Docker Engine API over a Unix socket ----------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 120):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


class DockerAPI:
    """A kept-alive HTTP/1.1 connection to dockerd's Unix socket. Not thread-safe: one per thread."""

    VERSION = "v1.41"  # Docker 20.10

    def __init__(self, socket_path: str, timeout: float = 120):
        self.socket_path = socket_path
        self.timeout = timeout
        self.conn: _UnixHTTPConnection | None = None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                content_type: str = "application/json", expect: tuple[int, ...] = (200, 201, 204)) -> Any:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        headers = {"Content-Type": content_type} if data is not None else {}
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = _UnixHTTPConnection(self.socket_path, self.timeout)
            try:
                self.conn.request(method, f"/{self.VERSION}{path}", body=data, headers=headers)
                response = self.conn.getresponse()
                payload = response.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # dockerd closed the idle kept-alive connection: reconnect once (before timing matters)
                self.close()
                if attempt == 2:
                    raise
        if response.status not in expect:
            try:
                message = json.loads(payload).get("message", payload.decode(errors="replace"))
            except ValueError:
                message = payload.decode(errors="replace")
            raise PeerError(f"docker {method} {path}: {response.status} {message.strip()}")
        if payload and response.getheader("Content-Type", "").startswith("application/json"):
            return json.loads(payload)
        return payload


def busybox_rootfs_tar(busybox: str = "/bin/busybox") -> bytes:
    """A tar of a minimal root file system: static busybox with sh and sleep links."""
    if not os.path.exists(busybox):
        raise PeerUnavailable(f"{busybox} not found (install busybox-static)")
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for directory in ("bin", "dev", "etc", "proc", "sys", "tmp"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        tar.add(busybox, arcname="bin/busybox")
        for applet in ("sh", "sleep", "ip", "ping"):
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, "busybox", 0o777
            tar.addfile(info)
    return out.getvalue()


# The private mount namespace dockerd runs in (set up by /bin/sh, then exec dockerd):
# - a sysfs of its own network namespace on /sys (as `ip netns exec` does), with the host's
#   cgroup mounts carried over;
# - a tmpfs on /run, so containerd's shim sockets (/run/containerd/s), the iptables lock and any
#   default socket dockerd looks for stay private, and a system containerd is never picked up;
# - an empty /etc/docker, so its key.json (20.10 always writes /etc/docker/key.json) never
#   lands in the host's.
_DOCKERD_WRAPPER = r"""
set -e
tmp="$1"; shift
mkdir -p "$tmp/cgroup" "$tmp/etc-docker"
mount --rbind /sys/fs/cgroup "$tmp/cgroup"
mount -t sysfs sysfs /sys
mount --rbind "$tmp/cgroup" /sys/fs/cgroup
mount -t tmpfs -o mode=0755 netd-bench-run /run
if [ -n "$PLUGIN_DIR" ]; then
    mkdir -p /run/docker/plugins
    mount --bind "$PLUGIN_DIR" /run/docker/plugins
fi
if [ -d /etc/docker ]; then
    mount --bind "$tmp/etc-docker" /etc/docker
else  # dockerd would create /etc/docker/key.json: give it a copy-on-write /etc instead
    mkdir -p "$tmp/etc-upper" "$tmp/etc-work"
    mount -t overlay netd-bench-etc -o "lowerdir=/etc,upperdir=$tmp/etc-upper,workdir=$tmp/etc-work" /etc
fi
exec "$@"
"""


class DockerBridgePeer:
    """Docker's bridge driver: a private dockerd, one user-defined bridge network, containers
    that are running but on no network, connected and disconnected one at a time."""

    name = "docker"

    def __init__(self, use_cli: bool = False, subnet: str = "10.231.0.0/16", workers: int = 4,
                 dockerd: str = "/usr/sbin/dockerd", docker_cli: str = "/usr/bin/docker",
                 start_timeout: float = 60, default_bridge: bool = False, second: bool = False,
                 netns: str | None = None, plugin_dir: str | None = None, own_network: bool = True) -> None:
        """use_cli: time `docker network connect|disconnect` (fork + CLI start-up included)
        instead of the API call. workers: parallel container creation in make_sandboxes (4 is
        about as fast as it gets on 2 CPUs). default_bridge: attach to Docker's built-in
        `bridge` network (docker0: no embedded DNS, so no resolver set-up per container) instead
        of a user-defined one; for reference only, netd is compared on user-defined networks."""
        self.use_cli = use_cli
        self.default_bridge = default_bridge
        # second: the containers are already on a network (a user-defined "home" one) and are
        # connected to a second: the like-for-like case. Otherwise they are on none (Docker's slow
        # path: the first connect sets up the container's embedded DNS).
        self.second = second
        self.subnet = subnet
        self.workers = max(1, workers)
        self.dockerd = dockerd
        self.docker_cli = docker_cli
        self.start_timeout = start_timeout
        self.token = _token()
        self.prefix = f"netd-bench-docker-{self.token}"
        # netns: run in a namespace the caller made and keeps (e.g. a netd test host's, so that
        # dockerd sees netd's interfaces); plugin_dir: what dockerd finds in /run/docker/plugins.
        self.netns = netns or self.prefix
        self.netns_owned = netns is None
        self.plugin_dir = plugin_dir
        self.own_network = own_network
        self.cgroup_parent = f"/{self.prefix}"
        self.image = f"netd-bench-busybox-{self.token}:latest"
        self.network_name = f"netd-bench-{self.token}"
        self.label = {"netd.bench": self.token}
        self.tmp: str | None = None
        self.socket_path = ""
        self.process: subprocess.Popen | None = None
        self.log_file: io.TextIOWrapper | None = None
        self.api: DockerAPI | None = None
        self.network_id: str | None = None
        self.containers: list[str] = []
        self._local = threading.local()
        self._stopped = False

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        if os.geteuid() != 0:
            raise PeerUnavailable("needs root (network namespaces, dockerd)")
        for binary in (self.dockerd, "/usr/bin/containerd", "/usr/sbin/runc", "/usr/bin/containerd-shim-runc-v2"):
            if not os.path.exists(binary):
                raise PeerUnavailable(f"{binary} not found: install docker.io (Debian) for the Docker peer")
        if self.use_cli and not os.path.exists(self.docker_cli):
            raise PeerUnavailable(f"{self.docker_cli} not found (docker.io's CLI)")
        self.tmp = tempfile.mkdtemp(prefix=f"{self.prefix}-")
        self.socket_path = os.path.join(self.tmp, "docker.sock")
        with open(os.path.join(self.tmp, "daemon.json"), "w") as f:
            json.dump({}, f)
        if self.netns_owned:
            netns_add(self.netns)
        self._start_dockerd()
        self.api = DockerAPI(self.socket_path)
        self._import_image()
        if not self.own_network:
            return
        if self.default_bridge:
            self.network_id = self.api.request("GET", "/networks/bridge")["Id"]
            return
        reply = self.api.request("POST", "/networks/create", {
            "Name": self.network_name, "Driver": "bridge", "CheckDuplicate": True, "Labels": self.label,
            "IPAM": {"Driver": "default", "Config": [{"Subnet": self.subnet}]}})
        self.network_id = reply["Id"]
        if self.second:
            self.api.request("POST", "/networks/create", {
                "Name": self.network_name + "-home", "Driver": "bridge", "CheckDuplicate": True, "Labels": self.label,
                "IPAM": {"Driver": "default", "Config": [{"Subnet": "10.234.0.0/16"}]}})

    def _start_dockerd(self) -> None:
        assert self.tmp
        tmp = self.tmp
        argv = [
            "nsenter", f"--net={os.path.join(NETNS_DIR, self.netns)}", "--",
            "unshare", "--mount", "--propagation", "slave", "--",
            "/bin/sh", "-c", _DOCKERD_WRAPPER, "netd-bench-dockerd", tmp,
            self.dockerd,
            "--data-root", os.path.join(tmp, "data"),
            "--exec-root", os.path.join(tmp, "exec"),
            "--pidfile", os.path.join(tmp, "dockerd.pid"),
            "-H", f"unix://{self.socket_path}",
            "--config-file", os.path.join(tmp, "daemon.json"),
            "--cgroup-parent", self.cgroup_parent,
            "--log-level", "warn",
            "--group", "root",
        ]
        self.log_file = open(os.path.join(tmp, "dockerd.log"), "w")  # closed in stop()
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log_file,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        env={**os.environ, "PATH": SYSTEM_PATH, "PLUGIN_DIR": self.plugin_dir or ""})
        deadline = time.monotonic() + self.start_timeout
        probe = DockerAPI(self.socket_path, timeout=5)
        try:
            while True:
                if self.process.poll() is not None:
                    raise PeerUnavailable(f"dockerd exited ({self.process.returncode}) at start-up: "
                                          f"{self._log_tail()}")
                if os.path.exists(self.socket_path):
                    with contextlib.suppress(OSError, http.client.HTTPException, PeerError):
                        if probe.request("GET", "/_ping") == b"OK":
                            return
                    probe.close()
                if time.monotonic() > deadline:
                    raise PeerUnavailable(f"dockerd did not answer on {self.socket_path} within "
                                          f"{self.start_timeout:.0f} s: {self._log_tail()}")
                time.sleep(0.1)
        finally:
            probe.close()

    def restart_dockerd(self) -> None:
        """Stop dockerd (it stops its containers) and start it again with the same state. (A
        SIGKILL is not offered: in its private mount namespace the new dockerd cannot take over
        the old containerd.)"""
        assert self.process is not None
        if self.api is not None:
            self.api.close()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)
        if self.log_file is not None:
            self.log_file.close()
        self._start_dockerd()
        self.api = DockerAPI(self.socket_path)

    def _log_tail(self, lines: int = 8) -> str:
        if not self.tmp:
            return ""
        with contextlib.suppress(OSError), open(os.path.join(self.tmp, "dockerd.log")) as f:
            return " | ".join(line.strip() for line in f.read().splitlines()[-lines:]) or "(no output)"
        return "(no log)"

    def _import_image(self) -> None:
        assert self.api
        repo, tag = self.image.rsplit(":", 1)
        reply = self.api.request("POST", "/images/create?" + urlencode({"fromSrc": "-", "repo": repo, "tag": tag}),
                                 raw=busybox_rootfs_tar(), content_type="application/x-tar")
        text = reply.decode(errors="replace") if isinstance(reply, bytes) else json.dumps(reply)
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                if "error" in json.loads(line):
                    raise PeerError(f"docker import failed: {line}")

    # --- sandboxes ----------------------------------------------------------------------------

    def _thread_api(self) -> DockerAPI:
        api = getattr(self._local, "api", None)
        if api is None:
            api = self._local.api = DockerAPI(self.socket_path)
        return api

    def _make_container(self, i: int) -> str:
        """A running container on no network at all (`docker run --network none`, then
        disconnected from `none`: Docker refuses to connect a container that is on `none`)."""
        api = self._thread_api()
        mode = self.network_name + "-home" if self.second else "none"
        reply = api.request("POST", "/containers/create?" + urlencode({"name": f"{self.prefix}-{i}"}), {
            "Image": self.image, "Cmd": ["/bin/sleep", "2147483647"], "Labels": self.label,
            "HostConfig": {"NetworkMode": mode, "LogConfig": {"Type": "none"}}})
        cid = reply["Id"]
        api.request("POST", f"/containers/{cid}/start")
        if not self.second:
            api.request("POST", "/networks/none/disconnect", {"Container": cid, "Force": False})
        return cid

    def make_sandboxes(self, n: int) -> None:
        if self.api is None:
            raise PeerError("start() first")
        first = len(self.containers)
        if n <= first:
            return
        with concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="docker-sandbox") as pool:
            made = list(pool.map(self._make_container, range(first, n)))
        self.containers.extend(made)

    # --- the measured operations ----------------------------------------------------------------

    def attach(self, i: int) -> float:
        return self._network_op("connect", i)

    def detach(self, i: int) -> float:
        return self._network_op("disconnect", i)

    def _network_op(self, op: str, i: int) -> float:
        assert self.api and self.network_id
        cid = self.containers[i]
        if self.use_cli:
            argv = [self.docker_cli, "-H", f"unix://{self.socket_path}", "network", op, self.network_id, cid]
            env = {"PATH": SYSTEM_PATH, "DOCKER_CONFIG": os.path.join(self.tmp or "", "cli")}
            return timed_command(argv, env, f"docker network {op} {i}")
        body: dict[str, Any] = {"Container": cid}
        if op == "disconnect":
            body["Force"] = False
        started = time.perf_counter()
        self.api.request("POST", f"/networks/{self.network_id}/{op}", body)
        return time.perf_counter() - started

    def memory_rss_bytes(self) -> int | None:
        """dockerd's RSS (the process that runs libnetwork)."""
        pid = self._dockerd_pid()
        return rss_bytes(pid) if pid else None

    def memory_detail(self) -> dict[str, int]:
        """RSS of dockerd, its containerd, and all shims together (bytes)."""
        detail = {"dockerd": 0, "containerd": 0, "shims": 0, "shim_count": 0}
        for pid in netns_pids(self.netns):
            try:
                with open(f"/proc/{pid}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                continue
            rss = rss_bytes(pid) or 0
            if comm == "dockerd":
                detail["dockerd"] += rss
            elif comm == "containerd":
                detail["containerd"] += rss
            elif comm.startswith("containerd-shim"):
                detail["shims"] += rss
                detail["shim_count"] += 1
        return detail

    def _dockerd_pid(self) -> int | None:
        if not self.tmp:
            return None
        with contextlib.suppress(OSError, ValueError), open(os.path.join(self.tmp, "dockerd.pid")) as f:
            return int(f.read().strip())
        return None

    # --- teardown -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Remove containers and network over the API, stop dockerd (which stops its containerd),
        kill whatever is left in the namespace or the cgroups, delete netns and temp dir, then
        check that nothing is left."""
        if self._stopped:
            return
        self._stopped = True
        problems: list[str] = []
        if self.process is not None and self.process.poll() is None and self.api is not None:
            try:
                self._remove_containers()
                if self.network_id and not self.default_bridge:
                    self.api.request("DELETE", f"/networks/{self.network_id}", expect=(200, 204, 404))
            except Exception as e:  # noqa: BLE001 - go on tearing down by force
                problems.append(f"API clean-up failed ({e}); killing instead")
        for api in (self.api,):
            if api is not None:
                api.close()
        self._stop_processes(problems)
        self._remove_cgroups(problems)
        if self.netns_owned:
            try:
                netns_delete(self.netns)
            except PeerError as e:
                problems.append(str(e))
        if self.log_file is not None:
            self.log_file.close()
        if self.tmp:
            leftover_mounts = mounts_under(self.tmp)
            if leftover_mounts:
                problems.append(f"mounts left under {self.tmp}: {leftover_mounts[:5]}")
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)
                if os.path.exists(self.tmp):
                    problems.append(f"could not delete {self.tmp}")
        problems += self.leftovers()
        if problems:
            raise LeftoverError("docker peer clean-up: " + "; ".join(problems))

    def _remove_containers(self) -> None:
        assert self.api
        listed = self.api.request("GET", "/containers/json?" + urlencode(
            {"all": "1", "filters": json.dumps({"label": [f"netd.bench={self.token}"]})}))
        ids = [c["Id"] for c in listed]

        def remove(cid: str) -> None:
            self._thread_api().request("DELETE", f"/containers/{cid}?force=1", expect=(200, 204, 404))

        with concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="docker-rm") as pool:
            list(pool.map(remove, ids))
        self.containers.clear()

    def _stop_processes(self, problems: list[str]) -> None:
        if self.process is not None and self.process.poll() is None:
            # SIGTERM to dockerd (our child is the wrapper that exec'd into dockerd).
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                problems.append("dockerd ignored SIGTERM for 30 s; killed")
                self.process.kill()
                self.process.wait(timeout=10)
        # Whatever is left that we started: containerd, shims (in our netns), container
        # processes (in our cgroups).
        for _ in range(3):
            mine = set(netns_pids(self.netns)) if self.netns_owned else set()   # a borrowed one holds others' too
            left = sorted(mine | set(self._cgroup_pids()) | set(self._pids_under_tmp()))
            if not left:
                break
            kill_pids(left)
            wait_gone(left, 10)

    def _cgroup_dirs(self) -> list[str]:
        """Our cgroup-parent directory in every mounted hierarchy (v1 and the unified one)."""
        dirs = []
        root = "/sys/fs/cgroup"
        candidates = [root] + [os.path.join(root, d) for d in sorted(os.listdir(root))] if os.path.isdir(root) else []
        for hierarchy in candidates:
            path = os.path.join(hierarchy, self.cgroup_parent.lstrip("/"))
            if os.path.isdir(path):
                dirs.append(path)
        return dirs

    def _cgroup_pids(self) -> list[int]:
        pids: set[int] = set()
        for top in self._cgroup_dirs():
            for directory, _subdirs, files in os.walk(top):
                if "cgroup.procs" in files:
                    with contextlib.suppress(OSError), open(os.path.join(directory, "cgroup.procs")) as f:
                        pids.update(int(p) for p in f.read().split())
        return sorted(pids)

    def _remove_cgroups(self, problems: list[str]) -> None:
        for top in self._cgroup_dirs():
            for directory, _subdirs, _files in sorted(os.walk(top, topdown=False), key=lambda w: -len(w[0])):
                for attempt in range(20):
                    try:
                        os.rmdir(directory)
                        break
                    except FileNotFoundError:
                        break
                    except OSError as e:
                        if e.errno != errno.EBUSY or attempt == 19:
                            problems.append(f"cannot remove cgroup {directory}: {e}")
                            break
                        time.sleep(0.1)

    def _pids_under_tmp(self) -> list[int]:
        """Processes whose command line names our temp dir (containerd and its shims)."""
        if not self.tmp:
            return []
        found = []
        for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
                if self.tmp.encode() in f.read():
                    found.append(pid)
        return found

    def leftovers(self) -> list[str]:
        """What of ours still exists on the machine (empty when clean)."""
        found = []
        if self.netns_owned and netns_exists(self.netns):
            found.append(f"network namespace {self.netns}")
        if self.tmp and os.path.exists(self.tmp):
            found.append(f"temp dir {self.tmp}")
        if self.tmp:
            everywhere = [int(p) for p in os.listdir("/proc") if p.isdigit()]
            mounts = mounts_under(self.tmp, everywhere)
            if mounts:
                found.append(f"mounts {mounts[:5]}")
            stray = []
            for pid in everywhere:
                with contextlib.suppress(OSError):
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if self.tmp.encode() in f.read():
                            stray.append(pid)
            if stray:
                found.append(f"processes {stray}")
        cgroups = self._cgroup_dirs()
        if cgroups:
            found.append(f"cgroups {cgroups[:3]}")
        return found


class CniBridgePeer:
    """The CNI reference bridge plugin with host-local IPAM: one exec per ADD/DEL, run from a
    private "host" namespace, against bare container network namespaces."""

    name = "cni"

    def __init__(self, subnet: str = "10.232.0.0/16", plugin_dir: str = "/usr/lib/cni",
                 cni_version: str = "1.0.0", second: bool = False) -> None:
        self.second = second   # each namespace on a home network first (eth0); the measured one is eth1
        self.subnet = subnet
        self.plugin_dir = plugin_dir
        self.cni_version = cni_version
        self.token = _token()
        self.prefix = f"netd-bench-cni-{self.token}"
        self.host_netns = self.prefix
        self.bridge = f"nbcni{self.token}"  # <= 15 characters
        self.tmp: str | None = None
        self.config: dict[str, Any] = {}
        self.sandboxes: list[str] = []
        self.results: dict[int, dict[str, Any]] = {}
        self.host_fd: int | None = None
        self._stopped = False

    def start(self) -> None:
        if os.geteuid() != 0:
            raise PeerUnavailable("needs root (network namespaces)")
        for plugin in ("bridge", "host-local"):
            if not os.access(os.path.join(self.plugin_dir, plugin), os.X_OK):
                raise PeerUnavailable(f"{self.plugin_dir}/{plugin} not found: install containernetworking-plugins")
        if shutil.which("iptables", path=SYSTEM_PATH) is None:
            raise PeerUnavailable("iptables not found (the bridge plugin needs it for ipMasq)")
        self.tmp = tempfile.mkdtemp(prefix=f"{self.prefix}-")
        netns_add(self.host_netns)
        self.host_fd = os.open(os.path.join(NETNS_DIR, self.host_netns), os.O_RDONLY | os.O_CLOEXEC)
        self.config = {
            "cniVersion": self.cni_version,
            "name": f"netd-bench-{self.token}",
            "type": "bridge",
            "bridge": self.bridge,
            "isGateway": True,
            "ipMasq": True,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": self.subnet}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": os.path.join(self.tmp, "ipam"),
            },
        }

    def make_sandboxes(self, n: int) -> None:
        if self.tmp is None:
            raise PeerError("start() first")
        names = [f"{self.prefix}-c{i}" for i in range(len(self.sandboxes), n)]
        if not names:
            return
        # One `ip -batch` for all of them: namespace creation is set-up, not measured. (lo stays
        # down: a runtime would run the separate `loopback` plugin; bridge does not need it.)
        script = "".join(f"netns add {name}\n" for name in names)
        result = subprocess.run(["ip", "-batch", "-"], input=script, capture_output=True, text=True, timeout=600)
        created = [name for name in names if netns_exists(name)]
        first = len(self.sandboxes)
        self.sandboxes.extend(created)
        if result.returncode != 0 or len(created) != len(names):
            raise PeerError(f"creating namespaces failed: {result.stderr.strip()}")
        if self.second:
            home = {**self.config, "name": self.config["name"] + "-home", "bridge": self.bridge[:12] + "h",
                    "ipam": {**self.config["ipam"], "ranges": [[{"subnet": "10.235.0.0/16"}]],
                             "dataDir": os.path.join(self.tmp, "ipam-home")}}
            for i in range(first, len(self.sandboxes)):
                self._exec("ADD", i, home, ifname="eth0")

    def _exec(self, command: str, i: int, config: dict[str, Any], ifname: str | None = None) -> tuple[float, dict[str, Any]]:
        assert self.host_fd is not None
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": f"{self.prefix}-c{i}",
            "CNI_NETNS": os.path.join(NETNS_DIR, self.sandboxes[i]),
            "CNI_IFNAME": ifname or ("eth1" if self.second else "eth0"),
            "CNI_PATH": self.plugin_dir,
            "PATH": SYSTEM_PATH,
        }
        stdin = json.dumps(config).encode()
        plugin = os.path.join(self.plugin_dir, config["type"])
        started = time.perf_counter()
        result = subprocess.run([plugin], input=stdin, capture_output=True, env=env,
                                preexec_fn=_setns_preexec(self.host_fd), pass_fds=(self.host_fd,), timeout=120)
        elapsed = time.perf_counter() - started
        reply: dict[str, Any] = {}
        if result.stdout.strip():
            try:
                reply = json.loads(result.stdout)
            except ValueError as e:
                raise PeerError(f"CNI {command} {i}: unparsable reply {result.stdout[:200]!r}") from e
        if result.returncode != 0 or "code" in reply:
            message = reply.get("msg") or result.stderr.decode(errors="replace").strip()
            details = f" ({reply['details']})" if reply.get("details") else ""
            raise PeerError(f"CNI {command} {i} failed (exit {result.returncode}, code {reply.get('code')}): "
                            f"{message}{details}")
        return elapsed, reply

    def attach(self, i: int) -> float:
        elapsed, reply = self._exec("ADD", i, self.config)
        if not reply.get("ips") or not reply.get("interfaces"):
            raise PeerError(f"CNI ADD {i}: result without ips/interfaces: {json.dumps(reply)[:300]}")
        self.results[i] = reply
        return elapsed

    def detach(self, i: int) -> float:
        # As libcni does: the ADD result goes back to the plugin as prevResult.
        config = dict(self.config)
        if i in self.results:
            config["prevResult"] = self.results[i]
        elapsed, _ = self._exec("DEL", i, config)
        self.results.pop(i, None)
        return elapsed

    def memory_rss_bytes(self) -> int | None:
        return None  # no daemon: the plugin is a process per operation

    def stop(self) -> None:
        """Delete container namespaces (their veth ends go with them), the host namespace (bridge,
        iptables rules) and the data dir; check nothing is left."""
        if self._stopped:
            return
        self._stopped = True
        problems: list[str] = []
        if self.host_fd is not None:
            os.close(self.host_fd)
            self.host_fd = None
        names = [*self.sandboxes, self.host_netns]
        for name in names:
            pids = netns_pids(name)
            if pids:  # a plugin still running after a timeout: ours
                kill_pids(pids)
                wait_gone(pids, 5)
        script = "".join(f"netns del {name}\n" for name in names if netns_exists(name))
        if script:
            subprocess.run(["ip", "-force", "-batch", "-"], input=script, capture_output=True, text=True, timeout=600)
        for name in names:
            try:
                netns_delete(name)
            except PeerError as e:
                problems.append(str(e))
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
        problems += self.leftovers()
        if problems:
            raise LeftoverError("cni peer clean-up: " + "; ".join(problems))

    def leftovers(self) -> list[str]:
        found = [f"network namespace {name}" for name in [*self.sandboxes, self.host_netns] if netns_exists(name)]
        if self.tmp and os.path.exists(self.tmp):
            found.append(f"temp dir {self.tmp}")
        return found


PEERS: dict[str, type] = {"docker": DockerBridgePeer, "cni": CniBridgePeer}


def make_peer(name: str, **options: Any) -> AttachPeer:
    try:
        cls = PEERS[name]
    except KeyError:
        raise SystemExit(f"unknown peer {name!r}: choose from {', '.join(PEERS)}") from None
    return cls(**options)


def run_peer(peer: AttachPeer, n: int, out=sys.stdout) -> dict[str, Any]:
    """start, make n sandboxes, attach all, detach all, stop; print and return the figures."""
    figures: dict[str, Any] = {"peer": peer.name, "n": n}
    try:
        started = time.perf_counter()
        peer.start()
        figures["start_s"] = time.perf_counter() - started
        started = time.perf_counter()
        peer.make_sandboxes(n)
        figures["make_sandboxes_s"] = time.perf_counter() - started
        figures["attach"] = [peer.attach(i) for i in range(n)]
        figures["rss"] = peer.memory_rss_bytes()
        if isinstance(peer, DockerBridgePeer):
            figures["memory_detail"] = peer.memory_detail()
        figures["detach"] = [peer.detach(i) for i in reversed(range(n))]
    finally:
        started = time.perf_counter()
        peer.stop()
        figures["stop_s"] = time.perf_counter() - started
    a, d = summarize(figures["attach"]), summarize(figures["detach"])
    label = peer.name + (" (cli)" if getattr(peer, "use_cli", False) else "")
    print_table([[label, str(n), f"{a['median_ms']:.2f}", f"{a['p99_ms']:.2f}",
                  f"{d['median_ms']:.2f}", f"{d['p99_ms']:.2f}"]],
                ["PEER", "ENDPOINTS", "ATTACH MEDIAN ms", "ATTACH P99 ms", "DETACH MEDIAN ms", "DETACH P99 ms"],
                file=out)
    print(f"start {figures['start_s']:.2f} s, make_sandboxes({n}) {figures['make_sandboxes_s']:.2f} s, "
          f"stop {figures['stop_s']:.2f} s", file=out)
    if figures.get("rss"):
        print(f"daemon RSS with {n} endpoints: {figures['rss'] / 2**20:.1f} MiB", file=out)
    if figures.get("memory_detail"):
        m = figures["memory_detail"]
        print(f"dockerd {m['dockerd'] / 2**20:.1f} MiB, containerd {m['containerd'] / 2**20:.1f} MiB, "
              f"{m['shim_count']} shims {m['shims'] / 2**20:.1f} MiB", file=out)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description="Run one attach peer alone.")
    parser.add_argument("peer", choices=sorted(PEERS))
    parser.add_argument("--n", type=int, default=20, help="endpoints (default %(default)s)")
    parser.add_argument("--cli", action="store_true", help="docker: time `docker network connect` (the CLI)")
    parser.add_argument("--workers", type=int, default=4, help="docker: parallel container creation")
    parser.add_argument("--default-bridge", action="store_true",
                        help="docker: use the built-in `bridge` network (no embedded DNS) instead of a user-defined one")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 2
    options: dict[str, Any] = {}
    if args.peer == "docker":
        options = {"use_cli": args.cli, "workers": args.workers, "default_bridge": args.default_bridge}
    peer = make_peer(args.peer, **options)
    try:
        run_peer(peer, args.n)
    except PeerUnavailable as e:
        print(f"{args.peer} unavailable: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
