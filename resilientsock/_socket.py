"""ResilientSocket: the reconnect / replay state machine on top of gevent's socket.

Rules of this module (DESIGN §5-§7):

1. Subclass, don't proxy: ``ResilientSocket`` *is* a gevent socket, so ``with``, ``makefile``,
   gevent's own ``sendall`` (which calls ``self.send``) and C-level consumers see a real socket.
2. A socket is protected only once it is a client stream socket (AF_INET, AF_INET6, AF_UNIX)
   that this process connected in blocking or timeout mode. Listening, accepted, UDP, raw,
   ``fromfd`` and non-blocking sockets pass every call straight to gevent (``_rs_target`` is
   None). ``shutdown()`` by the caller turns protection off: the stream is theirs to end.
3. Reconnecting swaps the wrapped ``_sock`` (so ``fileno()`` changes). The old io watchers are
   dropped with ``_drop_events_and_close``, which wakes any greenlet blocked on them; that
   greenlet sees the connection generation moved and retries on the new connection, so a
   reader and a writer that meet the same drop cause one reconnect, not two.
4. Re-entrancy: gevent's ``sendall`` calls ``self.send`` and TLS ``recv`` calls ``self.read``.
   A per-direction flag makes the inner call raw, so a record is journaled exactly once.
   Hooks and replay run with both flags set: their I/O is not journaled.
5. States (``_rs_state``):

   =========  ==================================================  =========================
   state      meaning                                              next I/O call
   =========  ==================================================  =========================
   idle       never connected (or protection off)                  passes through
   connected  a live connection, journal in force                  runs; a drop -> recover
   broken     an error was surfaced, connection discarded          reconnects first (lazily)
   closed     the application closed it                            passes through (EBADF)
   =========  ==================================================  =========================

   "reconnecting" and "replaying" are the inside of ``_rs_reconnect``, under the socket's lock.
6. After a surfaced error the journal is empty: the application owns recovery, so nothing is
   ever re-sent twice by both of us.
7. Banners (server-first protocols: SMTP, FTP, POP3, IMAP). Bytes that arrive before the
   application's first write are a banner. On a reconnect after that first write, the new
   connection's banner is read and dropped before the hook and the replay (the application
   already read one). Once the server has also answered a write, a session exists that a new
   connection would not have (EHLO, login), so a drop is surfaced unless an ``on_reconnect``
   hook restores the session. A surfaced error ends the session: a lazily reconnected socket
   hands the next banner to the application, as a fresh connection would.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket as _std
import struct
import sys
import time
from typing import Any

import gevent
from gevent._socket3 import socket as _GeventSocket
from gevent._socketcommon import timeout_default as _timeout_default
from gevent.lock import RLock
from gevent.socket import getaddrinfo as _getaddrinfo
from gevent.socket import wait_write as _wait_write

from . import _stats
from ._errors import REASONS, ErrorCategory, ErrorInfo, UnansweredEOFError, classify
from ._journal import Journal
from ._policy import RetryPolicy

__all__ = ["ResilientSocket", "create_connection", "default_policy", "set_default_policy"]

log = logging.getLogger("resilientsock")

IDLE, CONNECTED, BROKEN, CLOSED = "idle", "connected", "broken", "closed"
_RECV, _RECV_INTO, _TLS_READ = 0, 1, 2  # how a read call names its size (for the EOF rule)
_PROTECTED_FAMILIES = tuple(
    f for f in (getattr(_std, n, None) for n in ("AF_INET", "AF_INET6", "AF_UNIX")) if f is not None
)
_INET = tuple(f for f in (_std.AF_INET, getattr(_std, "AF_INET6", None)) if f is not None)
_TLS_TRANSPORT_CAP = 3  # "retry, small cap" (DESIGN §3); picked, not measured
_ACK_CHECK_INTERVAL = 0.05  # seconds between TCP_INFO queries under confirm="tcp-ack"
_TCP_INFO = getattr(_std, "TCP_INFO", None)
_TCPI_BYTES_ACKED = 120  # offset of tcpi_bytes_acked (u64) in Linux struct tcp_info
_TCPI_UNACKED = 24  # offset of tcpi_unacked (u32): segments sent and not yet acknowledged
_TCPI_RTT = 68  # offset of tcpi_rtt (u32, microseconds): smoothed round-trip time

_default_policy: RetryPolicy | None = None


def default_policy() -> RetryPolicy:
    """The policy sockets get when none is given: the one ``patch()`` set, else defaults."""
    global _default_policy
    if _default_policy is None:
        _default_policy = RetryPolicy()
    return _default_policy


def set_default_policy(policy: RetryPolicy | None) -> None:
    global _default_policy
    _default_policy = policy


def _add_note(exc: BaseException, note: str) -> None:
    """PEP 678 note; Python 3.10 has no ``add_note``, so set ``__notes__`` directly."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:  # pragma: no cover - 3.10
        notes = list(getattr(exc, "__notes__", []))
        notes.append(note)
        exc.__notes__ = notes  # type: ignore[attr-defined]


class _TokenBucket:
    """Process-wide limiter for reconnect attempts (DESIGN §4): a lone drop never waits
    (burst), a mass drop is spread out. Cooperative (gevent): no lock needed."""

    def __init__(self) -> None:
        self.tokens = -1.0
        self.stamp = 0.0

    def delay(self, rate: float) -> float:
        burst = max(1.0, rate / 10.0)
        now = time.monotonic()
        if self.tokens < 0 and self.stamp == 0.0:
            self.tokens = burst
        else:
            self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        self.tokens -= 1.0  # reserve, even if we must wait for it
        return 0.0 if self.tokens >= 0 else -self.tokens / rate


_bucket = _TokenBucket()


class _Budget:
    """What one call may still spend on recovery: attempts and the deadline."""

    __slots__ = ("policy", "start", "attempts", "original", "last", "tls_transport", "tries")

    def __init__(self, policy: RetryPolicy, original: BaseException | None, tries: int = 0):
        self.policy = policy
        self.start = time.monotonic()
        self.attempts = 0
        self.tries = tries  # attempts already made outside the reconnect loop (first connect)
        self.original = original
        self.last: BaseException | None = original
        self.tls_transport = 0

    def remaining(self) -> float:
        if self.policy.deadline is None:
            return math.inf
        return self.policy.deadline - (time.monotonic() - self.start)

    def exhausted(self) -> bool:
        cap = self.policy.max_attempts
        return (cap is not None and self.attempts >= cap) or self.remaining() <= 0

    def describe(self) -> str:
        last = self.last
        text = f"{last}" if last is not None and str(last) else type(last).__name__
        total = self.attempts + self.tries
        return (f"gave up after {total} attempt{'s' if total != 1 else ''} in "
                f"{time.monotonic() - self.start:.1f} s (last: {text})")


class _Dual:
    """``ResilientSocket.connect(address, policy=...)`` on the class creates and connects a
    socket; ``sock.connect(address)`` on an instance is the normal socket method."""

    def __init__(self, on_class: Any, on_instance: Any) -> None:
        self.on_class = on_class
        self.on_instance = on_instance
        self.__doc__ = on_instance.__doc__

    def __get__(self, obj: Any, cls: Any = None) -> Any:
        if obj is None:
            return self.on_class.__get__(None, cls)
        return self.on_instance.__get__(obj, cls)


def _dead_peer_options(family: int, seconds: float | None) -> list[tuple[int, int, int]]:
    """Keepalive + TCP_USER_TIMEOUT so a silently dead link surfaces as ETIMEDOUT in about
    ``seconds``. Options the platform lacks are skipped."""
    if seconds is None or family not in _INET:
        return []
    opts = [(_std.SOL_SOCKET, _std.SO_KEEPALIVE, 1)]
    idle = max(1, int(seconds // 2))
    interval = max(1, int((seconds - idle) // 3))
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval),
                        ("TCP_KEEPCNT", 3), ("TCP_USER_TIMEOUT", int(seconds * 1000))):
        opt = getattr(_std, name, None)
        if opt is not None:
            opts.append((_std.IPPROTO_TCP, opt, value))
    return opts


class ResilientSocket(_GeventSocket):
    """A gevent socket that survives connection drops (see the module docstring).

    Guarantees after an error (what the caller may rely on):

    * A call that returns normally did its work, possibly on a new connection; unconfirmed
      writes were re-sent there first (at-least-once: a request whose answer was lost in
      flight arrives twice).
    * A call that raises raised the original exception type (``ConnectionResetError`` stays
      ``ConnectionResetError``) with a note saying what was tried. The journal is then empty:
      nothing written before the error will be re-sent by resilientsock. The next call
      reconnects first.
    * ``fileno()`` changes across a reconnect.
    * Server-first protocols (a banner before the client speaks): a drop once the server has
      answered a command is surfaced unless ``on_reconnect`` restores the session; before
      that, the new connection's banner is skipped and the first command re-sent.
    """

    # Class-level defaults: gevent's __getattr__ forwards unknown names to the raw socket, and
    # SSLSocket.__init__ may call our methods before _rs_init ran.
    _rs_target: Any = None
    _rs_reading = False
    _rs_writing = False
    _rs_recovering = False
    _rs_wrote = False
    _rs_banner_bytes = 0
    _rs_banner_lines = 0
    _rs_session = False
    _rs_state = IDLE
    _rs_policy: RetryPolicy | None = None
    _rs_source: Any = None
    _rs_any_family = False
    _rs_tls = False
    _sock: Any  # set by gevent's socket (a slot); declared for type checkers
    _rs_raw_recv = staticmethod(_GeventSocket.recv)
    _rs_raw_recv_into = staticmethod(_GeventSocket.recv_into)
    _rs_raw_send = staticmethod(_GeventSocket.send)
    _rs_raw_sendall = staticmethod(_GeventSocket.sendall)
    _rs_raw_connect = staticmethod(_GeventSocket.connect)
    _rs_raw_connect_ex = staticmethod(_GeventSocket.connect_ex)
    _rs_raw_shutdown = staticmethod(_GeventSocket.shutdown)

    def __init__(self, family: int = -1, type: int = -1, proto: int = -1,
                 fileno: int | None = None, *, policy: RetryPolicy | None = None) -> None:
        _GeventSocket.__init__(self, family, type, proto, fileno)
        self._rs_init(policy)

    def _rs_init(self, policy: RetryPolicy | None) -> None:
        if policy is not None and not isinstance(policy, RetryPolicy):
            raise TypeError(f"policy must be a RetryPolicy, got {policy!r}")
        self._rs_policy = policy
        self._rs_target = None
        self._rs_any_family = False
        self._rs_source = None
        self.__dict__.setdefault("_rs_opts", {})
        self._rs_journal = Journal(0)
        self._rs_gen = 0
        self._rs_lock: RLock | None = None
        self._rs_state = IDLE
        self._rs_read_since_write = 0
        self._rs_conn_answered = False
        self._rs_new_session()
        self._rs_warned = False
        self._rs_ack_checked = 0.0
        self.reconnects = 0

    def _rs_new_session(self) -> None:
        """Forget the banner bookkeeping (rule 7): the next connection starts a new session."""
        self._rs_wrote = False  # the application wrote on this session
        self._rs_banner_bytes = 0  # bytes the server sent before the application's first write
        self._rs_banner_lines = 0  # line ends in them
        self._rs_session = False  # a banner, then an answer to a write: session state exists

    # -- public extras ------------------------------------------------------------------------

    @property
    def policy(self) -> RetryPolicy:
        """The policy in force for this socket."""
        return self._rs_policy or default_policy()

    @property
    def resilient(self) -> bool:
        """True while drops on this socket are recovered (a connected client socket)."""
        return self._rs_target is not None and self._rs_state != CLOSED

    def confirm(self) -> int:
        """Declare every record written so far delivered: it will not be re-sent after a drop.
        Returns how many records were confirmed."""
        return self._rs_journal.confirm_all()

    @property
    def unconfirmed_bytes(self) -> int:
        """Bytes written and not yet confirmed (what a drop now would re-send)."""
        return self._rs_journal.size

    # -- connecting ---------------------------------------------------------------------------

    @classmethod
    def _connect_new(cls, address: Any, policy: RetryPolicy | None = None, *,
                     timeout: float | None = None, source_address: Any = None) -> ResilientSocket:
        """Create a resilient client socket connected to ``address`` (host, port) or a path.

        The host name is re-resolved at every reconnect and every address it returns is tried
        in order. ``timeout`` is the socket timeout (as in ``create_connection``). On failure
        the original exception type is raised with a note (``retry_connect`` allowing).
        """
        if isinstance(address, str | bytes):
            sock = cls(_std.AF_UNIX, _std.SOCK_STREAM, policy=policy)
        else:
            if not (isinstance(address, tuple) and len(address) >= 2):
                raise ValueError(f"address must be (host, port) or a unix path, got {address!r}")
            sock = cls(_std.AF_INET, _std.SOCK_STREAM, policy=policy)
            sock._rs_any_family = True
        try:
            sock.settimeout(timeout)
            sock._rs_source = source_address
            sock._rs_begin(address)
            sock._rs_first_connect(address, via_open=True)
        except BaseException:
            sock.close()
            raise
        return sock

    def _connect_instance(self, address: Any) -> None:
        """Connect to ``address``; for a client stream socket, resiliently (retry_connect)."""
        if not self._rs_can_protect():
            return self._rs_raw_connect(self, address)
        self._rs_begin(address)
        self._rs_first_connect(address, via_open=False)
        return None

    connect = _Dual(_connect_new, _connect_instance)

    def connect_ex(self, address: Any) -> int:
        if not self._rs_can_protect():
            return int(self._rs_raw_connect_ex(self, address) or 0)
        try:
            self._connect_instance(address)
        except _std.gaierror:
            raise
        except TimeoutError as exc:
            if exc.errno:
                return int(exc.errno)
            return errno.EAGAIN
        except OSError as exc:
            if exc.errno:
                return int(exc.errno)
            raise
        return 0

    def _rs_can_protect(self) -> bool:
        return (
            self._rs_target is None
            and self._rs_state == IDLE
            and self.timeout != 0.0
            and self.family in _PROTECTED_FAMILIES
            and self.type == _std.SOCK_STREAM
            and not getattr(self, "server_side", False)
        )

    def _rs_begin(self, address: Any) -> None:
        policy = self.policy
        self._rs_policy = policy
        self._rs_target = address
        self._rs_journal = Journal(policy.journal_limit, keep_data=policy.replay != "none")
        self._rs_lock = RLock()

    def _rs_first_connect(self, address: Any, via_open: bool) -> None:
        policy = self._rs_policy
        assert policy is not None
        try:
            if via_open:
                self._rs_open_connection(policy.connect_timeout if self.timeout is None
                                         else self.timeout)
            else:
                for level, opt, value in _dead_peer_options(self.family, policy.dead_peer_timeout):
                    self._rs_try_setsockopt(self._sock, level, opt, value)
                self._rs_raw_connect(self, address)
        except Exception as exc:
            info = classify(exc, phase="connect")
            _count_failed_attempt(info)
            if not policy.retry_connect or info is None or not info.retryable:
                self._rs_target = None
                if info is not None:
                    _stats.bump("surfaced")
                    _stats.bump(f"surfaced.{info.category}")
                raise
            log.info("connect to %r failed (%s: %s); retrying", address, info.category, exc)
            budget = _Budget(policy, exc, tries=1)
            try:
                self._rs_reconnect(budget, replay=False)
            except BaseException:
                self._rs_target = None
                raise
        self._rs_state = CONNECTED
        _stats.bump("connects")

    # -- the guarded I/O methods --------------------------------------------------------------

    def recv(self, *args: Any) -> bytes:
        if self._rs_reading or self._rs_target is None or self.timeout == 0.0:
            return self._rs_raw_recv(self, *args)  # type: ignore[no-any-return]
        return self._rs_read(self._rs_raw_recv, args, _RECV)  # type: ignore[no-any-return]

    def recv_into(self, *args: Any) -> int:
        if self._rs_reading or self._rs_target is None or self.timeout == 0.0:
            return self._rs_raw_recv_into(self, *args)  # type: ignore[no-any-return]
        return self._rs_read(self._rs_raw_recv_into, args, _RECV_INTO)  # type: ignore[no-any-return]

    def send(self, data: Any, flags: int = 0, timeout: Any = _timeout_default) -> int:
        if self._rs_writing or self._rs_target is None or self.timeout == 0.0:
            return self._rs_raw_send(self, data, flags, timeout)  # type: ignore[no-any-return]
        return self._rs_write(self._rs_raw_send, (data, flags, timeout), data, True)  # type: ignore[no-any-return]

    def sendall(self, data: Any, flags: int = 0) -> None:
        if self._rs_writing or self._rs_target is None or self.timeout == 0.0:
            return self._rs_raw_sendall(self, data, flags)  # type: ignore[no-any-return]
        return self._rs_write(self._rs_raw_sendall, (data, flags), data, False)  # type: ignore[no-any-return]

    def sendmsg(self, buffers: Any, ancdata: Any = (), flags: int = 0, address: Any = None) -> int:
        if (self._rs_writing or self._rs_target is None or self.timeout == 0.0
                or ancdata or address is not None):
            # Ancillary data (fd passing) cannot be replayed: passed through unprotected.
            return _GeventSocket.sendmsg(self, buffers, ancdata, flags, address)  # type: ignore[no-any-return]
        data = b"".join(buffers)  # TypeError for what is not an iterable of bytes-like objects
        return self._rs_write(_sendmsg_raw, (data, flags), data, True)  # type: ignore[no-any-return]

    def _rs_read(self, raw: Any, args: tuple, kind: int) -> Any:
        into = kind == _RECV_INTO or (kind == _TLS_READ and len(args) > 1 and args[1] is not None)
        budget: _Budget | None = None
        self._rs_reading = True
        try:
            while True:
                if self._rs_state != CONNECTED:
                    if self._rs_state == CLOSED or self._closed:
                        return raw(self, *args)  # what a closed socket raises (EBADF, ValueError)
                    budget = self._rs_ensure_connected(budget)
                gen = self._rs_gen
                journal = self._rs_journal
                mark = journal._next
                try:
                    result = raw(self, *args)
                except Exception as exc:
                    budget = self._rs_recover(exc, "read", gen, budget, False)
                    continue
                except BaseException:
                    self._rs_discard(gen)
                    raise
                n = result if into else len(result)
                if n:
                    if not self._rs_session and (self._rs_banner_bytes or not self._rs_wrote):
                        self._rs_note_banner(result, args, kind, n)
                    self._rs_read_since_write += n
                    self._rs_conn_answered = True
                    if journal._records or journal.overflowed:
                        if self._rs_policy.confirm != "explicit":  # type: ignore[union-attr]
                            journal.confirm_before(mark)
                    return result
                if not self._rs_eof_is_drop(args, kind):
                    return result
                eof = UnansweredEOFError(
                    "peer closed the connection without answering "
                    f"{len(journal) or 'some'} request(s)")
                try:
                    budget = self._rs_recover(eof, "read", gen, budget, False)
                except UnansweredEOFError as exc:
                    if exc is eof and getattr(exc, "_rs_refused", False):
                        # Not recoverable under this policy (replay="none", a session...):
                        # the EOF itself goes to the caller, as a plain socket gives it, so
                        # the protocol's own "closed without an answer" handling runs.
                        return result
                    raise
        finally:
            self._rs_reading = False

    def _rs_note_banner(self, result: Any, args: tuple, kind: int, n: int) -> None:
        """Bytes before the first write are a banner; an answer after one starts a session."""
        if self._rs_wrote:
            self._rs_session = True
            return
        if kind == _RECV_INTO:
            data = memoryview(args[0]).cast("B")[:n]
        elif kind == _TLS_READ and len(args) > 1 and args[1] is not None:
            data = memoryview(args[1]).cast("B")[:n]
        else:
            data = result
        self._rs_banner_bytes += n
        self._rs_banner_lines += bytes(data).count(b"\n")

    def _rs_eof_is_drop(self, args: tuple, kind: int) -> bool:
        """EOF while records are unanswered is a drop (the stale keep-alive case).

        Full duplex: the kernel reports a reset once, so when a writer greenlet consumed the
        ECONNRESET, the reader sees a plain EOF. An EOF while another greenlet is writing or
        reconnecting is therefore part of that same drop, not the stream's end.
        """
        if self._rs_recovering or self._rs_writing:
            return True
        if self._rs_policy.eof == "pass" or not self._rs_journal.pending:  # type: ignore[union-attr]
            return False
        if self._rs_read_since_write:
            return False  # an answer began; this EOF ends it
        if kind == _RECV_INTO:
            nbytes = args[1] if len(args) > 1 and args[1] else memoryview(args[0]).nbytes
        elif kind == _TLS_READ and len(args) > 1 and args[1] is not None and not args[0]:
            nbytes = memoryview(args[1]).nbytes
        else:  # recv(bufsize) and read(nbytes): 0 asks for nothing; read() defaults to 1024
            nbytes = args[0] if args else 1024
        return bool(nbytes)

    def _rs_write(self, raw: Any, args: tuple, data: Any, partial: bool) -> Any:
        if type(data) is not bytes:
            data = memoryview(data).cast("B")
        budget: _Budget | None = None
        self._rs_writing = True
        try:
            while True:
                if self._rs_state != CONNECTED:
                    if self._rs_state == CLOSED or self._closed:
                        return raw(self, *args)
                    budget = self._rs_ensure_connected(budget)
                gen = self._rs_gen
                try:
                    result = raw(self, *args)
                except Exception as exc:
                    budget = self._rs_recover(exc, "write", gen, budget, True)
                    continue
                except BaseException:
                    # gevent.Timeout, KeyboardInterrupt: part of the record may be out.
                    self._rs_discard(gen)
                    raise
                n = result if partial else len(data)
                if n:
                    self._rs_record(data if n == len(data) else data[:n])
                return result
        finally:
            self._rs_writing = False

    def _rs_record(self, data: Any) -> None:
        journal = self._rs_journal
        journal.append(data)
        self._rs_read_since_write = 0
        self._rs_wrote = True
        policy = self._rs_policy
        assert policy is not None
        if policy.confirm == "tcp-ack":
            now = time.monotonic()
            if now - self._rs_ack_checked > _ACK_CHECK_INTERVAL:
                self._rs_ack_checked = now
                self._rs_confirm_acked()
        elif not self._rs_warned and policy.confirm == "answer" and (
            journal.overflowed or journal.size > max(1 << 20, policy.journal_limit // 4)
        ):
            self._rs_warned = True
            log.warning(
                "%s: %d bytes written without any answer; if the peer never answers "
                "(telemetry, log shipping) use RetryPolicy(confirm=\"tcp-ack\") so the journal "
                "does not fill up and replay megabytes of duplicates", self._rs_name(),
                journal.size if not journal.overflowed else policy.journal_limit)

    def _rs_confirm_acked(self) -> None:
        acked = self._rs_tcp_acked()
        if acked is not None:
            self._rs_journal.confirm_acked(acked)

    def _rs_tcp_info(self, need: int) -> bytes | None:
        """Linux ``TCP_INFO`` of the current connection, if it has at least ``need`` bytes."""
        if _TCP_INFO is None or self.family not in _INET or not self._sock:
            return None
        try:
            buf = self._sock.getsockopt(_std.IPPROTO_TCP, _TCP_INFO, 256)
        except OSError:
            return None
        return buf if len(buf) >= need else None

    def _rs_tcp_acked(self) -> int | None:
        """Data bytes of this connection that the peer's TCP acknowledged (Linux TCP_INFO)."""
        if self._rs_tls:
            return None
        buf = self._rs_tcp_info(_TCPI_BYTES_ACKED + 8)
        if buf is None:
            return None
        acked = struct.unpack_from("Q", buf, _TCPI_BYTES_ACKED)[0]
        return max(0, acked - 1)  # the SYN counts as one acknowledged byte

    def _rs_peer_not_reading(self) -> bool:
        """After a write timeout: is the peer alive and merely not reading?

        A Unix stream peer cannot vanish silently (its end gives EPIPE or ECONNRESET), so a
        timeout means it is not reading. Over TCP, Linux's ``tcpi_unacked == 0`` says every
        segment sent was acknowledged: the peer's window is closed, not the link dead (a dead
        link leaves segments unacknowledged). Elsewhere unknown: False (treated as a drop).
        """
        if self.family == getattr(_std, "AF_UNIX", None):
            return True
        # The last segment's ACK may still be on its way when the timeout fires, or held back
        # by the peer's delayed-ACK timer (40-200 ms on Linux): allow two round trips plus
        # that before calling the link dead.
        limit = None
        while True:
            buf = self._rs_tcp_info(_TCPI_RTT + 4)
            if buf is None:
                return False
            if struct.unpack_from("I", buf, _TCPI_UNACKED)[0] == 0:
                return True
            now = time.monotonic()
            if limit is None:
                rtt = struct.unpack_from("I", buf, _TCPI_RTT)[0] / 1e6
                limit = now + min(1.0, 2 * rtt + 0.25)
            if now >= limit:
                return False
            gevent.sleep(0.002)

    # -- recovery -----------------------------------------------------------------------------

    def _rs_recover(self, exc: Exception, phase: str, gen: int, budget: _Budget | None,
                    writing: bool) -> _Budget | None:
        """Called with the exception of a guarded operation. Returns when the operation should
        be retried (on a new connection); raises when the error is the caller's to see."""
        if self._rs_gen != gen:
            return budget  # another greenlet already reconnected: retry there
        lock = self._rs_lock
        assert lock is not None
        with lock:
            if self._rs_gen != gen:
                return budget
            if self._closed or self._rs_target is None:
                raise exc
            policy = self._rs_policy
            assert policy is not None
            info = classify(exc, phase=phase)
            if info is None:
                raise exc  # not a connection problem: unchanged, connection kept
            why = self._rs_refusal(info, phase, writing)
            if why is not None:
                if isinstance(exc, UnansweredEOFError):
                    exc._rs_refused = True  # type: ignore[attr-defined]
                # A surfaced timeout leaves the connection as a plain socket would: the peer
                # is alive, and the caller decides what to do with the stream.
                discard = info.category is not ErrorCategory.TIMEOUT
                self._rs_surface(exc, info, why, discard)
                raise exc
            _stats.bump("disconnects")
            _stats.bump(f"disconnects.{info.category}")
            log.info("%s: %s during %s (%s); reconnecting, %d unconfirmed record(s)",
                     self._rs_name(), info.errno_name or type(exc).__name__, phase,
                     info.category, len(self._rs_journal))
            self._rs_hook(policy.on_disconnect, info)
            if budget is None:
                budget = _Budget(policy, exc)
            elif budget.original is None:
                budget.original = exc
            budget.last = exc
            if info.category is ErrorCategory.TLS_TRANSPORT:
                budget.tls_transport += 1
            self._rs_reconnect(budget, replay=True)
            return budget

    def _rs_refusal(self, info: ErrorInfo, phase: str, writing: bool) -> str | None:
        """Why this drop must be surfaced rather than recovered (None: recover it)."""
        policy = self._rs_policy
        assert policy is not None
        journal = self._rs_journal
        if info.category is ErrorCategory.TIMEOUT:
            if phase == "read" and not policy.retry_read_timeouts:
                return ("read timeout surfaced: the peer is probably alive and busy "
                        "(RetryPolicy(retry_read_timeouts=True) retries it)")
            if phase == "write" and self._rs_peer_not_reading():
                return ("write timeout surfaced: the peer is alive (its TCP acknowledged "
                        "everything sent) but is not reading, so a new connection would not "
                        "help")
        elif not info.retryable:
            return f"{info.category} is not retried: {_reason(info.category)}"
        if phase == "read" and self._rs_read_since_write:
            return ("the connection dropped mid-answer: part of the answer was already "
                    "returned, and re-sending the request would hand back a second copy")
        if self._rs_session and policy.on_reconnect is None:
            return ("the server spoke first (a banner, as in SMTP, FTP, POP3, IMAP) and a "
                    "session was under way: a new connection starts a new session, where "
                    "re-sent commands would be read out of context (an on_reconnect hook that "
                    "restores the session lets resilientsock recover it)")
        pending = journal.pending or writing
        if not pending:
            return None
        if journal.overflowed:
            return (f"more than journal_limit={policy.journal_limit} bytes were unconfirmed, "
                    "so replay was no longer promised")
        if policy.replay == "none":
            return "replay='none': unconfirmed writes are never re-sent"
        if policy.replay == "safe":
            count = len(journal) + (1 if writing else 0)
            if not (self._rs_conn_answered and count <= 1
                    and info.category is ErrorCategory.CONNECTION_LOST):
                return ("replay='safe': the unanswered writes may have reached a live peer "
                        "(only the first write on an idle, reused connection is re-sent)")
        return None

    def _rs_surface(self, exc: BaseException, info: ErrorInfo, why: str, discard: bool) -> None:
        self._rs_journal.clear()
        _stats.bump("surfaced")
        _stats.bump(f"surfaced.{info.category}")
        _add_note(exc, f"resilientsock: not recovered: {why}")
        log.info("%s: surfacing %s: %s", self._rs_name(), type(exc).__name__, why)
        if discard:
            self._rs_discard(self._rs_gen)

    def _rs_discard(self, gen: int) -> None:
        """Close the connection but keep the socket: the next call reconnects."""
        if self._rs_gen != gen or self._rs_target is None or self._closed:
            return
        self._rs_journal.clear()
        self._rs_new_session()
        if self._sock:
            self._detach_socket("closed")
        self._rs_gen += 1
        self._rs_state = BROKEN

    def _rs_ensure_connected(self, budget: _Budget | None) -> _Budget | None:
        """Lazy reconnect of a broken socket (after a surfaced error)."""
        if self._rs_state == CLOSED or self._closed:
            raise OSError(errno.EBADF, "Bad file descriptor")
        lock = self._rs_lock
        assert lock is not None
        with lock:
            if self._rs_state == CONNECTED:
                return budget
            if budget is None:
                budget = _Budget(self._rs_policy, None)  # type: ignore[arg-type]
            self._rs_reconnect(budget, replay=True)
        return budget

    def _rs_reconnect(self, budget: _Budget, replay: bool) -> None:
        """Reconnect under the policy until it works or the budget is spent (then raise)."""
        self._rs_recovering = True
        try:
            self._rs_reconnect_loop(budget, replay)
        finally:
            self._rs_recovering = False

    def _rs_reconnect_loop(self, budget: _Budget, replay: bool) -> None:
        policy = budget.policy
        while True:
            if self._closed:
                raise budget.last or OSError(errno.EBADF, "socket closed during reconnect")
            if budget.exhausted() or budget.tls_transport > _TLS_TRANSPORT_CAP:
                self._rs_give_up(budget)
            delay = max(policy.backoff(budget.attempts), _bucket.delay(policy.reconnect_rate))
            if delay > 0:
                remaining = budget.remaining()
                if delay >= remaining:
                    gevent.sleep(max(0.0, remaining))
                    self._rs_give_up(budget)
                gevent.sleep(delay)
            budget.attempts += 1
            _stats.bump("reconnect_attempts")
            timeout = min(policy.connect_timeout or math.inf, budget.remaining())
            try:
                self._rs_open_connection(timeout)
                if self._rs_banner_bytes and self._rs_wrote:
                    self._rs_skip_banner(timeout)
                self._rs_state = CONNECTED
                self._rs_hook(policy.on_reconnect, budget.attempts)
                if replay:
                    self._rs_replay()
            except Exception as exc:
                budget.last = exc
                info = classify(exc, phase="connect")
                _count_failed_attempt(info)
                log.info("%s: reconnect attempt %d failed: %s", self._rs_name(),
                         budget.attempts, exc)
                if info is not None and info.category is ErrorCategory.TLS_TRANSPORT:
                    budget.tls_transport += 1
                elif info is None or not info.retryable:
                    self._rs_give_up(budget, permanent=True)
                continue
            self.reconnects += 1
            _stats.bump("reconnects")
            log.info("%s: reconnected (attempt %d)", self._rs_name(), budget.attempts)
            return

    def _rs_give_up(self, budget: _Budget, permanent: bool = False) -> None:
        exc = budget.original or budget.last
        if exc is None:
            exc = ConnectionError("resilientsock: could not reconnect")
        text = budget.describe()
        if permanent:
            text += "; that error is not retried"
        _add_note(exc, f"resilientsock: {text}")
        _stats.bump("gave_up")
        _stats.bump("surfaced")
        info = classify(exc)
        if info is not None:
            _stats.bump(f"surfaced.{info.category}")
        log.warning("%s: %s", self._rs_name(), text)
        self._rs_discard(self._rs_gen)
        self._rs_journal.clear()
        if budget.last is not None and budget.last is not exc:
            raise exc from budget.last
        raise exc

    def _rs_skip_banner(self, timeout: float | None) -> None:
        """Read the new connection's banner (as many lines as the first one had; as many bytes
        if it had no line end) and drop it: the application already read one, and it is not
        the answer to anything the replay is about to send."""
        want_lines, want_bytes = self._rs_banner_lines, self._rs_banner_bytes
        got = b""
        reading = self._rs_reading
        self._rs_reading = True  # raw reads: not journal bookkeeping
        try:
            with gevent.Timeout(timeout, TimeoutError("timed out reading the server's banner")):
                while (got.count(b"\n") < want_lines) if want_lines else (len(got) < want_bytes):
                    chunk = self.recv(4096)
                    if not chunk:
                        raise UnansweredEOFError("the server closed before its banner")
                    got += chunk
        finally:
            self._rs_reading = reading
        log.debug("%s: skipped the new connection's banner (%d bytes)", self._rs_name(), len(got))

    def _rs_hook(self, hook: Any, arg: Any) -> None:
        if hook is None:
            return
        reading, writing = self._rs_reading, self._rs_writing
        self._rs_reading = self._rs_writing = True  # hook I/O is raw: not journaled
        try:
            hook(self, arg)
        finally:
            self._rs_reading, self._rs_writing = reading, writing

    def _rs_replay(self) -> None:
        journal = self._rs_journal
        records = journal.records()
        if records:
            reading, writing = self._rs_reading, self._rs_writing
            self._rs_reading = self._rs_writing = True
            try:
                for record in records:
                    self._rs_raw_sendall(self, record)
            finally:
                self._rs_reading, self._rs_writing = reading, writing
            _stats.bump("replayed_records", len(records))
            _stats.bump("replayed_bytes", sum(len(r) for r in records))
            log.info("%s: replayed %d record(s), %d bytes", self._rs_name(), len(records),
                     sum(len(r) for r in records))
        journal.restart_stream()

    # -- opening a new connection -------------------------------------------------------------

    def _rs_open_connection(self, timeout: float | None) -> None:
        """One attempt: resolve the name again, connect to each address in turn, swap it in."""
        if self._rs_policy and self._rs_policy.confirm == "tcp-ack" and self._sock:
            self._rs_confirm_acked()  # what the old connection's peer did get is not re-sent
        raw = self._rs_connect_raw(timeout)
        self._rs_swap(raw)
        self._rs_after_swap(timeout)

    def _rs_after_swap(self, timeout: float | None) -> None:
        """TLS redoes its handshake here."""

    def _rs_candidates(self) -> list[tuple[int, int, Any]]:
        target = self._rs_target
        if self.family == getattr(_std, "AF_UNIX", None) and not isinstance(target, tuple):
            return [(_std.AF_UNIX, 0, target)]
        host, port = target[0], target[1]
        family = 0 if self._rs_any_family else int(self.family)
        infos = _getaddrinfo(host, port, family, _std.SOCK_STREAM)
        out = []
        for af, _type, proto, _name, sockaddr in infos:
            if len(target) == 4 and af == getattr(_std, "AF_INET6", None):
                sockaddr = (sockaddr[0], sockaddr[1], target[2], target[3] or sockaddr[3])
            out.append((af, proto, sockaddr))
        return out

    def _rs_connect_raw(self, timeout: float | None) -> Any:
        end = None if timeout is None or math.isinf(timeout) else time.monotonic() + timeout
        policy = self._rs_policy
        assert policy is not None
        last: BaseException | None = None
        errors: list[Exception] = []  # one per address tried, for all_errors=True
        for af, proto, sockaddr in self._rs_candidates():
            raw = self._gevent_sock_class(af, _std.SOCK_STREAM, proto, None)
            try:
                raw.setblocking(False)
                for level, opt, value in _dead_peer_options(af, policy.dead_peer_timeout):
                    self._rs_try_setsockopt(raw, level, opt, value)
                for (level, opt), value in self.__dict__.get("_rs_opts", {}).items():
                    self._rs_try_setsockopt(raw, level, opt, value)
                if self._rs_source is not None:
                    raw.bind(self._rs_source)
                err = raw.connect_ex(sockaddr)
                if err in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY, errno.EAGAIN):
                    left = None if end is None else max(0.0, end - time.monotonic())
                    _wait_write(raw.fileno(), timeout=left,
                                timeout_exc=TimeoutError("timed out"))
                    err = raw.getsockopt(_std.SOL_SOCKET, _std.SO_ERROR)
                if err and err != errno.EISCONN:
                    raise OSError(err, _strerror(err))
                return raw
            except BaseException as exc:
                raw.close()
                if not isinstance(exc, Exception):
                    raise
                last = exc
                errors.append(exc)
        if last is None:
            raise OSError(errno.EADDRNOTAVAIL, f"no address for {self._rs_target!r}")
        last._rs_all_errors = errors  # type: ignore[attr-defined]
        raise last

    @staticmethod
    def _rs_try_setsockopt(raw: Any, level: int, opt: int, value: Any) -> None:
        try:
            raw.setsockopt(level, opt, value)
        except OSError as exc:  # e.g. TCP options on a platform that has the name only
            log.debug("setsockopt(%s, %s, %r) failed: %s", level, opt, value, exc)

    def _rs_swap(self, raw: Any) -> None:
        if self._sock:
            self._drop_events_and_close(closefd=True)  # wakes greenlets blocked on it
        self._sock = raw
        io = self.hub.loop.io
        fd = raw.fileno()
        self._read_event = io(fd, 1)
        self._write_event = io(fd, 2)
        self._rs_gen += 1
        self._rs_read_since_write = 0
        self._rs_conn_answered = False
        if not self._rs_wrote:
            self._rs_new_session()  # the application has yet to read this connection's banner

    # -- recorded options ---------------------------------------------------------------------

    def setsockopt(self, *args: Any) -> None:
        """Set an option; client sockets re-apply it to every new connection."""
        _GeventSocket.setsockopt(self, *args)
        if len(args) == 3:
            self.__dict__.setdefault("_rs_opts", {})[(args[0], args[1])] = args[2]

    def bind(self, address: Any) -> None:
        _GeventSocket.bind(self, address)
        self._rs_source = address

    def shutdown(self, how: int) -> None:
        """Shut down a direction. The caller is ending the stream, so protection stops here
        (EPIPE after our own SHUT_WR is the caller's doing, not a drop)."""
        if self._rs_target is not None:
            self._rs_target = None
            self._rs_journal.clear()
        self._rs_raw_shutdown(self, how)

    def close(self) -> None:
        self._rs_state = CLOSED
        _GeventSocket.close(self)

    def accept(self) -> tuple[ResilientSocket, Any]:
        """Accepted sockets behave exactly as before (never resilient), but are instances of
        this class so ``isinstance(conn, socket.socket)`` holds under ``patch()``."""
        while True:
            try:
                fd, addr = self._accept()
                break
            except BlockingIOError:
                if self.timeout == 0.0:
                    raise
            self._wait(self._read_event)
        sock = ResilientSocket(self.family, self.type, self.proto, fileno=fd)
        if _std.getdefaulttimeout() is None and self.gettimeout():
            sock.setblocking(True)
        return sock, addr

    def _rs_name(self) -> str:
        return f"resilient socket to {self._rs_target!r}"

    def __repr__(self) -> str:
        text = _GeventSocket.__repr__(self)
        if self._rs_target is not None:
            text = text[:-1] + f", resilient={self._rs_state}>"
        return text


def _sendmsg_raw(sock: ResilientSocket, data: bytes, flags: int) -> int:
    return _GeventSocket.sendmsg(sock, [data], (), flags)  # type: ignore[no-any-return]


def _count_failed_attempt(info: ErrorInfo | None) -> None:
    if info is None:
        _stats.bump("attempt_failed.unclassified")
        return
    _stats.bump(f"attempt_failed.{info.category}")
    if info.errno_name:
        _stats.bump(f"attempt_failed.{info.errno_name}")


def _strerror(err: int) -> str:
    try:
        return os.strerror(err)
    except ValueError:  # pragma: no cover
        return f"error {err}"


def _reason(category: ErrorCategory) -> str:
    return REASONS[category]


_GLOBAL_DEFAULT = getattr(_std, "_GLOBAL_DEFAULT_TIMEOUT", object())


def create_connection(address: Any, timeout: Any = _GLOBAL_DEFAULT, source_address: Any = None,
                      *, all_errors: bool = False) -> ResilientSocket:
    """Drop-in for ``socket.create_connection`` returning a resilient socket.

    Same arguments; the name in ``address`` is re-resolved at every reconnect. On failure
    (after the policy's retries) the last error is raised with a note saying what was tried;
    with ``all_errors=True`` on Python 3.11+, as the stdlib does, an ``ExceptionGroup`` of the
    last attempt's errors (one per address) carrying the same note.
    """
    if timeout is _GLOBAL_DEFAULT:
        timeout = _std.getdefaulttimeout()
    try:
        return ResilientSocket._connect_new(address, None, timeout=timeout,
                                            source_address=source_address)
    except OSError as exc:
        if not all_errors or sys.version_info < (3, 11) or isinstance(exc, _std.gaierror):
            raise
        errors = getattr(exc, "_rs_all_errors", None) or [exc]
        group = ExceptionGroup(  # type: ignore[name-defined]  # noqa: F821 - 3.11+
            "create_connection failed", errors)
        for note in getattr(exc, "__notes__", ()):
            group.add_note(note)
        raise group from None

