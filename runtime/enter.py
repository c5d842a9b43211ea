"""Container entry helper: `python3 -I -S enter.py`, a ProcessSpec (as a marshal'd dict) on stdin.

runtime.process.spawn() runs this as a separate, single-threaded process, because
the daemon is multi-threaded and must not fork itself. The helper:

1. joins the container's network namespace (if any) and unshares uts/ipc/pid;
2. forks: the child is PID 1 of the new pid namespace. It unshares its own mount
   namespace, sets it up (hostname, /etc files, /proc, /sys, chroot) and execs the
   command;
3. writes {"pid": HOST_PID, "start_time": TICKS} (or {"error": ..., "kind": ...}),
   marshal'd, on stdout once the exec has succeeded or failed, and exits without
   waiting. The container is then re-parented to the daemon (a child subreaper),
   so nothing stays resident per container.

Exec and set-up failures travel over a close-on-exec pipe: EOF means exec worked.

Every import costs spawn latency, so: marshal rather than json (both ends are the
same interpreter, sys.executable), _signal rather than signal (which pulls in enum),
and ./syscalls.py for the system calls (-I leaves this directory off sys.path).
"""

import _signal
import errno
import marshal
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import syscalls as ns  # noqa: E402

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class SetupError(Exception):
    """A failure to report to spawn(); kind is "bad_request" (the user's command) or "internal"."""

    def __init__(self, message, kind="internal"):
        super().__init__(message)
        self.kind = kind


def _inside(rootfs, path):
    """A container path as seen from the host (before the chroot)."""
    return os.path.join(rootfs, path.lstrip("/")) if rootfs else path


def _ensure_mount_point(path, directory):
    """Create a missing mount point, but only inside a rootfs: never in the host's own tree."""
    if os.path.lexists(path):
        return
    if directory:
        os.makedirs(path, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))


def _unescape_mountinfo(field):
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040), so
    every backslash starts one."""
    first, *rest = field.split("\\")
    return first + "".join(chr(int(part[:3], 8)) + part[3:] for part in rest)


def _unmount_netns_pins():
    """Drop every nsfs mount (pinned namespaces) from the container's mount namespace.

    The container's mount namespace starts as a copy of the daemon's, including the
    bind mounts that pin every other container's network namespace. Left there, they
    would keep those namespaces (and their interfaces) alive after netd deletes them,
    for as long as this container lives.
    """
    with open("/proc/self/mountinfo") as mountinfo:
        lines = mountinfo.read().splitlines()
    for line in reversed(lines):
        fields, _, after = line.partition(" - ")
        if after.split(" ", 1)[0] == "nsfs":
            try:
                ns.umount(_unescape_mountinfo(fields.split(" ")[4]), ns.MNT_DETACH)
            except OSError:
                pass  # already gone with a parent; nothing else depends on it


def _setup_and_exec(spec, stdio):
    """In the child (PID 1 of the new pid namespace); returns only by raising."""
    os.setsid()  # out of the daemon's session: a ^C on a foreground daemon must not hit containers
    os.dup2(stdio["stdin"], 0)
    os.dup2(stdio["log"], 1)
    os.dup2(stdio["log"], 2)

    ns.unshare(ns.CLONE_NEWNS)
    # Private first, before any mount, so that nothing propagates back to the host.
    ns.mount(None, "/", None, ns.MS_REC | ns.MS_PRIVATE)
    _unmount_netns_pins()

    rootfs = spec.get("rootfs")
    if spec.get("hostname"):
        try:
            ns.sethostname(spec["hostname"])  # of our new uts namespace
        except OSError as exc:
            raise SetupError(f"invalid hostname {spec['hostname']!r}: {os.strerror(exc.errno)}",
                             "bad_request") from None
    for container_path, host_file in sorted(spec.get("etc_files", {}).items()):
        target = _inside(rootfs, container_path)
        if rootfs:
            _ensure_mount_point(target, directory=False)
        elif not os.path.exists(target):
            raise SetupError(f"cannot bind-mount {host_file}: {container_path} does not exist on the host")
        ns.mount(host_file, target, None, ns.MS_BIND)
    if rootfs:
        for directory in ("dev", "proc", "sys"):
            _ensure_mount_point(_inside(rootfs, directory), directory=True)
        ns.mount("/dev", _inside(rootfs, "/dev"), None, ns.MS_BIND | ns.MS_REC)
    # A /proc of the new pid namespace, and a sysfs of the container's network
    # namespace (sysfs shows the net devices of the namespace that mounts it).
    ns.mount("proc", _inside(rootfs, "/proc"), "proc", ns.MS_NOSUID | ns.MS_NODEV | ns.MS_NOEXEC)
    sysfs_flags = ns.MS_NOSUID | ns.MS_NODEV | ns.MS_NOEXEC
    try:
        ns.mount("sysfs", _inside(rootfs, "/sys"), "sysfs", sysfs_flags)
    except OSError as exc:
        # EBUSY: this very sysfs is mounted there already (host mode, no rootfs).
        if exc.errno != errno.EBUSY:
            raise
    # Read-only per mount, as Docker has it. Not in the mount call itself: the kernel
    # shares one sysfs superblock per network namespace (the host's, in host mode),
    # and refuses (EBUSY) to mount an rw one read-only.
    ns.mount(None, _inside(rootfs, "/sys"), None, ns.MS_REMOUNT | ns.MS_BIND | ns.MS_RDONLY | sysfs_flags)
    if rootfs:
        os.chroot(rootfs)
    workdir = spec.get("workdir") or "/"
    try:
        os.chdir(workdir)
    except OSError as exc:
        raise SetupError(f"cannot change to working directory {workdir}: {exc.strerror}", "bad_request") from None

    env = {"PATH": DEFAULT_PATH, "HOME": "/"}
    if spec.get("hostname"):
        env["HOSTNAME"] = spec["hostname"]
    env.update(spec.get("env") or {})
    # Python ignores SIGPIPE and SIGXFSZ; exec keeps ignored signals ignored.
    for signum in (_signal.SIGPIPE, _signal.SIGXFSZ):
        _signal.signal(signum, _signal.SIG_DFL)
    _signal.pthread_sigmask(_signal.SIG_SETMASK, [])
    if spec.get("capabilities") is not None:
        ns.limit_capabilities(set(spec["capabilities"]))
    if spec.get("no_new_privs", True) and spec.get("capabilities") is not None:
        ns.no_new_privileges()
    cmd = spec["cmd"]
    try:
        _execvpe(cmd, env)
    except FileNotFoundError:
        where = "" if "/" in cmd[0] else " in $PATH"
        raise SetupError(f"executable file not found{where}: {cmd[0]}", "bad_request") from None
    except PermissionError:
        raise SetupError(f"permission denied: {cmd[0]}", "bad_request") from None
    except OSError as exc:
        raise SetupError(f"cannot execute {cmd[0]}: {exc.strerror}", "bad_request") from None


def _execvpe(cmd, env):
    """os.execvpe, minus its lazy `import warnings`, which fails after a chroot."""
    if "/" in cmd[0]:
        os.execve(cmd[0], cmd, env)
    denied = None
    for directory in env["PATH"].split(":"):
        try:
            os.execve(os.path.join(directory or ".", cmd[0]), cmd, env)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except PermissionError as exc:  # as a shell does: keep looking, report it if nothing else runs
            denied = exc
    raise denied or FileNotFoundError(errno.ENOENT, "not found", cmd[0])


def _describe(exc):
    """One line without Python's "[Errno N]" prefix."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__


def _start_time(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[19])


def main():
    spec = marshal.load(sys.stdin.buffer)
    try:
        if not spec.get("cmd"):
            raise SetupError("no command given", "bad_request")
        stdio = {
            "stdin": os.open("/dev/null", os.O_RDONLY),
            "log": os.open(spec["log_path"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600),
        }
        if spec.get("netns_path"):
            try:
                fd = os.open(spec["netns_path"], os.O_RDONLY)
                ns.setns(fd, ns.CLONE_NEWNET)
            except OSError as exc:
                raise SetupError(f"cannot join network namespace {spec['netns_path']}: "
                                 f"{os.strerror(exc.errno)}") from None
            os.close(fd)
        flags = ns.CLONE_NEWIPC | ns.CLONE_NEWPID
        if spec.get("hostname"):
            flags |= ns.CLONE_NEWUTS
        ns.unshare(flags)
    except SetupError as exc:
        return _reply({"error": str(exc), "kind": exc.kind})
    except OSError as exc:
        return _reply({"error": _describe(exc), "kind": "internal"})

    errors_r, errors_w = os.pipe()  # close-on-exec (Python's default)
    pid = os.fork()
    if pid == 0:
        try:
            os.close(errors_r)
            _setup_and_exec(spec, stdio)
        except SetupError as exc:
            report = {"error": str(exc), "kind": exc.kind}
        except BaseException as exc:
            report = {"error": _describe(exc), "kind": "internal"}
        try:
            os.write(errors_w, marshal.dumps(report))
        finally:
            os._exit(127)
    os.close(errors_w)
    chunks = []
    while chunk := os.read(errors_r, 65536):
        chunks.append(chunk)
    if chunks:
        os.waitpid(pid, 0)  # it has exited (or is about to): PID 1 gone, the namespaces go too
        return _reply(marshal.loads(b"".join(chunks)))
    # Read now, while the child is still ours and cannot have been reaped.
    return _reply({"pid": pid, "start_time": _start_time(pid)})


def _reply(message):
    data = marshal.dumps(message)
    while data:
        data = data[os.write(1, data):]
    return 0 if "pid" in message else 1


if __name__ == "__main__":
    status = main()
    os._exit(status)  # the reply is written; skip the interpreter's teardown (a few ms per spawn)
