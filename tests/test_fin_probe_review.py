"""Review of the write-time look at the TCP state (docs/design.md §5, half-close;
docs/decisions.md, "A request written after the peer's FIN, in one greenlet").

Plain vs ours under the same conditions, every count taken on the server side. The case the
look must not break: a forwarder that passes the server's FIN on and still takes the client's
bytes (docker-proxy, ``ssh -L``, socat for its ``-t`` moment, a TCP-mode balancer:
``Forwarder`` from tests/forwarder.py; FaultProxy closes the client's connection at the
server's FIN, as Toxiproxy does) in front of a server that closed an idle keep-alive
connection. The client's TCP sees what a genuine half-close shows (the FIN first, then the
request acknowledged), so for an unknown protocol the EOF is passed on, as the plain client
gets it; where the dialect knows its servers never read after their FIN (HTTP/1.x, RESP,
memcached) the request is a drop and is re-sent as before the look.
"""

from __future__ import annotations

import http.client
import http.server
import select
import socket
import socketserver
import struct
import threading
import time
from collections import Counter
from typing import Any

import gevent
import gevent.socket as gsocket
import pytest
from forwarder import Forwarder
from test_chaos_core import FAST, HalfCloser, _write_after_the_servers_fin

from resilientsock import ResilientSocket
from resilientsock._machine import FIN_PROBES
from resilientsock.testing import FaultProxy

pytestmark = pytest.mark.timeout(60)



class IdleClosingHTTP:
    """http.server (HTTP/1.1, keep-alive) that closes a connection idle for 0.2 s, as real
    servers do (nginx's keepalive_timeout), counting every request by method and path."""

    def __init__(self) -> None:
        counts: Counter[str] = Counter()
        self.counts = counts

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 0.2  # the idle keep-alive close: socketserver shuts down and closes

            def _answer(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    self.rfile.read(n)
                counts[f"{self.command} {self.path}"] += 1
                self.send_response(200)
                self.send_header("Content-Length", "3")
                self.end_headers()
                self.wfile.write(b"ok\n")

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = self.server.server_address[:2]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class RsHTTPConnection(http.client.HTTPConnection):
    def connect(self) -> None:
        self.sock = ResilientSocket.connect((self.host, self.port), FAST, timeout=10)


def _after_idle_close(resilient: bool, method: str, via_proxy: bool) -> tuple[Any, int]:
    """A kept-alive connection, idle past the server's keep-alive timeout (its FIN is in,
    through the forwarder when ``via_proxy``), then one request: what http.client got, and
    how many times the server ran that request."""
    srv = IdleClosingHTTP()
    try:
        with Forwarder(srv.address) as proxy:
            address = proxy.address if via_proxy else srv.address
            cls = RsHTTPConnection if resilient else http.client.HTTPConnection
            conn = cls(*address, timeout=10)
            conn.request("GET", "/warm")
            assert conn.getresponse().read() == b"ok\n"
            sock = conn.sock
            assert select.select([sock], [], [], 5)[0]  # the server's FIN reached the client
            path = "/orders" if method == "POST" else "/items/7"
            got: Any
            try:
                conn.request(method, path, body=b"{}" if method == "POST" else None)
                response = conn.getresponse()
                got = (response.status, response.read())
            except OSError as exc:
                got = type(exc).__name__
            conn.close()
            # A request the server reads arrives before the client's read returned (on the
            # new connection, or the old one through the forwarder): a bounded wait for it.
            end = time.monotonic() + 1
            while not srv.counts[f"{method} {path}"] and time.monotonic() < end:
                gevent.sleep(0.01)
            return got, srv.counts[f"{method} {path}"]
    finally:
        srv.close()


def test_a_get_on_a_stale_keep_alive_connection_through_a_forwarder_is_re_sent_once():
    """The server closed the idle connection; the forwarder passed its FIN on and acknowledged
    the GET (it forwards it to the closed server, which resets the forwarder, not us). The
    plain client gets RemoteDisconnected; ours re-sends the GET on a new connection, where it
    runs once, as it did before the write-time look (which took the forwarder's
    acknowledgement for a half-closed server still reading and passed the EOF on)."""
    plain = _after_idle_close(False, "GET", via_proxy=True)
    assert plain == ("RemoteDisconnected", 0)
    ours = _after_idle_close(True, "GET", via_proxy=True)
    assert ours == ((200, b"ok\n"), 1)


def test_a_post_on_a_stale_keep_alive_connection_through_a_forwarder_is_re_sent_once():
    """The POST was written after the server's FIN (the look saw it in): an HTTP/1.x server
    never reads after its FIN (``fin_is_final``), so the forwarder's acknowledgement took it
    for a closed server, which never ran it. Re-sent, run once; the plain client gets
    RemoteDisconnected. (Was, until the stale keep-alive POST fix: passed on as plain, since
    the POST "may have reached the server".)"""
    plain = _after_idle_close(False, "POST", via_proxy=True)
    assert plain == ("RemoteDisconnected", 0)
    assert _after_idle_close(True, "POST", via_proxy=True) == ((200, b"ok\n"), 1)


def test_a_get_on_a_stale_keep_alive_connection_is_re_sent_once():
    """Direct: the closed server resets the GET written after its FIN: re-sent, run once."""
    plain = _after_idle_close(False, "GET", via_proxy=False)
    assert plain == ("RemoteDisconnected", 0)
    assert _after_idle_close(True, "GET", via_proxy=False) == ((200, b"ok\n"), 1)


def _line_server_closes_behind_a_forwarder(resilient: bool) -> tuple[Any, list[bytes], int]:
    """An unknown (line) protocol: the server answers and closes, the forwarder passes the
    FIN on and takes the next request. What the read gave, the lines read, connections."""
    with HalfCloser(full=True) as srv, Forwarder(srv.address) as proxy:
        sock: Any = (ResilientSocket.connect(proxy.address, FAST, timeout=2) if resilient
                     else gsocket.create_connection(proxy.address, timeout=2))
        sock.sendall(b"MSG 1 x\n")
        assert sock.recv(100) == b"ACK 1\n"
        assert select.select([sock], [], [], 5)[0]  # the FIN is in
        sock.sendall(b"MSG 2 x\n")
        try:
            answer: Any = sock.recv(100)
        except OSError as exc:
            answer = type(exc).__name__
        sock.close()
        gevent.sleep(0.2)  # nothing should arrive: a bounded look for a re-send
        return answer, list(srv.lines), srv.connections


def test_an_unknown_protocol_behind_a_half_closing_forwarder_gets_what_plain_gets():
    """Known limit (docs/design.md §5): with no dialect to say the server never reads after
    its FIN, the forwarder's acknowledgement reads as a half-close: the EOF is passed on, as
    the plain client gets it (never worse; before the look it was re-sent and answered)."""
    plain = _line_server_closes_behind_a_forwarder(False)
    assert plain == (b"", [b"MSG 1 x"], 1)
    assert _line_server_closes_behind_a_forwarder(True) == plain


class HalfCloser6(HalfCloser):
    def __init__(self, full: bool = False) -> None:
        super().__init__(full)
        self._host = "::1"
        self.address = ("::1", 0)


@pytest.mark.skipif(not gsocket.has_ipv6, reason="no IPv6")
def test_half_close_over_ipv6_is_not_resent():
    """The look is made on AF_INET6 too: the request after the half-close reaches the server
    once, as the plain client's does."""
    import test_chaos_core

    real = test_chaos_core.HalfCloser
    test_chaos_core.HalfCloser = HalfCloser6  # type: ignore[misc]
    try:
        try:
            plain = _write_after_the_servers_fin(False, full=False)
        except OSError as exc:  # no ::1 on this machine
            pytest.skip(f"::1 unusable: {exc}")
        ours = _write_after_the_servers_fin(True, full=False)
    finally:
        test_chaos_core.HalfCloser = real  # type: ignore[misc]
    assert plain == (b"", [b"MSG 1 x", b"MSG 2 x"], 1)
    assert ours == plain


def test_the_look_stops_after_the_first_exchanges_of_a_connection():
    """The steady hot path pays nothing: after FIN_PROBES exchanges no look is left, and a
    new connection (after a reset) gets its own."""
    from resilientsock.testing import MessageServer

    with MessageServer(mode="ack") as server, FaultProxy(server.address) as proxy:
        sock: Any = ResilientSocket.connect(proxy.address, FAST, timeout=5)
        m = sock._rs_m
        assert m.fin_probe == FIN_PROBES
        for i in range(1, FIN_PROBES + 5):
            sock.sendall(b"MSG %d x\n" % i)
            assert sock.recv(100) == b"ACK %d\n" % i
            assert m.fin_probe == max(FIN_PROBES - i, 0)
        proxy.reset_all()
        sock.sendall(b"MSG 99 x\n")
        assert sock.recv(100) == b"ACK 99\n"
        assert sock.reconnects == 1
        assert m.fin_probe == FIN_PROBES  # the re-sent record is not a new exchange
        sock.sendall(b"MSG 100 x\n")
        assert sock.recv(100) == b"ACK 100\n"
        assert m.fin_probe == FIN_PROBES - 1
        sock.close()


def _redis_calls(port: int, command: str) -> int:
    """How many times redis-server ran ``command`` (INFO commandstats), asked directly."""
    with gsocket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n")
        data = b""
        while b"\r\n" not in data or len(data) < data.index(b"\r\n") + 4 + int(
                data[1:data.index(b"\r\n")]):  # "$<n>\r\n" and n bytes and "\r\n"
            chunk = s.recv(65536)
            assert chunk, "redis closed the INFO connection"
            data += chunk
    for line in data.decode().splitlines():
        if line.startswith(f"cmdstat_{command}:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


def _redis_after_idle_close(resilient: bool, port: int, command: bytes) -> Any:
    """RESP through a forwarder: PING, then the server's idle timeout closes the connection
    (its FIN passed on), then ``command``: what the read gave."""
    with Forwarder(("127.0.0.1", port)) as proxy:
        sock: Any = (ResilientSocket.connect(proxy.address, FAST, timeout=5) if resilient
                     else gsocket.create_connection(proxy.address, timeout=5))
        sock.sendall(b"*1\r\n$4\r\nPING\r\n")
        assert sock.recv(100) == b"+PONG\r\n"
        assert select.select([sock], [], [], 10)[0]  # redis closed the idle connection
        sock.sendall(command)
        try:
            got: Any = sock.recv(100)
        except OSError as exc:
            got = type(exc).__name__
        sock.close()
        return got


def test_a_redis_get_after_an_idle_timeout_close_through_a_forwarder_is_re_sent_once(
        redis_server):
    """redis-server's ``timeout`` closes an idle client; a forwarder passes the FIN on. The
    plain client's GET gets b"" and never runs; ours is re-sent on a new connection, runs
    once (RESP servers never read after their FIN: no half-close to look for)."""
    _, port = redis_server
    with gsocket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"*4\r\n$6\r\nCONFIG\r\n$3\r\nSET\r\n$7\r\ntimeout\r\n$1\r\n1\r\n")
        assert s.recv(100) == b"+OK\r\n"
        get = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
        assert _redis_after_idle_close(False, port, get) == b""
        assert _redis_calls(port, "get") == 0
        assert _redis_after_idle_close(True, port, get) == b"$-1\r\n"
        assert _redis_calls(port, "get") == 1


class HalfCloseReadReset(HalfCloser):
    """Each connection's first line is answered; after ``MSG 1`` the server half-closes, reads
    the next line, then resets the connection (SO_LINGER 0) — at once, or after ``work``
    seconds with the line acknowledged first (TCP_QUICKACK). A fresh connection (a re-send)
    gets its first line answered. ``reset`` is set once the reset is out."""

    def __init__(self, work: float) -> None:
        super().__init__()
        self.work = work
        self.reset = threading.Event()

    def _line(self, c: Any, line: bytes, mine: int) -> bool:
        if mine == 1:
            c.sendall(b"ACK " + line.split()[1] + b"\n")
            if line.startswith(b"MSG 1 "):
                c.shutdown(gsocket.SHUT_WR)
                if self.work:
                    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            return True
        gevent.sleep(self.work)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.reset.set()
        return False  # closed with SO_LINGER 0: the reset


def _half_close_read_reset(resilient: bool, work: float) -> tuple[Any, list[bytes], int]:
    with HalfCloseReadReset(work) as srv:
        sock: Any = (ResilientSocket.connect(srv.address, FAST, timeout=5) if resilient
                     else gsocket.create_connection(srv.address, timeout=5))
        sock.sendall(b"MSG 1 x\n")
        assert sock.recv(100) == b"ACK 1\n"
        assert select.select([sock], [], [], 5)[0]  # the half-close is in
        sock.sendall(b"MSG 2 x\n")
        if work:  # the application reads late: the ACK and then the reset are in
            assert srv.reset.wait(5)
            end = time.monotonic() + 5
            while (sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] != 7
                   and time.monotonic() < end):  # TCP_CLOSE: the reset reached us
                gevent.sleep(0.005)
        try:
            answer: Any = sock.recv(100)
        except OSError as exc:
            answer = type(exc).__name__
        sock.close()
        gevent.sleep(0.2)  # a bounded look for a re-send
        return answer, list(srv.lines), srv.connections


def test_a_request_read_after_a_half_close_then_reset_is_not_resent():
    """The server half-closed, its TCP acknowledged the next request, it read it and reset
    the connection; ours reads the EOF after the reset is in. The peer took the request
    after its FIN (a half-close): passed on, as plain; it was re-sent (read twice) when the
    reset was looked at before the acknowledgement."""
    plain = _half_close_read_reset(False, 0.3)
    assert plain == (b"", [b"MSG 1 x", b"MSG 2 x"], 1)
    assert _half_close_read_reset(True, 0.3) == plain


def _restart_behind_the_proxy(resilient: bool) -> tuple[Any, list[int]]:
    """The robot's server restarted (its FIN through FaultProxy) after three exchanges, well
    inside the connection's first FIN_PROBES; then the fourth request: what the read gave and
    what the server counted."""
    from resilientsock.testing import MessageServer

    with MessageServer(mode="ack") as server, FaultProxy(server.address) as proxy:
        sock: Any = (ResilientSocket.connect(proxy.address, FAST, timeout=5) if resilient
                     else gsocket.create_connection(proxy.address, timeout=5))
        reader = sock.makefile("rb")
        for n in (1, 2, 3):
            sock.sendall(b"MSG %d x\n" % n)
            assert reader.readline() == b"ACK %d\n" % n
        server.stop()
        assert select.select([sock], [], [], 5)[0]  # the FIN is in, through the proxy
        server.restart()
        sock.sendall(b"MSG 4 x\n")
        try:
            got: Any = reader.readline()
        except OSError as exc:
            got = type(exc).__name__
        sock.close()
        return got, sorted(server.received)


def test_a_server_restarted_behind_faultproxy_early_in_a_connection_is_recovered():
    """FaultProxy closes the client's connection when the server's stream ends, as Toxiproxy
    does, so the request written after that FIN meets a reset and is re-sent to the restarted
    server (runs once). It passed the FIN on as a half-close and took the request, which the
    look read as a half-closed server still reading: the EOF was passed on, the robot's
    message never ran (plain: the same EOF)."""
    plain = _restart_behind_the_proxy(False)
    assert plain[0] in (b"", "ConnectionResetError") and plain[1] == [1, 2, 3]
    assert _restart_behind_the_proxy(True) == (b"ACK 4\n", [1, 2, 3, 4])
