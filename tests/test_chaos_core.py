"""The core socket on hard paths (wave-5 chaos review), against the public contract
(docs/design.md §4, §5, §7): storms of mixed faults (RST, FIN, refused connects, black holes,
cuts mid-record and mid-answer) every 50-200 ms over thousands of messages, with the
application's own timeout; a writer and a reader greenlet on one socket; ``makefile()`` in
text mode with ``readline(limit)``; ``sendfile()``; ``MSG_WAITALL``; TLS with ``unwrap()``;
``KeyboardInterrupt``/``gevent.Timeout``/``close()`` from another greenlet during a
recovery; a server that half-closes after answering. Counted on the server side: lost
records, duplicates (only of records the client had not seen answered), order, and how long
each call took against the application's timeout."""

from __future__ import annotations

import select
import socket
import tempfile
import time
from typing import Any

import gevent
import gevent.socket as gsocket
import gevent.ssl
import pytest
from conftest import FaultThread, TLSServer, duplex_run, wrap_server_side

from resilientsock import ResilientSocket, ResilientSSLSocket, RetryPolicy
from resilientsock.testing import FaultProxy, MessageServer
from resilientsock.testing._loop import ListenerService

pytestmark = pytest.mark.timeout(90)

FAST = RetryPolicy(deadline=10, backoff_initial=0.01, backoff_max=0.1)
# The application's timeout in the storms: longer than one outage of the storm (a 0.3 s black
# hole, a 0.15 s refusal, and the faults that meet the reconnects), so that a give-up is a
# defect, not the timeout doing its job; each call is measured against it.
TIMEOUT = 5.0
KINDS = ("rst", "fin", "refuse", "blackhole", "cut-up", "cut-down")


class Storm(FaultThread):
    """Mixed faults through ``proxy`` every 50-200 ms (a thread of its own, so a client that
    never yields still meets them), until stopped. ``fired`` lists the kinds in order."""

    def __init__(self, proxy: FaultProxy, seed: int, kinds: tuple[str, ...] = KINDS) -> None:
        super().__init__(proxy, seed, kinds)

    def _run(self) -> None:
        px, rng = self.proxy, self.rng
        while not self.stop.wait(rng.uniform(0.05, 0.2)):
            kind = rng.choice(self.kinds)
            self.fired.append(kind)
            if kind == "rst":
                px.reset_all()
            elif kind == "fin":
                px.close_all()
            elif kind == "refuse":
                px.refuse(0.15)
                px.reset_all()
            elif kind == "blackhole":
                px.blackhole(True)
                self.stop.wait(0.3)
                px.blackhole(False)
                px.reset_all()
            elif kind == "cut-up":
                px.cut_after(rng.randrange(1, 12), "up", how=rng.choice(["reset", "close"]))
            else:
                px.cut_after(rng.randrange(1, 6), "down", how=rng.choice(["reset", "close"]))


def first_arrivals(received: list[int]) -> list[int]:
    seen: set[int] = set()
    out = []
    for n in received:
        if n not in seen:
            seen.add(n)
            out.append(n)
    return out


def assert_server_counts(received: list[int], confirmed: list[int]) -> None:
    """Nothing the client saw answered is missing; first arrivals in order; a record arrives
    again only while it was unanswered (never after a later record was answered)."""
    assert set(confirmed) <= set(received), sorted(set(confirmed) - set(received))[:10]
    first = first_arrivals(received)
    assert first == sorted(first), "records arrived out of order"
    answered_at = {n: i for i, n in enumerate(confirmed)}
    top = 0
    for n in received:
        if n < top and n in answered_at and answered_at.get(top, -1) > answered_at[n]:
            raise AssertionError(f"record {n} arrived again after {top} was answered")
        top = max(top, n)


def tls_ctx(server: TLSServer, resilient: bool = True) -> Any:
    ctx = gevent.ssl.SSLContext(gevent.ssl.PROTOCOL_TLS_CLIENT)
    server.ca.configure_trust(ctx)
    if resilient:
        ctx.sslsocket_class = ResilientSSLSocket
    return ctx


def request_answer(address: Any, count: int, timeout: float, storm: Storm, *,
                   tls: TLSServer | None = None, use_makefile: bool = False,
                   faults: int = 12) -> tuple[list[int], dict[str, int], float]:
    """A legacy robot loop: one line, its ACK; on any error or a wrong answer it closes,
    reconnects and sends the same message again (as the robot client does). At least
    ``count`` messages, and on until ``faults`` faults fired (bounded: 30 s). Returns the
    records it saw answered, the errors by kind, and its slowest call."""
    confirmed: list[int] = []
    errors: dict[str, int] = {}
    worst = 0.0
    sock: Any = None
    reader: Any = None
    n = 1
    end = time.monotonic() + 30
    while n <= count or (len(storm.fired) < faults and time.monotonic() < end):
        start = time.monotonic()
        try:
            if sock is None:
                sock = ResilientSocket.connect(address, FAST, timeout=timeout)
                if tls is not None:
                    sock = tls_ctx(tls).wrap_socket(sock, server_hostname="localhost")
                reader = sock.makefile("rb") if use_makefile else None
            sock.sendall(b"MSG %d x\n" % n)
            if reader is not None:
                line = reader.readline()
            else:
                line = b""
                while not line.endswith(b"\n"):
                    chunk = sock.recv(100)
                    if not chunk:
                        break
                    line += chunk
            if line == b"ACK %d\n" % n:
                confirmed.append(n)
                n += 1
            else:
                kind = "EOF" if not line.endswith(b"\n") else "wrong answer"
                errors[kind] = errors.get(kind, 0) + 1
                sock = _close(sock, reader)
        except OSError as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            sock = _close(sock, reader)
        worst = max(worst, time.monotonic() - start)
        assert sum(errors.values()) < 50, errors
    _close(sock, reader)
    return confirmed, errors, worst


def _close(sock: Any, reader: Any) -> None:
    if reader is not None:
        reader.close()
    if sock is not None:
        sock.close()


@pytest.mark.parametrize("use_makefile", [False, True], ids=["recv", "makefile"])
def test_mixed_storm_request_answer_loses_nothing_within_the_timeout(use_makefile):
    """3,000 request/answer round trips while RST, FIN, refusals, black holes and cuts
    mid-record and mid-answer fire every 50-200 ms, under the application's timeout.
    Counted on the server: nothing answered is missing, in order, a record repeated only
    while unanswered; no call took longer than its timeout plus one connect attempt."""
    timeout = TIMEOUT
    with MessageServer() as srv, FaultProxy(srv.address) as proxy, Storm(proxy, 11) as storm:
        confirmed, errors, worst = request_answer(proxy.address, 3000, timeout, storm,
                                                  use_makefile=use_makefile)
    assert confirmed == list(range(1, len(confirmed) + 1)) and len(confirmed) >= 3000
    assert_server_counts(srv.received, confirmed)
    assert worst < timeout + 1.0, worst
    assert len(storm.fired) >= 12, storm.fired
    # A FIN in the middle of an answer line reaches the application as its EOF, as a plain
    # socket gives it (unknown protocol, §5b); nothing else may.
    assert set(errors) <= {"EOF"}, errors


def test_tls_mixed_storm_request_answer_loses_nothing_within_the_timeout():
    timeout = TIMEOUT
    srv = TLSServer().start()
    try:
        with FaultProxy(srv.address) as proxy, Storm(proxy, 5) as storm:
            confirmed, errors, worst = request_answer(proxy.address, 1500, timeout, storm,
                                                      tls=srv)
        assert confirmed == list(range(1, len(confirmed) + 1)) and len(confirmed) >= 1500
        assert_server_counts(srv.received, confirmed)
        assert worst < timeout + 1.0, worst
        assert len(storm.fired) >= 12, storm.fired
        assert set(errors) <= {"EOF"}, errors
    finally:
        srv.stop()


class LineAck(ListenerService):
    """Counts every line ``L <n>`` and answers ``A <n>`` (per connection, in order)."""

    def __init__(self) -> None:
        super().__init__("line-ack", "127.0.0.1", 0, None)
        self.received: list[int] = []

    def _handle(self, c: Any) -> None:
        buf = b""
        try:
            while True:
                d = c.recv(65536)
                if not d:
                    return
                buf += d
                *complete, buf = buf.split(b"\n")
                out = []
                for line in complete:
                    n = int(line.split()[1])
                    self.received.append(n)
                    out.append(b"A %d\n" % n)
                if out:
                    c.sendall(b"".join(out))
        except OSError:
            pass
        finally:
            c.close()

    def _teardown(self) -> None:
        self._close_listener()


@pytest.mark.parametrize("use_makefile", [False, True], ids=["recv", "makefile"])
def test_duplex_mixed_storm_with_the_application_timeout(use_makefile):
    """A writer greenlet streams 20,000 lines and a reader greenlet reads their ACKs on one
    socket with the application's timeout, through the mixed storm (black holes and
    refusals too, not only cuts): no line lost, the reader never sees a premature EOF or an
    error, and no call outlasts the timeout."""
    lines = 20_000
    out: dict[str, Any] = {"worst": 0.0}
    with LineAck() as srv, FaultProxy(srv.address) as proxy, Storm(proxy, 3) as storm:
        sock = ResilientSocket.connect(proxy.address, FAST, timeout=TIMEOUT)

        def timed(call: Any, *args: Any) -> Any:
            start = time.monotonic()
            try:
                return call(*args)
            finally:
                out["worst"] = max(out["worst"], time.monotonic() - start)

        def writer() -> None:
            n, end = 0, time.monotonic() + 30
            more = True
            while more:
                n += 1
                more = n < lines or (len(storm.fired) < 12 and time.monotonic() < end)
                if not more:
                    out["total"] = n  # before its line goes out: the reader stops at its ACK
                timed(sock.sendall, b"L %d\n" % n)
                if n % 20 == 0:
                    gevent.sleep(0.001)  # paced: the storm meets the stream all along
            out["writer"] = "ok"

        stream = sock.makefile("rb") if use_makefile else None
        duplex_run(sock, out, writer, (lambda: timed(stream.readline)) if stream is not None
                   else (lambda: timed(sock.recv, 65536)), 60)
    assert out["writer"] == out["reader"] == "ok", out
    assert set(srv.received) == set(range(1, out["total"] + 1))
    first = first_arrivals(srv.received)
    assert first == sorted(first)
    assert out["worst"] < TIMEOUT + 1.0, out["worst"]
    assert len(storm.fired) >= 12, storm.fired


def test_text_makefile_readline_with_a_limit_through_resets():
    """``makefile("r", encoding=...)`` and ``readline(limit)`` (a partial line, then the
    rest) across resets every few messages: every answer whole, in order, none lost."""
    with MessageServer() as srv, FaultProxy(srv.address) as proxy:
        sock = ResilientSocket.connect(proxy.address, FAST, timeout=10)
        writer = sock.makefile("w", encoding="ascii", newline="\n")
        reader = sock.makefile("r", encoding="ascii", newline="\n")
        got = []
        for n in range(300):
            writer.write(f"MSG {n} hello\n")
            writer.flush()
            if n % 29 == 7:
                proxy.reset_all()
            head = reader.readline(3)
            got.append(head + (reader.readline() if not head.endswith("\n") else ""))
        sock.close()
    assert got == [f"ACK {n}\n" for n in range(300)]
    assert sock.reconnects >= 5
    assert_server_counts(srv.received, list(range(300)))


def test_sendfile_through_a_reset_mid_file_loses_nothing():
    """``sendfile()`` of 20,000 lines to a server that reads and never answers, the
    connection reset ~100 KB into the file: every line reaches the server, first arrivals in
    order. (Against a server that answers as it reads, unread answers when the write fails
    are an early answer, §5: the write's error, as without us.)"""
    count = 20_000
    data = b"".join(b"MSG %d x\n" % n for n in range(1, count + 1))
    with MessageServer(mode="sink") as srv, FaultProxy(srv.address) as proxy, \
            tempfile.TemporaryFile() as f:
        f.write(data)
        f.seek(0)
        sock = ResilientSocket.connect(proxy.address, FAST, timeout=10)
        proxy.cut_after(100_000, "up", how="reset")
        assert sock.sendfile(f) == len(data)
        # The stream goes on (telemetry): a write after the reset meets it, if sendfile's
        # own writes all went into the kernel's buffer before it came.
        deadline = time.monotonic() + 10
        more = count
        while not set(range(1, count + 1)) <= set(srv.received):
            assert time.monotonic() < deadline, f"{len(set(srv.received))} of {count}"
            more += 1
            sock.sendall(b"MSG %d x\n" % more)
            gevent.sleep(0.02)
        sock.close()
    assert sock.reconnects == 1
    assert first_arrivals(srv.received)[:count] == list(range(1, count + 1))


def test_recv_waitall_across_a_reset_mid_answer_gives_the_answer_whole():
    """``recv(n, MSG_WAITALL)`` reads until it has the answer (gevent may return it in
    parts, as without us); a reset in the middle of the echoed bytes is resumed: the bytes
    are the ones sent, once."""
    with MessageServer(mode="echo") as srv, FaultProxy(srv.address) as proxy:
        sock = ResilientSocket.connect(proxy.address, FAST, timeout=10)
        sock.sendall(b"a" * 100)
        assert sock.recv(100, socket.MSG_WAITALL) == b"a" * 100
        proxy.cut_after(50, "down", how="reset")
        payload = bytes(range(256)) * 4
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = sock.recv(len(payload) - len(got), socket.MSG_WAITALL)
            assert chunk, f"EOF after {len(got)} bytes"
            got += chunk
        sock.close()
    assert got == payload
    assert sock.reconnects == 1


def test_tls_unwrap_ends_protection_and_a_later_drop_is_the_plain_error():
    """After ``unwrap()`` the stream is plain text inside the same TCP connection: a new
    connection could not carry it (it would need a TLS handshake the server is not asking
    for), so a drop there is the plain socket's error, and nothing is re-sent."""
    srv = UnwrapServer()
    with srv, FaultProxy(srv.address) as proxy:
        raw = ResilientSocket.connect(proxy.address, FAST, timeout=5)
        sock = srv.client_ctx().wrap_socket(raw, server_hostname="localhost")
        sock.sendall(b"a")
        assert sock.recv(100) == b"TLS a"
        plain = sock.unwrap()
        plain.sendall(b"b")
        assert plain.recv(100) == b"PLAIN b"
        proxy.reset_all()
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            for _ in range(3):
                plain.sendall(b"c")
                if not plain.recv(100):
                    raise ConnectionResetError("EOF")
        plain.close()
    assert srv.connections == 1
    assert srv.plain == [b"b"]


class UnwrapServer(ListenerService):
    """TLS until the client's close_notify, then plain text on the same connection."""

    def __init__(self) -> None:
        import trustme

        super().__init__("unwrap", "127.0.0.1", 0, None)
        self.ca = trustme.CA()
        self.plain: list[bytes] = []
        self.ctx = gevent.ssl.SSLContext(gevent.ssl.PROTOCOL_TLS_SERVER)
        cert = self.ca.issue_cert("localhost", "127.0.0.1")
        with cert.private_key_and_cert_chain_pem.tempfile() as path:
            self.ctx.load_cert_chain(path)

    def client_ctx(self) -> Any:
        ctx = gevent.ssl.SSLContext(gevent.ssl.PROTOCOL_TLS_CLIENT)
        self.ca.configure_trust(ctx)
        ctx.sslsocket_class = ResilientSSLSocket
        return ctx

    def _handle(self, raw: Any) -> None:
        try:
            conn = wrap_server_side(self.ctx, raw)
            while True:
                try:
                    data = conn.recv(100)
                except gevent.ssl.SSLZeroReturnError:
                    data = b""
                if not data:
                    break
                conn.sendall(b"TLS " + data)
            plain = conn.unwrap()
            with plain:
                while True:
                    data = plain.recv(100)
                    if not data:
                        return
                    self.plain.append(data)
                    plain.sendall(b"PLAIN " + data)
        except OSError:
            pass
        finally:
            raw.close()

    def _teardown(self) -> None:
        self._close_listener()


def _held(proxy: FaultProxy, refuse: float = 5.0) -> ResilientSocket:
    """A socket whose request is unanswered (a sink) and whose next read must recover while
    the server refuses: the read is then inside a recovery for ``refuse`` seconds."""
    sock = ResilientSocket.connect(proxy.address, RetryPolicy(deadline=30, backoff_initial=0.02,
                                                              backoff_max=0.2))
    sock.sendall(b"MSG 2 x\n")
    gevent.sleep(0.05)
    proxy.refuse(refuse)
    proxy.reset_all()
    return sock


def test_keyboard_interrupt_during_a_recovery_leaves_the_socket_usable():
    """^C while a read recovers: the interrupt reaches the caller at once, nothing leaks,
    and the socket is usable again once the server is back (the next call reconnects), as
    the contract says of an interrupted recovery (§3)."""
    with MessageServer(mode="sink") as sink, FaultProxy(sink.address) as proxy:
        sock = _held(proxy, refuse=0.6)
        main = gevent.getcurrent()
        gevent.spawn_later(0.2, main.throw, KeyboardInterrupt)
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            sock.recv(100)
        assert time.monotonic() - start < 1.0
        assert sock.fileno() == -1 or sock.resilient  # let go; the next call reconnects
        sock.settimeout(5)
        sock.sendall(b"MSG 3 x\n")
        deadline = time.monotonic() + 5
        while 3 not in sink.received and time.monotonic() < deadline:
            gevent.sleep(0.01)
        sock.close()
    assert sink.received.count(3) == 1
    assert sink.received.count(2) == 1  # sent before the drop; the interrupted replay not run


def test_close_from_another_greenlet_ends_a_recovery_into_a_black_hole():
    """The server is black-holed after the reset (connects succeed, nothing answers): the
    reader waits inside the recovery; ``close()`` from another greenlet ends it at once with
    the closed socket's error, and nothing is left open."""
    with MessageServer(mode="sink") as sink, FaultProxy(sink.address) as proxy:
        sock = ResilientSocket.connect(proxy.address, FAST)
        sock.sendall(b"MSG 2 x\n")
        gevent.sleep(0.05)
        proxy.blackhole(True)
        proxy.reset_all()
        reader = gevent.spawn(sock.recv, 100)
        gevent.sleep(0.3)
        start = time.monotonic()
        sock.close()
        reader.join(3)
        assert reader.ready() and time.monotonic() - start < 1.0
        assert isinstance(reader.exception, OSError), reader.value
        assert sock.fileno() == -1
        deadline = time.monotonic() + 5
        while proxy.active and time.monotonic() < deadline:
            gevent.sleep(0.01)
        assert proxy.active == 0


@pytest.mark.parametrize("fault", ["blackhole", "refuse"])
def test_tls_call_never_outlasts_the_application_timeout(fault):
    """TLS, the application's timeout 1 s, the server black-holed (the handshake never
    completes) or refusing after a reset: the call gives up within the timeout plus one
    connect attempt, with the original error type and the note."""
    srv = TLSServer().start()
    try:
        with FaultProxy(srv.address) as proxy:
            raw = ResilientSocket.connect(proxy.address, RetryPolicy(deadline=30), timeout=1)
            sock = tls_ctx(srv).wrap_socket(raw, server_hostname="localhost")
            sock.sendall(b"MSG 1 x\n")
            assert sock.recv(100) == b"ACK 1\n"
            if fault == "blackhole":
                proxy.blackhole(True)
            else:
                proxy.refuse(10)
            proxy.reset_all()
            gevent.sleep(0.05)
            start = time.monotonic()
            with pytest.raises(OSError) as caught:
                sock.sendall(b"MSG 2 x\n")
                sock.recv(100)
            took = time.monotonic() - start
            sock.close()
        assert took < 1.0 + 0.5, took
        assert "timeout of 1 s ran out" in " ".join(getattr(caught.value, "__notes__", []))
    finally:
        srv.stop()


class HalfCloser(ListenerService):
    """Answers a connection's first line, then shuts down its sending side and goes on
    reading (and counting) lines until the client closes: nginx's lingering close. With
    ``full=True`` it closes the connection instead (an idle keep-alive connection closed by
    the server: a request written after that FIN is answered by a reset)."""

    def __init__(self, full: bool = False) -> None:
        super().__init__("half-closer", "127.0.0.1", 0, None)
        self.full = full
        self.lines: list[bytes] = []

    def _handle(self, c: Any) -> None:
        buf = b""
        mine = 0
        try:
            while True:
                d = c.recv(65536)
                if not d:
                    return
                buf += d
                *complete, buf = buf.split(b"\n")
                for line in complete:
                    self.lines.append(line)
                    mine += 1
                    if not self._line(c, line, mine):
                        return
        except OSError:
            pass
        finally:
            c.close()

    def _line(self, c: Any, line: bytes, mine: int) -> bool:
        """The connection's ``mine``-th line was read: False ends the connection."""
        if mine == 1:  # each connection's first line is answered
            c.sendall(b"ACK " + line.split()[1] + b"\n")
            if self.full:
                return False
            c.shutdown(gsocket.SHUT_WR)
        return True

    def _teardown(self) -> None:
        self._close_listener()


def _write_after_the_servers_fin(resilient: bool, full: bool) -> tuple[Any, list[bytes], int]:
    """One greenlet: a request answered, the server's FIN in (a half-close, or a full close
    with ``full``), then a second request and a read. What the read gave, the lines the
    server read, its connection count."""
    with HalfCloser(full) as srv:
        sock: Any = (ResilientSocket.connect(srv.address, FAST, timeout=2) if resilient
                     else gsocket.create_connection(srv.address, timeout=2))
        sock.sendall(b"MSG 1 x\n")
        assert sock.recv(100) == b"ACK 1\n"
        assert select.select([sock], [], [], 5)[0]  # the peer's FIN is in
        sock.sendall(b"MSG 2 x\n")
        answer: Any
        try:
            answer = sock.recv(100)
        except OSError as exc:
            answer = type(exc).__name__
        sock.close()
        # The second line, if the server reads it (the plain client's after a full close
        # never arrives), and a re-send, if any, was written before recv() returned: the
        # server's moment to read them (a bounded wait for something that may not come).
        deadline = time.monotonic() + (0.3 if full and not resilient else 2)
        while len(srv.lines) < 2 and time.monotonic() < deadline:
            gevent.sleep(0.01)
        gevent.sleep(0.1)
        return answer, list(srv.lines), srv.connections


def test_request_after_a_half_close_in_one_greenlet_is_not_resent():
    """The server answers, half-closes and keeps reading (design.md §5: a half-close is not a
    drop): the plain client's next request reaches it once, on the half-closed connection,
    and its read gets the EOF. Ours the same: the request was written after the peer's FIN
    (seen before the write) and the peer's TCP acknowledged it, so it is not re-sent. Before
    the write-time look at the TCP state it was sent a second time on a new connection."""
    plain = _write_after_the_servers_fin(False, full=False)
    ours = _write_after_the_servers_fin(True, full=False)
    assert plain == (b"", [b"MSG 1 x", b"MSG 2 x"], 1)
    assert ours == plain


def test_request_after_the_server_closed_an_idle_connection_is_re_sent_once():
    """The other side of the same look: the server closed the connection after answering
    (an idle keep-alive close), so the request written after its FIN meets a reset and was
    never read. The plain client gets the EOF (or the reset); ours re-sends the request on a
    new connection, where it runs once and is answered."""
    plain = _write_after_the_servers_fin(False, full=True)
    assert plain[0] in (b"", "ConnectionResetError") and plain[1] == [b"MSG 1 x"]
    ours = _write_after_the_servers_fin(True, full=True)
    assert ours == (b"ACK 2\n", [b"MSG 1 x", b"MSG 2 x"], 2)


def _nonblocking_after_fault(resilient: bool, server: MessageServer, fault: str) -> list[Any]:
    """A legacy event loop: a connected socket set non-blocking, select() for readability,
    recv until EOF or an error, after a fault under a request in flight."""
    with FaultProxy(server.address) as proxy:
        sock: Any = (ResilientSocket.connect(proxy.address, FAST) if resilient
                     else gsocket.create_connection(proxy.address))
        before = len(server.lines)
        sock.sendall(b"MSG 1 x\n")
        if server.mode == "ack":
            assert sock.recv(100) == b"ACK 1\n"
        sock.setblocking(False)
        sock.send(b"MSG 2 x\n")
        end = time.monotonic() + 5  # the request reached the server (and its answer is out)
        while len(server.lines) < before + 2 and time.monotonic() < end:
            gevent.sleep(0.005)
        assert len(server.lines) == before + 2
        if server.mode == "ack":  # its answer is in the client's buffer before the fault
            assert select.select([sock], [], [], 5)[0]
        if fault == "fin":
            proxy.close_all()
        else:
            proxy.reset_all()
        got: list[Any] = []
        for _ in range(4):
            ready, _, _ = select.select([sock], [], [], 2)
            if not ready:
                got.append("select timed out")
                break
            try:
                data = sock.recv(100)
            except OSError as exc:
                got.append(type(exc).__name__)
                continue
            got.append(data)
            if not data:
                break
        sock.close()
    return got


@pytest.mark.parametrize("mode", ["ack", "sink"])
@pytest.mark.parametrize("fault", ["rst", "fin"])
def test_nonblocking_event_loop_sees_what_a_plain_socket_sees(mode, fault):
    """Non-blocking sockets pass through (§6): after a reset or a FIN under a request in
    flight, select() and recv() give the legacy loop exactly what the plain socket gives,
    at once (no reconnect, no wait)."""
    with MessageServer(mode=mode) as server:
        plain = _nonblocking_after_fault(False, server, fault)
        ours = _nonblocking_after_fault(True, server, fault)
    assert ours == plain, (ours, plain)
    assert plain[-1] == b""


@pytest.mark.slow
@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_mixed_storm_with_a_busy_loop_beside_it(tls):
    """The request/answer storm with a CPU hog (a busy-loop process) on the machine: still
    nothing lost, in order, within the timeout."""
    import subprocess
    import sys

    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        if tls:
            srv: Any = TLSServer().start()
        else:
            srv = MessageServer().start()
        try:
            with FaultProxy(srv.address) as proxy, Storm(proxy, 21) as storm:
                confirmed, errors, worst = request_answer(
                    proxy.address, 20_000, TIMEOUT, storm, tls=srv if tls else None,
                    faults=60)
            assert confirmed == list(range(1, len(confirmed) + 1))
            assert_server_counts(srv.received, confirmed)
            assert worst < TIMEOUT + 1.0, worst
            assert set(errors) <= {"EOF"}, errors
        finally:
            srv.stop() if tls else srv.close()
    finally:
        hog.kill()
        hog.wait(5)
