"""netd as containerd's CNI plugin: Debian's containerd 1.6 (its own root, state and socket, in a
test host's namespace) and `ctr run --cni`, which reads /etc/cni/net.d and /opt/cni/bin: each ctr
call runs in a private mount namespace where those are the test's own directories. The image is an
OCI layout made here from busybox-static."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time

import pytest

from bench.peers import busybox_rootfs_tar
from tests.support.cni import NETD, REFERENCE_PLUGINS, unique

CONTAINERD, CTR = shutil.which("containerd"), shutil.which("ctr")
pytestmark = pytest.mark.skipif(not (CONTAINERD and CTR and os.access(NETD, os.X_OK)),
                                reason="needs containerd, ctr and the installed netd")
IMAGE = "netd.test/busybox:latest"


def oci_archive(path: str, ref: str) -> None:
    """An OCI image layout tar of one layer (busybox-static with sh, sleep, ip, ping)."""
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return f"sha256:{digest}"

    layer = busybox_rootfs_tar()
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
                         "rootfs": {"type": "layers", "diff_ids": [blob(layer)]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": blob(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": f"sha256:{hashlib.sha256(layer).hexdigest()}",
                    "size": len(layer)}]}).encode()
    index = json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": blob(manifest), "size": len(manifest),
        "annotations": {"org.opencontainers.image.ref.name": ref}, "platform": {"architecture": "amd64", "os": "linux"}}]})
    with tarfile.open(path, "w") as tar:
        for name, data in [("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'), ("index.json", index.encode()),
                           *((f"blobs/sha256/{d}", b) for d, b in blobs.items())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


class Containerd:
    def __init__(self, host, network: str):
        self.host = host
        self.dir = tempfile.mkdtemp(prefix=f"{host.name}-containerd-")
        self.conf_dir, self.bin_dir = os.path.join(self.dir, "net.d"), os.path.join(self.dir, "bin")
        os.makedirs(self.conf_dir)
        os.makedirs(self.bin_dir)
        for plugin in os.listdir(REFERENCE_PLUGINS):
            os.symlink(os.path.join(REFERENCE_PLUGINS, plugin), os.path.join(self.bin_dir, plugin))
        os.symlink(NETD, os.path.join(self.bin_dir, "netd"))
        with open(os.path.join(self.conf_dir, "10-netd.conflist"), "w") as f:
            json.dump({"cniVersion": "1.0.0", "name": network, "plugins": [
                {"type": "netd", "network": network, "socket": host.socket},
                {"type": "portmap", "capabilities": {"portMappings": True}}]}, f)
        self.socket = os.path.join(self.dir, "containerd.sock")
        self.namespace = unique("netd-test")   # containerd's namespace: its containers' cgroups are under it
        self.process = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{host.name}", CONTAINERD, "--root", f"{self.dir}/root",
             "--state", f"{self.dir}/state", "--address", self.socket, "--log-level", "warn"],
            stdout=open(os.path.join(self.dir, "containerd.log"), "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
            start_new_session=True)
        deadline = time.monotonic() + 20
        while self.ctr("version", check=False).returncode != 0:
            assert time.monotonic() < deadline, "containerd did not start"
            time.sleep(0.2)
        oci_archive(os.path.join(self.dir, "image.tar"), IMAGE)
        self.ctr("image", "import", os.path.join(self.dir, "image.tar"))

    def ctr(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        private = (f"mount --bind {self.conf_dir} /etc/cni/net.d && mount -t tmpfs netd-test /opt && "
                   f"mkdir -p /opt/cni && ln -s {self.bin_dir} /opt/cni/bin && exec \"$@\"")
        argv = ["nsenter", f"--net=/run/netns/{self.host.name}", "unshare", "--mount", "--propagation", "private",
                "sh", "-c", private, "ctr", CTR, "-a", self.socket, "-n", self.namespace, *args]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check:
            assert result.returncode == 0, f"ctr {' '.join(args)}: {result.stderr.strip()}"
        return result

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):   # shims and what they ran
            with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
                if self.dir.encode() in f.read():
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.3)
        with open("/proc/mounts") as f:
            mounts = [line.split()[1] for line in f if self.dir in line.split()[1]]
        for mount in sorted(mounts, reverse=True):
            subprocess.run(["umount", "-l", mount], check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
        for hierarchy in os.listdir("/sys/fs/cgroup"):
            top = os.path.join("/sys/fs/cgroup", hierarchy, self.namespace)
            for directory, _subdirs, _files in sorted(os.walk(top, topdown=False), key=lambda w: -len(w[0])):
                with contextlib.suppress(OSError):
                    os.rmdir(directory)


def cni_sandboxes(host) -> list[str]:
    return [c["Names"][0] for c in json.loads(host.netd("ps", "-a", "--format", "json")) if "cni" in c["Command"]]


def test_ctr_run_cni_puts_containerd_containers_on_a_netd_network(host):
    net = unique("ctrnet")
    host.netd("network", "create", "--subnet", "10.93.0.0/24", net)
    runtime = Containerd(host, net)
    a, b = unique("ca"), unique("cb")
    try:
        runtime.ctr("run", "-d", "--cni", IMAGE, a, "/bin/sleep", "1000")
        runtime.ctr("run", "-d", "--cni", IMAGE, b, "/bin/sleep", "1000")
        held = {x["Container"]: x["Address"] for x in json.loads(host.netd("ipam", "inspect", net, "--format", "json"))
                if x["Kind"] == "endpoint"}
        assert len(held) == 2
        address_a = runtime.ctr("task", "exec", "--exec-id", "ip", a, "/bin/ip", "-4", "-o", "addr", "show", "eth0").stdout
        assert any(address in address_a for address in held.values())
        for address in held.values():
            runtime.ctr("task", "exec", "--exec-id", "ping", a, "/bin/ping", "-c1", "-W2", address)
        # a foreground `ctr run --cni` sends DEL when it ends
        runtime.ctr("run", "--rm", "--cni", IMAGE, unique("cc"), "/bin/ping", "-c1", "-W2", list(held.values())[0])
        assert len(cni_sandboxes(host)) == 2
        # `ctr run -d` never sends DEL: netd lets the endpoints go when their namespace is gone
        for name in (a, b):
            runtime.ctr("task", "kill", "-s", "SIGKILL", name)
        time.sleep(0.5)
        runtime.ctr("task", "rm", a, b, check=False)
        runtime.ctr("container", "rm", a, b)
        deadline = time.monotonic() + 25
        while cni_sandboxes(host) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert cni_sandboxes(host) == []
        assert [x for x in json.loads(host.netd("ipam", "inspect", net, "--format", "json")) if x["Kind"] == "endpoint"] == []
    finally:
        runtime.close()
        host.cli("network", "rm", net, check=False)
