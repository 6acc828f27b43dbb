"""TLS: a resilient socket that redoes its handshake on every new connection.

Rules of this module (docs/design.md §3, §6, §7):

1. ``ResilientSSLSocket`` subclasses ``ResilientSocket`` and ``gevent.ssl.SSLSocket`` and is
   installed as ``SSLContext.sslsocket_class``. Like the plain class it passes everything
   through until it is protected; its guarded twin guards ``read``/``write``/``send``/
   ``sendall`` (``recv``/``recv_into`` call ``read``).
2. Wrapping a connected resilient socket takes over its target, policy and options: the TLS
   socket reconnects with the same ``SSLContext`` and ``server_hostname`` and offers the last
   TLS session for resumption. A socket that already carried plaintext before being wrapped
   (STARTTLS in SMTP, FTP, IMAP) is *not* made resilient: a reconnect could not replay the
   plaintext prelude, so its drops surface as before. What decides is what flowed on the
   connection, never how many attempts its first connect needed (review r19).
3. Server-side sockets are never resilient.
4. The handshake runs under the attempt's time (``connect_timeout``, the episode's deadline
   and the application's own timeout); ``TCP_NODELAY`` is on during the handshake (46.7 ms
   without it on loopback, 3.5 ms with) and restored after.
5. A reset under TLS often reads as EOF (``suppress_ragged_eofs``): the EOF rule of the journal
   applies (unanswered -> drop, otherwise the end of the stream).
6. ``confirm="tcp-ack"`` counts TCP bytes, which under TLS are ciphertext: it falls back to
   confirmation by answer (with a warning).
7. Bytes waiting unread when a write fails are ciphertext too: only decrypted application
   data is an early answer (§5), kept for the next read (``_rs_early_answer``). A fresh TLS
   1.3 connection always has the server's session tickets waiting there.
"""

from __future__ import annotations

import logging
import socket as _std
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, cast

from gevent._socketcommon import timeout_default as _timeout_default

if TYPE_CHECKING:  # gevent ships no types: a type checker sees the stdlib class it mirrors
    from ssl import SSLSession
    from ssl import SSLSocket as _GeventSSLSocket
else:
    from gevent.ssl import SSLSocket as _GeventSSLSocket

from . import _stats
from ._errors import classify
from ._machine import BROKEN, CONNECTED, Machine
from ._socket import TLS_READ, ResilientSocket, _clock, _live, _sendall_with

__all__ = ["ResilientSSLSocket", "wrap_socket"]

log = logging.getLogger("resilientsock")


class _SSLObject(Protocol):
    """What this module uses of ``SSLSocket._sslobj``, the stdlib's private ``_ssl._SSLSocket``
    (typeshed has no class for it)."""

    @property
    def session(self) -> SSLSession | None: ...
    @property
    def session_reused(self) -> bool: ...
    def read(self, size: int) -> bytes: ...


class _WrapsSocket(Protocol):
    """``SSLContext._wrap_socket``, the stdlib's private constructor of the TLS object of an
    ``SSLSocket`` (not in typeshed); gevent's ``SSLSocket.__init__`` calls it the same way."""

    def _wrap_socket(self, sock: _std.socket, server_side: bool, server_hostname: str | None,
                     *, owner: object = None, session: SSLSession | None = None) -> _SSLObject: ...


class ResilientSSLSocket(ResilientSocket, _GeventSSLSocket):
    """A gevent ``SSLSocket`` that survives drops like :class:`ResilientSocket`."""

    _rs_tls = True
    if TYPE_CHECKING:
        # gevent's SSLSocket internals set or read here.
        _sslobj: _SSLObject | None
        _connected: bool

        # gevent's accept() wraps the accepted socket with this socket's context: an instance
        # of the context's sslsocket_class (ResilientSSLSocket under patch(), gevent's
        # SSLSocket otherwise). No one static type says that: not ResilientSocket.accept's.
        def accept(self) -> tuple[Any, Any]: ...
    else:
        accept = _GeventSSLSocket.accept
    dup = _GeventSSLSocket.dup
    sendmsg = _GeventSSLSocket.sendmsg
    recvfrom = _GeventSSLSocket.recvfrom
    recvfrom_into = _GeventSSLSocket.recvfrom_into
    recvmsg = _GeventSSLSocket.recvmsg
    recvmsg_into = _GeventSSLSocket.recvmsg_into
    # Called unbound, as type(self)._rs_raw_connect(self, address): the first argument is always
    # the ResilientSSLSocket itself (a self type the base class's staticmethod cannot spell).
    _rs_raw_connect: Callable[[Any, Any], None] = staticmethod(_GeventSSLSocket.connect)
    _rs_raw_connect_ex: Callable[[Any, Any], int] = staticmethod(_GeventSSLSocket.connect_ex)

    def shutdown(self, how: int) -> None:
        if self._rs_m is not None:
            self._rs_unprotect()
        _GeventSSLSocket.shutdown(self, how)
    _rs_tls_session: SSLSession | None = None
    # An early answer decrypted to judge a failed write (``_rs_early_answer``), returned by
    # the next reads before anything else of the connection.
    _rs_early: bytes = b""

    def __init__(self, sock: Any = None, *args: Any, **kwargs: Any) -> None:
        carried = _carry_over(sock, kwargs)
        self.__dict__["reconnects"] = 0
        try:
            _GeventSSLSocket.__init__(self, sock, *args, **kwargs)
        except Exception as exc:
            # A drop in the first handshake of a socket we could reconnect: retry it whole.
            info = classify(exc, phase="connect")
            if carried is None or info is None or not info.retryable:
                raise
            self._closed = False
            # gevent's __init__ probes a socket that is no longer connected (a reset before
            # the handshake: ENOTCONN) with recv(1) after setblocking(False), and that recv's
            # ECONNRESET leaves it non-blocking: the new connection's handshake then raised
            # SSLWantReadError, "not retried". The caller's timeout, as it was at the wrap.
            self.settimeout(carried["timeout"])
            self._rs_adopt(carried, BROKEN)
            self._rs_recover(exc, carried["call_end"], first=True)
            self._rs_protect()
            _live.add(self)
            return
        if carried is not None:
            self._rs_adopt(carried, CONNECTED)
            self._rs_protect()
            _live.add(self)
        else:
            self._rs_init(None)

    def _rs_adopt(self, carried: dict[str, Any], state: str) -> None:
        self._rs_init(carried["policy"])
        self._rs_any_family = carried["any_family"]
        self._rs_source = carried["source"]
        self.__dict__["_rs_opts"] = dict(carried["opts"])
        self._rs_target = carried["target"]
        m = Machine(carried["policy"], _clock)
        m.target = carried["target"]
        m.state = state
        m.library = carried.get("library")
        self.__dict__["_rs_m"] = m
        if m.policy.confirm == "tcp-ack":
            log.warning("confirm='tcp-ack' counts TCP bytes, which are ciphertext under TLS; "
                        "this TLS socket confirms by answer instead")

    @classmethod
    def _rs_guard_methods(cls) -> dict[str, Any]:
        return _tls_guarded_methods(cls.read, cls.write, cls.send)

    def unwrap(self) -> Any:
        if self._rs_m is not None:
            self._rs_unprotect()  # plaintext from here on: the caller's protocol, not ours
        return _GeventSSLSocket.unwrap(self)

    def close(self) -> None:
        ResilientSocket.close(self)

    def _rs_early_answer(self) -> bool:
        """A write failed with the peer's bytes waiting unread (§5, an early answer?). They
        are ciphertext, and a fresh TLS 1.3 connection always has some: the server's session
        tickets, which the client reads only at its next read. Decrypt what has arrived,
        without waiting (gevent keeps the descriptor non-blocking): application data is the
        early answer, kept for the caller's next read; tickets alone, an incomplete record,
        a close_notify or a reset are not. (Was: the tickets were taken for an answer, and a
        request on a fresh connection reset before its write was surfaced, not re-sent.)"""
        sslobj = self._sslobj
        if sslobj is None:
            return True
        try:
            data = sslobj.read(65536)
        except (OSError, ValueError):  # SSLWantReadError (nothing whole), the end, a reset
            return False
        self._rs_early = data
        return bool(data)

    def pending(self) -> int:
        """Decrypted bytes ready to read without waiting: the kept early answer's too (an
        application that selects before it reads asks this first, as the ssl docs say)."""
        return len(self._rs_early) + int(_GeventSSLSocket.pending(self))

    def _rs_take_early(self, nbytes: int, buffer: Any) -> Any:
        """The next read's share of the kept early answer (``_rs_early_answer``), counted as
        any answer byte is."""
        data = self._rs_early
        if buffer is not None:
            view = memoryview(buffer).cast("B")
            n = min(len(data), nbytes if nbytes > 0 else len(view), len(view))
            view[:n] = data[:n]
            result: Any = n
        else:
            n = min(len(data), nbytes)
            result = data[:n]
        self._rs_early = data[n:]
        m = self._rs_m
        if m is not None and n:
            m.read_data(data[:n], m.journal.seq)
        return result

    # -- reconnect ----------------------------------------------------------------------------

    def _rs_install(self, raw: Any) -> None:
        sslobj = getattr(self, "_sslobj", None)
        if sslobj is not None:
            # The session to offer the next handshake. Reading ``.session`` copies it
            # (CPython serialises and parses it again, certificates included: ~0.4 ms here,
            # a third of a TLS recovery), so a session this connection resumed is offered
            # again as it is; a new one (a full handshake) is read.
            try:
                if self._rs_tls_session is None or not sslobj.session_reused:
                    self._rs_tls_session = sslobj.session or self._rs_tls_session
            except (AttributeError, ValueError):
                pass
        self._rs_early = b""  # the old connection's
        ResilientSocket._rs_install(self, raw)

    def _rs_after_install(self, timeout: float | None) -> None:
        """New TCP connection in place: new TLS object, handshake (under the attempt's
        gevent.Timeout)."""
        self._sslobj = None
        self._connected = True
        session = self._rs_tls_session
        context = cast(_WrapsSocket, self.context)
        try:
            self._sslobj = context._wrap_socket(
                self._sock, False, self.server_hostname, owner=self._sock, session=session)
        except (ValueError, TypeError):  # a session the context will not take
            self._sslobj = context._wrap_socket(
                self._sock, False, self.server_hostname, owner=self._sock)
        inet = self.family in (_std.AF_INET, getattr(_std, "AF_INET6", None))
        if inet:
            self._rs_try_nodelay(1)
        _GeventSSLSocket.do_handshake(self)
        if inet:
            self._rs_try_nodelay(
                self.__dict__.get("_rs_opts", {}).get((_std.IPPROTO_TCP, _std.TCP_NODELAY), 0))
        if session is not None and not self._sslobj.session_reused:
            log.debug("%s: TLS session not resumed", self._rs_name())

    def _rs_try_nodelay(self, value: int) -> None:
        try:
            self._sock.setsockopt(_std.IPPROTO_TCP, _std.TCP_NODELAY, value)
        except OSError:  # pragma: no cover
            pass

    def _rs_raw_recv(self, n: int) -> bytes:
        return _GeventSSLSocket.read(self, n)

    def _rs_raw_sendall(self, data: Any) -> None:
        _sendall_with(_GeventSSLSocket.send, self, data, 0)


def _tls_guarded_methods(read: Any, write: Any, send: Any) -> dict[str, Any]:
    """TLS hot paths: ``read``/``write`` guarded; ``send``/``sendall`` journaled once."""

    def read_(self: Any, nbytes: int = 1024, buffer: Any = None) -> Any:
        if self._rs_early:
            return self._rs_take_early(nbytes, buffer)
        m = self._rs_m
        args = (nbytes, buffer)
        if m is None or m.state is not CONNECTED:
            return self._rs_read(read, args, TLS_READ)
        mark = m.journal.seq  # Journal.mark()
        gen = m.gen
        t0 = _clock() if self.timeout is not None else None
        # A read under way, counted as the TCP reads count it: a write meanwhile makes the
        # socket full duplex (§5). (Was: not counted over TLS, so a line protocol with a
        # reader and a writer greenlet never became full duplex, and the writer's drop met
        # with the reader's unread answer lines was surfaced as an early answer.)
        m.reading += 1
        try:
            result = read(self, nbytes, buffer)
        except BaseException as exc:
            try:
                return self._rs_read(read, args, TLS_READ, t0, exc, gen)
            finally:
                m.reading -= 1
        if result:
            m.reading -= 1
            if buffer is None:
                m.read_data(result, mark)
            else:
                m.read_data(memoryview(buffer).cast("B")[:result], mark)
            return result
        try:
            return self._rs_read_eof(read, args, TLS_READ, result, t0, gen)
        finally:
            m.reading -= 1

    def write_(self: Any, data: Any) -> Any:
        return self._rs_write(write, (data,), data, True)

    def send_(self: Any, data: Any, flags: int = 0, timeout: Any = _timeout_default) -> Any:
        return self._rs_write(send, (data, flags, timeout), data, True)

    def sendall_raw(self: Any, data: Any, flags: int = 0) -> None:
        if flags:
            raise ValueError(f"non-zero flags not allowed in calls to sendall() on {type(self)}")
        _sendall_with(send, self, data, flags)

    def sendall_(self: Any, data: Any, flags: int = 0) -> None:
        self._rs_write(sendall_raw, (data, flags), data, False)

    read_.__doc__ = _GeventSSLSocket.read.__doc__
    return {"read": read_, "write": write_, "send": send_, "sendall": sendall_}


def _carry_over(sock: Any, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """What a TLS wrap takes over from a connected, still unused resilient socket."""
    if not isinstance(sock, ResilientSocket) or kwargs.get("server_side"):
        return None
    m = sock._rs_m
    if m is None or m.state is not CONNECTED:
        return None
    if m.wrote or m.conn_answered or m.answered or m.banner:
        return None  # plaintext already flowed (STARTTLS): a reconnect could not replay it
    timeout = sock.timeout
    carried = {
        "policy": m.policy,
        "target": sock._rs_target,
        "any_family": sock._rs_any_family,
        "source": sock._rs_source,
        "opts": sock.__dict__.get("_rs_opts", {}),
        "library": m.library,
        "timeout": timeout,
        "call_end": None if timeout is None else _clock() + timeout,
    }
    sock._rs_unprotect()  # the TLS socket owns the connection from here on
    _stats.bump("tls_wraps")
    return carried


def wrap_socket(sock: Any, keyfile: Any = None, certfile: Any = None, server_side: bool = False,
                cert_reqs: Any = None, ssl_version: Any = None, ca_certs: Any = None,
                do_handshake_on_connect: bool = True, suppress_ragged_eofs: bool = True,
                ciphers: Any = None) -> ResilientSSLSocket:
    """``ssl.wrap_socket`` (Python 3.10/3.11) returning a resilient TLS socket."""
    import ssl

    return ResilientSSLSocket(
        sock=sock, keyfile=keyfile, certfile=certfile, server_side=server_side,
        cert_reqs=ssl.CERT_NONE if cert_reqs is None else cert_reqs,
        ssl_version=ssl.PROTOCOL_TLS if ssl_version is None else ssl_version,
        ca_certs=ca_certs, do_handshake_on_connect=do_handshake_on_connect,
        suppress_ragged_eofs=suppress_ragged_eofs, ciphers=ciphers)
