"""TLS: the robot loop over TLS through resets; bad certificate and plaintext port fail fast."""

from __future__ import annotations

import socket
import ssl
import time

import gevent
import gevent.ssl
import pytest
from conftest import RandomResets, assert_in_order_no_loss

import resilientsock
from resilientsock import ResilientSocket, ResilientSSLSocket, RetryPolicy
from resilientsock.testing import FaultProxy

FAST = RetryPolicy(deadline=10, backoff_initial=0.01, backoff_max=0.1)


def client_ctx(tls_server) -> gevent.ssl.SSLContext:  # type: ignore[no-untyped-def]
    ctx = gevent.ssl.SSLContext(gevent.ssl.PROTOCOL_TLS_CLIENT)
    tls_server.ca.configure_trust(ctx)
    ctx.sslsocket_class = ResilientSSLSocket
    return ctx


def tls_connect(address, tls_server, policy=FAST) -> ResilientSSLSocket:  # type: ignore[no-untyped-def]
    raw = ResilientSocket.connect(address, policy, timeout=10)
    sock = client_ctx(tls_server).wrap_socket(raw, server_hostname="localhost")
    assert isinstance(sock, ResilientSSLSocket)
    return sock


def test_tls_robot_loop_through_resets(tls_server):
    with FaultProxy(tls_server.address) as proxy:
        sock = tls_connect(proxy.address, tls_server)
        with sock, sock.makefile("rb") as reader, RandomResets(proxy, seed=3) as resets:
            n = 0
            while n < 300 or (resets.fired < 2 and n < 50_000):  # until resets hit (bounded)
                n += 1
                sock.sendall(b"MSG %d reading\n" % n)
                assert reader.readline() == b"ACK %d\n" % n
    assert_in_order_no_loss(tls_server.received, n)
    assert resets.fired >= 2 and sock.reconnects >= 1


def test_bad_certificate_fails_in_under_a_second(tls_server):
    ctx = gevent.ssl.SSLContext(gevent.ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_default_certs()  # the test CA is not trusted
    ctx.sslsocket_class = ResilientSSLSocket
    start = time.monotonic()
    raw = ResilientSocket.connect(tls_server.address, FAST, timeout=5)
    with pytest.raises(ssl.SSLCertVerificationError):
        ctx.wrap_socket(raw, server_hostname="localhost")
    assert time.monotonic() - start < 1.0
    assert resilientsock.stats().get("reconnect_attempts", 0) == 0


def test_plaintext_port_fails_fast(server):
    ctx = gevent.ssl.SSLContext(gevent.ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.sslsocket_class = ResilientSSLSocket
    raw = ResilientSocket.connect(server.address, FAST, timeout=5)
    raw.sendall(b"PING\n")  # the plaintext server answers PONG: not TLS
    start = time.monotonic()
    with pytest.raises((ssl.SSLError, OSError)):
        s = ctx.wrap_socket(raw, server_hostname="localhost")
        s.recv(10)
    assert time.monotonic() - start < 1.0


def test_tls_session_is_offered_for_resumption(tls_server):
    with FaultProxy(tls_server.address) as proxy:
        sock = tls_connect(proxy.address, tls_server)
        sock.sendall(b"MSG 1 x\n")
        assert sock.recv(100) == b"ACK 1\n"
        assert sock.session is not None
        proxy.cut_after(0, "down")
        sock.sendall(b"MSG 2 x\n")
        assert sock.recv(100) == b"ACK 2\n"
        assert sock.reconnects == 1
        assert sock.server_hostname == "localhost"
        sock.close()


def test_starttls_socket_is_not_made_resilient(tls_server):
    """A real STARTTLS: plaintext banner and command, then the upgrade on the same
    connection. A reconnect could not replay the plaintext prelude, so the TLS socket is
    not resilient, and a drop after the upgrade reaches the caller."""
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert = tls_server.ca.issue_cert("localhost")
    with cert.private_key_and_cert_chain_pem.tempfile() as path:
        server_ctx.load_cert_chain(path)
    accepted: list[socket.socket] = []
    answered = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        accepted.append(conn)
        conn.sendall(b"220 ready\r\n")
        assert conn.recv(100) == b"STARTTLS\r\n"
        conn.sendall(b"220 go ahead\r\n")
        tls = server_ctx.wrap_socket(conn, server_side=True)
        tls.recv(100)
        tls.sendall(b"ACK 1\n")
        answered.wait(5)
        tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        tls.close()  # an RST after the first answer

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with listener:
        raw = ResilientSocket.connect(listener.getsockname(), FAST, timeout=5)
        assert raw.recv(100) == b"220 ready\r\n"
        raw.sendall(b"STARTTLS\r\n")
        assert raw.recv(100) == b"220 go ahead\r\n"
        sock = client_ctx(tls_server).wrap_socket(raw, server_hostname="localhost")
        assert not sock.resilient
        sock.sendall(b"MSG 1 x\n")
        assert sock.recv(100) == b"ACK 1\n"
        answered.set()
        thread.join(5)
        with pytest.raises(OSError):
            sock.sendall(b"MSG 2 x\n")
            sock.sendall(b"MSG 3 x\n")
            if not sock.recv(100):
                raise ConnectionResetError("EOF")
        sock.close()
    assert len(accepted) == 1  # nothing was re-sent on a new connection


def test_plain_socket_wrap_is_untouched(tls_server):
    raw = socket.create_connection(tls_server.address, timeout=5)
    ctx = ssl.create_default_context()
    tls_server.ca.configure_trust(ctx)
    with ctx.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(b"MSG 9 x\n")
        assert s.recv(100) == b"ACK 9\n"


def test_io_after_close_raises_what_a_closed_socket_raises(tls_server, server):
    """Found by CPython's test_ssl under patch(): a closed TLS socket raises ValueError on
    read/write (as ssl does), not a reconnect attempt or OSError."""
    sock = tls_connect(tls_server.address, tls_server)
    sock.close()
    with pytest.raises(ValueError):
        sock.read(1024)
    with pytest.raises(ValueError):
        sock.write(b"hello")
    plain = ResilientSocket.connect(server.address, FAST, timeout=10)
    plain.close()
    with pytest.raises(OSError) as caught:
        plain.recv(10)
    assert caught.value.errno == 9  # EBADF, as gevent's closed socket says
    assert server.received == []


@pytest.mark.parametrize("how", ["reset", "close"])
def test_drop_during_the_first_handshake_is_retried(tls_server, how):
    """A drop in the middle of the server's first handshake flight (design.md §3: anything during
    connect or handshake is not maybe_delivered, and retryable): a new TCP connection and a new
    handshake, then the conversation as if nothing happened."""
    with FaultProxy(tls_server.address) as proxy:
        proxy.cut_after(40, "down", how=how)  # inside the ServerHello flight
        sock = tls_connect(proxy.address, tls_server)
        with sock:
            assert proxy.faults["cut"] == 1 and proxy.connections == 2
            sock.sendall(b"MSG 1 x\n")
            assert sock.recv(100) == b"ACK 1\n"
    assert tls_server.received == [1]
    assert resilientsock.stats()["reconnects"] == 1


@pytest.mark.parametrize("how", ["reset", "close"])
def test_tls_cut_mid_record_before_the_answer_replays(tls_server, how):
    """The answer's TLS record is cut after 10 of its ~30 bytes: nothing of it could be
    decrypted, so no byte of the answer reached the caller; the request is re-sent over a new
    handshake and the answer arrives whole (the server saw the request twice: at least once)."""
    with FaultProxy(tls_server.address) as proxy:
        sock = tls_connect(proxy.address, tls_server)
        with sock:
            sock.sendall(b"MSG 1 x\n")
            assert sock.recv(100) == b"ACK 1\n"  # handshake and session tickets are through
            proxy.cut_after(10, "down", how=how)
            sock.sendall(b"MSG 2 x\n")
            assert sock.recv(100) == b"ACK 2\n"
            assert sock.reconnects == 1 and proxy.faults["cut"] == 1
    assert tls_server.received == [1, 2, 2]


def test_every_drop_is_recovered_and_the_session_resumed(tls_server):
    """Three drops on one TLS socket, each recovered. (The TLS session kept for resumption
    once shared an attribute with the banner rule's "session under way" flag, so every drop
    after the first was surfaced as if the server had spoken first.)"""
    with FaultProxy(tls_server.address) as proxy:
        sock = tls_connect(proxy.address, tls_server)
        with sock:
            sock.sendall(b"MSG 1 x\n")
            assert sock.recv(100) == b"ACK 1\n"
            for n in range(2, 5):
                proxy.cut_after(0, "down", how="reset" if n % 2 else "close")
                sock.sendall(b"MSG %d x\n" % n)
                assert sock.recv(100) == b"ACK %d\n" % n
                assert sock.reconnects == n - 1
            assert sock.session_reused  # the last handshake resumed the kept session
    assert tls_server.received == [1, 2, 2, 3, 3, 4, 4]  # each cut answer: its request again


def test_tls_banner_is_skipped_on_a_reconnect_before_the_first_answer(tls_banner_server):
    """The banner rule (docs/decisions.md) over implicit TLS: the first command's answer is
    cut; the new connection's banner, decrypted after a new handshake, is read and dropped
    before the replay, so the caller reads the answer, not a second greeting."""
    with FaultProxy(tls_banner_server.address) as proxy:
        sock = tls_connect(proxy.address, tls_banner_server)
        with sock, sock.makefile("rb") as reader:  # as smtplib and poplib read
            assert reader.readline() == b"220 robot-hub ready\r\n"
            proxy.cut_after(0, "down")
            sock.sendall(b"MSG 1 x\n")
            assert reader.readline() == b"ACK 1\n"
            assert sock.reconnects == 1
    assert tls_banner_server.received == [1, 1]


def test_tls_drop_in_an_established_session_is_surfaced(tls_banner_server):
    with FaultProxy(tls_banner_server.address) as proxy:
        sock = tls_connect(proxy.address, tls_banner_server)
        with sock, sock.makefile("rb") as reader:
            assert reader.readline() == b"220 robot-hub ready\r\n"
            sock.sendall(b"MSG 1 login\n")
            assert reader.readline() == b"ACK 1\n"  # the session now has state
            proxy.cut_after(0, "up")
            sock.sendall(b"MSG 2 in-session\n")
            try:
                line = reader.readline()
            except ConnectionError as exc:  # 3.13: the reset is ConnectionResetError
                assert "server spoke first" in "".join(getattr(exc, "__notes__", []))
            else:
                # 3.10-3.12: a TLS reset reads as EOF (suppress_ragged_eofs); it reaches the
                # caller as EOF, so smtplib/poplib raise their own "connection closed".
                assert line == b""
            assert sock.reconnects == 0
    assert tls_banner_server.received == [1]  # MSG 2 was never re-sent into a new session
    assert resilientsock.stats()["surfaced.CONNECTION_LOST"] == 1


def test_wrap_then_connect_handshakes_once_and_is_resilient(tls_server):
    """``ctx.wrap_socket(socket.socket()).connect(addr)``: the TLS connect does the handshake
    itself; the core must not start a second one (found by CPython's test_ssl under patch())."""
    with FaultProxy(tls_server.address) as proxy:
        ctx = client_ctx(tls_server)
        sock = ctx.wrap_socket(ResilientSocket(socket.AF_INET, socket.SOCK_STREAM, policy=FAST),
                               server_hostname="localhost")
        with sock:
            sock.settimeout(10)
            sock.connect(proxy.address)
            assert sock.resilient and sock.version() is not None
            sock.sendall(b"MSG 1 x\n")
            assert sock.recv(100) == b"ACK 1\n"
            proxy.cut_after(0, "down")
            sock.sendall(b"MSG 2 x\n")
            assert sock.recv(100) == b"ACK 2\n"
            assert sock.reconnects == 1
    assert tls_server.received == [1, 2, 2]


def test_connect_on_a_server_side_tls_socket_is_refused_as_ssl_does(tls_server):
    import trustme

    cert = trustme.CA().issue_cert("localhost")
    ctx = gevent.ssl.SSLContext(gevent.ssl.PROTOCOL_TLS_SERVER)
    with cert.private_key_and_cert_chain_pem.tempfile() as path:
        ctx.load_cert_chain(path)
    ctx.sslsocket_class = ResilientSSLSocket
    with ctx.wrap_socket(ResilientSocket(socket.AF_INET, socket.SOCK_STREAM),
                         server_side=True) as s:
        with pytest.raises(ValueError, match="server-side"):
            s.connect(tls_server.address)
