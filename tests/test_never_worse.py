"""Never worse, judged (issue #23, docs/design.md §5): a request that may have reached the server is
re-sent after a drop only if running it twice leaves the server as once would, and a
surfaced error leaves the socket as dead as a plain one.

Real clients (http.client, xmlrpc.client, redis-py, pymemcache, ftplib) against real servers
on loopback (http.server, SimpleXMLRPCServer, redis-server, memcached, pyftpdlib), through a
FaultProxy that lets the request reach the server and resets the client at the answer's first
byte (``plan.on_response``). Every count is taken on the server side.
"""

from __future__ import annotations

import ftplib
import http.client
import http.server
import logging
import os
import select
import shutil
import socket
import subprocess
import threading
import time
import types
import warnings
import xmlrpc.client
import xmlrpc.server
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Lines, ThreadedServer, wait_until

from resilientsock import ResilientSocket, RetryPolicy
from resilientsock.testing import FaultProxy

pytestmark = pytest.mark.timeout(60)

FAST = RetryPolicy(deadline=5, backoff_initial=0.01, backoff_max=0.1)
AT_LEAST_ONCE = FAST.replace(replay="unanswered")


def notes(exc: BaseException | None) -> str:
    """Every PEP 678 note on ``exc`` and the exceptions it was raised from."""
    out = []
    while exc is not None:
        out += getattr(exc, "__notes__", [])
        exc = exc.__cause__ or exc.__context__
    return "\n".join(out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    end = time.monotonic() + 10
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            try:
                proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                pass
    raise AssertionError(f"{what} did not start")


def _reset_seen(sock: Any) -> None:
    """Wait (bounded) until the proxy's RST has reached this client socket."""
    wait_until(lambda: bool(select.select([sock], [], [], 0)[0]), 5, "the RST to arrive")


# -- HTTP (http.client) against http.server -----------------------------------------------------

class CountingHTTP(ThreadedServer):
    """http.server (HTTP/1.1, keep-alive) counting every request by method and path."""

    def __init__(self) -> None:
        counts: Counter[str] = Counter()
        self.counts = counts

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                size = int(self.headers.get("Content-Length") or 0)
                if size:
                    self.rfile.read(size)
                counts[f"{self.command} {self.path}"] += 1
                body = b"ok\n"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_PATCH = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self._start(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler))


@pytest.fixture
def http_server() -> Iterator[CountingHTTP]:
    srv = CountingHTTP()
    try:
        yield srv
    finally:
        srv.close()


class CountingHTTPS(CountingHTTP):
    """The same server over TLS (a trustme CA; the client trusts it)."""

    def __init__(self) -> None:
        import ssl

        import trustme

        super().__init__()
        self.ca = trustme.CA()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)


class RsHTTPSConnection(http.client.HTTPConnection):
    """http.client over TLS over a resilient socket: the dialect sees the plaintext."""

    policy = FAST
    ca: Any = None

    def connect(self) -> None:
        import gevent.ssl

        from resilientsock import ResilientSSLSocket

        ctx = gevent.ssl.SSLContext(gevent.ssl.PROTOCOL_TLS_CLIENT)
        self.ca.configure_trust(ctx)
        ctx.sslsocket_class = ResilientSSLSocket
        raw = ResilientSocket.connect((self.host, self.port), self.policy, timeout=10)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")


def test_a_post_over_tls_whose_answer_is_lost_runs_once(caplog):
    srv = CountingHTTPS()
    try:
        with FaultProxy(srv.address) as proxy:
            conn = RsHTTPSConnection(*proxy.address, timeout=10)
            conn.ca = srv.ca
            conn.request("GET", "/warm")
            assert conn.getresponse().read() == b"ok\n"
            proxy.plan.on_response(1, "reset")
            conn.request("POST", "/orders", body=b"{}")
            with caplog.at_level(logging.WARNING, logger="resilientsock"), \
                    pytest.raises(ConnectionResetError) as caught:
                conn.getresponse()
            # The TLS layer reads the reset as the end of the stream: the EOF is passed on
            # as a plain socket gives it, and http.client raises RemoteDisconnected, a
            # ConnectionResetError. An EOF carries no note: a WARNING names the request.
            if isinstance(caught.value, http.client.RemoteDisconnected):
                assert any("POST /orders" in r.getMessage() and r.levelno == logging.WARNING
                           for r in caplog.records), caplog.text
            else:
                assert "POST /orders" in notes(caught.value)
            conn.close()
            conn = RsHTTPSConnection(*proxy.address, timeout=10)  # GET: recovered
            conn.ca = srv.ca
            conn.request("GET", "/warm")
            assert conn.getresponse().read() == b"ok\n"
            proxy.plan.on_response(1, "reset")
            conn.request("GET", "/items")
            assert conn.getresponse().read() == b"ok\n"
            conn.close()
    finally:
        srv.close()
    assert srv.counts["POST /orders"] == 1 and srv.counts["GET /items"] == 2


class RsHTTPConnection(http.client.HTTPConnection):
    """http.client over a resilient socket (what ``patch()`` gives every HTTPConnection)."""

    policy = FAST

    def connect(self) -> None:
        self.sock = ResilientSocket.connect((self.host, self.port), self.policy, timeout=10)


def _http(proxy: FaultProxy, policy: RetryPolicy = FAST) -> RsHTTPConnection:
    conn = RsHTTPConnection(*proxy.address, timeout=10)
    conn.policy = policy
    conn.request("GET", "/warm")  # a kept-alive connection, as a real client has
    assert conn.getresponse().read() == b"ok\n"
    return conn


def test_a_post_whose_answer_is_lost_runs_once_and_is_surfaced(http_server):
    with FaultProxy(http_server.address) as proxy:
        conn = _http(proxy)
        proxy.plan.on_response(1, "reset")
        conn.request("POST", "/orders", body=b'{"item": 1}')
        with pytest.raises(ConnectionResetError) as caught:  # as the plain client gets it
            conn.getresponse()
        text = notes(caught.value)
        assert "POST /orders" in text and "session mode" in text
        assert "replay='unanswered'" in text
        assert conn.sock is None or conn.sock.reconnects == 0
        conn.close()
    assert http_server.counts["POST /orders"] == 1


@pytest.mark.parametrize("method", ["GET", "PUT"])
def test_an_idempotent_request_whose_answer_is_lost_is_recovered(http_server, method):
    with FaultProxy(http_server.address) as proxy:
        conn = _http(proxy)
        proxy.plan.on_response(1, "reset")
        conn.request(method, "/items/7", body=b"x" if method == "PUT" else None)
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"ok\n")
        assert conn.sock.reconnects == 1
        conn.close()
    assert http_server.counts[f"{method} /items/7"] == 2  # at-least-once: idempotent


def test_a_post_with_an_idempotency_key_is_recovered(http_server):
    with FaultProxy(http_server.address) as proxy:
        conn = _http(proxy)
        proxy.plan.on_response(1, "reset")
        conn.request("POST", "/payments", body=b"{}", headers={"Idempotency-Key": "k-1"})
        assert conn.getresponse().read() == b"ok\n"
        conn.close()
    assert http_server.counts["POST /payments"] == 2  # the server dedups by the key


def test_replay_unanswered_opts_in_to_at_least_once(http_server):
    with FaultProxy(http_server.address) as proxy:
        conn = _http(proxy, AT_LEAST_ONCE)
        proxy.plan.on_response(1, "reset")
        conn.request("PATCH", "/orders/1", body=b"{}")
        assert conn.getresponse().read() == b"ok\n"
        conn.close()
    assert http_server.counts["PATCH /orders/1"] == 2


def test_http_socket_reconnects_lazily_after_a_surfaced_post(http_server):
    """HTTP is stateless between requests: after the surfaced POST the same socket may carry
    the next request on a new connection (a fresh one is equivalent, docs/design.md §5)."""
    with FaultProxy(http_server.address) as proxy:
        with ResilientSocket.connect(proxy.address, FAST, timeout=10) as sock:
            proxy.plan.on_response(1, "reset")
            sock.sendall(b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            with pytest.raises(ConnectionResetError) as caught:
                sock.recv(4096)
            assert "POST /orders" in notes(caught.value)
            sock.sendall(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    assert http_server.counts["POST /orders"] == 1 and http_server.counts["GET /next"] == 1


# -- xmlrpc.client: its own retry is not multiplied ---------------------------------------------

def test_xmlrpc_incr_never_runs_more_often_than_plain():
    """xmlrpc.client re-sends once on its own after a reset. Both answers lost: plain runs
    ``incr`` twice and raises; so must we (it ran 3+ times: our re-sends stacked on it)."""
    calls = Counter[str]()

    def incr() -> int:
        calls["incr"] += 1
        return calls["incr"]

    server = xmlrpc.server.SimpleXMLRPCServer(("127.0.0.1", 0), logRequests=False)
    server.register_function(incr)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    class Transport(xmlrpc.client.Transport):
        def make_connection(self, host: Any) -> http.client.HTTPConnection:
            if self._connection and host == self._connection[0]:
                return self._connection[1]
            chost, self._extra_headers, x509 = self.get_host_info(host)
            self._connection = host, RsHTTPConnection(chost, timeout=10)
            return self._connection[1]

    try:
        with FaultProxy(server.server_address[:2]) as proxy:
            proxy.plan.on_response({1, 2}, "reset")
            client = xmlrpc.client.ServerProxy("http://%s:%d/" % proxy.address,
                                               transport=Transport())
            with pytest.raises(ConnectionResetError) as caught:
                client.incr()
            assert "POST /" in notes(caught.value)
            client("close")()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert calls["incr"] == 2  # plain: xmlrpc.client's own retry, once


# -- redis-py against redis-server ---------------------------------------------------------------

def _redis(port: int, proxy: FaultProxy) -> Any:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    class RsConnection(redis.Connection):
        def _connect(self) -> Any:
            sock = ResilientSocket.connect((self.host, self.port), FAST, timeout=5)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.socket_timeout)
            return sock

    host, pport = proxy.address
    pool = redis.ConnectionPool(connection_class=RsConnection, host=host, port=pport,
                                socket_timeout=5, retry=Retry(NoBackoff(), 0))
    return redis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))  # retries off


def test_redis_incr_whose_answer_is_lost_runs_once(redis_server):
    import redis

    port = redis_server[1]
    direct = redis.Redis(port=port)
    direct.set("counter", 0)
    with FaultProxy(("127.0.0.1", port)) as proxy:
        r = _redis(port, proxy)
        assert r.ping()
        proxy.plan.on_response(1, "reset")
        with pytest.raises(redis.ConnectionError) as caught:
            r.incr("counter")
        assert "INCRBY counter" in notes(caught.value)
        assert r.get("counter") == b"1"  # the client carries on (redis-py reconnects)
        r.close()
    assert direct.get("counter") == b"1"
    direct.close()


def test_redis_multi_exec_whose_answer_is_lost_runs_once(redis_server):
    import redis

    port = redis_server[1]
    direct = redis.Redis(port=port)
    with FaultProxy(("127.0.0.1", port)) as proxy:
        r = _redis(port, proxy)
        assert r.ping()
        pipe = r.pipeline(transaction=True)
        pipe.incr("a").incr("b")
        proxy.plan.on_response(1, "reset")
        with pytest.raises(redis.ConnectionError) as caught:
            pipe.execute()
        assert "MULTI ... EXEC (INCRBY a)" in notes(caught.value)
        r.close()
    assert (direct.get("a"), direct.get("b")) == (b"1", b"1")
    direct.close()


def test_redis_reads_and_sets_are_still_recovered(redis_server):
    import redis

    port = redis_server[1]
    with FaultProxy(("127.0.0.1", port)) as proxy:
        r = _redis(port, proxy)
        assert r.ping()
        proxy.plan.on_response(1, "reset")
        assert r.set("k", "v") is True  # SET is idempotent: re-sent, answered
        proxy.plan.on_response(1, "reset")
        assert r.get("k") == b"v"
        r.close()
    direct = redis.Redis(port=port)
    assert direct.get("k") == b"v"
    direct.close()


# -- pymemcache against memcached ---------------------------------------------------------------

@pytest.fixture
def memcached_port() -> Iterator[int]:
    exe = shutil.which("memcached")
    if exe is None:
        pytest.skip("memcached is not installed (make test installs it as root)")
    pytest.importorskip("pymemcache")
    port = _free_port()
    user = ["-u", "root"] if os.geteuid() == 0 else []  # memcached refuses root without it
    proc = subprocess.Popen([exe, "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", "16",
                             *user],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, proc, "memcached")
        yield port
    finally:
        proc.kill()
        proc.wait()


def _rs_socket_module(policy: RetryPolicy = FAST) -> Any:
    """pymemcache's ``socket_module``: sockets are resilient ones."""
    module = types.SimpleNamespace(**{k: getattr(socket, k) for k in dir(socket)
                                      if not k.startswith("__")})
    module.socket = lambda *a: ResilientSocket(*a, policy=policy)
    return module


def test_memcached_incr_whose_answer_is_lost_runs_once(memcached_port):
    from pymemcache.client.base import Client

    direct = Client(("127.0.0.1", memcached_port))
    direct.set("hits", "10", noreply=False)
    with FaultProxy(("127.0.0.1", memcached_port)) as proxy:
        client = Client(proxy.address, socket_module=_rs_socket_module(), timeout=5,
                        connect_timeout=5)
        assert client.get("hits") == b"10"
        proxy.plan.on_response(1, "reset")
        with pytest.raises(ConnectionResetError) as caught:
            client.incr("hits", 1)
        assert "incr hits" in notes(caught.value)
        client.close()
    assert direct.get("hits") == b"11"
    direct.close()


def test_memcached_gets_are_recovered(memcached_port):
    from pymemcache.client.base import Client

    direct = Client(("127.0.0.1", memcached_port))
    direct.set("g", "v", noreply=False)
    direct.close()
    with FaultProxy(("127.0.0.1", memcached_port)) as proxy:
        client = Client(proxy.address, socket_module=_rs_socket_module(), timeout=5)
        assert client.get("g") == b"v"
        proxy.plan.on_response(1, "reset")
        assert client.get("g") == b"v"
        assert client.sock.reconnects == 1 and client.sock.dialect == "memcached"
        client.close()


def test_a_noreply_set_is_not_replayed_over_a_newer_value(memcached_port):
    """pymemcache's set is noreply by default: no answer ever confirms it. It used to stay in
    the journal and be replayed after a later drop, over another client's newer value."""
    from pymemcache.client.base import Client

    direct = Client(("127.0.0.1", memcached_port))
    with FaultProxy(("127.0.0.1", memcached_port)) as proxy:
        client = Client(proxy.address, socket_module=_rs_socket_module(), timeout=5)
        client.set("k", "old")  # noreply
        wait_until(lambda: direct.get("k") == b"old", 5, "the first set")
        direct.set("k", "new", noreply=False)  # another client's newer value
        proxy.reset_all()
        _reset_seen(client.sock)
        client.set("j", "x")  # meets the reset: recovered (a set is idempotent)
        wait_until(lambda: direct.get("j") == b"x", 5, "the second set")
        assert client.sock.reconnects == 1
        client.close()
    assert direct.get("k") == b"new"
    direct.close()


# -- ftplib against pyftpdlib: a surfaced error leaves the socket dead --------------------------

class RsFTP(ftplib.FTP):
    def connect(self, host: str = "", port: int = 0, timeout: float = 10,
                source_address: Any = None) -> str:
        self.host, self.port, self.timeout = host, port, timeout
        self.sock = ResilientSocket.connect((host, port), FAST, timeout=timeout)
        self.af = self.sock.family
        self.file = self.sock.makefile("r", encoding=self.encoding)
        self.welcome = self.getresp()
        return self.welcome


@pytest.fixture
def ftp_server(tmp_path) -> Iterator[tuple[str, int]]:
    pytest.importorskip("pyftpdlib")
    with warnings.catch_warnings():  # pyftpdlib 1.x imports asyncore / asynchat
        warnings.simplefilter("ignore", DeprecationWarning)
        from pyftpdlib.authorizers import DummyAuthorizer
        from pyftpdlib.handlers import FTPHandler
        from pyftpdlib.servers import FTPServer

    authorizer = DummyAuthorizer()
    authorizer.add_user("robot", "secret", str(tmp_path), perm="elr")
    handler = type("Handler", (FTPHandler,), {"authorizer": authorizer})
    server = FTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"timeout": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server.address[:2]
    finally:
        server.close_all()
        thread.join(5)


@pytest.mark.filterwarnings("ignore:The asyncore module:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The asynchat module:DeprecationWarning")
def test_ftplib_noop_liveness_loop_never_gets_530(ftp_server):
    """The legacy loop: a command fails, NOOP checks whether the connection lives, log in
    again if not. A lazily opened connection answered NOOP with its greeting (220), so the
    check passed and the next command met "530 Log in with USER and PASS first"."""
    dead = (OSError, EOFError, ftplib.Error)

    def login(address: tuple[str, int]) -> RsFTP:
        ftp = RsFTP()
        ftp.connect(*address)
        ftp.login("robot", "secret")
        return ftp

    answers: Counter[str] = Counter()
    with FaultProxy(ftp_server) as proxy:
        ftp = login(proxy.address)
        for _ in range(5):
            proxy.reset_all()
            _reset_seen(ftp.sock)
            with pytest.raises(dead):
                ftp.pwd()
            try:
                ftp.voidcmd("NOOP")
                alive = True
            except dead as e:
                alive = False
                assert isinstance(e, OSError | EOFError), e  # as a plain dead socket
            if not alive:
                ftp.close()
                ftp = login(proxy.address)
            try:
                answers[ftp.sendcmd("PWD")[:3]] += 1
            except ftplib.error_perm as e:
                answers[str(e)[:3]] += 1
        ftp.close()
    assert answers == {"257": 5}, answers


# -- the dialects' verdicts, sans-IO ------------------------------------------------------------

def _resp(*args: str) -> bytes:
    from resilientsock.dialects.resp import encode

    return encode([a.encode() for a in args])


def test_http_unsafe_names_a_non_idempotent_request_written_whole():
    from resilientsock.dialects.http import HttpDialect

    d = HttpDialect()
    d.wrote(b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n")
    assert d.unsafe() is None  # the body is not written yet: it cannot have run
    d.wrote(b"{}{}")
    assert d.unsafe() == "POST /orders"
    d.read(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    assert d.unsafe() is None  # answered
    for head, verdict in [
        (b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", None),
        (b"DELETE /a HTTP/1.1\r\nHost: x\r\n\r\n", None),
        (b"PUT /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", None),
        (b"POST /p HTTP/1.1\r\nHost: x\r\nIdempotency-Key: 7\r\nContent-Length: 0\r\n\r\n",
         None),
        (b"PATCH /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", "PATCH /a"),
        (b"PURGE /a HTTP/1.1\r\nHost: x\r\n\r\n", "PURGE /a"),
    ]:
        d = HttpDialect()
        d.wrote(head)
        assert d.unsafe() == verdict, head
        assert d.fresh_ok()


def test_resp_unsafe_table_and_transactions():
    from resilientsock.dialects.resp import RespDialect

    for args, verdict in [
        (("GET", "k"), None), (("SET", "k", "v"), None), (("DEL", "k"), None),
        (("SET", "k", "v", "NX"), "SET k"), (("INCR", "n"), "INCR n"),
        (("LPUSH", "q", "x"), "LPUSH q"), (("FOO.BAR", "k"), "FOO.BAR k"),
    ]:
        d = RespDialect()
        d.wrote(_resp(*args))
        assert d.unsafe() == verdict, args
    d = RespDialect()
    d.wrote(_resp("MULTI") + _resp("INCR", "n"))
    assert d.unsafe() is None  # queued, not run: re-sent whole with its EXEC
    d.wrote(_resp("EXEC"))
    assert d.unsafe() == "MULTI ... EXEC (INCR n)"
    d = RespDialect()
    d.wrote(_resp("MULTI") + _resp("GET", "n") + _resp("EXEC"))
    assert d.unsafe() is None
    d = RespDialect()
    d.wrote(_resp("GET", "a") + _resp("INCR", "n"))  # a pipeline: judged by its worst
    d.read(b"$-1\r\n")
    assert d.unsafe() == "INCR n"
    assert d.fresh_ok()


def test_memcached_unsafe_and_write_only():
    from resilientsock.dialects.memcached import MemcachedDialect

    for line, verdict in [
        (b"get a b\r\n", None), (b"set k 0 0 1\r\nx\r\n", None), (b"delete k\r\n", None),
        (b"incr hits 1\r\n", "incr hits"), (b"decr hits 1 noreply\r\n", "decr hits noreply"),
        (b"add k 0 0 1\r\nx\r\n", "add k"), (b"cas k 0 0 1 9\r\nx\r\n", "cas k"),
        (b"append k 0 0 1\r\nx\r\n", "append k"), (b"mg k v\r\n", None),
        (b"ms k 1 T0\r\nx\r\n", None), (b"ms k 1 MA\r\nx\r\n", "ms k"),
        (b"ma k\r\n", "ma k"), (b"md k C5\r\n", "md k"), (b"md k\r\n", None),
    ]:
        d = MemcachedDialect()
        d.wrote(line)
        assert d.unsafe() == verdict, line
    d = MemcachedDialect()
    d.wrote(b"set k 0 0 3 noreply\r\n")
    assert not d.write_only()  # its data block is still to come
    d.wrote(b"abc\r\n")
    assert d.write_only() and d.unsafe() is None
    d.wrote(b"get k\r\n")
    assert not d.write_only() and d.truncated()
    d.read(b"VALUE k 0 3\r\nab")
    assert d.truncated() and d.resumable()
    d.read(b"c\r\nEND\r\n")
    assert not d.truncated() and d.write_only()


def test_the_machine_surfaces_a_non_idempotent_drop_unless_opted_in():
    from resilientsock import ErrorCategory
    from resilientsock._errors import classify
    from resilientsock._machine import RECOVER, SURFACE, Drop, Machine

    post = b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    info = classify(ConnectionResetError(), phase="read")
    assert info is not None and info.category is ErrorCategory.CONNECTION_LOST
    verdicts = {}
    for replay in ("idempotent", "unanswered", "safe"):
        m = Machine(RetryPolicy(replay=replay))
        m.wrote_data(post)
        verdicts[replay] = m.drop(Drop(info, "read"))
    assert verdicts["idempotent"].kind == SURFACE
    assert verdicts["idempotent"].rule == "not-idempotent" and verdicts["idempotent"].discard
    assert "POST /orders" in verdicts["idempotent"].note
    assert verdicts["unanswered"].kind == RECOVER
    m = Machine(RetryPolicy(replay="safe"))  # the first write on an idle reused connection
    m.wrote_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    m.read_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", m.journal.mark())
    m.wrote_data(post)
    assert m.drop(Drop(info, "read")).rule == "not-idempotent"  # "safe" never re-sends it
    m = Machine(RetryPolicy())
    m.wrote_data(b"MSG 1 hello\n")  # an unknown protocol keeps at-least-once
    assert m.dialect is None and m.drop(Drop(info, "read")).kind == RECOVER


def test_after_a_surfaced_error_only_a_known_stateless_protocol_reconnects_lazily():
    from resilientsock._machine import Machine

    for first, lazy in [(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", True),
                        (_resp("GET", "k"), True), (b"get k\r\n", True),
                        (b"AUTH robot-7 secret\n", False)]:
        m = Machine(RetryPolicy())
        m.wrote_data(first)
        assert m.lazy_refusal() is None  # nothing surfaced yet
        m.discarded()
        m.move("surface-discard")
        assert (m.lazy_refusal() is None) is lazy, first
    m = Machine(RetryPolicy())
    m.read_data(b"220 ftp ready\r\n", m.journal.mark())  # a greeting: server-first
    m.wrote_data(b"USER robot\r\n")
    m.read_data(b"331 password\r\n", m.journal.mark())
    m.discarded()
    m.move("surface-discard")
    assert "server spoke first" in (m.lazy_refusal() or "")


def test_a_declared_setup_lets_an_unknown_protocol_reconnect_lazily():
    """prelude=N or an on_reconnect hook say how to restore a new connection: equivalent."""
    from resilientsock._machine import Machine

    for policy in (RetryPolicy(prelude=1), RetryPolicy(on_reconnect=lambda s, a: None)):
        m = Machine(policy)
        m.wrote_data(b"AUTH robot-7 secret\n")
        m.read_data(b"OK\n", m.journal.mark())
        m.wrote_data(b"MSG 1 x\n")
        m.discarded()
        m.move("surface-discard")
        assert m.lazy_refusal() is None, policy


# -- STOMP: the CONNECT is the connection's login -----------------------------------------------

class MiniStomp(ThreadedServer):
    """A minimal STOMP 1.2 broker (CONNECT, SEND, DISCONNECT) counting, per connection,
    what arrived before a CONNECT (a real broker answers those with ERROR and closes)."""

    def __init__(self, refuse_after: int = 0) -> None:
        import socketserver

        self.sends: list[bytes] = []
        self.unauthenticated = 0
        self.connects = 0
        self.refuse_after = refuse_after  # refuse every CONNECT after this many (0: never)
        broker = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                buf = b""
                logged_in = False
                while True:
                    try:
                        data = self.request.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    buf += data
                    while b"\x00" in buf:
                        frame, _, buf = buf.partition(b"\x00")
                        frame = frame.lstrip(b"\r\n")
                        cmd = frame.split(b"\n", 1)[0].strip()
                        if cmd in (b"CONNECT", b"STOMP"):
                            broker.connects += 1
                            if broker.refuse_after and broker.connects > broker.refuse_after:
                                self.request.sendall(b"ERROR\nmessage:Access refused\n\n\x00")
                                return
                            logged_in = True
                            self.request.sendall(b"CONNECTED\nversion:1.2\nsession:s-%d\n\n\x00"
                                                 % broker.connects)
                        elif not logged_in:
                            broker.unauthenticated += 1
                            self.request.sendall(b"ERROR\nmessage:You must log in using "
                                                 b"CONNECT first\n\n\x00")
                            return
                        elif cmd == b"SEND":
                            head, _, body = frame.partition(b"\n\n")
                            broker.sends.append(body)
                            for line in head.split(b"\n"):
                                if line.startswith(b"receipt:"):
                                    self.request.sendall(b"RECEIPT\nreceipt-id:%s\n\n\x00"
                                                         % line[8:])

        self._start(socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler))


STOMP_CONNECT = b"CONNECT\naccept-version:1.2\nhost:/\nlogin:robot\npasscode:secret\n\n\x00"


def _stomp_login(address: Any) -> ResilientSocket:
    sock = ResilientSocket.connect(address, FAST, timeout=5)
    sock.sendall(STOMP_CONNECT)
    got = b""
    while b"\x00" not in got:
        chunk = sock.recv(4096)
        assert chunk, "closed"
        got += chunk
    assert got.startswith(b"CONNECTED") and sock.dialect == "stomp"
    return sock


def test_stomp_connect_is_redone_before_anything_is_sent_on_a_new_connection():
    """issue #23: a SEND went out alone on a new connection that never sent CONNECT (ERROR
    frames "You must log in using CONNECT first"). Now the CONNECT is redone and checked."""
    broker = MiniStomp()
    try:
        with FaultProxy(broker.address) as proxy:
            with _stomp_login(proxy.address) as sock:
                proxy.reset_all()
                _reset_seen(sock)
                sock.sendall(b"SEND\ndestination:/queue/a\n\nhello\x00")
                sock.sendall(b"DISCONNECT\nreceipt:9\n\n\x00")  # flush, as a client does
                assert sock.reconnects == 1
                wait_until(lambda: len(broker.sends) == 1, 5, "the SEND")
    finally:
        broker.close()
    assert broker.sends == [b"hello"] and broker.unauthenticated == 0
    assert broker.connects == 2


def test_stomp_login_refused_on_the_new_connection_is_surfaced():
    broker = MiniStomp(refuse_after=1)
    try:
        with FaultProxy(broker.address) as proxy:
            with _stomp_login(proxy.address) as sock:
                proxy.reset_all()
                _reset_seen(sock)
                with pytest.raises(ConnectionResetError) as caught:
                    sock.sendall(b"SEND\ndestination:/queue/a\n\nhello\x00")
                assert "CONNECT was answered ERROR" in notes(caught.value)
    finally:
        broker.close()
    assert broker.sends == [] and broker.unauthenticated == 0


def _cut_under_a_receiver(sock: Any, proxy: Any, frame: bytes, wait: float,
                          cut: int = 10) -> tuple[bytes, Any]:
    """stomp.py's shape: a receiver greenlet waits in ``recv`` while the application writes
    ``frame``; the proxy cuts the answer ``cut`` bytes in (then RST). What the receiver got, and
    how its stream ended (an exception, or "EOF"); it must have ended within ``wait`` s."""
    import gevent

    out: dict[str, Any] = {}

    def receiver() -> None:
        got = b""
        try:
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    out["receiver"] = (got, "EOF")
                    return
                got += chunk
                out["got"] = got
        except OSError as exc:
            out["receiver"] = (got, exc)

    reader = gevent.spawn(receiver)
    gevent.idle()  # the receiver runs until it waits in recv
    assert sock._rs_m.reading == 1
    proxy.cut_after(cut, "down")
    sock.sendall(frame)
    reader.join(wait)
    waiting = not reader.dead
    reader.kill()
    assert not waiting, ("the receiver is still waiting", out)
    return out["receiver"]


def test_stomp_send_whose_receipt_is_cut_is_not_resent_to_a_reader_greenlet():
    """make field on 350dfe2 (stomp.py vs RabbitMQ): stomp.py reads in a receiver thread, which
    waits in recv while the application SENDs. The proxy cut the RECEIPT 10 bytes in: the
    receiver's read (begun before the SEND) got "RECEIPT\nre", then the reset. That read
    does not answer the SEND (the journal keeps it unconfirmed), but the dialect counted it as
    answered, so the SEND was re-sent: the message delivered twice, the receipt wait of the
    next CONNECT ran 10 s. Now the SEND is surfaced, as plain surfaces the reset."""

    broker = MiniStomp()
    try:
        with FaultProxy(broker.address) as proxy:
            with _stomp_login(proxy.address) as sock:
                # the RECEIPT: its first 10 bytes, then RST
                got, exc = _cut_under_a_receiver(
                    sock, proxy, b"SEND\ndestination:/queue/a\nreceipt:r1\n\nhello\x00", 10)
    finally:
        broker.close()
    assert broker.sends == [b"hello"], "the SEND was re-sent after its receipt began"
    assert got == b"RECEIPT\nre"
    assert isinstance(exc, ConnectionResetError), exc
    assert "SEND /queue/a" in notes(exc)


def test_stomp_connected_cut_under_a_reader_greenlet_is_surfaced_not_spliced():
    """make field on 350dfe2, after the receipt fix: stomp.py's receiver waits in recv while
    connect() sends the CONNECT; the proxy cut the CONNECTED 10 bytes in. The CONNECT counted
    as answered, so the socket reconnected with nothing to re-send and the receiver's stream
    went on over a connection that never had a CONNECT: stomp.py waited for the rest of the
    frame until the broker's login timeout (10 s), past the app's 5 s. A plain socket gives
    the reset at once; so does this one now."""

    broker = MiniStomp()
    try:
        with FaultProxy(broker.address) as proxy:
            with ResilientSocket.connect(proxy.address, FAST, timeout=5) as sock:
                # the CONNECTED: its first 10 bytes, then RST
                got, exc = _cut_under_a_receiver(sock, proxy, STOMP_CONNECT, 4)
    finally:
        broker.close()
    assert got == b"CONNECTED\n"
    assert isinstance(exc, ConnectionResetError), exc
    assert "inside a stomp message" in notes(exc)


def test_getsockname_while_a_reader_greenlet_recovers_is_the_last_connections():
    """make field on 54e672e (stomp.py, 1 run in 4): stomp.py's ``is_connected()`` calls
    ``getsockname()`` from the application's thread while its receiver thread recovers the
    connection. It raised EBADF (the old connection closed, the new one not in place), where
    a plain socket that met the reset still answers; stomp.py took the socket for closed,
    started a second receiver on it, and the two closed it under the application's SEND:
    ``OSError: [Errno 9] Bad file descriptor``, an error plain stomp.py did not have."""
    import gevent

    from resilientsock._machine import RECOVERING

    broker = MiniStomp()
    try:
        with FaultProxy(broker.address) as proxy:
            with ResilientSocket.connect(proxy.address, FAST, timeout=5) as sock:
                local, peer = sock.getsockname(), sock.getpeername()
                reader = gevent.spawn(sock.recv, 4096)
                gevent.idle()  # the receiver waits in recv
                proxy.refuse(1.0)  # the recovery's attempts are refused for a while
                # (the proxy may still be connecting upstream: reset once it holds the pair)
                wait_until(lambda: proxy.reset_all() == 1, 5, "the proxy's connection")
                wait_until(lambda: sock._rs_m.state is RECOVERING, 5, "the recovery")
                try:
                    assert sock.getsockname() == local
                    assert sock.getpeername() == peer
                finally:
                    reader.kill()
    finally:
        broker.close()


def test_stomp_send_and_subscribe_verdicts():
    from resilientsock.dialects.stomp import StompDialect

    d = StompDialect()
    d.wrote(STOMP_CONNECT)
    d.read(b"CONNECTED\nversion:1.2\n\n\x00")
    assert d.fresh_ok() and d.write_only() and d.unsafe() is None
    d.wrote(b"SEND\ndestination:/queue/a\n\nx\x00")
    assert d.unsafe() == "SEND /queue/a"  # a message delivered twice: never re-sent
    d.acked()  # the peer's TCP acknowledged it: confirmed, nothing left to re-send
    assert d.unsafe() is None
    d.wrote(b"SEND\ndestination:/queue/c\nreceipt:1\n\nx\x00")
    d.answered(1)  # a read begun before that SEND returned: it does not answer the SEND
    d.read(b"RECEIPT\nre")
    assert d.unsafe() == "SEND /queue/c"
    d.answered(0)  # a read begun after it: answered
    d.read(b"ceipt-id:1\n\n\x00")
    assert d.unsafe() is None
    d.wrote(b"SUBSCRIBE\nid:1\ndestination:/queue/b\n\n\x00")
    assert "SUBSCRIBE" in (d.refusal() or "")
    d.discard()
    assert d.refusal() is None and d.restore() is not None


# -- LDAP (ldap3): the BIND is the connection's login; ADD is not re-sent -----------------------

def _tlv(tag: int, value: bytes) -> bytes:
    n = len(value)
    if n < 0x80:
        return bytes((tag, n)) + value
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + value


def _ber(data: bytes, i: int = 0) -> tuple[int, int, int] | None:
    """(tag, header length, value length) of the BER TLV at ``data[i]`` (None: incomplete)."""
    if len(data) < i + 2:
        return None
    tag, first = data[i], data[i + 1]
    if first < 0x80:
        return tag, 2, first
    n = first & 0x7F
    if len(data) < i + 2 + n:
        return None
    return tag, 2 + n, int.from_bytes(data[i + 2:i + 2 + n], "big")


def _ldap_op(msg: bytes) -> tuple[int, int, bytes]:
    """(message ID, operation tag, operation value) of an LDAPMessage (RFC 4511 §4.1.1)."""
    _, hl, _ = _ber(msg)  # type: ignore[misc]
    _, il, iv = _ber(msg, hl)  # type: ignore[misc]
    msgid = int.from_bytes(msg[hl + il:hl + il + iv], "big")
    at = hl + il + iv
    tag, ol, ov = _ber(msg, at)  # type: ignore[misc]
    return msgid, tag, msg[at + ol:at + ol + ov]


class MiniLdap(ThreadedServer):
    """A minimal LDAPv3 server (simple BIND, ADD, UNBIND) counting each ADD by DN, and the
    writes that arrive on a connection that never bound (answered strongerAuthRequired)."""

    def __init__(self) -> None:
        import socketserver

        self.adds: Counter[str] = Counter()
        self.unbound_writes = 0
        self.binds = 0
        server = self

        def message(sock: socket.socket, buf: bytearray) -> bytes | None:
            while True:
                h = _ber(bytes(buf))
                if h is not None and len(buf) >= h[1] + h[2]:
                    msg = bytes(buf[:h[1] + h[2]])
                    del buf[:h[1] + h[2]]
                    return msg
                data = sock.recv(65536)
                if not data:
                    return None
                buf += data

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                buf = bytearray()
                bound = False
                while True:
                    try:
                        msg = message(self.request, buf)
                    except OSError:
                        return
                    if msg is None:
                        return
                    msgid, op, value = _ldap_op(msg)

                    def answer(tag: int, code: int, msgid: int = msgid) -> None:
                        result = _tlv(0x0A, bytes((code,))) + _tlv(0x04, b"") + _tlv(0x04, b"")
                        self.request.sendall(_tlv(0x30, _tlv(0x02, bytes((msgid,)))
                                                  + _tlv(tag, result)))

                    if op == 0x60:  # BindRequest: version, name, simple password
                        server.binds += 1
                        bound = b"secret" in value
                        answer(0x61, 0 if bound else 49)
                    elif op == 0x68:  # AddRequest
                        if not bound:
                            server.unbound_writes += 1
                            answer(0x69, 8)  # strongerAuthRequired
                        else:
                            _, dl, dv = _ber(value)  # type: ignore[misc]
                            server.adds[value[dl:dl + dv].decode()] += 1
                            answer(0x69, 0)
                    elif op == 0x42:  # UnbindRequest
                        return

        self._start(socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler))


@pytest.fixture
def ldap_conn(monkeypatch) -> Iterator[Any]:
    ldap3 = pytest.importorskip("ldap3")
    base = pytest.importorskip("ldap3.strategy.base")

    monkeypatch.setattr(base, "socket", _rs_socket_module())
    server = MiniLdap()
    with FaultProxy(server.address) as proxy:
        host, port = proxy.address
        conn = ldap3.Connection(ldap3.Server(host, port=port, get_info=ldap3.NONE),
                                user="cn=admin,dc=x", password="secret", auto_bind=True,
                                receive_timeout=5)
        try:
            yield conn, proxy, server
        finally:
            conn.unbind()
            server.close()


def test_ldap_add_whose_answer_is_lost_runs_once(ldap_conn):
    conn, proxy, server = ldap_conn
    assert conn.add("cn=a,dc=x", "person", {"sn": "a"})
    proxy.plan.on_response(1, "reset")
    with pytest.raises(Exception) as caught:
        conn.add("cn=b,dc=x", "person", {"sn": "b"})
    assert server.adds == {"cn=a,dc=x": 1, "cn=b,dc=x": 1}
    assert "ADD cn=b,dc=x" in notes(caught.value)


def test_ldap_bind_is_redone_before_a_write_on_a_new_connection(ldap_conn):
    """issue #23: an ADD re-sent on a new connection that never did the BIND met
    strongerAuthRequired (10 writes on unbound connections with ldap3 against slapd)."""
    conn, proxy, server = ldap_conn
    proxy.reset_all()
    _reset_seen(conn.socket)
    assert conn.add("cn=c,dc=x", "person", {"sn": "c"})
    assert conn.socket.reconnects == 1
    assert server.adds == {"cn=c,dc=x": 1} and server.unbound_writes == 0
    assert server.binds == 2


def test_memcached_incr_whose_answer_is_cut_under_a_reader_greenlet_runs_once(memcached_port):
    """A hand-written memcached client in stomp.py's shape: a reader greenlet waits in recv
    while the application writes ``incr``; the answer is cut 1 byte in (then RST). The read
    begun before the incr does not answer it by the journal's rule, but the dialect counted
    every read as answering all it had seen written, so the incr was re-sent: run twice
    where plain ran it once and surfaced the reset. Now the dialect forgets only what the
    journal counts as answered (``Dialect.answered(late)``), and the incr is surfaced."""
    from pymemcache.client.base import Client

    direct = Client(("127.0.0.1", memcached_port))
    direct.set("hits", "10", noreply=False)
    with FaultProxy(("127.0.0.1", memcached_port)) as proxy:
        with ResilientSocket.connect(proxy.address, FAST, timeout=5) as sock:
            sock.sendall(b"get hits\r\n")
            lines = Lines(sock)
            assert [lines.readline() for _ in range(3)] == [b"VALUE hits 0 2\r", b"10\r",
                                                            b"END\r"]
            got, exc = _cut_under_a_receiver(sock, proxy, b"incr hits 1\r\n", 4, cut=1)
    assert got == b"1"
    assert isinstance(exc, ConnectionResetError), exc
    assert "incr hits" in notes(exc)
    assert direct.get("hits") == b"11", "the incr ran twice"
    direct.close()


def test_memcached_dialect_forgets_only_what_a_read_answers():
    from resilientsock.dialects.memcached import MemcachedDialect

    d = MemcachedDialect()
    d.wrote(b"incr a 1\r\n")
    assert d.unsafe() == "incr a"
    d.wrote(b"incr b 1\r\n")
    d.answered(1)  # a read begun before the second incr: it answers the first only
    d.read(b"2\r\n")
    assert d.unsafe() == "incr b"
    d.answered(0)
    d.read(b"5\r\n")
    assert d.unsafe() is None
