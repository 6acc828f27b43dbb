"""design.md §5, one rule per test, each with a real fault through FaultProxy or a real server."""

from __future__ import annotations

import socket
import time

import gevent
import pytest
from conftest import readline, run_py, wait_until

import resilientsock
from resilientsock import ResilientSocket, RetryPolicy
from resilientsock.testing import FaultProxy, MessageServer

FAST = RetryPolicy(deadline=5, backoff_initial=0.01, backoff_max=0.1)


def connect(proxy: FaultProxy, policy: RetryPolicy = FAST, **kw) -> ResilientSocket:
    return ResilientSocket.connect(proxy.address, policy, timeout=10, **kw)


def test_plain_round_trip_counts_nothing(server, proxy):
    with connect(proxy) as s:
        s.sendall(b"MSG 1 hi\n")
        assert readline(s) == b"ACK 1\n"
        assert s.unconfirmed_bytes == 0  # the answer confirmed the record
    assert resilientsock.stats().get("reconnects", 0) == 0
    assert server.received == [1]


def test_reset_during_sendall_resends_the_record_whole(server, proxy):
    payload = b"MSG 7 " + b"x" * (2 << 20) + b"\n"  # 2 MiB: the reset lands mid-sendall
    proxy.cut_after(100_000, "up")
    with connect(proxy) as s:
        s.sendall(payload)
        assert readline(s) == b"ACK 7\n"
        assert s.reconnects == 1
    assert server.received == [7]  # the cut copy had no newline: only the re-sent one counts
    assert proxy.faults["cut"] == 1


def test_reset_while_waiting_in_recv_before_any_answer_byte(server, proxy):
    proxy.cut_after(0, "down")  # the answer's first byte triggers an RST instead
    with connect(proxy) as s:
        s.sendall(b"MSG 1 hello\n")
        assert readline(s) == b"ACK 1\n"
        assert s.reconnects == 1
    assert server.received == [1, 1]  # at-least-once: the request arrived twice
    st = resilientsock.stats()
    assert st["replayed_records"] == 1
    assert st["replayed_bytes"] == len(b"MSG 1 hello\n")


def test_eof_with_unanswered_record_reconnects_and_replays(server, proxy):
    proxy.cut_after(0, "down", how="close")  # FIN instead of the answer
    with connect(proxy) as s:
        s.sendall(b"MSG 3 x\n")
        assert readline(s) == b"ACK 3\n"
        assert s.reconnects == 1
    assert server.received == [3, 3]
    assert resilientsock.stats()["disconnects.CONNECTION_LOST"] == 1


def test_eof_with_nothing_unanswered_is_passed_through(server, proxy):
    with connect(proxy) as s:
        s.sendall(b"MSG 1 x\n")
        assert readline(s) == b"ACK 1\n"
        proxy.close_all()
        assert s.recv(100) == b""  # the protocol's normal end
        assert s.reconnects == 0
    assert server.received == [1]


def test_drop_mid_answer_is_surfaced_then_the_socket_is_dead(server, proxy):
    """Wave 3 (docs/design.md §5): after a surfaced error the socket is as dead as a plain one (it
    reconnected lazily before: a new connection the application never asked for, lacking
    whatever login the old one had)."""
    with connect(proxy, FAST.replace(resume_answers=False)) as s:
        s.sendall(b"HALF 1\n")
        assert s.recv(100) == b"ACK "  # part of the answer reached the caller
        wait_until(lambda: proxy.active == 1)
        proxy.reset_all()
        with pytest.raises(ConnectionResetError) as info:
            s.recv(100)
        assert any("mid-answer" in n for n in info.value.__notes__)
        assert s.unconfirmed_bytes == 0  # journal cleared: the caller owns recovery
        assert s.recv(100) == b""  # the connection's end, as a plain socket gives it
        with pytest.raises(BrokenPipeError) as dead:
            s.sendall(b"MSG 2 y\n")  # as on a plain dead socket: no lazy reconnect
        assert any("not reconnected" in n for n in dead.value.__notes__)
        assert s.reconnects == 0
    assert server.received == [1]  # HALF 1 was not re-sent, MSG 2 never left


def test_server_refusing_for_one_second_then_back(server, proxy):
    proxy.refuse(1.0)
    start = time.monotonic()
    with connect(proxy) as s:  # retry_connect: the first connect waits it out
        elapsed = time.monotonic() - start
        s.sendall(b"MSG 1 x\n")
        assert readline(s) == b"ACK 1\n"
    assert 0.9 <= elapsed < 4.0
    assert resilientsock.stats()["reconnect_attempts"] >= 2


def test_existing_connection_survives_a_restart_window(server, proxy):
    with connect(proxy) as s:
        s.sendall(b"MSG 1 x\n")
        assert readline(s) == b"ACK 1\n"
        proxy.refuse(0.5)
        proxy.reset_all()
        s.sendall(b"MSG 2 x\n")
        assert readline(s) == b"ACK 2\n"
        assert s.reconnects == 1
    assert sorted(set(server.received)) == [1, 2]


def test_deadline_spent_raises_original_type_with_note(server, proxy):
    policy = RetryPolicy(deadline=1.0, backoff_initial=0.05, backoff_max=0.2)
    with connect(proxy, policy) as s:
        s.sendall(b"MSG 1 x\n")
        assert readline(s) == b"ACK 1\n"
        proxy.refuse_now()
        proxy.reset_all()
        start = time.monotonic()
        with pytest.raises((ConnectionResetError, BrokenPipeError)) as info:
            s.sendall(b"MSG 2 x\n")
            s.recv(100)
        elapsed = time.monotonic() - start
    assert 0.9 <= elapsed < 3.0
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "resilientsock: gave up after" in notes
    assert "Connection refused" in notes
    assert resilientsock.stats()["gave_up"] == 1


def test_permanent_error_is_not_retried_and_fails_fast():
    start = time.monotonic()
    with pytest.raises(socket.gaierror):
        ResilientSocket.connect(("no-such-host.invalid", 80), FAST)
    assert time.monotonic() - start < 3.0
    assert resilientsock.stats().get("reconnect_attempts", 0) == 0


def test_journal_limit_exceeded_surfaces_the_drop(server, proxy):
    policy = FAST.replace(journal_limit=1000)
    with connect(proxy, policy) as s:
        s.sendall(b"PAD " + b"p" * 1500 + b"\n")  # over the limit, no answer
        assert s.unconfirmed_bytes == 0
        wait_until(lambda: server.lines != [], what="server got the line")
        proxy.reset_all()
        with pytest.raises(ConnectionResetError) as info:
            s.recv(100)
        assert any("journal_limit" in n for n in info.value.__notes__)
    assert resilientsock.stats().get("replayed_records", 0) == 0


@pytest.mark.parametrize("replay", ["none", "safe"])
def test_replay_none_or_safe_surfaces_instead_of_resending(server, proxy, replay):
    """replay="none" never re-sends; "safe" not on a connection that was never answered."""
    proxy.cut_after(0, "down")
    with connect(proxy, FAST.replace(replay=replay)) as s:
        s.sendall(b"MSG 1 x\n")
        with pytest.raises(ConnectionResetError) as info:
            readline(s)
        assert any(f"replay='{replay}'" in n for n in info.value.__notes__)
        assert s.reconnects == 0
    assert server.received == [1]


def test_replay_none_passes_an_unanswered_eof_through(server, proxy):
    """Found by CPython's test_xmlrpc under patch(replay="none"): a stale keep-alive
    connection closed by the server must still look closed (b"") to the caller, so
    http.client raises RemoteDisconnected and xmlrpc.client retries as it always did."""
    proxy.cut_after(0, "down", how="close")
    with connect(proxy, FAST.replace(replay="none")) as s:
        s.sendall(b"MSG 1 x\n")
        assert s.recv(100) == b""
        assert s.unconfirmed_bytes == 0 and s.reconnects == 0
        with pytest.raises(BrokenPipeError):  # wave 3: dead, as a plain socket (no lazy
            s.sendall(b"MSG 2 x\n")          # reconnect); the application reconnects
    assert server.received == [1]
    assert resilientsock.stats()["surfaced.CONNECTION_LOST"] == 1


def test_poison_record_gives_up_after_max_attempts(server, proxy):
    policy = RetryPolicy(deadline=10, max_attempts=3, backoff_initial=0.01, backoff_max=0.05)
    # Directly to the server: its RST reaches the client (the proxy would turn it into a FIN,
    # and an unanswered EOF that repeats is the server's answer, passed on as EOF).
    with ResilientSocket.connect(server.address, policy, timeout=10) as s:
        s.sendall(b"POISON\n")
        with pytest.raises(ConnectionResetError) as info:
            s.recv(100)
        assert any("gave up after 3 attempts" in n for n in info.value.__notes__)
    assert server.lines.count(b"POISON") == 1 + 3  # first send + one replay per attempt


def test_full_duplex_sees_exactly_one_reconnect(server, proxy):
    with connect(proxy) as s:
        s.sendall(b"MSG 1 x\n")
        assert readline(s) == b"ACK 1\n"
        got: list[bytes] = []
        reader = gevent.spawn(lambda: got.append(readline(s)))
        wait_until(lambda: proxy.active == 1)
        reader.join(0.05)  # bounded: the reader is blocked in recv (it cannot finish)
        assert not reader.dead
        proxy.reset_all()
        writer = gevent.spawn(s.sendall, b"MSG 2 x\n")
        gevent.joinall([reader, writer], timeout=10, raise_error=True)
        assert got == [b"ACK 2\n"]
        assert s.reconnects == 1
    assert resilientsock.stats()["reconnects"] == 1


def test_on_reconnect_runs_on_new_connection_before_replay(server, proxy):
    calls: list[int] = []

    def reauth(sock: ResilientSocket, attempt: int) -> None:
        calls.append(attempt)
        sock.sendall(b"AUTH secret\n")  # raw: not journaled

    seen: list[str] = []
    policy = FAST.replace(on_reconnect=reauth,
                          on_disconnect=lambda sock, info: seen.append(info.category.name))
    proxy.cut_after(0, "down")
    with connect(proxy, policy) as s:
        s.sendall(b"MSG 1 x\n")
        assert readline(s) == b"ACK 1\n"
        assert s.unconfirmed_bytes == 0
    assert calls == [1]
    assert seen == ["CONNECTION_LOST"]
    assert server.lines == [b"MSG 1 x", b"AUTH secret", b"MSG 1 x"]


def test_options_and_timeout_are_on_the_new_connection(server, proxy):
    s = ResilientSocket(socket.AF_INET, socket.SOCK_STREAM, policy=FAST)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    s.settimeout(7.5)
    s.connect(proxy.address)
    with s:
        before = s.fileno()
        sndbuf = s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        proxy.cut_after(0, "down")
        s.sendall(b"MSG 1 x\n")
        assert readline(s) == b"ACK 1\n"
        assert s.reconnects == 1
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == sndbuf
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1  # dead-peer default
        assert s.gettimeout() == 7.5
        assert s.fileno() != before or s.getpeername() == proxy.address  # a new connection
        assert proxy.connections == 2


def test_read_timeout_is_surfaced_not_retried(server, proxy):
    """The application's own read timeout is no error of ours (docs/design.md §3): raised as is,
    without a note, not counted as surfaced; the connection and its journal are kept."""
    with connect(proxy) as s:
        s.settimeout(0.2)
        s.sendall(b"NOANSWER\n")
        with pytest.raises(TimeoutError) as info:
            s.recv(10)
        assert not getattr(info.value, "__notes__", None)
        assert s.reconnects == 0
        assert s.unconfirmed_bytes == len(b"NOANSWER\n")
    st = resilientsock.stats()
    assert st["surfaced"] == 0 and "surfaced.TIMEOUT" not in st


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_write_timeout_to_a_peer_that_does_not_read_is_surfaced(family, tmp_path):
    """The peer is alive (its TCP acknowledges everything) but never reads: a new connection
    would not help, so the timeout reaches the caller, as with a plain socket."""
    if family == "unix":
        address: object = str(tmp_path / "s")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        listener = socket.socket()
        address = ("127.0.0.1", 0)
    with listener:
        listener.bind(address)
        listener.listen(1)  # never accepted, never read: its window closes
        with ResilientSocket.connect(listener.getsockname(), FAST, timeout=0.2) as s:
            fd = s.fileno()
            sent = 0
            with pytest.raises(TimeoutError) as caught:
                for _ in range(100_000):  # bounded: the buffers hold far less
                    s.sendall(b"x" * 65536)
                    sent += 1
            assert sent < 100_000
            notes = "".join(getattr(caught.value, "__notes__", []))
            assert "write timeout: the peer is alive" in notes
            assert s.reconnects == 0 and s.fileno() == fd  # the connection is kept
            # The connection is kept, so is its journal (docs/design.md §5): the failed sendall's
            # record was never journaled.
            assert s.unconfirmed_bytes == sent * 65536
    assert resilientsock.stats()["surfaced.TIMEOUT"] == 1


def test_makefile_reader_and_writer_go_through_the_guards(server, proxy):
    proxy.cut_after(0, "down")
    with connect(proxy) as s:
        f = s.makefile("rwb")
        f.write(b"MSG 5 via makefile\n")
        f.flush()
        assert f.readline() == b"ACK 5\n"
        f.close()
        assert s.reconnects == 1
    assert server.received == [5, 5]


def test_unix_socket_reconnects(tmp_path):
    path = str(tmp_path / "srv.sock")
    accepted: list[int] = []

    def serve(listener: socket.socket) -> None:
        while True:
            conn, _ = listener.accept()
            accepted.append(1)
            data = conn.recv(100)
            if len(accepted) == 1:
                conn.close()  # FIN without answering
                continue
            conn.sendall(b"OK " + data)
            conn.close()

    import gevent.socket as gs
    listener = gs.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    g = gevent.spawn(serve, listener)
    try:
        with ResilientSocket.connect(path, FAST) as s:
            s.sendall(b"hello")
            assert s.recv(100) == b"OK hello"
            assert s.reconnects == 1
    finally:
        g.kill()
        listener.close()


def test_listening_and_accepted_sockets_are_not_resilient():
    listener = ResilientSocket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = ResilientSocket.connect(listener.getsockname(), FAST)
    conn, _ = listener.accept()
    try:
        assert isinstance(conn, ResilientSocket)
        assert not conn.resilient and not listener.resilient and client.resilient
    finally:
        for s in (conn, client, listener):
            s.close()


def test_nonblocking_socket_passes_through(server):
    s = ResilientSocket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    with pytest.raises(BlockingIOError):
        s.connect(server.address)
    assert not s.resilient
    s.close()


def test_direct_connect_validates_address():
    with pytest.raises(ValueError, match="address"):
        ResilientSocket.connect(("only-host",))


# -- server-first protocols (a banner before the client speaks: SMTP, FTP, POP3, IMAP) --------

BANNER = b"220-banner.test first line\r\n220 banner.test ready\r\n"


@pytest.fixture
def banner_server():
    from resilientsock.testing import MessageServer
    with MessageServer(banner=BANNER) as srv:
        yield srv


def _read_banner(sock: ResilientSocket) -> bytes:
    return readline(sock) + readline(sock)


def test_drop_before_the_first_answer_skips_the_new_banner_and_replays(banner_server):
    with FaultProxy(banner_server.address) as proxy:
        proxy.cut_after(0, "up")  # the first command is cut before it reaches the server
        with connect(proxy) as s:
            assert _read_banner(s) == BANNER
            s.sendall(b"MSG 1 first\n")
            # The new connection's banner was read and dropped: the answer is the answer.
            assert readline(s) == b"ACK 1\n"
            assert s.reconnects == 1
    assert banner_server.received == [1]
    assert resilientsock.stats()["replayed_records"] == 1


def test_drop_in_an_established_session_is_surfaced_not_replayed(banner_server):
    with FaultProxy(banner_server.address) as proxy:
        with connect(proxy) as s:
            assert _read_banner(s) == BANNER
            s.sendall(b"MSG 1 login\n")
            assert readline(s) == b"ACK 1\n"  # the session now has state (EHLO, login)
            proxy.cut_after(0, "up")
            with pytest.raises(ConnectionError) as caught:
                s.sendall(b"MSG 2 in-session\n")
                readline(s)
            assert "server spoke first" in "".join(getattr(caught.value, "__notes__", []))
            assert s.unconfirmed_bytes == 0
            # Wave 3 (design.md §5, issue #23): the socket is as dead as a plain one. It used to
            # reconnect lazily, and ftplib's / imaplib's NOOP liveness check read the new
            # greeting as NOOP's answer, then met "530 Log in" / "BAD" on the next command.
            assert s.recv(100) == b""
            with pytest.raises(BrokenPipeError):
                s.sendall(b"NOOP\n")
            assert s.reconnects == 0
    assert banner_server.received == [1]  # MSG 2 was never re-sent into a new session
    assert resilientsock.stats().get("replayed_records", 0) == 0


def test_on_reconnect_hook_restores_a_session_after_the_banner(banner_server):
    hook_saw: list[bytes] = []

    def relogin(sock: ResilientSocket, attempt: int) -> None:
        sock.sendall(b"PING relogin\n")  # the banner is already consumed: PONG comes next
        hook_saw.append(readline(sock))

    with FaultProxy(banner_server.address) as proxy:
        with connect(proxy, FAST.replace(on_reconnect=relogin)) as s:
            assert _read_banner(s) == BANNER
            s.sendall(b"MSG 1 login\n")
            assert readline(s) == b"ACK 1\n"
            proxy.cut_after(0, "up")
            s.sendall(b"MSG 2 in-session\n")
            assert readline(s) == b"ACK 2\n"
            assert s.reconnects == 1
    assert hook_saw == [b"PONG\n"]
    assert banner_server.received == [1, 2]
    assert banner_server.lines == [b"MSG 1 login", b"PING relogin", b"MSG 2 in-session"]


def test_sendmsg_rejects_what_is_not_an_iterable_of_buffers(server, proxy):
    """Found by CPython's test_socket under patch(): bytes are not a list of buffers (the
    old code turned each int into that many zero bytes and sent them)."""
    with connect(proxy) as s:
        for bad in (b"not in an iterable", object(), [object()], [b"MSG 1 x\n", object()]):
            with pytest.raises(TypeError):
                s.sendmsg(bad)  # type: ignore[arg-type]
        assert s.unconfirmed_bytes == 0
        assert s.sendmsg([b"MSG 1 ", b"x\n"]) == 8
        assert readline(s) == b"ACK 1\n"
    assert server.lines == [b"MSG 1 x"]


@pytest.mark.parametrize("confirm", ["tcp-ack", "answer"])
def test_write_only_stream_with_tcp_ack_does_not_replay_what_the_peer_acknowledged(confirm):
    """docs/design.md §5 `confirm`: a telemetry stream to a server that never answers. Under
    "tcp-ack" the records the peer's TCP acknowledged are not re-sent after a drop (here the
    POISON line that made the server reset); under "answer" they all are, POISON included, so
    the server resets again at every attempt until max_attempts."""
    policy = RetryPolicy(confirm=confirm, deadline=5, max_attempts=3, backoff_initial=0.01,
                         backoff_max=0.05)
    with MessageServer("sink") as sink, \
            ResilientSocket.connect(sink.address, policy, timeout=0.5) as s:
        for n in range(1, 201):
            s.sendall(b"MSG %d telemetry\n" % n)
        s.sendall(b"POISON\n")  # read, acknowledged, then the server resets the connection
        wait_until(lambda: b"POISON" in sink.lines, what="the server read POISON")
        if confirm == "answer":
            with pytest.raises(ConnectionResetError) as info:
                s.recv(1)
            assert any("gave up after 3 attempts" in n for n in info.value.__notes__)
            assert sink.lines.count(b"POISON") == 1 + 3
            assert sink.duplicates() == 3 * 200
            return
        with pytest.raises(TimeoutError):  # the reset is recovered; then nothing to read
            s.recv(1)
        assert s.reconnects == 1 and s.unconfirmed_bytes == 0
        for n in range(201, 211):
            s.sendall(b"MSG %d telemetry\n" % n)
        wait_until(lambda: len(sink.received) >= 210, what="all 210 records")
    assert sink.received == list(range(1, 211))
    assert sink.lines.count(b"POISON") == 1
    assert resilientsock.stats().get("replayed_records", 0) == 0


def test_replay_safe_resends_only_the_first_write_on_a_reused_connection(server, proxy):
    """design.md §5 replay="safe" (the RFC 7230 §6.3.1 / xmlrpc.client rule): the first write on
    an idle connection that had already been answered, met by a drop before any answer byte,
    is re-sent; two unanswered writes are not (either may have been acted on)."""
    with connect(proxy, FAST.replace(replay="safe")) as s:
        s.sendall(b"MSG 1 x\n")
        assert readline(s) == b"ACK 1\n"
        proxy.cut_after(0, "down")  # MSG 2 reaches the server; its answer is cut
        s.sendall(b"MSG 2 x\n")
        assert readline(s) == b"ACK 2\n"
        assert s.reconnects == 1
        proxy.cut_after(0, "down")
        s.sendall(b"MSG 3 x\n")
        with pytest.raises(ConnectionError) as info:
            # A second unanswered write: not "the first" any more. The cut may meet this
            # write already (EPIPE/ECONNRESET) or the read after it.
            s.sendall(b"MSG 4 x\n")
            readline(s)
        assert any("replay='safe'" in n for n in info.value.__notes__)
        assert s.unconfirmed_bytes == 0 and s.reconnects == 1  # surfaced, not re-sent
    assert server.received[:4] == [1, 2, 2, 3] and server.received.count(3) == 1
    assert server.received.count(4) <= 1


def test_write_after_own_shutdown_is_the_callers_error_not_a_drop(server, proxy):
    """docs/design.md §3: EPIPE after our own shutdown(SHUT_WR) is the caller's doing."""
    with connect(proxy) as s:
        s.sendall(b"MSG 1 x\n")
        assert readline(s) == b"ACK 1\n"
        s.shutdown(socket.SHUT_WR)
        with pytest.raises(BrokenPipeError):
            s.sendall(b"MSG 2 x\n")
        assert s.reconnects == 0 and not s.resilient
    assert proxy.connections == 1 and server.received == [1]
    assert resilientsock.stats().get("reconnect_attempts", 0) == 0


def test_gevent_timeout_during_a_read_keeps_the_connection_and_the_late_answer(server, proxy):
    """docs/design.md §3 (review r06): ``with gevent.Timeout(t, False): sock.recv(n)`` is a common
    idiom; a plain gevent socket keeps the connection and the late answer arrives."""
    with connect(proxy) as s:
        s.sendall(b"HALF 1\n")  # answered "ACK " only: the rest never comes
        with gevent.Timeout(0.2, False):
            assert s.recv(4) == b"ACK "
            s.recv(100)  # interrupted by the silent timeout
        s.sendall(b"MSG 2 y\n")
        assert readline(s) == b"ACK 2\n"
        assert s.reconnects == 0
    assert proxy.connections == 1
    assert server.received == [1, 2]


@pytest.mark.parametrize("how", ["source_address", "bind"])
def test_source_address_is_bound_again_on_every_new_connection(server, proxy, how):
    """docs/design.md §6: source_address / bind() are re-applied to each new connection."""
    if how == "source_address":
        s = connect(proxy, source_address=("127.0.0.2", 0))
    else:
        s = ResilientSocket(socket.AF_INET, socket.SOCK_STREAM, policy=FAST)
        s.settimeout(10)
        s.bind(("127.0.0.2", 0))
        s.connect(proxy.address)
    with s:
        assert s.getsockname()[0] == "127.0.0.2"
        first_port = s.getsockname()[1]
        proxy.cut_after(0, "down")
        s.sendall(b"MSG 1 x\n")
        assert readline(s) == b"ACK 1\n"
        assert s.reconnects == 1
        assert s.getsockname()[0] == "127.0.0.2"
        assert s.getsockname()[1] != first_port  # a new connection, bound the same way
    assert server.received == [1, 1]


# -- rules that had no test before the core rebuild ------------------------------------------

def test_eof_pass_hands_an_unanswered_eof_to_the_caller(server, proxy):
    proxy.cut_after(0, "down", how="close")
    with connect(proxy, FAST.replace(eof="pass")) as s:
        s.sendall(b"MSG 1 x\n")
        assert s.recv(100) == b""
        assert s.reconnects == 0
    assert server.received == [1]


def test_confirm_explicit_keeps_answered_records_until_confirm(server, proxy):
    with connect(proxy, FAST.replace(confirm="explicit")) as s:
        s.sendall(b"MSG 1 x\n")
        assert readline(s) == b"ACK 1\n"
        assert s.unconfirmed_bytes == len(b"MSG 1 x\n")  # an answer does not confirm
        proxy.cut_after(0, "down")
        s.sendall(b"MSG 2 x\n")
        assert readline(s) == b"ACK 1\n"  # both records were re-sent, in order
        assert readline(s) == b"ACK 2\n"
        assert s.confirm() == 2 and s.unconfirmed_bytes == 0
    assert server.received == [1, 2, 1, 2]


def test_reconnect_rate_spreads_a_mass_drop(server, proxy):
    """The process-wide token bucket (reconnect_rate, burst rate/10): 20 sockets dropped at
    once under rate=10/s reconnect over about 1.9 s, not at once."""
    from resilientsock import _socket as rs

    saved = rs._bucket
    rs._bucket = rs.TokenBucket()
    policy = FAST.replace(reconnect_rate=10.0, deadline=10)
    try:
        socks = [connect(proxy, policy) for _ in range(20)]
        for n, s in enumerate(socks):
            s.sendall(b"MSG %d x\n" % n)
            assert readline(s) == b"ACK %d\n" % n
        proxy.record_accepts = True
        proxy.accept_times.clear()
        proxy.reset_all()
        start = time.monotonic()

        def again(n: int, s: ResilientSocket) -> None:
            s.sendall(b"MSG %d y\n" % (100 + n))
            assert readline(s) == b"ACK %d\n" % (100 + n)

        gevent.joinall([gevent.spawn(again, n, s) for n, s in enumerate(socks)], timeout=15,
                       raise_error=True)
        elapsed = time.monotonic() - start
        for s in socks:
            s.close()
    finally:
        rs._bucket = saved
    assert 1.5 <= elapsed < 6.0, elapsed
    assert len(proxy.accept_times) == 20
    early = [t for t in proxy.accept_times if t - start < 0.5]
    assert len(early) <= 6  # the burst (1) and what 0.5 s at 10/s refills


class _TwoAnswers:
    """A server that answers each request line with a long line, different per connection
    when ``change`` is set (the answer changed between the two requests)."""

    def __init__(self, change: bool) -> None:
        import socketserver
        import threading

        self.connections = 0
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                outer.connections += 1
                tag = b"v%d" % outer.connections if change else b"v1"
                for line in self.rfile:
                    self.wfile.write(b"ANSWER " + tag + b" " + b"x" * 200 + b" " + line)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True

        self.srv = Server(("127.0.0.1", 0), Handler)
        self.address = self.srv.server_address
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


def test_a_drop_mid_answer_is_resumed_and_the_caller_sees_one_answer():
    srv = _TwoAnswers(change=False)
    try:
        with FaultProxy(srv.address) as proxy:
            proxy.cut_after(20, "down")  # the answer is cut after 20 of its ~220 bytes
            with connect(proxy) as s:
                s.sendall(b"GET 1\n")
                line = readline(s)
                assert line == b"ANSWER v1 " + b"x" * 200 + b" GET 1\n"
                assert s.reconnects == 1 and s.stats().answers_resumed == 1
    finally:
        srv.close()
    assert resilientsock.stats()["answers_resumed"] == 1


def test_a_changed_answer_is_surfaced_with_a_note():
    srv = _TwoAnswers(change=True)
    try:
        with FaultProxy(srv.address) as proxy:
            proxy.cut_after(20, "down")
            with connect(proxy) as s:
                s.sendall(b"GET 1\n")
                with pytest.raises(ConnectionResetError) as info:
                    readline(s)
                assert any("differs" in n for n in info.value.__notes__)
                assert s.stats().answers_changed == 1
    finally:
        srv.close()


def test_a_moment_of_non_blocking_does_not_end_protection(server, proxy):
    """redis-py's can_read() sets timeout 0 for a poll, then its timeout again: protection
    resumes with it (found by the redis restart test under the runner)."""
    with connect(proxy) as s:
        s.sendall(b"MSG 1 x\n")
        assert readline(s) == b"ACK 1\n"
        s.settimeout(0)
        with pytest.raises(BlockingIOError):
            s.recv(10)  # nothing to read: the poll's answer, unchanged
        s.settimeout(5)
        assert s.resilient
        proxy.cut_after(0, "down")
        s.sendall(b"MSG 2 x\n")
        assert readline(s) == b"ACK 2\n"
        assert s.reconnects == 1
    assert server.received == [1, 2, 2]


def test_connections_to_the_process_itself_are_counted_apart(server):
    """A wake-up pair (pika's, a socketpair fallback) is no connection to a server."""
    listener = ResilientSocket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    with listener, ResilientSocket.connect(listener.getsockname(), FAST) as own, \
            ResilientSocket.connect(server.address, FAST) as remote:
        assert own.stats().internal and not remote.stats().internal
    st = resilientsock.stats()
    assert st["internal_connects"] == 1 and st["connects"] == 1


def test_socket_stats_describe_what_one_socket_went_through(server, proxy):
    with connect(proxy) as s:
        s.sendall(b"MSG 1 x\n")
        assert readline(s) == b"ACK 1\n"
        proxy.cut_after(0, "down")
        s.sendall(b"MSG 2 x\n")
        assert readline(s) == b"ACK 2\n"
        st = s.stats()
    assert isinstance(st, resilientsock.SocketStats)
    assert (st.connects, st.reconnects, st.drops, st.replayed_records) == (2, 1, 1, 1)
    assert st.replayed_bytes == len(b"MSG 2 x\n") and st.surfaced == 0
    assert st.peer == proxy.address and not st.internal


def test_a_wait_longer_than_the_budget_still_makes_one_last_attempt(server, proxy):
    """A 1 s outage, and a backoff wait grown past what is left of the application's 3 s
    timeout: the socket makes one last attempt just before the timeout ends (the server is
    back by then) rather than sleeping the timeout out and giving up untried (found by the
    http.server row: 7 refusals in a 1 s outage, then 5 s asleep)."""
    slow = RetryPolicy(deadline=30, backoff_initial=1000, backoff_max=1000)
    with ResilientSocket.connect(proxy.address, slow, timeout=3) as s:
        s.sendall(b"MSG 1 x\n")
        assert readline(s) == b"ACK 1\n"
        proxy.refuse(1.0)
        proxy.reset_all()
        t0 = time.monotonic()
        s.sendall(b"MSG 2 x\n")
        t1 = time.monotonic()
        assert readline(s) == b"ACK 2\n"
        t2 = time.monotonic()
        assert s.reconnects == 1
    # The outage was waited out, and neither call ran past its own 3 s timeout (the two
    # together may: each call has the whole timeout, and a loaded machine delays the second).
    assert t2 - t0 >= 1.0, t2 - t0
    assert t1 - t0 < 3.0 and t2 - t1 < 3.0, (t1 - t0, t2 - t1)
    assert server.received == [1, 2]


def test_a_write_of_multi_byte_items_is_sent_and_journaled_by_its_bytes():
    """``send`` counts bytes, ``len()`` of a memoryview of 8-byte items counts items (found in
    issue 28's hot path): a first ``send`` that took more bytes than the view has items ended
    ``sendall`` early (the rest never sent: 36,757 bytes of 4 MiB here), and the journal
    counted items. Every byte reaches the peer, and the journal counts bytes."""
    import gevent.socket as gsocket

    payload = memoryview(bytes(range(256)) * 16384).cast("Q")  # 4 MiB, 524,288 items
    want = payload.tobytes() + payload[:3].tobytes()
    listener = gsocket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    got = bytearray()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            while len(got) < len(want):
                chunk = conn.recv(1 << 20)
                if not chunk:
                    return
                got.extend(chunk)

    server = gevent.spawn(serve)
    try:
        with ResilientSocket.connect(listener.getsockname(), FAST, timeout=10) as s:
            s.sendall(payload)  # its first send runs before the server greenlet reads
            assert s.unconfirmed_bytes == payload.nbytes  # nothing answered it
            assert s.send(payload[:3]) == 24
            assert s.unconfirmed_bytes == payload.nbytes + 24
            server.join(timeout=10)
            assert server.dead
            assert len(got) == len(want) and got == want
    finally:
        server.kill()
        listener.close()


def test_a_peek_is_not_counted_as_part_of_the_answer(server):
    """recv(n, MSG_PEEK) leaves the bytes queued: the read that takes them counts them, the
    peek does not (it counted them twice: the answer's length and digest, by which a cut
    answer is resumed, were off by the peeked bytes)."""
    with ResilientSocket.connect(server.address, RetryPolicy(deadline=5), timeout=5) as s:
        s.sendall(b"MSG 1 x\n")
        peeked = s.recv(3, socket.MSG_PEEK)
        assert peeked == b"ACK"[: len(peeked)] and peeked
        buf = bytearray(3)
        n = s.recv_into(buf, 3, socket.MSG_PEEK)
        assert bytes(buf[:n]) == b"ACK"[:n]
        assert s._rs_m.answered == 0
        got = readline(s)
        assert got == b"ACK 1\n"
        assert s._rs_m.answered == len(b"ACK 1\n")


def test_recv_into_a_two_dimensional_byte_view_counts_what_was_read(server):
    """A 2-D 'B' view (rows of bytes): the n bytes read are counted, not n rows."""
    from resilientsock._machine import new_digest

    with ResilientSocket.connect(server.address, RetryPolicy(deadline=5), timeout=5) as s:
        s.sendall(b"MSG 1 x\n")
        grid = memoryview(bytearray(4)).cast("B", (2, 2))
        assert s.recv_into(grid, 1) == 1
        assert bytes(grid.tobytes()[:1]) == b"A"
        m = s._rs_m
        expected = new_digest()
        expected.update(b"A")
        assert m.answered == 1
        assert m.digest.intdigest() == expected.intdigest()  # of b"A", not of a whole row


def test_a_write_timeout_under_tcp_ack_ends_protection_for_the_socket():
    """confirm="tcp-ack": a sendall cut by its timeout may have sent part of its record, which
    the journal does not hold; the peer's TCP acknowledgements would count those bytes as
    later records' and confirm them before the peer has them (lost on a later drop). The
    connection is kept, as a plain socket keeps it, and goes on as one: protection ends."""
    listener = socket.socket()
    with listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # never accepted, never read
        policy = FAST.replace(confirm="tcp-ack")
        with ResilientSocket.connect(listener.getsockname(), policy, timeout=0.2) as s:
            assert s.resilient
            fd = s.fileno()
            with pytest.raises(TimeoutError) as caught:
                for _ in range(100_000):  # bounded: the buffers hold far less
                    s.sendall(b"x" * 65536)
            assert "write timeout: the peer is alive" in "".join(caught.value.__notes__)
            assert s.fileno() == fd  # the connection is kept
            assert not s.resilient  # and is plain from now on


def test_a_numeric_address_is_resolved_without_the_resolver_thread_pool(server):
    """Reconnecting to an address literal needs no lookup (docs/design.md §12: recovery time
    that is not I/O): gevent's resolver would hop to its thread pool and back; a name still
    takes the resolver's way (a new lookup on each reconnect)."""
    code = f"""
import resilientsock
resilientsock.patch()
import socket, gevent
from resilientsock.testing import FaultProxy
hub = gevent.get_hub()
with FaultProxy({server.address!r}) as proxy:
    s = socket.create_connection(proxy.address, timeout=10)
    s.sendall(b"MSG 1 a\\n")
    assert s.recv(100) == b"ACK 1\\n"
    proxy.reset_all()
    s.sendall(b"MSG 2 b\\n")
    assert s.recv(100) == b"ACK 2\\n"
    assert s.reconnects == 1, s.reconnects
    print("pool after a numeric reconnect:", hub._threadpool is not None)
    s.close()
    s = socket.create_connection(("localhost", proxy.address[1]), timeout=10)
    s.close()
    print("pool after a name:", hub._threadpool is not None)
"""
    res = run_py(["-c", code])
    assert res.returncode == 0, res.stderr
    assert "pool after a numeric reconnect: False" in res.stdout
    assert "pool after a name: True" in res.stdout


@pytest.mark.parametrize("how", ["sendto", "sendto-flags", "sendmsg-address"])
def test_a_write_that_names_an_address_is_journaled_like_send(server, proxy, how):
    """§5 "no silent loss": ``sendto(data, address)`` (and ``sendmsg`` with an address) on a
    connected TCP socket sends as ``send`` does (Linux ignores the address), but was not
    journaled: a reset that lost the record was recovered with nothing to re-send, and the
    reader waited for an answer that could not come (a plain socket gets the reset at once)."""
    proxy.plan.on_pattern(b"MSG 1 ", "up", nth=1, action="reset")
    with ResilientSocket.connect(proxy.address, RetryPolicy(deadline=5)) as s:
        s.settimeout(5)
        if how == "sendto":
            assert s.sendto(b"MSG 1 hello\n", proxy.address) == 12
        elif how == "sendto-flags":
            assert s.sendto(bytearray(b"MSG 1 hello\n"), 0, proxy.address) == 12
        else:
            assert s.sendmsg([b"MSG 1 ", b"hello\n"], (), 0, proxy.address) == 12
        assert readline(s) == b"ACK 1\n"
    assert server.received == [1]
