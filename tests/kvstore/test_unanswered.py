"""Store faults below the daemon: a commit etcd applied but answered too late (a proxy holds the
answer back), and a Consul key still locked by the session of a daemon that restarted."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from kvstore import Create, open_store
from tests.support.etcd_server import EtcdServer


class SlowAnswers:
    """A TCP proxy in front of etcd that passes requests at once and, while `slow` is set, holds
    every answer back for `delay` seconds: etcd applies the commit, the client times out first."""

    def __init__(self, port: int, delay: float = 2.0):
        self.target, self.delay = port, delay
        self.slow = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, answers: bool) -> None:
        try:
            while data := source.recv(65536):
                if answers and self.slow.is_set():
                    time.sleep(self.delay)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


def test_a_commit_answered_late_is_read_back():
    """etcd applied the commit but its answer came after the client's timeout: the client reads
    back who owns the key and reports the commit applied (before: an error, and no undo step)."""
    with EtcdServer() as server:
        proxy = SlowAnswers(server.client_port)
        store = open_store(f"etcd://127.0.0.1:{proxy.port}", timeout=1.0)
        proxy.slow.set()
        threading.Timer(1.5, proxy.slow.clear).start()
        revision = store.commit([Create("late/k", "owner-1234")])
        assert revision > 0
        assert store.get("late/k").value == "owner-1234"
        store.close()
        proxy.close()


def test_consul_key_moves_to_a_new_session_while_the_old_one_lives():
    """A daemon restarted within its TTL takes its host key over: the key is still locked by the
    old daemon's session, which has not expired yet (Consul)."""
    from tests.support.fake_consul import FakeConsul

    with FakeConsul(min_session_ttl=1.0) as fake:
        before = open_store(fake.url, min_session_ttl=1.0)
        old = before.grant_lease(30)
        pair = before.create("hosts/10.0.0.1", "first", old)
        after = open_store(fake.url, min_session_ttl=1.0)   # the restarted daemon
        new = after.grant_lease(30)
        after.update("hosts/10.0.0.1", "second", pair.version, new)
        assert after.get("hosts/10.0.0.1").value == "second"
        old.revoke()                                         # the old session ending takes nothing with it
        assert after.get("hosts/10.0.0.1").value == "second"
        before.close()
        after.close()
