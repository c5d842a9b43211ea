"""A daemon whose cluster store wants client TLS (etcd --client-cert-auth): with its certificates
it works; with a wrong one, or none, it fails at start with one line that says so."""

from __future__ import annotations

import subprocess

import pytest

from tests.support.certs import make_certificates
from tests.support.hosts import PYTHON, clustered_host

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(str(tmp_path_factory.mktemp("certs")))


def test_daemon_over_tls_and_refused_without_the_right_certificate(certs, tmp_path):
    with clustered_host(certs=certs) as (host, url):
        host.netd("network", "create", "-d", "overlay", "--subnet", "10.96.0.0/24", "tls1")
        host.netd("run", "-d", "--name", "tlsa", "--network", "tls1", "sleep", "100000")
        host.netd("run", "-d", "--name", "tlsb", "--network", "tls1", "sleep", "100000")
        host.cli("exec", "tlsa", "ping", "-c1", "-W2", "tlsb")
        cert, key = certs.rogue_client
        for opts, message in (
            ([f"kv.cacertfile={certs.ca}", f"kv.certfile={cert}", f"kv.keyfile={key}"], "TLS handshake failed"),
            ([], "cannot reach etcd"),
            ([f"kv.cacertfile={certs.ca}", "kv.certfile=/nonexistent"], "kv.certfile /nonexistent: cannot read it"),
        ):
            argv = ["nsenter", f"--net=/run/netns/{host.name}", PYTHON, "-m", "netd", "daemon",
                    "--run-dir", str(tmp_path / "run"), "--data-dir", str(tmp_path / "data"),
                    "--config-file", "/nonexistent", "--cluster-store", url, "--cluster-advertise", "203.0.113.9",
                    *[a for o in opts for a in ("--cluster-store-opt", o)]]
            result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            lines = [line for line in result.stderr.splitlines() if line.startswith("netd daemon:")]
            assert result.returncode != 0 and len(lines) == 1 and message in lines[0], result.stderr
