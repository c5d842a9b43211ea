"""TLS and credentials to the cluster store, against a real etcd: with --client-cert-auth (a
certificate of its CA or nothing), and with etcd's authentication on. A wrong certificate, CA or
password is one line that says so."""

from __future__ import annotations

import pytest

from kvstore import StoreConfigError, StoreError, open_store
from kvstore.security import StoreCredentials
from tests.support.etcd_server import EtcdServer


def credentials(options: dict) -> dict:
    return {"credentials": StoreCredentials.from_options(options)}


def test_tls_store_works_with_its_certificates(etcd_tls_server):
    store = open_store(etcd_tls_server.url, **credentials(etcd_tls_server.certs.options()))
    store.put("tls/k", "v")
    assert store.get("tls/k").value == "v"
    store.close()


@pytest.mark.parametrize("how, message", [
    ("no client certificate", "TLS handshake failed"),
    ("a certificate of another CA", "TLS handshake failed"),
    ("another CA to trust", "certificate verify failed"),
    ("no TLS at all", "cannot reach etcd"),
])
def test_tls_store_refuses_the_wrong_certificates(etcd_tls_server, how, message):
    certs = etcd_tls_server.certs
    options = {
        "no client certificate": {"kv.cacertfile": certs.ca},
        "a certificate of another CA": certs.options(certs.rogue_client),
        "another CA to trust": {**certs.options(), "kv.cacertfile": certs.path("rogue-ca.pem")},
        "no TLS at all": {},
    }[how]
    with pytest.raises(StoreError) as caught:
        store = open_store(etcd_tls_server.url, **credentials(options))
        store.get("tls/k")
    text = str(caught.value)
    assert message in text and "\n" not in text, text


@pytest.fixture(scope="module")
def etcd_auth_server():
    with EtcdServer(password="s3cret-root") as server:
        yield server


def test_password_store_works_and_refuses_a_wrong_password(etcd_auth_server):
    good = open_store(etcd_auth_server.url, **credentials({"kv.username": "root", "kv.password": "s3cret-root"}))
    good.put("auth/k", "v")
    assert good.get("auth/k").value == "v"
    good.close()
    with pytest.raises(StoreError, match="refused user 'root'"):
        open_store(etcd_auth_server.url, **credentials({"kv.username": "root", "kv.password": "wrong"}))
    anonymous = open_store(etcd_auth_server.url)
    with pytest.raises(StoreError):
        anonymous.get("auth/k")


@pytest.mark.parametrize("options, message", [
    ({"kv.cafile": "/x"}, "unknown cluster store option 'kv.cafile'"),
    ({"kv.cacertfile": "/nonexistent.pem"}, "kv.cacertfile /nonexistent.pem: cannot read it"),
    ({"kv.username": "root"}, "kv.username and kv.password go together"),
])
def test_bad_options_are_one_line(options, message):
    with pytest.raises(StoreConfigError, match=message):
        StoreCredentials.from_options(options)


def test_consul_gets_its_acl_token(consul_address):
    host, port, min_ttl = consul_address
    from tests.support.fake_consul import FakeConsul

    with FakeConsul(min_session_ttl=min_ttl) as fake:
        store = open_store(fake.url, min_session_ttl=min_ttl, **credentials({"kv.token": "acl-123"}))
        store.put("acl/k", "v")
        store.close()
        assert fake.tokens == {"acl-123"}
