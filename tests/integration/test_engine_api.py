"""Docker's own clients against netd's socket: the docker CLI (DOCKER_HOST=unix://...) and the
Docker SDK for Python, for networks, as an operator who knows `docker network` uses them."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess

import docker
import pytest

DOCKER = shutil.which("docker")


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(2)}"


def docker_cli(host, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**host.env, "DOCKER_HOST": f"unix://{host.socket}", "DOCKER_CONFIG": host.tmp}
    result = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=60, env=env)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture
def sdk(host):
    client = docker.DockerClient(base_url=f"unix://{host.socket}", timeout=30)
    yield client
    client.close()


@pytest.mark.skipif(DOCKER is None, reason="needs the docker CLI")
def test_the_docker_cli_manages_netd_networks(host):
    net, other = unique("dcli"), unique("dcli")
    version = docker_cli(host, "version", "--format", "{{.Server.APIVersion}} {{.Server.MinAPIVersion}}").stdout
    assert version.split() == ["1.41", "1.24"], "negotiated, not the 1.24 fallback"
    docker_cli(host, "network", "create", "--subnet", "10.70.1.0/24", "--gateway", "10.70.1.254",
               "--label", "team=blue", "-o", "com.docker.network.driver.mtu=1400", net)
    docker_cli(host, "network", "create", "--subnet", "10.70.2.0/24", other)
    try:
        listed = docker_cli(host, "network", "ls", "--filter", "label=team=blue",
                            "--format", "{{.Name}} {{.Driver}} {{.Scope}}").stdout.split("\n")
        assert listed == [f"{net} bridge local", ""]
        assert docker_cli(host, "network", "ls", "-q", "--filter", f"name={other}").stdout.strip() == \
            json.loads(host.netd("network", "inspect", other))[0]["Id"][:12]
        assert docker_cli(host, "network", "inspect", "-f", "{{(index .IPAM.Config 0).Gateway}} {{.Labels.team}}",
                          net).stdout.strip() == "10.70.1.254 blue"
        name = unique("c")
        host.netd("run", "-d", "--name", name, "sleep", "1000")
        try:
            docker_cli(host, "network", "connect", "--ip", "10.70.1.9", "--alias", "web", net, name)
            assert host.address(name, net) == "10.70.1.9"
            containers = docker_cli(host, "network", "inspect", "-f", "{{range .Containers}}{{.Name}}{{end}}", net)
            assert containers.stdout.strip() == name
            docker_cli(host, "network", "disconnect", net, name)
        finally:
            host.netd("rm", "-f", name)
        error = docker_cli(host, "network", "create", net, check=False)
        assert error.returncode == 1 and f"network with name {net} already exists" in error.stderr
        error = docker_cli(host, "network", "rm", "nosuch", check=False)
        assert error.returncode == 1 and "network nosuch not found" in error.stderr
        pruned = docker_cli(host, "network", "prune", "-f", "--filter", "label=team=blue").stdout
        assert net in pruned and other not in pruned
        docker_cli(host, "network", "rm", other)
    finally:
        host.cli("network", "rm", net, other, check=False)


def test_docker_py_connects_and_manages_netd_networks(host, sdk):
    assert sdk.ping() is True
    assert sdk.version()["ApiVersion"] == "1.41"
    assert sdk.api.api_version == "1.41"
    ipam = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet="10.70.3.0/24")])
    name = unique("sdk")
    network = sdk.networks.create(name, driver="bridge", ipam=ipam, labels={"made-by": "docker-py"})
    try:
        assert [n.id for n in sdk.networks.list(names=[name])] == [network.id]
        assert [n.name for n in sdk.networks.list(filters={"label": "made-by=docker-py"})] == [name]
        container = unique("c")
        host.netd("run", "-d", "--name", container, "sleep", "1000")
        try:
            network.connect(container, aliases=["db"])
            network.reload()
            assert [c.name for c in network.containers] == [container]
            assert network.attrs["IPAM"]["Config"][0]["Subnet"] == "10.70.3.0/24"
            network.disconnect(container)
            network.reload()
            assert network.containers == []
        finally:
            host.netd("rm", "-f", container)
        with pytest.raises(docker.errors.NotFound, match="network nosuch not found"):
            sdk.networks.get("nosuch")
        with pytest.raises(docker.errors.APIError) as conflict:
            sdk.networks.create(name)
        assert conflict.value.status_code == 409
    finally:
        network.remove()
    assert sdk.networks.list(names=[name]) == []


def test_ping_answers_head_and_get_with_the_api_headers(host):
    for method, flag in (("GET", "-i"), ("HEAD", "-I")):
        out = host.sh(f"curl -s {flag} --unix-socket {host.socket} http://x/_ping --max-time 5").stdout
        head, _, body = out.partition("\n\n")   # (text mode: the CRLFs read as newlines)
        assert head.startswith("HTTP/1.1 200")
        assert "Api-Version: 1.41" in head and "Ostype: linux" in head and "Docker-Experimental: false" in head
        assert body == ("OK" if method == "GET" else "")
    out = host.sh(f"curl -s --unix-socket {host.socket} http://x/v1.41/networks/nosuch -w ' %{{http_code}}'").stdout
    assert out == '{"message": "network nosuch not found"} 404'
