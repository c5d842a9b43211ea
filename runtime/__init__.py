"""The minimal container runtime: namespaces and processes, nothing about networks or drivers.

- namespaces: network namespaces pinned at a path (create_netns, delete_netns, is_netns),
  entered per thread (entered_netns, open_in_netns); syscalls holds the libc wrappers.
- process: spawn(ProcessSpec) -> ProcessHandle starts a command as PID 1 of new uts/ipc/pid/
  mount namespaces, joined to a network namespace; Reaper collects exits (start it once);
  stop, kill, is_running, exec_argv (nsenter).
- rootfs: make_busybox_rootfs(path), a chroot-able directory for --rootfs.

Containers run as root with every capability, chrooted (not pivot_root'ed): isolation
enough for networking, not a security boundary.
"""
