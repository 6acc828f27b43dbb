"""The rows of the matrix (docs/design.md §9): which client, against which server, through which
faults, and which errors the plain client raises under them.

Rules of this module:

1. A row is data (``matrix.Row``); the test modules add the row's own expected outcome
   (issue #14 §4) on top of "never worse". The fast subset (tests/test_field_fast.py) runs
   the same rows with fewer faults.
2. Cut sizes are picked per protocol so that ``cutup`` lands inside a request and
   ``cutdown`` inside an answer (numbers from the protocol: a SET is ~40 bytes and "+OK\\r\\n"
   5; the HTTP blob is 48 KiB; MySQL's greeting length is measured at start).
3. ``plain_errors`` lists what the plain client raises under these faults (read from the
   client library and seen in runs); the comparison also allows whatever the plain run of
   the same plan raised.
"""

from __future__ import annotations

from typing import Any

from .matrix import Row
from .servers import (
    BLOB_SIZE,
    Dovecot,
    Exim,
    HTTPServer,
    MariaDB,
    Memcached,
    MemcachedNoreply,
    Nginx,
    NginxPost,
    PostBackend,
    PyFTPd,
    RabbitMQ,
    Redis,
    Slapd,
    Sshd,
    WebSockets,
    XMLRPCServer,
)

# what a refused or failed connect raises: "a drop is surfaced at once" is about sessions
CONNECT_ERRORS = frozenset({"ConnectionRefusedError",
                            "paramiko.ssh_exception.NoValidConnectionsError"})
OS_ERRORS = frozenset({"ConnectionResetError", "ConnectionRefusedError", "BrokenPipeError",
                       "ConnectionAbortedError", "TimeoutError"})
MID = BLOB_SIZE // 2  # a cut in the middle of the blob


def redis_db2(server: Redis, **kw: Any) -> Row:
    return Row(slug="redis-db2", title="redis-py (db=2, requirepass) vs redis-server",
               server=server,
               client=["redis_client.py", "127.0.0.1", "{port}", server.password, "2"],
               kinds=("reset", "close", "refuse1.0", "cutup:10", "cutdown:3"),
               plain_errors=frozenset({"redis.exceptions.ConnectionError",
                                       "redis.exceptions.TimeoutError"}), **kw)


def redis_db2_nopass(server: Redis, **kw: Any) -> Row:
    """db=2 without a password: a re-sent SET on a new connection lands in db 0, silently
    (with requirepass it meets NOAUTH instead)."""
    return Row(slug="redis-db2-nopass", title="redis-py (db=2, no password) vs redis-server",
               server=server, client=["redis_client.py", "127.0.0.1", "{port}", "", "2"],
               kinds=("reset", "close", "refuse1.0", "cutup:10", "cutdown:3"),
               plain_errors=frozenset({"redis.exceptions.ConnectionError",
                                       "redis.exceptions.TimeoutError"}), **kw)


def redis_down_for_good(server: Redis, **kw: Any) -> Row:
    """docs/design.md §9's "server down for good" row: after a few keys the server is gone; redis-py
    (retries off, 5 s timeouts) fails at once; under resilientsock, with its *default*
    policy, each call must still return within the application's 5 s (§4: the application's
    timeout is honoured), not after the 30 s deadline."""
    return Row(slug="redis-down-for-good",
               title="redis-py vs redis-server gone for good (default policy)",
               server=server,
               client=["redis_client.py", "127.0.0.1", "{port}", server.password, "2"],
               kinds=("down",), faults=1, after_ops=2, timeout=45.0, rs_opts=[],
               plain_errors=frozenset({"redis.exceptions.ConnectionError",
                                       "redis.exceptions.TimeoutError"}), **kw)


def http_server(server: HTTPServer, **kw: Any) -> Row:
    return Row(slug="httpclient-httpserver", title="http.client vs Python's http.server",
               server=server,
               client=["http_client.py", "127.0.0.1", "{port}", str(BLOB_SIZE)],
               kinds=("reset", "close", "refuse1.0", "cutup:30", f"cutdown:{MID}"),
               plain_errors=OS_ERRORS | {"http.client.RemoteDisconnected",
                                         "http.client.IncompleteRead"}, **kw)


REQUESTS_ERRORS = frozenset({"requests.exceptions.ConnectionError",
                             "requests.exceptions.ChunkedEncodingError",
                             "requests.exceptions.ReadTimeout"})


def requests_nginx(server: Nginx, tls: bool = False, **kw: Any) -> Row:
    if tls:
        url = "https://127.0.0.1:{port}/blob"
        extra, slug, title = [server.cafile], "requests-nginx-https", \
            "requests (urllib3 2.x) vs nginx, HTTPS"
    else:
        url = "http://127.0.0.1:{port}/blob"
        extra, slug, title = [], "requests-nginx-http", "requests (urllib3 2.x) vs nginx, HTTP"
    return Row(slug=slug, title=title, server=server,
               client=["requests_client.py", url, str(BLOB_SIZE), *extra],
               upstream_port=server.tls_port if tls else server.port,
               kinds=("reset", "close", "refuse1.0", "cutup:30", f"cutdown:{MID}"),
               plain_errors=REQUESTS_ERRORS | ({"requests.exceptions.SSLError"} if tls else
                                               set()), **kw)


# 2013 lost connection (reading), 2006 gone away (writing), 2003 cannot connect
PYMYSQL_ERRORS = frozenset({"pymysql.err.OperationalError(2013)",
                            "pymysql.err.OperationalError(2006)",
                            "pymysql.err.OperationalError(2003)",
                            "pymysql.err.InterfaceError(0)"})


def pymysql_loop(server: MariaDB, **kw: Any) -> Row:
    return Row(slug="pymysql-mariadb", title="PyMySQL vs MariaDB, INSERT loop", server=server,
               client=["pymysql_client.py", "127.0.0.1", "{port}", server.user,
                       server.password, server.db, "loop"],
               kinds=("reset", "close", "refuse1.0", "cutup:20", "cutdown:5"),
               plain_errors=PYMYSQL_ERRORS, **kw)


def pymysql_handshake(server: MariaDB, **kw: Any) -> Row:
    g = server.greeting_len
    return Row(slug="pymysql-mariadb-handshake",
               title="PyMySQL vs MariaDB, a drop inside the handshake", server=server,
               client=["pymysql_client.py", "127.0.0.1", "{port}", server.user,
                       server.password, server.db, "connect"],
               # after the greeting (the auth packet is answered on a dead connection), inside
               # the auth answer, the auth packet itself cut, the greeting cut
               kinds=(f"cutdown:{g}:new", f"cutdown:{g + 4}:new", "cutup:0:new",
                      "cutup:40:new", "cutdown:20:new", "reset"),
               faults=12, plain_errors=PYMYSQL_ERRORS, **kw)


def pymemcache(server: Memcached, **kw: Any) -> Row:
    return Row(slug="pymemcache-memcached", title="pymemcache vs memcached", server=server,
               client=["memcache_client.py", "127.0.0.1", "{port}"],
               kinds=("reset", "close", "refuse1.0", "cutup:10", "cutdown:4"),
               plain_errors=OS_ERRORS | {"pymemcache.exceptions.MemcacheUnexpectedCloseError"},
               **kw)


def smtplib_exim(server: Exim, **kw: Any) -> Row:
    return Row(slug="smtplib-exim", title="smtplib vs exim4", server=server,
               client=["smtp_client.py", "127.0.0.1", "{port}", "box@field.test"],
               kinds=("reset", "close", "refuse1.0", "cutup:10", "cutdown:10"),
               plain_errors=OS_ERRORS | {"smtplib.SMTPServerDisconnected"}, **kw)


def paramiko_sshd(server: Sshd, **kw: Any) -> Row:
    return Row(slug="paramiko-openssh", title="paramiko vs OpenSSH", server=server,
               client=["ssh_client.py", "127.0.0.1", "{port}", server.user, server.keyfile,
                       str(server.cmdlog)],
               kinds=("reset", "close", "refuse1.0", "cutup:30", "cutdown:30"),
               spacing=(0.6, 1.0), after_ops=10,
               plain_errors=OS_ERRORS | {"paramiko.ssh_exception.SSHException", "EOFError",
                                         "EmptyOutput",
                                         "paramiko.ssh_exception.NoValidConnectionsError"},
               **kw)


def websocket_client(server: WebSockets, **kw: Any) -> Row:
    return Row(slug="websocket-client-websockets", title="websocket-client vs websockets",
               server=server, client=["ws_client.py", "ws://127.0.0.1:{port}/"],
               kinds=("reset", "close", "refuse1.0", "cutup:4", "cutdown:3"),
               plain_errors=OS_ERRORS | {
                   "websocket._exceptions.WebSocketConnectionClosedException",
                   "websocket._exceptions.WebSocketTimeoutException"}, **kw)


def requests_nginx_tls_after_retried_connect(server: Nginx, **kw: Any) -> Row:
    """The repro repro_tls_after_retried_connect (r19) as a row: the first TCP connect is
    refused for 1 s (resilientsock retries it), then TLS; later resets must be recovered."""
    return Row(slug="requests-nginx-https-retried-connect",
               title="requests vs nginx, HTTPS whose first connect was refused for 1 s",
               server=server,
               client=["requests_client.py", "https://127.0.0.1:{port}/blob", str(BLOB_SIZE),
                       server.cafile],
               upstream_port=server.tls_port, at_start="refuse1.0", kinds=("reset",),
               faults=6, plain_errors=REQUESTS_ERRORS | {"requests.exceptions.SSLError"}, **kw)


def redis_incr(server: Redis, **kw: Any) -> Row:
    """Issue #23: INCR with redis-py's own retries off. A lost answer must not make it run
    twice (it did: the counter went up by 2 where plain raised and it ran once)."""
    return Row(slug="redis-incr", title="redis-py INCR (retries off) vs redis-server",
               server=server,
               client=["redis_incr_client.py", "127.0.0.1", "{port}", server.password, "2"],
               kinds=("answer-lost", "reset", "answer-lost", "close", "cutup:10"),
               idempotent=False,
               plain_errors=frozenset({"redis.exceptions.ConnectionError",
                                       "redis.exceptions.TimeoutError"}), **kw)


def pymemcache_incr(server: Memcached, **kw: Any) -> Row:
    """Issue #23: pymemcache incr. A lost answer must not make it run twice."""
    return Row(slug="pymemcache-incr", title="pymemcache incr vs memcached", server=server,
               client=["memcache_incr_client.py", "127.0.0.1", "{port}"],
               kinds=("answer-lost", "reset", "answer-lost", "close", "cutup:10"),
               idempotent=False, plain_errors=OS_ERRORS | {
                   "pymemcache.exceptions.MemcacheUnexpectedCloseError"}, **kw)


# HTTP: the fault kinds of a POST row. answer-lost is the case (the order was placed,
# the answer never came); cutup:60 lands inside the request (never reached: safe to re-send);
# cutdown:20 inside the answer's headers.
POST_KINDS = ("answer-lost", "reset", "answer-lost", "close", "cutup:60", "cutdown:20",
              "refuse1.0")
URLLIB3_ERRORS = frozenset({"urllib3.exceptions.ProtocolError",
                            "urllib3.exceptions.MaxRetryError",
                            "urllib3.exceptions.ReadTimeoutError",
                            "urllib3.exceptions.SSLError"})


def requests_post(server: NginxPost | PostBackend, mode: str = "requests", tls: bool = False,
                  **kw: Any) -> Row:
    """Issue #23: a POST (no Idempotency-Key) whose answer was lost ran twice under
    resilientsock where plain raised and ran it once. ``mode``: requests' defaults, an
    explicit ``Retry(0)`` adapter, or urllib3's own defaults (``Retry(3)``)."""
    scheme = "https" if tls else "http"
    extra = [server.cafile] if tls else []  # type: ignore[union-attr]
    where = "nginx" if isinstance(server, NginxPost) else "http.server"
    lib = {"requests": "requests (defaults)", "retry0": "requests, Retry(0)",
           "urllib3": "urllib3 (defaults, Retry(3))"}[mode]
    port = (server.tls_port if tls else server.port)  # type: ignore[union-attr]
    return Row(slug=f"post-{mode}-{where.replace('.', '')}-{scheme}",
               title=f"POST: {lib} vs {where}, {scheme.upper()}", server=server,
               client=["requests_post_client.py", f"{scheme}://127.0.0.1:{{port}}/orders",
                       mode, *extra],
               upstream_port=port, kinds=POST_KINDS, idempotent=False,
               plain_errors=REQUESTS_ERRORS | URLLIB3_ERRORS | OS_ERRORS
               | {"requests.exceptions.SSLError", "http.client.RemoteDisconnected"}, **kw)


def xmlrpc_incr(server: XMLRPCServer, **kw: Any) -> Row:
    """Issue #23: xmlrpc.client re-sends once by itself after a reset; resilientsock's
    re-send stacked on it (incr ran 3 times where plain ran it at most twice)."""
    return Row(slug="xmlrpc-incr", title="xmlrpc.client incr vs SimpleXMLRPCServer",
               server=server, client=["xmlrpc_client.py", "http://127.0.0.1:{port}/"],
               kinds=("answer-lost", "answer-lost2", "reset", "answer-lost2", "close",
                      "cutup:60"),
               idempotent=False, client_resends=True,
               plain_errors=OS_ERRORS | {"http.client.RemoteDisconnected",
                                         "http.client.CannotSendRequest",
                                         "http.client.ResponseNotReady",
                                         "xmlrpc.client.ProtocolError"}, **kw)


def redis_multi(server: Redis, **kw: Any) -> Row:
    """Issue #23: a MULTI ... EXEC whose answer was lost ran twice (the app saw [2, 2])."""
    return Row(slug="redis-multi-exec", title="redis-py MULTI/EXEC (retries off) vs redis-server",
               server=server,
               client=["redis_multi_client.py", "127.0.0.1", "{port}", server.password, "2"],
               kinds=("answer-lost", "reset", "answer-lost", "close", "cutup:30"),
               idempotent=False,
               plain_errors=frozenset({"redis.exceptions.ConnectionError",
                                       "redis.exceptions.TimeoutError"}), **kw)


# the legacy loops: a command fails, NOOP checks the connection, log in again if NOOP raises
LOGIN_KINDS = ("reset", "answer-lost", "close", "cutup:8", "cutdown:5", "refuse1.0")


def ftplib_noop_loop(server: PyFTPd, **kw: Any) -> Row:
    """Issue #23: after a surfaced drop, a lazily opened connection's greeting (220) was
    read as NOOP's answer, and the next command met 530 (6 x in 20 s)."""
    return Row(slug="ftplib-pyftpdlib-noop-loop",
               title="ftplib NOOP liveness loop (MKD) vs pyftpdlib", server=server,
               client=["ftp_client.py", "127.0.0.1", "{port}", server.user, server.password],
               kinds=LOGIN_KINDS, idempotent=False, worse_if_more=("reply530",),
               plain_errors=OS_ERRORS | {"EOFError", "ftplib.error_temp", "ftplib.error_reply",
                                         "TimeoutError", "socket.timeout"}, **kw)


def imaplib_noop_loop(server: Dovecot, **kw: Any) -> Row:
    """Issue #23: the same with imaplib against dovecot: 22 x BAD in 20 s."""
    return Row(slug="imaplib-dovecot-noop-loop",
               title="imaplib NOOP liveness loop (APPEND) vs dovecot", server=server,
               client=["imap_client.py", "127.0.0.1", "{port}", server.user, server.password],
               kinds=LOGIN_KINDS, idempotent=False,
               plain_errors=OS_ERRORS | {"EOFError", "imaplib.IMAP4.abort", "TimeoutError",
                                         "socket.timeout"}, **kw)


LDAP_ERRORS = frozenset({"ldap3.core.exceptions.LDAPSocketOpenError",
                         "ldap3.core.exceptions.LDAPSocketReceiveError",
                         "ldap3.core.exceptions.LDAPSocketSendError",
                         "ldap3.core.exceptions.LDAPSessionTerminatedByServerError",
                         "ldap3.core.exceptions.LDAPSocketCloseError",
                         "ldap3.core.exceptions.LDAPStartTLSError",
                         "ldap3.core.exceptions.LDAPBindError",
                         "ldap3.core.exceptions.LDAPResponseTimeoutError"})


def ldap3_bind_add(server: Slapd, **kw: Any) -> Row:
    """Issue #23: an unanswered ADD was re-sent on a new connection that never did the BIND
    (10 writes on unbound connections, 4 ADDs received twice)."""
    return Row(slug="ldap3-slapd-bind-add", title="ldap3 BIND + ADD vs slapd", server=server,
               client=["ldap_client.py", "127.0.0.1", "{port}", server.rootdn,
                       server.password, f"ou=orders,{server.suffix}"],
               kinds=("answer-lost", "reset", "close", "cutup:20", "cutdown:6", "refuse1.0"),
               idempotent=False, worse_if_more=("writes_unbound",),
               plain_errors=OS_ERRORS | LDAP_ERRORS, **kw)


def stomp_send(server: RabbitMQ, **kw: Any) -> Row:
    """Issue #23: a SEND cut before delivery was re-sent alone on a new connection that never
    sent CONNECT: ERROR frames "You must log in using CONNECT first"."""
    return Row(slug="stomp-rabbitmq-send", title="stomp.py SEND (receipts) vs RabbitMQ",
               server=server,
               client=["stomp_client.py", "127.0.0.1", "{port}", server.user, server.password],
               kinds=("reset", "answer-lost", "close", "cutup:30", "cutdown:10", "refuse1.0"),
               idempotent=False, worse_if_more=("error_frames",),
               plain_errors=OS_ERRORS | {"stomp.exception.NotConnectedException",
                                         "stomp.exception.ConnectFailedException",
                                         "NoReceipt"}, **kw)


def pymemcache_noreply(server: MemcachedNoreply, **kw: Any) -> Row:
    """Issue #23: a noreply set (no answer ever) stayed in the journal and was replayed after
    a later drop over another client's newer value."""
    return Row(slug="pymemcache-noreply", title="pymemcache set (noreply) then another "
               "client's newer value, vs memcached", server=server,
               client=["memcache_noreply_client.py", "127.0.0.1", "{port}", str(server.port)],
               kinds=("reset", "close", "cutup:10", "cutdown:6", "answer-lost", "refuse1.0"),
               plain_errors=OS_ERRORS | {"pymemcache.exceptions.MemcacheUnexpectedCloseError",
                                         "SetLost"}, **kw)
