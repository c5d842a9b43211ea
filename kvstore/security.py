"""Credentials for the cluster store, in Docker's own form (`--cluster-store-opt`, daemon.json's
"cluster-store-opts"): `kv.cacertfile`, `kv.certfile`, `kv.keyfile` (TLS: the CA to trust, this
host's client certificate and key), `kv.username` / `kv.password` (etcd's authentication) and
`kv.token` (a Consul ACL token). The store's clients are trusted like root on every host: run the
store with TLS and credentials.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

from kvstore import StoreConfigError

KEYS = {"kv.cacertfile": "cacertfile", "kv.certfile": "certfile", "kv.keyfile": "keyfile",
        "kv.username": "username", "kv.password": "password", "kv.token": "token"}


@dataclass(frozen=True)
class StoreCredentials:
    cacertfile: str = ""
    certfile: str = ""
    keyfile: str = ""
    username: str = ""
    password: str = ""
    token: str = ""

    @classmethod
    def from_options(cls, options: dict[str, str]) -> StoreCredentials:
        """From `kv.*` options; an unknown key, a file that cannot be read, or half a pair is one
        line of error."""
        fields = {}
        for key, value in options.items():
            if key not in KEYS:
                raise StoreConfigError(f"unknown cluster store option {key!r} (known: {', '.join(KEYS)})")
            fields[KEYS[key]] = str(value)
        made = cls(**fields)
        for name in ("cacertfile", "certfile", "keyfile"):
            path = getattr(made, name)
            if path and not os.access(path, os.R_OK):
                raise StoreConfigError(f"kv.{name} {path}: cannot read it")
        if bool(made.certfile) != bool(made.keyfile):
            raise StoreConfigError("kv.certfile and kv.keyfile go together: give both or neither")
        if bool(made.username) != bool(made.password):
            raise StoreConfigError("kv.username and kv.password go together: give both or neither")
        return made

    @property
    def tls(self) -> bool:
        return bool(self.cacertfile or self.certfile)

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=self.cacertfile or None)
        if self.certfile:
            try:
                context.load_cert_chain(self.certfile, self.keyfile)
            except (ssl.SSLError, OSError) as e:
                raise StoreConfigError(f"kv.certfile {self.certfile} / kv.keyfile {self.keyfile}: {e}") from None
        return context
