"""Wave 5 review: the new rules under storms their authors did not test (docs/design.md §5).

A storm (a reset of every connection every 50-200 ms, ``FaultProxy.reset_all``) is a flaky
path, not a server's answer: a client that recovered it before the rule "silent resets" must
still recover it. Counted on the server side.
"""

from __future__ import annotations

import platform
import random
import socket
import threading
import time
from typing import Any

import pytest

from resilientsock import ResilientSocket, RetryPolicy
from resilientsock.testing import FaultProxy

pytestmark = pytest.mark.timeout(60)

FAST = RetryPolicy(deadline=10, backoff_initial=0.01, backoff_max=0.1)


class SlowBannerServer:
    """A server-first line server whose constant banner comes ``delay`` s after the accept
    (a server that looks the client up first, a loaded one); then ``MSG n`` -> ``ACK n``.
    ``received`` lists the records as they arrived."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.received: list[int] = []
        self.accepted = 0
        self.lock = threading.Lock()
        self.closing = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closing.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                if self.closing.wait(self.delay):
                    return
                conn.sendall(b"220 ready\n")
                buf = b""
                while True:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        n = int(line.split()[1])
                        with self.lock:
                            self.received.append(n)
                        conn.sendall(b"ACK %d\n" % n)
            except OSError:
                return

    def close(self) -> None:
        self.closing.set()
        self.listener.close()


class Resets:
    """``proxy.reset_all()`` every 50-200 ms in a thread of its own, for ``seconds``."""

    def __init__(self, proxy: FaultProxy, seed: int, seconds: float) -> None:
        self.proxy, self.rng, self.seconds = proxy, random.Random(seed), seconds
        self.stop = threading.Event()
        self.fired = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        end = time.monotonic() + self.seconds
        while not self.stop.wait(self.rng.uniform(0.05, 0.2)) and time.monotonic() < end:
            self.proxy.reset_all()
            self.fired += 1

    def __enter__(self) -> Resets:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(5)


def _read_line(sock: Any) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        line += chunk
    return line


@pytest.mark.parametrize("policy", [FAST, RetryPolicy()], ids=["fast", "default"])
@pytest.mark.parametrize("seed", [1, 2])
def test_a_storm_over_a_late_banner_is_recovered_not_taken_for_a_resetting_server(seed, policy):
    """A robot connects and waits for a banner that comes 0.3 s after the accept, while every
    connection is reset each 50-200 ms. Nothing was sent, nothing is lost by a new
    connection: the socket recovers until the storm ends (as it did before wave 5). Was
    (wave 5, rule silent-resets): three resets before the banner counted as "the server
    resets each new connection at once" and surfaced ConnectionResetError."""
    srv = SlowBannerServer(0.3)
    banners = []
    try:
        with FaultProxy(srv.address) as proxy, Resets(proxy, seed, 2.5) as storm:
            while storm.thread.is_alive() or len(banners) < 3:
                sock = ResilientSocket.connect(proxy.address, policy, timeout=8)
                try:
                    banners.append(_read_line(sock))
                finally:
                    sock.close()
    finally:
        srv.close()
    assert storm.fired >= 8, storm.fired
    assert banners == [b"220 ready\n"] * len(banners)
    assert srv.accepted > len(banners)  # the storm met the waits for the banner


def test_a_declared_prelude_recovers_a_login_protocol_through_a_storm():
    """RetryPolicy(prelude=1) over a protocol that logs in first (rule client-login names it
    as the fix): through resets every 50-200 ms every command is answered, in order, and
    none runs on a connection that never logged in (counted on the server)."""
    from test_never_worse_clients import LoginServer

    server = LoginServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    policy = RetryPolicy(deadline=10, backoff_initial=0.01, backoff_max=0.1, prelude=1)
    got = []
    try:
        with FaultProxy(server.server_address[:2]) as proxy:
            sock = ResilientSocket.connect(proxy.address, policy, timeout=8)
            sock.sendall(b"LOGIN robot secret\n")
            assert _read_line(sock) == b"OK welcome\n"
            with Resets(proxy, 3, 2.0) as storm:
                n = 0
                while storm.thread.is_alive() or n < 5:
                    sock.sendall(b"SEND m%d\n" % n)
                    got.append(_read_line(sock))
                    n += 1
            sock.close()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert storm.fired >= 6, storm.fired
    assert sock.reconnects >= 3, sock.reconnects
    assert got == [b"OK m%d\n" % i for i in range(n)]
    assert server.counts["not logged in"] == 0, server.counts
    assert server.counts["ran"] >= n, server.counts


def test_the_relay_loads_without_malloc_trim_wherever_ctypes_cannot_give_it(monkeypatch):
    """``ctypes.CDLL(None)`` raises TypeError on Windows, AttributeError where the C library
    has no ``malloc_trim`` (musl, macOS), ImportError without ctypes: the relay goes on
    without the trim (was: a TypeError at import of resilientsock.session.relay)."""
    import ctypes

    from resilientsock.session import relay

    for error in (TypeError("expected str, bytes or os.PathLike object, not NoneType"),
                  AttributeError("malloc_trim"), OSError("no such library")):
        def cdll(*args: Any, error: Exception = error, **kwargs: Any) -> Any:
            raise error
        monkeypatch.setattr(ctypes, "CDLL", cdll)
        assert relay._load_malloc_trim() is None
    monkeypatch.undo()
    if platform.libc_ver()[0] == "glibc":
        assert relay._load_malloc_trim() is not None


def test_a_storm_over_a_subscriber_waiting_for_pushes_is_recovered():
    """A client that only reads a feed (a line every 0.3 s on each connection, the first one
    0.3 s after the accept) through resets every 50-200 ms: it reads on once the storm
    ends, as before wave 5. Was (rule silent-resets with a 1 s window): surfaced."""
    srv = SlowBannerServer(0.3)
    srv._serve = _feed(srv)  # type: ignore[method-assign]
    lines = []
    try:
        with FaultProxy(srv.address) as proxy:
            sock = ResilientSocket.connect(proxy.address, RetryPolicy(), timeout=8)
            with Resets(proxy, 4, 2.0) as storm:
                while storm.thread.is_alive() or len(lines) < 3:
                    lines.append(_read_line(sock))
            sock.close()
    finally:
        srv.close()
    assert storm.fired >= 6, storm.fired
    assert set(lines) == {b"tick\n"}, lines
    assert srv.accepted >= 4, srv.accepted


def _feed(srv: SlowBannerServer) -> Any:
    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                while not srv.closing.wait(srv.delay):
                    conn.sendall(b"tick\n")
            except OSError:
                return
    return serve
