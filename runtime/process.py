"""Container processes: spawn them in their own namespaces, notice their exit, stop them.

spawn() never forks the (multi-threaded) daemon: it runs the single-threaded helper
runtime/enter.py, which forks the container as PID 1 of a new pid namespace and
exits. The daemon is a child subreaper (Reaper.start()), so the container is
re-parented to it and the Reaper collects its exit status through a pidfd.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import marshal
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from runtime.errors import BadSpec, RuntimeFailure

log = logging.getLogger(__name__)

ENTER_HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "enter.py")
PR_SET_CHILD_SUBREAPER = 36


@dataclass
class ProcessSpec:
    cmd: list[str]
    netns_path: str | None = None  # None: the daemon's own network namespace (host mode)
    hostname: str | None = None  # None: keep the host's UTS namespace
    # Container path ("/etc/hosts") -> host file bind-mounted there. Update such a file
    # in place (truncate and write), not by rename: the mount follows the inode.
    etc_files: dict[str, str] = field(default_factory=dict)
    rootfs: str | None = None  # chroot directory; None: the host's files, like `ip netns exec`
    env: dict[str, str] = field(default_factory=dict)  # added to PATH and HOME defaults
    log_path: str = "/dev/null"  # stdout and stderr are appended here
    workdir: str = "/"
    # Capability numbers the process keeps (runtime.capabilities); None: all (--privileged).
    capabilities: list[int] | None = None
    no_new_privs: bool = True


@dataclass(frozen=True)
class ProcessHandle:
    pid: int
    start_time: int  # clock ticks after boot (/proc/PID/stat field 22): tells a reused pid apart


def spawn(spec: ProcessSpec) -> ProcessHandle:
    """Start `spec.cmd` in new uts (if hostname), ipc, pid and mount namespaces.

    Returns once the command has been exec'd. Raises BadSpec for the user's
    mistakes (executable not found, bad workdir) and RuntimeFailure for the rest; in
    both cases nothing is left running and no mount is left behind.
    """
    if not spec.cmd:
        raise BadSpec("cannot start container: no command given")
    try:
        helper = subprocess.run(
            [sys.executable, "-I", "-S", ENTER_HELPER],
            input=marshal.dumps(dataclasses.asdict(spec)),
            capture_output=True, timeout=60, check=False,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeFailure("cannot start container: the runtime helper did not answer within 60s") from None
    try:
        reply = marshal.loads(helper.stdout)
    except (EOFError, ValueError, TypeError):
        stderr = helper.stderr.decode(errors="replace").strip().splitlines()
        raise RuntimeFailure("cannot start container: runtime helper failed: "
                       f"{stderr[-1] if stderr else f'exit status {helper.returncode}'}") from None
    if "error" in reply:
        error = BadSpec if reply.get("kind") == "bad_request" else RuntimeFailure
        raise error(f"cannot start container: {reply['error']}")
    handle = ProcessHandle(pid=reply["pid"], start_time=reply["start_time"])
    if _active_reaper is not None:
        # Watched from birth: an exit status is never lost, even for `true`.
        _active_reaper.watch(handle.pid)
    return handle


def _exit_code_of(result: os.waitid_result) -> int:
    """Shell convention, as Docker reports it: the status, or 128 + the killing signal."""
    return result.si_status if result.si_code == os.CLD_EXITED else 128 + result.si_status


ExitCallback = Callable[[int, int | None], None]
_active_reaper: Reaper | None = None


def active_reaper() -> Reaper | None:
    """The started Reaper that spawn() registers new containers with, if any."""
    return _active_reaper


class Reaper:
    """Collects the exit of container processes; one per daemon, started once.

    Each watched pid has a pidfd in an epoll set. When it becomes readable the
    process has exited; waitid(P_PIDFD) collects the status of that process only
    (never waitpid(-1), which would steal statuses the subprocess module waits
    for, and no pid-reuse race). A process that is not our child (adopted by init
    while the daemon was down) still has its exit noticed, with exit code None.

    Exit codes are 0-255, 128 + N for a process killed by signal N, None if unknown.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pidfds: dict[int, int] = {}  # watched pid -> pidfd (running)
        self._pids: dict[int, int] = {}  # pidfd -> pid
        self._exited: dict[int, int | None] = {}  # pid -> exit code (None: unknown)
        self._callbacks: dict[int, list[ExitCallback]] = {}
        self._epoll = select.epoll()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Become a child subreaper (orphaned containers come to us) and start the thread."""
        global _active_reaper
        if self._thread is not None:
            return
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(code)}")
        self._thread = threading.Thread(target=self._run, name="netd-reaper", daemon=True)
        self._thread.start()
        _active_reaper = self

    def watch(self, pid: int) -> None:
        """Start watching `pid`, forgetting any earlier exit recorded for that number."""
        with self._cond:
            self._watch_locked(pid, fresh=True)

    def _watch_locked(self, pid: int, fresh: bool) -> None:
        if pid in self._pidfds or (not fresh and pid in self._exited):
            return
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            # Gone before we looked (and not a zombie child of ours): exited, code unknown.
            self._record_exit(pid, None)
            return
        except OSError as e:
            # Out of descriptors (EMFILE): a process nobody watches would be an orphan that holds
            # its address forever. Better a container that exited at once, and a log line.
            log.error("cannot watch process %d (%s): killing it", pid, e)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            self._record_exit(pid, None)
            return
        self._exited.pop(pid, None)
        self._pidfds[pid] = pidfd
        self._pids[pidfd] = pid
        self._epoll.register(pidfd, select.EPOLLIN)

    MAX_EXITS = 4096   # exits remembered for containers not yet removed; the oldest go first

    def _record_exit(self, pid: int, code: int | None) -> None:
        self._exited[pid] = code
        while len(self._exited) > self.MAX_EXITS:
            self._exited.pop(next(iter(self._exited)))
        self._cond.notify_all()

    def forget(self, pid: int) -> None:
        """Drop the recorded exit and pending callbacks of `pid` (its container was removed).

        Exits are kept until then. A pid still running stays watched, so that it is
        still reaped when it exits.
        """
        with self._cond:
            self._exited.pop(pid, None)
            self._callbacks.pop(pid, None)

    def exited(self, pid: int) -> bool:
        with self._cond:
            self._watch_locked(pid, fresh=False)
            return pid in self._exited

    def exit_code(self, pid: int) -> int | None:
        """The exit code if `pid` has exited and it is known; None while running or unknown."""
        with self._cond:
            self._watch_locked(pid, fresh=False)
            return self._exited.get(pid)

    def wait(self, pid: int, timeout: float | None = None) -> int | None:
        """Wait for `pid` to exit; its exit code, or None on timeout or if unknown."""
        with self._cond:
            self._watch_locked(pid, fresh=False)
            self._cond.wait_for(lambda: pid in self._exited, timeout)
            return self._exited.get(pid)

    def on_exit(self, pid: int, callback: ExitCallback) -> None:
        """Call `callback(pid, exit_code)` once `pid` exits: from the reaper thread, or
        right now in the caller's thread if it already has."""
        with self._cond:
            self._watch_locked(pid, fresh=False)
            if pid not in self._exited:
                self._callbacks.setdefault(pid, []).append(callback)
                return
            code = self._exited[pid]
        callback(pid, code)

    def _run(self) -> None:
        while True:
            for pidfd, _ in self._epoll.poll():
                try:
                    self._collect(pidfd)
                except Exception:  # the thread must outlive any one bad pid
                    log.exception("collecting the exit of pidfd %d failed", pidfd)

    def _collect(self, pidfd: int) -> None:
        try:
            result = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            code = None  # not our child: someone else reaps it, we only know it ended
        else:
            if result is None:
                time.sleep(0.01)  # readable, not yet reapable (never seen): retry without spinning
                return
            code = _exit_code_of(result)
        with self._cond:
            pid = self._pids.pop(pidfd)
            del self._pidfds[pid]
            self._epoll.unregister(pidfd)
            os.close(pidfd)
            self._record_exit(pid, code)
            callbacks = self._callbacks.pop(pid, [])
        for callback in callbacks:
            try:
                callback(pid, code)
            except Exception:
                log.exception("exit callback for pid %d failed", pid)


def process_start_time(pid: int) -> int | None:
    """When `pid` started, in clock ticks after boot; None if there is no such process."""
    stat = _read_stat(pid)
    return None if stat is None else int(stat[19])


def _read_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat fields from field 3 (state) on; the command name may hold spaces."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def is_running(pid: int, start_time: int) -> bool:
    """True if the process `pid` that started at `start_time` is alive (not a zombie)."""
    stat = _read_stat(pid)
    return stat is not None and int(stat[19]) == start_time and stat[0] not in ("Z", "X")


def _open_pidfd(handle: ProcessHandle) -> int | None:
    """A pidfd for exactly this process, or None if it is gone (or its pid reused)."""
    try:
        pidfd = os.pidfd_open(handle.pid)
    except ProcessLookupError:
        return None
    # Checked after opening: if the start time still matches, the pidfd is the right process.
    if process_start_time(handle.pid) != handle.start_time:
        os.close(pidfd)
        return None
    return pidfd


def _wait_pidfd(pidfd: int, timeout: float) -> bool:
    """True once the process has exited (readable pidfd), False on timeout."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(max(0.0, timeout) * 1000))


def _signal_and_wait(handle: ProcessHandle, signals: list[tuple[int, float]]) -> None:
    pidfd = _open_pidfd(handle)
    if pidfd is None:
        return
    try:
        for signum, timeout in signals:
            try:
                signal.pidfd_send_signal(pidfd, signum)
            except ProcessLookupError:
                break
            if _wait_pidfd(pidfd, timeout):
                break
        else:
            raise RuntimeFailure(f"process {handle.pid} did not exit after SIGKILL")
    finally:
        os.close(pidfd)
    if _active_reaper is not None:
        # Let the exit code be recorded before we return (it is a moment away).
        _active_reaper.wait(handle.pid, timeout=5.0)


def stop(handle: ProcessHandle, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds; returns once the process has exited.

    PID 1 of a pid namespace ignores signals it has no handler for (a plain `sleep`
    ignores SIGTERM), hence the SIGKILL. Its exit kills the whole pid namespace.
    """
    _signal_and_wait(handle, [(signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)])


def kill(handle: ProcessHandle) -> None:
    """SIGKILL now; returns once the process has exited."""
    _signal_and_wait(handle, [(signal.SIGKILL, 10.0)])


def exec_argv(pid: int, cmd: list[str], rootfs: bool) -> list[str]:
    """The argv that runs `cmd` inside the running container `pid` (for the CLI to execvp).

    util-linux nsenter joins its namespaces and its working directory (as `docker exec`
    starts in the container's); with a rootfs, also its root. --pid makes nsenter
    fork, so the command is in the container's pid namespace (and dies with its PID 1).
    """
    argv = ["nsenter", f"--target={pid}", "--net", "--uts", "--ipc", "--mount", "--pid"]
    if rootfs:
        argv.append("--root")
    return [*argv, "--wd", "--", *cmd]

