"""Certificates for TLS tests, made with openssl: a CA, a server certificate for 127.0.0.1, a client
certificate, and a second CA with a client certificate of its own that the first does not trust."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass


def _openssl(*args: str, cwd: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _key_and_csr(cwd: str, name: str, subject: str) -> None:
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=cwd)


def _sign(cwd: str, name: str, ca: str, extensions: str) -> None:
    with open(os.path.join(cwd, f"{name}.ext"), "w") as f:
        f.write(extensions + "\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=cwd)


def _ca(cwd: str, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}", cwd=cwd)


@dataclass
class Certificates:
    directory: str

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    @property
    def ca(self) -> str:
        return self.path("ca.pem")

    @property
    def server(self) -> tuple[str, str]:
        return self.path("server.pem"), self.path("server.key")

    @property
    def client(self) -> tuple[str, str]:
        return self.path("client.pem"), self.path("client.key")

    @property
    def rogue_client(self) -> tuple[str, str]:
        return self.path("rogue-client.pem"), self.path("rogue-client.key")

    def options(self, client: tuple[str, str] | None = None) -> dict[str, str]:
        """Docker's --cluster-store-opt keys for a client with this CA and `client` (default: the good one)."""
        cert, key = client or self.client
        return {"kv.cacertfile": self.ca, "kv.certfile": cert, "kv.keyfile": key}


def make_certificates(directory: str) -> Certificates:
    os.makedirs(directory, exist_ok=True)
    _ca(directory, "ca")
    _key_and_csr(directory, "server", "/O=netd-test")   # no CN: etcd refuses a gateway request whose cert has one
    _sign(directory, "server", "ca", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth")   # etcd's gateway dials etcd with it
    _key_and_csr(directory, "client", "/CN=netd")
    _sign(directory, "client", "ca", "extendedKeyUsage=clientAuth")
    _ca(directory, "rogue-ca")
    _key_and_csr(directory, "rogue-client", "/CN=netd")
    _sign(directory, "rogue-client", "rogue-ca", "extendedKeyUsage=clientAuth")
    return Certificates(directory)
