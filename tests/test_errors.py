"""The classifier: real exceptions provoked on loopback, then a table for what cannot be."""

from __future__ import annotations

import errno
import http.client
import socket
import ssl
import struct
import urllib.error

import pytest

from resilientsock import ErrorCategory, _facts, classify, is_connection_error, register

C = ErrorCategory


def _listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_real_reset_is_connection_lost():
    srv = _listener()
    cli = socket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
    with pytest.raises(OSError) as info:
        cli.recv(10)
    result = classify(info.value)
    assert result is not None and result.category is C.CONNECTION_LOST and result.retryable
    assert result.errno_name == "ECONNRESET"
    cli.close()
    srv.close()


def test_real_refused_is_refused_and_not_delivered():
    srv = _listener()
    addr = srv.getsockname()
    srv.close()
    with pytest.raises(ConnectionRefusedError) as info:
        socket.create_connection(addr, timeout=2)
    result = classify(info.value)
    assert result is not None and result.category is C.REFUSED
    assert result.retryable and not result.maybe_delivered


def test_real_broken_pipe():
    a, b = socket.socketpair()
    b.close()
    with pytest.raises(OSError) as info:
        for _ in range(100):
            a.sendall(b"x" * 65536)
    assert classify(info.value).category is C.CONNECTION_LOST  # type: ignore[union-attr]
    a.close()


def test_eof_is_not_an_exception_and_timeout_is_timeout():
    srv = _listener()
    cli = socket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    cli.settimeout(0.05)
    with pytest.raises(TimeoutError) as info:
        cli.recv(10)
    result = classify(info.value)
    assert result is not None and result.category is C.TIMEOUT and not result.retryable
    assert classify(info.value, phase="connect").category is C.CONNECT_TIMEOUT  # type: ignore[union-attr]
    conn.close()
    cli.settimeout(1)
    assert cli.recv(10) == b""
    cli.close()
    srv.close()


def test_tls_handshake_to_plaintext_port_is_permanent():
    srv = _listener()
    cli = socket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nnot tls at all" * 10)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with pytest.raises(ssl.SSLError) as info:
        ctx.wrap_socket(cli, server_hostname="x")
    result = classify(info.value)
    assert result is not None and result.category is C.TLS_PERMANENT and not result.retryable
    conn.close()
    srv.close()


def test_untrusted_certificate_is_permanent(tls_server):
    ctx = ssl.create_default_context()  # does not trust the test CA
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        with socket.create_connection(tls_server.address) as raw:
            ctx.wrap_socket(raw, server_hostname="localhost")
    result = classify(info.value)
    assert result is not None and result.category is C.TLS_PERMANENT and not result.retryable


def test_invalid_domain_is_permanent_dns():
    with pytest.raises(socket.gaierror) as info:
        socket.getaddrinfo("robot-hub.invalid", 80)
    result = classify(info.value)
    assert result is not None and result.category is C.DNS_PERMANENT and not result.retryable


def _os(name: str) -> OSError:
    number = getattr(errno, name)
    return OSError(number, "x")


@pytest.mark.parametrize("name,category", [
    ("ECONNRESET", C.CONNECTION_LOST), ("ECONNABORTED", C.CONNECTION_LOST),
    ("EPIPE", C.CONNECTION_LOST), ("ESHUTDOWN", C.CONNECTION_LOST),
    ("ENETRESET", C.CONNECTION_LOST), ("ENOTCONN", C.CONNECTION_LOST),
    ("EPROTO", C.CONNECTION_LOST), ("ECONNREFUSED", C.REFUSED),
    ("ENETUNREACH", C.UNREACHABLE), ("EHOSTUNREACH", C.UNREACHABLE),
    ("EHOSTDOWN", C.UNREACHABLE), ("ENETDOWN", C.UNREACHABLE), ("ENONET", C.UNREACHABLE),
    ("ETIMEDOUT", C.DEAD_PEER),
])
def test_errno_table(name, category):
    if not hasattr(errno, name):
        pytest.skip(f"{name} does not exist on this platform")
    result = classify(_os(name))
    assert result is not None and result.category is category and result.errno_name == name


@pytest.mark.parametrize("name", ["EBADF", "ENOTSOCK", "EINVAL", "EISCONN", "EMFILE", "ENFILE",
                                  "ENOBUFS", "ENOMEM", "EINTR", "EAGAIN"])
def test_never_classified_errnos(name):
    assert classify(_os(name)) is None


def test_never_classified_types():
    assert classify(BlockingIOError(errno.EAGAIN, "x")) is None
    assert classify(ssl.SSLWantReadError(2, "x")) is None
    assert classify(ssl.SSLWantWriteError(3, "x")) is None
    assert classify(ValueError("I/O operation on closed socket")) is None
    assert classify(KeyboardInterrupt()) is None
    import gevent

    assert classify(gevent.Timeout(1)) is None


def test_foreign_numbers_are_not_read_as_local_ones():
    # 54 is ECONNRESET on macOS but EXFULL on Linux: a number alone must not be trusted.
    if errno.ECONNRESET != 54:
        assert classify(OSError(54, "x")) is None


def test_winerror_is_consulted():
    if not hasattr(errno, "WSAECONNRESET"):
        pytest.skip("WSA symbols exist only on Windows")
    exc = OSError(None, "x")
    exc.winerror = errno.WSAECONNRESET  # type: ignore[attr-defined]
    assert classify(exc).category is C.CONNECTION_LOST  # type: ignore[union-attr]


@pytest.mark.parametrize("name,category", [
    ("EAI_AGAIN", C.DNS_TEMPORARY), ("EAI_NONAME", C.DNS_PERMANENT),
    ("EAI_FAIL", C.DNS_PERMANENT), ("EAI_NODATA", C.DNS_PERMANENT),
])
def test_gaierror_by_class_before_number(name, category):
    if not hasattr(socket, name):
        pytest.skip(f"{name} missing here")
    result = classify(socket.gaierror(getattr(socket, name), "x"))
    assert result is not None and result.category is category
    assert not result.maybe_delivered


def test_gaierror_number_colliding_with_errno_is_not_misread():
    # EAI_AGAIN is -3 on glibc; on macOS it is 2 (ENOENT's number): the class decides.
    assert classify(socket.gaierror(socket.EAI_AGAIN, "x")).category is C.DNS_TEMPORARY  # type: ignore[union-attr]


@pytest.mark.parametrize("exc,category", [
    (ssl.SSLEOFError(8, "EOF"), C.CONNECTION_LOST),
    (ssl.SSLZeroReturnError(6, "closed"), C.CONNECTION_LOST),
    (ssl.SSLSyscallError(5, "syscall"), C.CONNECTION_LOST),
    (ssl.SSLCertVerificationError(1, "verify"), C.TLS_PERMANENT),
])
def test_ssl_subclasses(exc, category):
    assert classify(exc).category is category  # type: ignore[union-attr]


@pytest.mark.parametrize("reason,category", [
    ("BAD_RECORD_MAC", C.TLS_TRANSPORT), ("DECRYPTION_FAILED_OR_BAD_RECORD_MAC", C.TLS_TRANSPORT),
    ("TLSV1_ALERT_INTERNAL_ERROR", C.TLS_TRANSPORT), ("WRONG_VERSION_NUMBER", C.TLS_PERMANENT),
    ("BAD_LENGTH", C.TLS_PERMANENT), ("SSLV3_ALERT_HANDSHAKE_FAILURE", C.TLS_PERMANENT),
    ("UNEXPECTED_EOF_WHILE_READING", C.CONNECTION_LOST),
])
def test_ssl_reasons(reason, category):
    exc = ssl.SSLError(1, f"[SSL: {reason}] x")
    exc.reason = reason  # type: ignore[attr-defined]
    assert classify(exc).category is category  # type: ignore[union-attr]


def test_wrappers_and_chains():
    assert classify(urllib.error.URLError(ConnectionRefusedError(errno.ECONNREFUSED, "r"))
                    ).category is C.REFUSED  # type: ignore[union-attr]
    assert classify(urllib.error.HTTPError("http://x", 503, "busy", {}, None)) is None
    assert classify(http.client.RemoteDisconnected("closed")).category is C.CONNECTION_LOST  # type: ignore[union-attr]
    assert classify(http.client.IncompleteRead(b"x")).category is C.CONNECTION_LOST  # type: ignore[union-attr]
    try:
        try:
            raise ConnectionResetError(errno.ECONNRESET, "reset")
        except OSError as inner:
            raise RuntimeError("library wrapper") from inner
    except RuntimeError as outer:
        assert classify(outer).category is C.CONNECTION_LOST  # type: ignore[union-attr]
    # A wrapper that claims "connection error" but hides a certificate failure:
    class FakeRequestsConnectionError(OSError):
        pass
    FakeRequestsConnectionError.__module__ = "requests.exceptions"
    FakeRequestsConnectionError.__qualname__ = "ConnectionError"
    exc = FakeRequestsConnectionError("wrapped")
    exc.__context__ = ssl.SSLCertVerificationError(1, "verify failed")
    assert classify(exc).category is C.TLS_PERMANENT  # type: ignore[union-attr]
    assert classify(FakeRequestsConnectionError("bare")).category is C.CONNECTION_LOST  # type: ignore[union-attr]


def test_register_third_party_type():
    class DriverGone(Exception):
        pass

    assert classify(DriverGone()) is None
    register(DriverGone, C.CONNECTION_LOST)
    assert is_connection_error(DriverGone())
    with pytest.raises(TypeError):
        register("not a type", C.REFUSED)  # type: ignore[arg-type]


def test_linux_facts_match_this_platform():
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("the Linux table is checked on Linux")
    for name, number in _facts.LINUX.items():
        if hasattr(errno, name):
            assert getattr(errno, name) == number, name
    for name, number in _facts.EAI_LINUX.items():
        if hasattr(socket, name):
            assert getattr(socket, name) == number, name


def test_a_certificate_error_never_says_data_may_have_been_delivered(tls_server):
    """§3: ``maybe_delivered`` is False for "anything during connect or handshake"; a
    certificate is only verified in a handshake, but ``classify`` of the real error said True
    (and ``explain`` said "written data may have reached the peer")."""
    ctx = ssl.create_default_context()  # does not trust the test CA
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        with socket.create_connection(tls_server.address) as raw:
            ctx.wrap_socket(raw, server_hostname="localhost")
    result = classify(info.value)
    assert result is not None and result.maybe_delivered is False
