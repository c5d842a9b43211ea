"""A netd test host with a real dockerd beside it: Debian's dockerd 20.10 in the host's network
namespace (so it takes the interfaces netd makes), in a private mount namespace where
/run/docker/plugins is netd's plugin directory, with its own data root, exec root, socket and
cgroup parent (bench.peers.DockerBridgePeer does the starting and the clean-up)."""

from __future__ import annotations

import os
import shutil
import subprocess

from bench.peers import DockerBridgePeer
from tests.support.hosts import NetdHost, run


class DockerdHost:
    def __init__(self, prefix: str = "ndk", daemon_args: tuple[str, ...] = ()):
        self.netd = NetdHost(prefix)
        self.plugin_dir = os.path.join(self.netd.tmp, "plugins")
        self.netd.daemon_args = ["--docker-plugin-dir", self.plugin_dir, *daemon_args]
        self.dockerd: DockerBridgePeer | None = None
        self.cli = shutil.which("docker") or "/usr/bin/docker"

    def __enter__(self) -> DockerdHost:
        self.netd.__enter__()
        try:
            self.dockerd = DockerBridgePeer(netns=self.netd.name, plugin_dir=self.plugin_dir, own_network=False)
            self.dockerd.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.dockerd is not None:
                self.dockerd.stop()
        finally:
            self.netd.cleanup()

    @property
    def image(self) -> str:
        return self.dockerd.image

    def env(self, socket: str | None = None) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": f"unix://{socket or self.dockerd.socket_path}",
                "DOCKER_CONFIG": os.path.join(self.dockerd.tmp, "cli")}

    def docker_run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return run([self.cli, *args], check=check, timeout=timeout, env=self.env())

    def docker(self, *args: str, timeout: float = 60) -> str:
        return self.docker_run(*args, timeout=timeout).stdout.strip()

    def docker_fails(self, *args: str) -> str:
        result = self.docker_run(*args, check=False)
        assert result.returncode != 0, f"docker {' '.join(args)} should have failed: {result.stdout}"
        return result.stderr.strip()

    def host_links(self) -> list[str]:
        out = self.netd.sh("ip -o link show").stdout
        return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]
