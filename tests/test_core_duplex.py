"""docs/design.md §5, full duplex on one socket: one greenlet's interruption never kills another's
call (w4), and a half-close is not a drop (w7, w7b). Real servers on loopback, counted on the
server side; each test fails on c94b32e. Repros (../shared/repro/wave3/):
w4_interrupted_write_kills_reader, w7_halfclose_while_writing, w7b_halfclose_after_banner."""

from __future__ import annotations

import struct
import threading
import time

import gevent
import gevent.event
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


class LingeringClose(ListenerService):
    """Reads one line, answers early, half-closes (SHUT_WR) and drains the upload slowly for
    ``linger`` seconds before closing (nginx's lingering close after an error answer);
    ``greet``: says hello first and half-closes once ``after`` upload bytes arrived."""

    def __init__(self, linger: float = 1.0, greet: bool = False, after: int = 65536) -> None:
        super().__init__("lingering-close", "127.0.0.1", 0, None)
        self.linger, self.greet, self.after = linger, greet, after
        self.got: list[bytearray] = []

    def _handle(self, c) -> None:
        got = bytearray()
        self.got.append(got)
        # a small window, yet larger than loopback's MSS (a smaller one stalls TCP for
        # 200 ms at a time: the sender waits for window probes, with or without us)
        c.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_RCVBUF, 262144)
        try:
            if self.greet:
                c.sendall(b"hello\n")
                while len(got) < self.after:
                    d = c.recv(16384)
                    if not d:
                        return
                    got += d
            else:
                while b"\n" not in got:
                    d = c.recv(4096)
                    if not d:
                        return
                    got += d
                c.sendall(b"ERR 413 upload too large\n")
            c.shutdown(gsocket.SHUT_WR)  # the answer is complete; keep draining
            end = time.monotonic() + self.linger
            while time.monotonic() < end:
                d = c.recv(16384)
                if not d:
                    break
                got += d
                gevent.sleep(0.002)  # a slow consumer
        except OSError:
            pass
        finally:
            c.close()

    def _teardown(self) -> None:
        self._close_listener()


def _duplex(sock, chunks: int, first: bytes | None, shut: bool = False,
            answered: threading.Event | None = None) -> dict:
    """A reader greenlet and a writer greenlet (``first``, then ``chunks`` of 64 KiB) on one
    socket; ``answered`` is set once the reader has a whole line."""
    out: dict = {}

    def reader():
        data = b""
        try:
            while True:
                d = sock.recv(100)
                if not d:
                    break
                data += d
                if answered is not None and data.endswith(b"\n"):
                    answered.set()
            out["reader"] = (data, "EOF")
        except Exception as exc:  # noqa: BLE001 - the test reports it
            out["reader"] = (data, exc)

    def writer():
        try:
            if first:
                sock.sendall(first)
            for i in range(chunks):
                sock.sendall(bytes([65 + i % 26]) * 65536)
            if shut:
                sock.shutdown(gsocket.SHUT_WR)
            out["writer"] = "ok"
        except Exception as exc:  # noqa: BLE001
            out["writer"] = exc

    gr, gw = gevent.spawn(reader), gevent.spawn(writer)
    gevent.joinall([gr, gw], timeout=30)
    gr.kill()
    gw.kill()
    return out


def test_half_close_while_uploading_is_not_a_drop():
    """w7: the answer once, then EOF; the writer gets what a plain socket gets when the
    server stops reading (EPIPE or a reset); one connection, nothing replayed."""
    with LingeringClose(linger=1.0) as srv:
        sock = ResilientSocket.connect(srv.address, POLICY, timeout=10)
        out = _duplex(sock, 512, b"PUT /big\n")  # 32 MiB: more than 1 s of draining
        assert out["reader"] == (b"ERR 413 upload too large\n", "EOF"), out
        assert isinstance(out["writer"], (BrokenPipeError, ConnectionResetError)), out
        assert srv.connections == 1
        assert sock.stats().replayed_records == 0
        sock.close()


def test_half_close_after_a_greeting_lets_the_upload_finish():
    """w7b: the server greets, half-closes and goes on reading: the reader gets the greeting
    and EOF, the writer's whole upload reaches the one connection."""
    with LingeringClose(linger=30.0, greet=True, after=1) as srv:
        sock = ResilientSocket.connect(srv.address, POLICY, timeout=20)
        out = _duplex(sock, 128, None, shut=True)  # 8 MiB: more than the socket buffers
        assert out["reader"] == (b"hello\n", "EOF"), out
        assert out["writer"] == "ok", out
        sock.close()
        assert srv.connections == 1
        deadline = time.monotonic() + 20
        while len(srv.got[0]) < 128 * 65536 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(srv.got[0]) == 128 * 65536


class AnswerAndClose(ListenerService):
    """Reads one line, answers it and closes at once (an early 413 without lingering)."""

    def __init__(self, name: str = "answer-and-close") -> None:
        super().__init__(name, "127.0.0.1", 0, None)
        self.requests = 0

    def _handle(self, c) -> None:
        got = b""
        while b"\n" not in got:
            d = c.recv(4096)
            if not d:
                c.close()
                return
            got += d
        self.requests += 1
        c.sendall(b"ERR 413 upload too large\n")
        self._after_answer(c)
        c.close()

    def _after_answer(self, c) -> None:
        """Closes at once (a FIN, or an RST if upload bytes are unread)."""

    def _teardown(self) -> None:
        self._close_listener()


def test_an_early_answer_with_a_reader_greenlet_is_delivered_once_and_nothing_re_sent():
    """A regression guard for the full duplex rules: an upload (not a line protocol) that
    the server answers and closes on while a reader greenlet waits stays an early answer:
    the reader gets the answer, the writer the plain error, the request ran once."""
    with AnswerAndClose() as srv:
        sock = ResilientSocket.connect(srv.address, POLICY, timeout=10)
        out = _duplex(sock, 160, b"PUT /big\n")
        assert out["reader"][0] == b"ERR 413 upload too large\n", out
        assert isinstance(out["writer"], (BrokenPipeError, ConnectionResetError)), out
        assert srv.requests == 1 and srv.connections == 1
        sock.close()


class AnswerWaitReset(AnswerAndClose):
    """Reads one line, answers it, reads nothing more, and once the test says the client
    has read the answer closes with an RST (SO_LINGER 0): the reader greenlet has taken the
    early answer before anyone meets the drop."""

    def __init__(self) -> None:
        super().__init__("answer-wait-reset")
        self.read = threading.Event()

    def _after_answer(self, c) -> None:
        _until(self.read)
        c.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_LINGER, struct.pack("ii", 1, 0))


def test_an_early_answer_taken_by_the_reader_before_the_drop_is_not_re_sent():
    """The order that made the early-answer test flaky (1-3 in 15 with a faster reconnect),
    made certain: the reader greenlet reads the answer while the writer is blocked mid-upload,
    then the server resets. Whichever greenlet meets the reset first, the request ran once,
    on one connection; the reader got the answer once, the writer a plain error (not the
    EBADF of a connection closed under it). Failed before the fix: the upload was re-sent on
    4 new connections (the request ran 5 times)."""
    with AnswerWaitReset() as srv:
        sock = ResilientSocket.connect(srv.address, POLICY, timeout=10)
        out = _duplex(sock, 160, b"PUT /big\n", answered=srv.read)  # 10 MiB: > the buffers
        assert out["reader"][0] == b"ERR 413 upload too large\n", out
        assert isinstance(out["reader"][1], (str, ConnectionResetError)), out
        assert isinstance(out["writer"], (BrokenPipeError, ConnectionResetError)), out
        assert srv.requests == 1 and srv.connections == 1, out
        assert sock.stats().replayed_records == 0
        sock.close()
