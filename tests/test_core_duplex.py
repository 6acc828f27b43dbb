"""DESIGN §5, full duplex on one socket: one greenlet's interruption never kills another's
call (w4), and a half-close is not a drop (w7, w7b). Real servers on loopback, counted on the
server side; each test fails on c94b32e."""

from __future__ import annotations

import threading
import time

import gevent
import gevent.socket as gsocket
import pytest

from resilientsock import ResilientSocket, RetryPolicy
from resilientsock.testing._loop import ListenerService

pytestmark = pytest.mark.timeout(60)

POLICY = RetryPolicy(deadline=5, backoff_initial=0.01, backoff_max=0.1)


def _until(flag: threading.Event, limit: float = 20.0) -> bool:
    """Inside a server's loop thread: wait for a flag set by the test (bounded)."""
    end = time.monotonic() + limit
    while not flag.is_set():
        if time.monotonic() > end:
            return False
        gevent.sleep(0.005)
    return True


class HeldAnswer(ListenerService):
    """Reads one line, reads nothing more, and answers it once the test says so."""

    def __init__(self) -> None:
        super().__init__("held-answer", "127.0.0.1", 0, None)
        self.release = threading.Event()
        self.lines: list[bytes] = []

    def _handle(self, c) -> None:
        buf = b""
        while b"\n" not in buf:
            d = c.recv(1)
            if not d:
                return
            buf += d
        self.lines.append(buf)
        if _until(self.release):
            try:
                c.sendall(b"ACK " + buf)
                while c.recv(65536):
                    pass
            except OSError:
                pass
        c.close()

    def _teardown(self) -> None:
        self._close_listener()


def test_interrupted_write_leaves_a_reader_its_answer():
    """w4: ``with gevent.Timeout(..., False): sock.sendall(big)`` in one greenlet while
    another waits in recv(): the reader gets the answer, as on a plain gevent socket (not
    gevent's cancel_wait_ex/EBADF)."""
    with HeldAnswer() as srv:
        sock = ResilientSocket.connect(srv.address, POLICY, timeout=10)
        out = {}
        timed_out = gevent.event.Event()

        def reader():
            sock.sendall(b"MSG 1\n")
            try:
                out["reader"] = sock.recv(100)
            except Exception as exc:  # noqa: BLE001 - the test reports it
                out["reader"] = exc

        def writer():
            gevent.sleep(0)  # the reader first
            with gevent.Timeout(0.3, False):
                sock.sendall(b"x" * (64 << 20))  # the server is not reading: blocks
            timed_out.set()

        gr = gevent.spawn(reader)
        gw = gevent.spawn(writer)
        assert timed_out.wait(10)
        srv.release.set()
        gevent.joinall([gr, gw], timeout=10)
        assert out.get("reader") == b"ACK MSG 1\n", out
        assert srv.connections == 1
        assert srv.lines == [b"MSG 1\n"]
        sock.close()
