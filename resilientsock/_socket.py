"""ResilientSocket: guarded I/O on top of gevent's socket, obeying the recovery machine.

Rules of this module (docs/design.md §5-§7; the decisions themselves live in ``_machine.py``):

1. Subclass, don't proxy: ``ResilientSocket`` *is* a gevent socket, so ``with``, ``makefile``
   and C-level consumers see a real socket.
2. Two classes per kind of socket. ``ResilientSocket`` (what ``socket.socket`` is under
   ``patch()``) has gevent's own I/O methods: listening, accepted, UDP, raw, ``fromfd`` and
   non-blocking sockets pay nothing, not even a Python frame (design.md §6, §12). A client stream
   socket that this process connects in blocking or timeout mode becomes an instance of its
   class's guarded twin (``_guarded_twin``; its ``__class__`` is switched: same layout, so
   this is safe), whose I/O methods make the raw call first and do the bookkeeping after it.
   Protection ends (the class switched back) at ``shutdown()``, ``close()``, ``detach()``,
   and in a child process after ``fork()``. While a protected socket is non-blocking
   (``settimeout(0)`` for a poll) nothing is recovered — its caller owns the loop — but the
   bookkeeping goes on, so protection resumes with the timeout.
3. One greenlet recovers (``Machine.owner``); its hook, restore, banner skip and replay I/O go
   straight to the connection. Another greenlet that arrives meanwhile waits until the new
   connection is published (after the replay), so nothing it writes overtakes a replayed
   record and nothing the recovery reads is handed to it (review r01).
4. Errors are judged outside the ``except`` block that caught them, so nothing raised while
   recovering carries the original drop as its ``__context__`` (review r02); reconnect errors
   are also classified with ``context=False``.
5. Every part of a recovery — connect attempts, TLS handshake, restore, banner skip,
   ``on_reconnect``, replay, the answer-resume read — runs under the episode's deadline and
   the application's own socket timeout (docs/design.md §4).
6. ``close()`` wins over a recovery in progress: it closes the connection being opened, wakes
   the recovering greenlet, and nothing is replayed after it (review r05).
7. Reconnecting swaps the wrapped ``_sock`` (so ``fileno()`` changes); the old connection is
   closed first (its io watchers dropped, waking any greenlet blocked on it), so a fixed
   source port can be bound again (review r22).
8. The socket asks and performs; it decides nothing about a drop. An error goes to
   ``Machine.error``/``judge``, an EOF to ``Machine.eof_seen``/``eof_judge``; the facts they
   ask for (TCP_INFO, a peek, whether a reader waits) are found here, and a recovery's steps
   (``Machine.recover``: wait, connect, handshake, setup, banner, hook, replay, resume, give
   up) are performed by ``_rs_perform``, which sends each result back.
"""

from __future__ import annotations

import errno
import logging
import os
import socket as _std
import struct
import sys
import time
import weakref
from dataclasses import replace
from typing import TYPE_CHECKING, Any, overload

import gevent

if TYPE_CHECKING:  # gevent ships no types: a type checker sees the stdlib socket it mirrors
    from socket import create_connection as _gevent_create_connection
    from socket import socket as _GeventSocket
else:
    from gevent._socket3 import socket as _GeventSocket
    from gevent.socket import create_connection as _gevent_create_connection
from gevent._socketcommon import timeout_default as _timeout_default

from . import _libraries, _stats
from ._answer import (
    _MSG_PEEK,
    RECV,
    RECV_INTO,
    RECVFROM,
    RECVFROM_INTO,
    RECVMSG,
    RECVMSG_INTO,
    _AnswerChanged,
    _eof_result,
    _extract,
    _peeking,
    _requested,
    _SetupMismatch,
)
from ._answer import (
    TLS_READ as TLS_READ,  # noqa: F401 - _tls.py imports it from here
)
from ._connect import INET, Attempt, candidates, dead_peer_options, open_connection, try_setsockopt
from ._errors import ErrorInfo, classify
from ._machine import (
    BROKEN,
    CLOSED,
    CONNECTED,
    PASS_EOF,
    RECOVERING,
    Abandon,
    Action,
    AskPeer,
    Connect,
    Connected,
    CountAcked,
    Done,
    Drop,
    Failed,
    FindFacts,
    GiveUp,
    HandOver,
    Handshake,
    Machine,
    PassEOF,
    Raise,
    Recover,
    Recovery,
    Replay,
    Restore,
    Resume,
    Retry,
    RunHook,
    SkipBanner,
    Stop,
    Surface,
    TokenBucket,
    Verdict,
    Wait,
    banner_refusal,
)
from ._policy import RetryPolicy
from ._stats import SocketStats

__all__ = ["ResilientSocket", "create_connection", "default_policy", "set_default_policy"]

log = logging.getLogger("resilientsock")

_PROTECTED_FAMILIES = tuple(
    f for f in (getattr(_std, n, None) for n in ("AF_INET", "AF_INET6", "AF_UNIX")) if f is not None
)
_AF_UNIX = getattr(_std, "AF_UNIX", None)
_ACK_CHECK_INTERVAL = 0.05  # seconds between TCP_INFO queries under confirm="tcp-ack"
_TCP_INFO = getattr(_std, "TCP_INFO", None)
_TCPI_BYTES_ACKED = 120  # offset of tcpi_bytes_acked (u64) in Linux struct tcp_info
_TCPI_UNACKED = 24  # offset of tcpi_unacked (u32): segments sent and not yet acknowledged
_TCP_STATE_CLOSE = 7  # tcpi_state (the first byte of struct tcp_info) after a reset
_TCP_STATE_CLOSE_WAIT = 8  # tcpi_state once the peer's FIN arrived (and ours is not sent)
_TCPI_RTT = 68  # offset of tcpi_rtt (u32, microseconds): smoothed round-trip time
_PEEK = _MSG_PEEK | int(getattr(_std, "MSG_DONTWAIT", 0))  # ints, as _answer._MSG_PEEK
_CHUNK = 1 << 20
_LINGER_RST = struct.pack("ii", 1, 0)  # sendall's chunk (gevent uses max(SO_SNDBUF, 1 MiB))


_clock = time.monotonic
_bucket = TokenBucket()
_default_policy: RetryPolicy | None = None
_live: weakref.WeakSet[Any] = weakref.WeakSet()  # protected sockets (for fork)


def default_policy() -> RetryPolicy:
    """The policy sockets get when none is given: the one ``patch()`` set, else the defaults
    with the ``RESILIENTSOCK_*`` variables applied (read once; docs/design.md §2: every knob
    is also an environment variable, whichever way in). A bad variable is a ValueError
    naming it, as from ``patch()``."""
    global _default_policy
    if _default_policy is None:
        _default_policy = RetryPolicy.from_env()
    return _default_policy


def set_default_policy(policy: RetryPolicy | None) -> None:
    global _default_policy
    _default_policy = policy


def add_note(exc: BaseException, note: str) -> None:
    """PEP 678 note; Python 3.10 has no ``add_note``, so set ``__notes__`` directly."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:  # pragma: no cover - 3.10
        notes = list(getattr(exc, "__notes__", []))
        notes.append(note)
        exc.__notes__ = notes  # type: ignore[attr-defined]


def _emit(event: str, level: int, message: str, *args: Any, **fields: Any) -> None:
    """One event through the ``resilientsock`` logger (and telemetry, where available)."""
    emit = _events_emit()
    if emit is not None:
        try:
            emit(event, level, message % args if args else message, **fields)
            return
        except Exception:  # pragma: no cover - telemetry must never break I/O
            pass
    if log.isEnabledFor(level):
        log.log(level, message, *args)


_EMIT: list[Any] = []


def _events_emit() -> Any:
    if not _EMIT:
        try:
            from ._events import emit as found
        except Exception:  # pragma: no cover - an older tree without telemetry
            found = None  # type: ignore[assignment]
        _EMIT.append(found)
    return _EMIT[0]


def _advice(field: str, value: str) -> str:
    try:
        from ._events import advice

        return str(advice(field, value))
    except Exception:
        return f"RetryPolicy({field}={value!r})"


def _after_fork_in_child() -> None:
    """A child never reconnects a connection its parent owns (docs/design.md §6)."""
    for sock in list(_live):
        try:
            sock._rs_unprotect()
        except Exception:  # pragma: no cover
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _AttemptTimeout(Exception):
    """The part of an attempt after the connect ran out of time (internal)."""

    def __str__(self) -> str:
        return "timed out restoring the connection (TLS handshake, hook or replay)"


_GEVENT_SOCKET: Any = _GeventSocket  # for isinstance where self is Any (connect)


class ResilientSocket(_GeventSocket):
    """A gevent socket that survives connection drops (see the module docstring).

    Guarantees after an error (what the caller may rely on):

    * A call that returns normally did its work, possibly on a new connection; unconfirmed
      writes were re-sent there first (at-least-once: a request whose answer was lost in
      flight arrives twice).
    * A call that raises raised the original exception type (``ConnectionResetError`` stays
      ``ConnectionResetError``) with a note saying what was tried. If the error discarded the
      connection, the journal is empty: nothing written before it will be re-sent by
      resilientsock, and the next call reconnects first. If the connection was kept (the
      application's own read timeout), the journal is kept too: a later drop still re-sends
      the unanswered request.
    * ``fileno()`` changes across a reconnect.
    * A socket whose first connect gave up can be connected again (``connect_ex`` loops work).
    """

    # Class-level defaults: gevent's __getattr__ forwards unknown names to the raw socket, and
    # SSLSocket.__init__ may call our methods before _rs_init ran.
    _rs_m: Machine | None = None
    _rs_target: Any = None
    _rs_policy: RetryPolicy | None = None
    _rs_source: Any = None
    _rs_any_family = False
    _rs_tls = False
    _sock: Any  # set by gevent's socket (a slot); declared for type checkers
    if TYPE_CHECKING:  # the rest of gevent's socket internals used here (gevent is untyped)
        _closed: bool
        _io_refs: int
        _read_event: Any
        _write_event: Any
        hub: Any
        _gevent_sock_class: Any
        def _accept(self) -> tuple[int, Any]: ...
        def _wait(self, watcher: Any, timeout_exc: Any = None) -> None: ...
        def _detach_socket(self, reason: str) -> None: ...
        def _drop_events_and_close(self, closefd: bool = True) -> None: ...
    _rs_raw_connect = staticmethod(_GeventSocket.connect)
    _rs_raw_connect_ex = staticmethod(_GeventSocket.connect_ex)

    def __init__(self, family: int = -1, type: int = -1, proto: int = -1,
                 fileno: int | None = None, *, policy: RetryPolicy | None = None) -> None:
        _GeventSocket.__init__(self, family, type, proto, fileno)
        self._rs_init(policy)

    def _rs_init(self, policy: RetryPolicy | None) -> None:
        if policy is not None and not isinstance(policy, RetryPolicy):
            raise TypeError(f"policy must be a RetryPolicy, got {policy!r}")
        self._rs_policy = policy
        self._rs_target = None
        self._rs_m = None
        self._rs_any_family = False
        self._rs_source = None
        self.__dict__.setdefault("_rs_opts", {})
        self.__dict__.setdefault("reconnects", 0)
        self._rs_pending: list[Any] = []  # (raw, watcher) of a connect under way
        self._rs_done: Any = None  # an Event set when a recovery ends
        self._rs_warned = False
        self._rs_ack_checked = 0.0

    # -- public extras ------------------------------------------------------------------------

    @property
    def policy(self) -> RetryPolicy:
        """The policy in force for this socket."""
        return self._rs_policy or default_policy()

    @property
    def resilient(self) -> bool:
        """True while drops on this socket are recovered (a connected client socket)."""
        m = self._rs_m
        return m is not None and m.state is not CLOSED

    def confirm(self) -> int:
        """Declare every record written so far delivered: it will not be re-sent after a drop.
        Returns how many records were confirmed."""
        m = self._rs_m
        return 0 if m is None else m.journal.confirm_all()

    @property
    def unconfirmed_bytes(self) -> int:
        """Bytes written and not yet confirmed (what a drop now would re-send)."""
        m = self._rs_m
        return 0 if m is None else m.journal.size

    @property
    def dialect(self) -> str | None:
        """The protocol recognised on this connection (docs/design.md §5a), or None."""
        m = self._rs_m
        return None if m is None or m.dialect is None else str(m.dialect.name)

    def stats(self) -> SocketStats:
        """What this socket has been through (a snapshot): connections opened, drops,
        reconnects, replays, errors shown to the application, answers resumed or changed."""
        counts = self.__dict__.get("_rs_counts", {})
        return SocketStats(
            connects=counts.get("connects", 0) + counts.get("internal_connects", 0)
            + counts.get("reconnects", 0),
            reconnects=counts.get("reconnects", 0), drops=counts.get("disconnects", 0),
            replayed_records=counts.get("replayed_records", 0),
            replayed_bytes=counts.get("replayed_bytes", 0), surfaced=counts.get("surfaced", 0),
            answers_resumed=counts.get("answers_resumed", 0),
            answers_changed=counts.get("answers_changed", 0),
            internal=bool(self.__dict__.get("_rs_internal_peer", False)),
            peer=self._rs_target if self._rs_target is not None
            else self.__dict__.get("_rs_last_target"))

    def _rs_bump(self, name: str, amount: int = 1) -> None:
        """A process-wide counter and this socket's own."""
        _stats.bump(name, amount)
        counts = self.__dict__.setdefault("_rs_counts", {})
        counts[name] = counts.get(name, 0) + amount

    # -- connecting ---------------------------------------------------------------------------

    @classmethod
    def _connect_new(cls, address: Any, policy: RetryPolicy | None = None, *,
                     timeout: float | None = None, source_address: Any = None,
                     holder: list[ResilientSocket] | None = None) -> ResilientSocket:
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
        if holder is not None:
            holder.append(sock)  # create_connection reads the per-address errors off it
        try:
            sock.settimeout(timeout)
            sock._rs_source = source_address
            sock._rs_first_connect(address, via_open=True)
        except BaseException:
            sock.close()
            raise
        return sock

    @overload
    def connect(self, address: Any, /) -> None: ...
    @overload
    def connect(self: object, policy: RetryPolicy | None = None, *,
                timeout: float | None = None,
                source_address: tuple[str, int] | None = None) -> ResilientSocket: ...
    def connect(self: Any, *args: Any, **kwargs: Any) -> Any:
        """``sock.connect(address)``: connect, resiliently for a client stream socket.

        Also ``ResilientSocket.connect(address, policy=None, *, timeout=None,
        source_address=None)`` called on the class: create and connect a resilient socket.
        A plain function (not a descriptor), so that reading ``socket.socket.connect`` from
        the class and writing it back leaves it working (design.md §7; pytest-socket does this).
        """
        if not isinstance(self, _GEVENT_SOCKET):  # called on the class: self is the address
            unknown = sorted(set(kwargs) - {"policy", "timeout", "source_address"})
            if unknown or len(args) > 1:
                # Named as the caller wrote it, not as _connect_new (a policy field given here,
                # ``deadline=1``, belongs in the RetryPolicy).
                what = (f"an unexpected keyword argument {unknown[0]!r}" if unknown
                        else f"{len(args) + 1} positional arguments (address, policy)")
                raise TypeError(f"ResilientSocket.connect() got {what}; it takes (address, "
                                "policy=None, *, timeout=None, source_address=None), and "
                                "policy fields go in RetryPolicy(...)")
            return ResilientSocket._connect_new(self, *args, **kwargs)
        if kwargs or len(args) != 1:
            raise TypeError("connect() takes exactly one argument (the address)")
        address = args[0]
        if not self._rs_can_protect():
            return type(self)._rs_raw_connect(self, address)
        self._rs_first_connect(address, via_open=False)
        return None

    def connect_ex(self, address: Any) -> int:
        if not self._rs_can_protect():
            return int(type(self)._rs_raw_connect_ex(self, address) or 0)
        try:
            self._rs_first_connect(address, via_open=False)
        except _std.gaierror:
            raise
        except TimeoutError as exc:
            return int(exc.errno) if exc.errno else errno.EAGAIN
        except OSError as exc:
            if exc.errno:
                return int(exc.errno)
            raise
        return 0

    def _rs_can_protect(self) -> bool:
        return (
            self._rs_m is None
            and self.timeout != 0.0
            and self.family in _PROTECTED_FAMILIES
            and self.type == _std.SOCK_STREAM
            and not getattr(self, "server_side", False)
            and not getattr(self, "_closed", False)
            and _libraries.one_shot_now() is None
        )

    def _rs_session_target(self, address: Any) -> bool:
        policy = self.policy
        if policy.session:
            return True
        try:
            from .session.targets import is_session_target, session_targets

            if not session_targets():
                return False
        except Exception:
            return False
        return bool(is_session_target(address))

    def _rs_first_connect(self, address: Any, via_open: bool) -> None:
        """The application's own connect: resilient under ``retry_connect``."""
        policy = self.policy
        self._rs_policy = policy
        if self.family in INET and isinstance(address, tuple) and self._rs_session_target(address):
            self._rs_open_session(address, policy)
            return
        self._rs_target = address
        self.__dict__.pop("_rs_in_place_failed", None)
        owner = _libraries.owner_now()  # set while a known library's connect runs
        if policy.retry_connect and _libraries.connect_retried_by_library(owner):
            # The client library has its own retry layer for connecting (redis-py's Retry,
            # urllib3's Retry): it gets a failed first connect at once, as without us, so
            # layered retries do not multiply into minutes (docs/design.md §9, docs/decisions.md).
            # Its established connections are still recovered.
            policy = policy.replace(retry_connect=False)
        m = Machine(policy, _clock)
        m.library = owner
        m.target = address
        m.fin_probing = _TCP_INFO is not None and self.family in INET and not self._rs_tls
        m.state = BROKEN  # not connected yet: the first connect is a recovery without a drop
        self.__dict__["_rs_m"] = m
        call_end = self._rs_call_end(None)
        try:
            if via_open:
                self._rs_recover(None, call_end, first=True)
            else:
                self._rs_recover(None, call_end, first=True, in_place=True)
        except BaseException:
            self._rs_unprotect(keep_sock=not via_open)
            raise
        self._rs_protect()
        _live.add(self)
        internal = self._rs_internal()
        self.__dict__["_rs_internal_peer"] = internal
        self._rs_bump("internal_connects" if internal else "connects")
        _emit("connect", logging.DEBUG, "%s: connected", self._rs_name(),
              peer=self._rs_target, internal=internal)

    def _rs_internal(self) -> bool:
        """A connection to one of this process's own listening sockets (a wake-up pair, a
        socketpair fallback): counted apart from connections to servers."""
        try:
            peer = self._sock.getpeername()
        except OSError:
            return False
        if not isinstance(peer, tuple) or len(peer) < 2:
            return False
        if tuple(peer[:2]) in _own_listeners:
            return True
        return peer[1] in _own_ports and str(peer[0]).startswith(("127.", "::1", "::ffff:127."))

    def _rs_open_session(self, address: Any, policy: RetryPolicy) -> None:
        """Session mode (docs/design.md §11): the byte stream rides a session through a relay, which
        does the recovery; this socket itself passes through."""
        from .session.client import open_session

        stream = open_session(address, timeout=self.timeout, policy=policy)
        session = stream.__dict__.get("_rs_direct")  # before detach() turns it off
        fd = stream.detach()
        raw = self._gevent_sock_class(stream.family, _std.SOCK_STREAM, 0, fd)
        self._rs_install(raw)
        if session is not None:
            # This socket's own writes go onto the session's link (no trip through the pair).
            from .session.client import set_direct

            set_direct(self, session)
            self.__class__ = _session_twin(type(self))
        self._rs_bump("connects")

    # -- protection on and off ----------------------------------------------------------------

    def _rs_protect(self) -> None:
        cls = type(self)
        if not cls.__dict__.get("_rs_is_guarded"):
            self.__class__ = _guarded_twin(cls)

    @classmethod
    def _rs_guard_methods(cls) -> dict[str, Any]:
        """The guarded I/O methods of this class's twin (TLS has its own)."""
        return {**_guarded_methods(cls.recv, cls.recv_into, cls.send), **_plain_extra_methods()}

    def _rs_unprotect(self, keep_sock: bool = True) -> None:
        """Protection off: this socket behaves as gevent's from now on."""
        m = self._rs_m
        if m is not None:
            m.journal.clear()
        self.__dict__["_rs_m"] = None
        if self._rs_target is not None:
            self.__dict__["_rs_last_target"] = self._rs_target
        self._rs_target = None
        _live.discard(self)
        cls = type(self)
        if cls.__dict__.get("_rs_is_guarded"):
            self.__class__ = cls.__mro__[1]
        if keep_sock and not self._sock and not self._closed:
            # A first connect that gave up: the socket stays usable, as a plain one would be
            # (a legacy ``while s.connect_ex(addr) != 0`` loop connects later, review r04).
            raw = self._gevent_sock_class(self.family, _std.SOCK_STREAM, 0, None)
            for (level, opt), value in self.__dict__.get("_rs_opts", {}).items():
                try_setsockopt(raw, level, opt, value)
            self._rs_install(raw)
            if self._rs_source is not None:
                try:
                    _GeventSocket.bind(self, self._rs_source)
                except OSError as exc:
                    log.debug("re-binding %r failed: %s", self._rs_source, exc)

    # -- recorded options and the end of the stream -------------------------------------------

    def setsockopt(self, *args: Any) -> None:
        """Set an option; client sockets re-apply it to every new connection."""
        _GeventSocket.setsockopt(self, *args)
        if len(args) == 3:
            self.__dict__.setdefault("_rs_opts", {})[(args[0], args[1])] = args[2]

    def bind(self, address: Any) -> None:
        _GeventSocket.bind(self, address)
        self._rs_source = address

    def listen(self, *args: Any) -> None:
        _GeventSocket.listen(self, *args)
        try:
            name = self.getsockname()
        except OSError:  # pragma: no cover
            return
        if isinstance(name, tuple) and len(name) >= 2:
            if name[0] in ("0.0.0.0", "::", ""):
                _own_ports.add(name[1])
            else:
                _own_listeners.add(tuple(name[:2]))


    def shutdown(self, how: int) -> None:
        """Shut down a direction. The caller is ending the stream, so protection stops here
        (EPIPE after our own SHUT_WR is the caller's doing, not a drop)."""
        if self._rs_m is not None:
            self._rs_unprotect()
        _GeventSocket.shutdown(self, how)
        if how != _std.SHUT_WR:
            self.__dict__["_rs_shut_rd"] = True

    # -- the connection's addresses ------------------------------------------------------------

    def getsockname(self) -> Any:
        """The local address. While another greenlet recovers the connection (the old one
        closed, the new one not in place yet) it is the last connection's, as a plain socket
        that met the drop still gives it; a first call then waits for the recovery. (stomp.py
        asks it in ``is_connected()`` from the application's thread while its reader
        recovers: the EBADF made it take the socket for closed, start a second reader on it,
        and the two closed it under the application's write: ``OSError: [Errno 9]``.)"""
        return self._rs_name_of(_GeventSocket.getsockname, "_rs_sockname")

    def getpeername(self) -> Any:
        """The peer's address; during another greenlet's recovery as ``getsockname``."""
        return self._rs_name_of(_GeventSocket.getpeername, "_rs_peername")

    def _rs_name_of(self, raw: Any, key: str) -> Any:
        try:
            name = raw(self)
        except OSError:
            m = self._rs_m
            if m is None or m.state is not RECOVERING or m.owner is gevent.getcurrent() \
                    or self._closed:
                raise
            name = self.__dict__.get(key)
            if name is None:
                self._rs_wait_recovery(m, None)
                return raw(self)
            return name
        self.__dict__[key] = name
        return name

    def close(self) -> None:
        m = self._rs_m
        if m is not None:
            m.move("close")
            for raw, watcher in list(self._rs_pending):
                try:
                    if watcher is not None:
                        self.hub.cancel_wait(watcher, _cancel_exc())
                    raw.close()
                except Exception:  # pragma: no cover
                    pass
            self._rs_pending.clear()
            done = self._rs_done
            if done is not None:
                done.set()
            _live.discard(self)
        _GeventSocket.close(self)

    def detach(self) -> int:
        if self._rs_m is not None:
            self._rs_unprotect()
        return int(_GeventSocket.detach(self))

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

    # -- the guarded I/O, slow paths ----------------------------------------------------------
    # The hot paths are in _guarded_methods() below; everything that is not the common case
    # (not connected, another greenlet recovering, an error, EOF) comes here.

    def _rs_call_end(self, t0: float | None) -> float | None:
        """When this call must return or raise (docs/design.md §4: the application's timeout bounds
        one call). With ``retry_read_timeouts=True`` the application opted in to reading its
        timeout as "the link may be dead": the timeout is then a liveness check per wait, and
        recovery runs under the policy's deadline (docs/decisions.md)."""
        timeout = self.timeout
        m = self._rs_m
        if timeout is None or (m is not None and m.policy.retry_read_timeouts):
            return None
        return (t0 if t0 is not None else _clock()) + timeout

    def _rs_read(self, raw: Any, args: tuple[Any, ...], kind: int, t0: float | None = None,
                 err: BaseException | None = None, gen: int = -1) -> Any:
        call_end = self._rs_call_end(t0)
        # Once this call has met an error, an EOF or a recovery (the hot path's first read is
        # behind it when t0 is given), a read again waits only what is left of the
        # application's timeout, not a fresh one (docs/design.md §4).
        again = t0 is not None
        while True:
            if err is None:
                m = self._rs_m
                if m is None:
                    return raw(self, *args)
                state = m.state
                if state is not CONNECTED:
                    if state is CLOSED or self._closed:
                        if not self._sock and self._io_refs > 0:
                            # Closed while a makefile() reader lives (http.client closes the
                            # connection of a will_close response and reads on), after the
                            # connection was let go: its end, as the plain fd would give.
                            return _eof_result(kind, args)
                        return raw(self, *args)  # what a closed socket raises (EBADF, ValueError)
                    if state is RECOVERING:
                        if m.owner is gevent.getcurrent():
                            return raw(self, *args)  # the hook's own I/O
                        self._rs_wait_recovery(m, call_end)
                        again = True
                        continue
                    # Broken (an error was surfaced and the connection let go): the read
                    # finds the connection's end, as a plain socket would after the error
                    # (docs/design.md §5). Only a server-first protocol whose connection was let go
                    # without a surfaced error (an interrupted write) reconnects here.
                    if not m.server_first or self.timeout == 0.0 or m.dead:
                        return _eof_result(kind, args)
                    self._rs_recover(None, call_end)
                    again = True
                    continue
                gen = m.gen
                mark = m.journal.seq
                try:
                    if again and call_end is not None:
                        result = _bounded(raw, self, args, call_end)
                    else:
                        result = raw(self, *args)
                except BaseException as caught:
                    err = caught
                else:
                    n, data = _extract(kind, args, result)
                    if n:
                        if not _peeking(kind, args):  # a peek's bytes are counted when read
                            m.read_data(data, mark)
                        return result
                    verdict = self._rs_on_eof(m, args, kind, gen, t0)
                    if verdict is None:
                        again = True
                        continue  # recovered: read again on the new connection
                    return result
            failure, err = err, None
            if self.__dict__.get("_rs_shut_rd") and _cancelled(failure):
                # Read side shut down, then closed, under a waiting reader (a reader thread
                # stopped with shutdown(SHUT_RDWR) and close()): the kernel gave a plain
                # reader its end at the shutdown; gevent's close() would throw cancel_wait_ex.
                return _eof_result(kind, args)
            self._rs_handle_error(failure, "read", gen, call_end, writing=False)
            again = True

    def _rs_read_eof(self, raw: Any, args: tuple[Any, ...], kind: int, result: Any,
                     t0: float | None, gen: int) -> Any:
        m = self._rs_m
        if m is None or self._rs_on_eof(m, args, kind, gen, t0) is not None:
            return result
        return self._rs_read(raw, args, kind, t0)

    def _rs_on_eof(self, m: Machine, args: tuple[Any, ...], kind: int, gen: int,
                   t0: float | None) -> Verdict | None:
        """EOF on a read: returns the verdict when the caller gets the EOF, None after a
        recovery, or when another greenlet recovers (read again). The machine decides
        (``eof_seen``, ``eof_judge``); this finds the facts and performs."""
        nbytes = _requested(kind, args)
        step = m.eof_seen(gen, nbytes, closed=self._closed, nonblocking=self.timeout == 0.0)
        if isinstance(step, AskPeer):
            alive = self._rs_peer_alive_after_eof(m, gen, self._rs_call_end(t0), step.idle,
                                                  step.wait, step.acked)
            step = m.eof_judge(gen, nbytes, step.others, alive)
        if isinstance(step, PassEOF):
            self._rs_pass_eof(step)
            return step.verdict
        if not isinstance(step, Recover):
            return None  # ReadAgain: the connection moved under this read
        self._rs_bump("disconnects")
        _stats.bump(f"disconnects.{step.category}")
        if step.cut:
            return self._rs_resume_cut(m, step, t0)
        try:
            self._rs_recover(step.error, self._rs_call_end(t0), resume=step.resume)
        except ConnectionError as exc:
            if exc is not step.error or not isinstance(exc.__cause__,
                                                       _SetupMismatch | _AnswerChanged):
                raise
            # A new connection cannot carry what this one had (its banner or setup answer
            # differs, or the answer line the reader had begun came back different): the
            # recovery is refused, not spent, so the EOF itself reaches the caller, as from
            # a plain socket (docs/decisions.md, "Unanswered EOF").
            setup = isinstance(exc.__cause__, _SetupMismatch)
            rule = "setup-differs" if setup else "answer-changed"
            return Verdict(PASS_EOF, rule, str(exc.__cause__))
        return None

    def _rs_pass_eof(self, step: PassEOF) -> None:
        verdict = step.verdict
        if step.report == "eof-repeat":
            _emit("surfaced", logging.INFO, "%s: EOF passed on: %s", self._rs_name(),
                  verdict.note, peer=self._rs_target, category="connection_lost")
        elif step.report == "cut" and step.warn and step.info is not None:
            self._rs_bump("surfaced")
            _stats.bump(f"surfaced.{step.info.category}")
            _emit("surfaced", logging.WARNING, "%s: EOF mid-answer passed on: %s",
                  self._rs_name(), verdict.note, peer=self._rs_target,
                  category=str(step.info.category), error_type="EOF")
        elif step.report == "cut":
            log.debug("%s: EOF mid-answer passed on: %s", self._rs_name(), verdict.note)
        elif step.report == "surfaced" and step.info is not None:
            category = step.info.category
            self._rs_bump("surfaced")
            _stats.bump(f"surfaced.{category}")
            _emit("surfaced", logging.WARNING if step.warn else logging.INFO,
                  "%s: unanswered EOF passed on: %s", self._rs_name(), verdict.note,
                  peer=self._rs_target, category=str(category), error_type="EOF")
        if step.discard and self._sock:
            self._detach_socket("closed")

    def _rs_resume_cut(self, m: Machine, step: Recover, t0: float | None) -> Verdict | None:
        """An EOF cut the answer in progress (§5b): resume it softly (``Machine.recover``'s
        ``soft``). None once resumed (read on); on any failure, an application's
        gevent.Timeout, or when the time is up, the caller gets the EOF, as a plain socket
        gave it, and the connection is let go (the next write reconnects)."""
        try:
            self._rs_recover(step.error, self._rs_call_end(t0), resume=step.resume, soft=True)
        except (Exception, gevent.Timeout) as failure:
            # A gevent.Timeout of the application's that fires while we wait: plain would
            # have returned this EOF at once, so the EOF it is (the connection is let go).
            if m.state is CLOSED or self._closed:
                raise
            _stats.bump("cuts_passed")
            _emit("surfaced", logging.INFO, "%s: EOF mid-answer passed on: the answer could "
                  "not be resumed (%s)", self._rs_name(), failure, peer=self._rs_target,
                  category="connection_lost", error_type="EOF")
            return Verdict(PASS_EOF, "cut", str(failure))
        return None

    def _rs_write(self, raw: Any, args: tuple[Any, ...], data: Any, partial: bool,
                  t0: float | None = None, err: BaseException | None = None,
                  gen: int = -1) -> Any:
        call_end = self._rs_call_end(t0)
        again = t0 is not None  # as in _rs_read: a write again gets what is left of the timeout
        while True:
            if err is None:
                m = self._rs_m
                if m is None:
                    return raw(self, *args)
                state = m.state
                if state is not CONNECTED:
                    if state is CLOSED or self._closed:
                        return raw(self, *args)
                    if state is RECOVERING:
                        if m.owner is gevent.getcurrent():
                            return raw(self, *args)  # the hook's own I/O: not journaled
                        self._rs_wait_recovery(m, call_end)
                        again = True
                        continue
                    if self.timeout == 0.0:
                        return raw(self, *args)  # non-blocking: no reconnect under it
                    self._rs_lazy_reconnect(m, call_end)
                    again = True
                    continue
                gen = m.gen
                m.writing += 1
                try:
                    if again and call_end is not None:
                        result = _bounded(raw, self, args, call_end)
                    else:
                        result = raw(self, *args)
                except BaseException as caught:
                    err = caught
                else:
                    n = result if partial else _nbytes(data)
                    if n:
                        m.wrote_data(data if type(data) is bytes and n >= len(data)
                                     else _sent(data, n))
                        self._rs_after_write(m)
                    return result
                finally:
                    m.writing -= 1
            failure, err = err, None
            self._rs_handle_error(failure, "write", gen, call_end, writing=True, data=data)
            again = True

    def _rs_lazy_reconnect(self, m: Machine, call_end: float | None) -> None:
        """A write on a broken socket reconnects, unless the machine says a plain dead socket
        would fail it (``Machine.lazy_note``): then it fails with EPIPE, as that one would."""
        note = m.lazy_note()
        if note is not None:
            exc = BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))
            add_note(exc, note)
            raise exc
        self._rs_recover(None, call_end)

    def _rs_after_write(self, m: Machine) -> None:
        policy = m.policy
        if m.tcp_ack:  # confirm="tcp-ack", or a dialect with requests that get no answer
            now = _clock()
            if now - self._rs_ack_checked > _ACK_CHECK_INTERVAL:
                self._rs_ack_checked = now
                if policy.confirm == "tcp-ack" or m.dialect.write_only():
                    self._rs_confirm_acked(m)
        elif not self._rs_warned and policy.confirm == "answer":
            journal = m.journal
            if journal.overflowed or journal.size > max(1 << 20, policy.journal_limit // 4):
                self._rs_warned = True
                log.warning(
                    "%s: %d bytes written without any answer; if the peer never answers "
                    "(telemetry, log shipping) use %s so the journal does not fill up and "
                    "replay megabytes of duplicates", self._rs_name(),
                    journal.size if not journal.overflowed else policy.journal_limit,
                    _advice("confirm", "tcp-ack"))

    # -- judging an error ---------------------------------------------------------------------

    def _rs_handle_error(self, exc: BaseException, phase: str, gen: int,
                         call_end: float | None, writing: bool, data: Any = None) -> None:
        """Returns when the call should be retried (on a new connection); raises when the
        error is the caller's to see. The machine decides (``error``, ``judge``); this finds
        the facts and performs."""
        m = self._rs_m
        if m is None:
            raise exc
        step = m.error(exc, phase, gen, writing, closed=self._closed,
                       nonblocking=self.timeout == 0.0, reader_waiting=self._rs_reader_waiting(),
                       data=data)
        if isinstance(step, FindFacts):
            step = m.judge(self._rs_facts(m, step), gen)
        if isinstance(step, Retry):
            return
        if isinstance(step, Recover):
            self._rs_bump("disconnects")
            _stats.bump(f"disconnects.{step.category}")
            self._rs_recover(exc, call_end, resume=step.resume)
            return
        if isinstance(step, Surface):
            self._rs_surface(exc, step)
        elif isinstance(step, HandOver):
            _emit("surfaced", logging.DEBUG, "%s: write interrupted (%s) while another "
                  "greenlet reads: connection kept, protection off", self._rs_name(),
                  type(exc).__name__, peer=self._rs_target)
            self._rs_unprotect()
        elif isinstance(step, Raise) and step.discard and self._sock:
            self._detach_socket("closed")
        raise exc

    def _rs_peer_alive_after_eof(self, m: Machine, gen: int, call_end: float | None,
                                 idle: bool = False, wait: float = 1.0,
                                 acked: int | None = None) -> bool | None:
        """After an EOF while another greenlet writes: is the peer's socket still there?

        True: it half-closed and still takes our bytes — its TCP acknowledged data after its
        FIN (Linux ``TCP_INFO``), or, on a Unix socket, a write succeeded after the EOF (a Unix
        peer that closed fails every write at once). False: a reset arrived (TCP state CLOSE:
        a peer that closed its socket answers our data with RST), or nothing could be learnt
        within about a second (the earlier rule: a drop). None: the connection moved while
        waiting (the writer recovered). Polls, as ``_rs_peer_not_reading`` does.

        ``idle``: the writer greenlet is between calls and nothing is unconfirmed; wait up
        to ``wait`` (the machine's ``AskPeer.wait``) for its next write to tell (None if it
        does not: the EOF is then the stream's end, as without a writer).

        ``acked``: one greenlet wrote after the peer's FIN (``Machine.fin_before``); what the
        peer's TCP had acknowledged before that write. Polls for the whole wait (no writer
        will tell): True once it acknowledged more, False on a reset or at the limit."""
        unix = self.family == _AF_UNIX
        journal = m.journal
        if acked is not None and not unix:
            start = acked
        elif unix:
            start = journal._total
        else:
            buf = self._rs_tcp_info(_TCPI_BYTES_ACKED + 8)
            if buf is None:
                return False
            start = struct.unpack_from("Q", buf, _TCPI_BYTES_ACKED)[0]
        limit = _clock() + wait
        if call_end is not None:
            limit = min(limit, call_end)
        while True:
            if m.gen != gen or m.state is not CONNECTED or self._closed:
                return None
            if unix:
                if journal._total > start:
                    return True
            else:
                buf = self._rs_tcp_info(_TCPI_BYTES_ACKED + 8)
                if buf is None:
                    return False
                # Acknowledged first: a peer that took our bytes after its FIN and reset
                # since (it read the request, then closed with SO_LINGER 0 or unread data)
                # had half-closed; only a reset with nothing acknowledged is a closed peer.
                if struct.unpack_from("Q", buf, _TCPI_BYTES_ACKED)[0] > start:
                    return True
                if buf[0] == _TCP_STATE_CLOSE:
                    return False
            if _clock() >= limit or (m.writing == 0 and not idle and acked is None):
                return None if idle else False
            if idle and (m.writer is None or m.writer.dead):
                return None  # the writer is done: nothing more will tell
            gevent.sleep(0.002)

    def _rs_reader_waiting(self) -> bool:
        """Is a greenlet blocked in a read on the current connection? (gevent starts the
        read watcher while one waits on it; nothing is added to the read path for this.)"""
        event = getattr(self, "_read_event", None)
        return bool(self._sock) and event is not None and bool(getattr(event, "active", False))

    def _rs_facts(self, m: Machine, step: FindFacts) -> Drop:
        """The I/O the machine asked for (``FindFacts``), done before it judges."""
        peer_not_reading = early = False
        if step.acked:
            self._rs_confirm_acked(m)  # what the peer's TCP acknowledged is not re-sent
        if step.not_reading:
            peer_not_reading = self._rs_peer_not_reading()
        elif step.early:
            try:
                early = bool(self._sock.recv(1, _PEEK))
            except OSError:
                early = False
            if early and not (self._rs_reader_waiting() or m.reading > 0):
                # Unread bytes and no reader in sight: let a reader greenlet that is ready
                # to run show itself (a full duplex client whose reader has not started yet)
                # before the machine takes them for an early answer to this write. This
                # write counts as under way meanwhile: what the reader meets is part of its
                # drop.
                m.writing += 1
                try:
                    gevent.sleep(0)
                finally:
                    m.writing -= 1
        duplex = self._rs_reader_waiting() or m.reading > 0
        if early and not duplex:
            early = self._rs_early_answer()
        return replace(step.drop, peer_not_reading=peer_not_reading, early_answer=early,
                       duplex=duplex)

    def _rs_early_answer(self) -> bool:
        """The peer's bytes wait unread where a write failed: are they an answer? Over TCP
        they are; TLS looks inside them (its TLS 1.3 session tickets wait there too)."""
        return True

    def _rs_surface(self, exc: BaseException, step: Surface) -> None:
        verdict = step.verdict
        if verdict.quiet:
            _stats.bump("read_timeouts")
            log.debug("%s: %s: %s", self._rs_name(), type(exc).__name__, verdict.note)
            raise exc
        add_note(exc, f"resilientsock: not recovered: {verdict.note}")
        self._rs_bump("surfaced")
        _stats.bump(f"surfaced.{step.info.category}")
        _emit("surfaced", logging.WARNING if step.warn else logging.INFO,
              "%s: surfacing %s: %s", self._rs_name(), type(exc).__name__, verdict.note,
              peer=self._rs_target, category=str(step.info.category),
              error_type=type(exc).__name__)
        if verdict.discard and self._sock:
            self._detach_socket("closed")  # the machine let it go
        elif step.unprotect:
            self._rs_unprotect()  # the machine's call: plain from now on (Surface.unprotect)
        raise exc

    # -- recovery -----------------------------------------------------------------------------

    def _rs_wait_recovery(self, m: Machine, call_end: float | None) -> None:
        """Another greenlet is recovering: wait until it publishes the new connection (or
        gives up), bounded by this call's own budget."""
        done = self._rs_done
        limit = self.policy.deadline
        if call_end is not None:
            left = max(0.0, call_end - _clock())
            limit = left if limit is None else min(limit, left)
        if done is not None and not done.wait(limit) and m.state is RECOVERING:
            raise add_note_and_return(
                TimeoutError("timed out") if call_end is not None else
                ConnectionResetError(errno.ECONNRESET, "connection reset; recovery still "
                                     "under way in another greenlet"),
                "resilientsock: gave up waiting for another greenlet's recovery")

    def _rs_recover(self, exc: BaseException | None, call_end: float | None, *,
                    resume: int = 0, first: bool = False, in_place: bool = False,
                    soft: bool = False) -> None:
        """Recover under the policy (rule 5): the machine's steps (``Machine.recover``),
        performed until it publishes the new connection or gives up (the original error
        raised with a note)."""
        from gevent.event import Event

        m = self._rs_m
        assert m is not None
        steps = m.recover(exc, call_end, self.timeout, resume=resume, first=first,
                          in_place=in_place, soft=soft, bucket=_bucket)
        m.owner = gevent.getcurrent()
        done = self._rs_done = Event()
        try:
            # Inside the try: a log handler may yield to the hub (a SocketHandler on a
            # patched socket), and the application's gevent.Timeout fire there; the recovery
            # must still end (not left RECOVERING with nobody recovering).
            if exc is not None:
                info = classify(exc, phase="read")
                _emit("drop", logging.DEBUG, "%s: %s (%s); reconnecting, %d unconfirmed "
                      "record(s)", self._rs_name(), type(exc).__name__,
                      info.category if info else "?", len(m.journal), peer=self._rs_target,
                      category=str(info.category) if info else None,
                      error_type=type(exc).__name__)
            self._rs_perform(m, steps)
        except BaseException as failure:
            if m.abandon(isinstance(failure, Exception)) and self._sock:
                self._detach_socket("closed")
            raise
        finally:
            m.owner = None
            done.set()

    def _rs_perform(self, m: Machine, steps: Recovery) -> None:
        """Do what the recovery says, and tell it what came of it, until it ends."""
        result: Connected | Failed | None = None
        while True:
            action = steps.send(result)
            result = None
            if isinstance(action, Wait):
                self._rs_sleep(action.seconds)
            elif isinstance(action, Connect):
                result = self._rs_connect_step(m, action)
            elif isinstance(action, Done):
                if action.reconnected:
                    self.reconnects = self.__dict__.get("reconnects", 0) + 1
                    self._rs_bump("reconnects")
                    _emit("reconnect", logging.DEBUG, "%s: reconnected (attempt %d)",
                          self._rs_name(), action.attempts, peer=self._rs_target,
                          attempts=action.attempts, seconds=action.seconds)
                return
            elif isinstance(action, GiveUp):
                self._rs_give_up(action)
            elif isinstance(action, Stop):
                raise _closed_error() from None
            elif isinstance(action, Abandon):
                if self._sock:
                    # Closing wakes the greenlets blocked on it.
                    try:
                        self._sock.setsockopt(_std.SOL_SOCKET, _std.SO_LINGER, _LINGER_RST)
                    except OSError:
                        pass
                    self._detach_socket("closed")
            elif isinstance(action, CountAcked):
                if self._sock:
                    self._rs_confirm_acked(m)
            elif isinstance(action, RunHook) and not action.fatal:
                self._rs_hook(action)
            else:
                try:
                    self._rs_step(m, action)
                except Exception as failure:
                    result = self._rs_failed(m, failure)

    def _rs_timer(self, until: float | None) -> gevent.Timeout:
        return gevent.Timeout(None if until is None else max(until - _clock(), 0.001),
                              _AttemptTimeout())

    def _rs_step(self, m: Machine, action: Action) -> None:
        """One step on the new connection, by the ``until`` it carries."""
        if isinstance(action, Resume):
            self._rs_resume(action)
            return
        until = getattr(action, "until", None)
        with self._rs_timer(until):
            if isinstance(action, Handshake):
                self._rs_after_install(None if until is None else max(until - _clock(), 0.001))
            elif isinstance(action, Restore):
                setup = action.setup
                self._rs_raw_sendall(setup.payload)
                while True:
                    chunk = self._rs_raw_recv(65536)
                    if not chunk:
                        raise ConnectionResetError(
                            errno.ECONNRESET, "closed while the connection's setup was redone")
                    try:
                        done = setup.feed(chunk)
                    except Exception as mismatch:
                        raise _SetupMismatch(str(mismatch)) from None
                    if done is not None:
                        break
            elif isinstance(action, SkipBanner):
                self._rs_skip_banner(action.first)
            elif isinstance(action, RunHook):
                action.hook(self, action.arg)
            elif isinstance(action, Replay):
                payload = action.payload
                self._rs_raw_sendall(payload)
                self._rs_bump("replayed_records", action.records)
                self._rs_bump("replayed_bytes", len(payload))
                _emit("replay", logging.DEBUG, "%s: replayed %d record(s), %d bytes",
                      self._rs_name(), action.records, len(payload), peer=self._rs_target,
                      records=action.records, nbytes=len(payload))
            else:  # pragma: no cover - a step this socket does not know is a bug
                raise RuntimeError(f"resilientsock: unknown recovery step {action!r}")

    def _rs_connect_step(self, m: Machine, action: Connect) -> Connected | Failed:
        if action.counted:
            _stats.bump("reconnect_attempts")
        try:
            if (action.in_place and self._sock
                    and not self.__dict__.get("_rs_in_place_failed")):
                attempt = self._rs_connect_in_place(action.limit)
            else:
                addresses = candidates(self._rs_target, int(self.family), self._rs_any_family)
                attempt = open_connection(
                    self._rs_make_raw, addresses, per_address=action.limit, end=None,
                    options=self.__dict__.get("_rs_opts", {}), source=self._rs_source,
                    dead_peer=m.policy.dead_peer_timeout, pending=self._rs_pending)
        except Exception as failure:
            return self._rs_failed(m, failure)
        if attempt.raw is None:
            self.__dict__["_rs_all_errors"] = attempt.errors  # read back by create_connection
            return self._rs_failed(m, attempt.errors[-1])
        if m.state is CLOSED:
            attempt.raw.close()  # close() won: the machine stops
            return Connected(False)
        fresh = attempt.raw is not self._sock  # in place, the raw connect did it all (TLS too)
        if fresh:
            self._rs_install(attempt.raw)
        return Connected(fresh)

    def _rs_failed(self, m: Machine, failure: BaseException) -> Failed:
        """A step raised: classified for the machine, counted, the connection closed."""
        info = self._rs_classify_attempt(failure)
        if m.state is not CLOSED:
            _count_failed_attempt(info)
            episode = m.episode
            log.info("%s: attempt %d failed: %s", self._rs_name(),
                     episode.attempts if episode is not None else 0, failure)
        if self._sock:
            self._detach_socket("closed")
        return Failed(failure, info)

    def _rs_sleep(self, seconds: float) -> None:
        done = self._rs_done
        if done is not None:
            done.wait(seconds)  # close() sets it: the wait ends at once
        else:  # pragma: no cover
            gevent.sleep(seconds)

    def _rs_classify_attempt(self, failure: BaseException) -> ErrorInfo | None:
        """Errors raised while reconnecting are classified alone (docs/design.md §3)."""
        if isinstance(failure, _AttemptTimeout):
            return classify(TimeoutError("timed out"), phase="connect")
        if (self.family == _AF_UNIX and isinstance(failure, OSError)
                and failure.errno in (errno.ENOENT, errno.ECONNREFUSED)):
            # A Unix server restarting: its socket file is being re-created.
            return classify(ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
                            phase="connect")
        return classify(failure, phase="connect", context=False)

    def _rs_connect_in_place(self, timeout: float | None) -> Attempt:
        """The application's own ``sock.connect(addr)`` on this very socket (first attempt),
        so options it set on it and its bound address stay. Later attempts open new ones."""
        attempt = Attempt()
        try:
            if self._sock is None or not self._sock:
                raise OSError(errno.EBADF, "Bad file descriptor")
            for level, opt, value in dead_peer_options(self.family, self.policy.dead_peer_timeout):
                try_setsockopt(self._sock, level, opt, value)
            saved = self.timeout
            try:
                if timeout is not None and (saved is None or timeout < saved):
                    _GeventSocket.settimeout(self, timeout)
                type(self)._rs_raw_connect(self, self._rs_target)
            finally:
                _GeventSocket.settimeout(self, saved)
            attempt.raw = self._sock
        except Exception as exc:
            attempt.errors.append(exc)
            # The next attempt opens a new socket: this one may be in an error state.
            if self._sock:
                self._detach_socket("closed")
            self.__dict__["_rs_in_place_failed"] = True
        return attempt

    def _rs_make_raw(self, family: int, proto: int) -> Any:
        return self._gevent_sock_class(family, _std.SOCK_STREAM, proto, None)

    def _rs_install(self, raw: Any) -> None:
        """The new connection becomes this socket's."""
        if self._sock:
            self._drop_events_and_close(closefd=True)
        self._sock = raw
        io = self.hub.loop.io
        fd = raw.fileno()
        self._read_event = io(fd, 1)
        self._write_event = io(fd, 2)

    def _rs_after_install(self, timeout: float | None) -> None:
        """TLS redoes its handshake here."""

    def _rs_resume(self, action: Resume) -> None:
        """Read the re-sent request's new answer up to what the caller already has into the
        machine's check (§5b): its first byte by ``first_until``, the rest by ``until``."""
        check = action.check
        with self._rs_timer(action.until):
            cut_timer: Any = None
            if action.first_until != action.until:
                cut_timer = self._rs_timer(action.first_until)
                cut_timer.start()
            try:
                while check.need > 0:
                    chunk = self._rs_raw_recv(min(65536, check.need))
                    if cut_timer is not None:
                        cut_timer.cancel()  # the new answer is coming: the normal budget now
                        cut_timer = None
                    if not chunk:
                        # The new connection ended before it carried what the caller has:
                        # a drop of this attempt (retried as a reset here would be), not a
                        # different answer (review wave 5: a storm's FIN within the first
                        # bytes of the new answer surfaced "the answer changed").
                        raise ConnectionResetError(
                            errno.ECONNRESET, "closed while the answer in progress was resumed")
                    check.feed(chunk)
            finally:
                if cut_timer is not None:
                    cut_timer.close()
        k = check.k
        if not check.matches():
            self._rs_bump("answers_changed")
            _emit("answer_changed", logging.INFO, "%s: the re-sent request's answer changed "
                  "after %d byte(s)", self._rs_name(), k, peer=self._rs_target, nbytes=k)
            raise check.changed()
        self._rs_bump("answers_resumed")
        _emit("answer_resumed", logging.DEBUG, "%s: answer resumed at byte %d", self._rs_name(),
              k, peer=self._rs_target, nbytes=k)

    def _rs_skip_banner(self, first: bytes) -> None:
        """Read the new connection's banner and drop it: the application already read one
        (``first``). Complete when a line arrives that is not a continuation (``NNN-`` in
        SMTP and FTP); a banner without a line end: as many bytes as the first one had
        (review r10)."""
        got = b""
        while not _banner_complete(got, first):
            chunk = self._rs_raw_recv(4096)
            if not chunk:
                raise ConnectionResetError(errno.ECONNRESET, "the server closed before its banner")
            got += chunk
        if got != first:
            # The re-sent bytes may have been computed from the banner the application read:
            # POP3's APOP digest covers its timestamp, a challenge-response login its nonce.
            # Sent after a different banner they would be wrong (a failed login on the server,
            # an error the plain client never had): not re-sent (docs/design.md §5a). A clock
            # or a counter in the banner (Exim's, Sendmail's date) changes nothing they carry.
            m = self._rs_m
            # what is about to be sent: the replay, and the interrupted write made again
            resend = m.journal.unconfirmed() + m.unwritten if m is not None else b""
            why = banner_refusal(first, got, resend)
            if why is not None:
                raise _SetupMismatch(
                    f"the new connection's banner differs from the one the application read: "
                    f"{why}, so they are not re-sent")
        log.debug("%s: skipped the new connection's banner (%d bytes)", self._rs_name(), len(got))

    def _rs_hook(self, action: RunHook) -> None:
        """``on_disconnect``: its failure is logged; the recovery goes on."""
        try:
            with self._rs_timer(action.until):
                action.hook(self, action.arg)
        except Exception as exc:
            log.warning("%s: on_disconnect hook failed: %s", self._rs_name(), exc)

    def _rs_give_up(self, action: GiveUp) -> None:
        """The machine gave up (and let the connection go): raise its error."""
        if self._sock:
            self._detach_socket("closed")
        exc = action.error
        if action.cut:
            raise exc  # an EOF cut not resumed: the caller gets the EOF (_rs_resume_cut)
        add_note(exc, f"resilientsock: {action.note}")
        _stats.bump("gave_up")
        self._rs_bump("surfaced")
        info = classify(exc)
        if info is not None:
            _stats.bump(f"surfaced.{info.category}")
        _emit("gave_up", logging.WARNING, "%s: %s", self._rs_name(), action.note,
              peer=self._rs_target, attempts=action.attempts, seconds=action.seconds,
              error_type=type(exc).__name__, category=str(info.category) if info else None)
        cause = action.cause
        if cause is not None:
            # As Python does for an exception raised while another is handled: the cause's
            # context chain may lead back to this error (a step failed while the call that
            # caught it was still in its except block), and must not loop back to it.
            link: BaseException | None = cause
            hops = 0
            while link is not None and hops < 64:
                if link.__context__ is exc:
                    link.__context__ = None
                    break
                link, hops = link.__context__, hops + 1
            exc.__context__ = cause
            raise exc from cause
        raise exc

    # -- raw I/O on the current connection (recovery only) ------------------------------------

    def _rs_raw_recv(self, n: int) -> bytes:
        return bytes(_GeventSocket.recv(self, n))

    def _rs_raw_sendall(self, data: Any) -> None:
        _sendall_with(_GeventSocket.send, self, data, 0)

    # -- TCP facts ------------------------------------------------------------------------------

    def _rs_confirm_acked(self, m: Machine) -> None:
        acked = self._rs_tcp_acked()
        if acked is not None:
            m.journal.confirm_acked(acked)
            if not m.journal.pending and m.dialect is not None:
                m.dialect.acked()

    def _rs_tcp_info(self, need: int) -> bytes | None:
        """Linux ``TCP_INFO`` of the current connection, if it has at least ``need`` bytes."""
        if _TCP_INFO is None or self.family not in INET or not self._sock:
            return None
        try:
            buf = self._sock.getsockopt(_std.IPPROTO_TCP, _TCP_INFO, 256)
        except OSError:
            return None
        return buf if len(buf) >= need else None

    def _rs_fin_probe(self, m: Machine) -> None:
        """Before the first write of a new exchange: has the peer's FIN already arrived
        (TCP state CLOSE_WAIT)? Then the EOF that follows is judged by what the peer's TCP
        does with the write (``Machine.fin_before``, docs/design.md §5, half-close). For a
        connection's first ``FIN_PROBES`` exchanges only."""
        m.fin_probe -= 1
        try:
            buf = self._sock.getsockopt(_std.IPPROTO_TCP, _TCP_INFO, _TCPI_BYTES_ACKED + 8)
        except OSError:
            return
        if buf[0] == _TCP_STATE_CLOSE_WAIT and len(buf) >= _TCPI_BYTES_ACKED + 8:
            m.fin_before = (m.gen, struct.unpack_from("Q", buf, _TCPI_BYTES_ACKED)[0])

    def _rs_tcp_acked(self) -> int | None:
        """Data bytes of this connection that the peer's TCP acknowledged (Linux TCP_INFO)."""
        if self._rs_tls:
            return None
        buf = self._rs_tcp_info(_TCPI_BYTES_ACKED + 8)
        if buf is None:
            return None
        acked: int = struct.unpack_from("Q", buf, _TCPI_BYTES_ACKED)[0]
        return max(0, acked - 1)  # the SYN counts as one acknowledged byte

    def _rs_peer_not_reading(self) -> bool:
        """After a write timeout: is the peer alive and merely not reading?

        A Unix stream peer cannot vanish silently (its end gives EPIPE or ECONNRESET), so a
        timeout means it is not reading. Over TCP, Linux's ``tcpi_unacked == 0`` says every
        segment sent was acknowledged: the peer's window is closed, not the link dead (a dead
        link leaves segments unacknowledged). Elsewhere unknown: False (treated as a drop).
        """
        if self.family == _AF_UNIX:
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
            now = _clock()
            if limit is None:
                rtt = struct.unpack_from("I", buf, _TCPI_RTT)[0] / 1e6
                limit = now + min(1.0, 2 * rtt + 0.25)
            if now >= limit:
                return False
            gevent.sleep(0.002)

    def _rs_name(self) -> str:
        return f"resilient socket to {self._rs_target!r}"

    def __repr__(self) -> str:
        text = _GeventSocket.__repr__(self)
        m = self._rs_m
        if m is not None:
            text = text[:-1] + f", resilient={m.state}>"
        return text


def add_note_and_return(exc: BaseException, note: str) -> BaseException:
    add_note(exc, note)
    return exc


def _cancel_exc() -> BaseException:
    from gevent._socketcommon import cancel_wait_ex

    exc: BaseException = cancel_wait_ex()
    return exc


def _bounded(raw: Any, sock: Any, args: tuple[Any, ...], call_end: float) -> Any:
    """``raw(sock, *args)`` again after an error or a recovery: its waits end at ``call_end``
    (what is left of the application's timeout) with the ``socket.timeout`` gevent's own
    timeout raises, not after a fresh timeout (docs/design.md §4). A wait only: bytes already
    there are returned at once."""
    timer = gevent.Timeout(max(call_end - _clock(), 0.001), TimeoutError("timed out"))
    timer.start()
    try:
        return raw(sock, *args)
    finally:
        timer.close()


def _cancelled(exc: BaseException) -> bool:
    """gevent's "closed in another greenlet" error, thrown into a waiter by close()."""
    from gevent._socketcommon import cancel_wait_ex

    return isinstance(exc, cancel_wait_ex)


def _closed_error() -> OSError:
    return OSError(errno.EBADF, "File descriptor was closed in another greenlet")


def _banner_complete(got: bytes, first: bytes) -> bool:
    if b"\n" not in first:
        return len(got) >= len(first)
    if not got.endswith(b"\n"):
        return False
    last = got.rstrip(b"\r\n").rsplit(b"\n", 1)[-1]
    return not (len(last) >= 4 and last[:3].isdigit() and last[3:4] == b"-")


def _nbytes(data: Any) -> int:
    """Bytes in a bytes-like object (``len`` counts items: an ``array('i')`` has 4 a piece)."""
    kind = type(data)
    return len(data) if kind is bytes or kind is bytearray else memoryview(data).nbytes


def _sent(data: Any, n: int) -> Any:
    """The first ``n`` bytes of a write, as its journal record (``n`` counts bytes, as
    ``send`` does; a slice of the object itself would count its items)."""
    if type(data) is bytes:
        return data if n >= len(data) else memoryview(data)[:n]
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view if n >= view.nbytes else view[:n]


def _sendall_with(send: Any, sock: Any, data: Any, flags: int) -> None:
    """``sendall`` built on a raw ``send`` (gevent's own calls ``sock.send``, which would
    journal every chunk a second time). The socket's timeout bounds the whole call."""
    view = data if isinstance(data, memoryview) else memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    total = len(view)
    sent = 0
    timeout = sock.timeout
    end = None if timeout is None else _clock() + timeout
    while sent < total:
        left = None
        if end is not None:
            left = end - _clock()
            if left <= 0:
                raise TimeoutError("timed out")
        sent += send(sock, view[sent:sent + _CHUNK], flags, left if left is not None
                     else _timeout_default)


def _count_failed_attempt(info: ErrorInfo | None) -> None:
    if info is None:
        _stats.bump("attempt_failed.unclassified")
        return
    _stats.bump(f"attempt_failed.{info.category}")
    if info.errno_name:
        _stats.bump(f"attempt_failed.{info.errno_name}")


# -- the guarded classes --------------------------------------------------------------------

def _guarded_methods(recv: Any, recv_into: Any, send: Any) -> dict[str, Any]:
    """The hot paths (rule 2): the raw call first, bookkeeping after it.

    ``recv_`` and ``recv_into_`` (and TLS's ``read_`` in ``_tls.py``) repeat one shape on
    purpose: each is one Python frame over the raw call, and a shared helper would be a second
    one on every read (docs/design.md §12). Everything past the common case is in ``_rs_read``.

    Where the raw methods are gevent's own (``direct``), the reads run gevent's loop in their
    own frame (the wrapped socket's call; on EWOULDBLOCK, unless non-blocking, gevent's wait
    and again), and ``sendall`` tries the wrapped socket's ``send`` once before its loop
    (gevent's ``send``, which waits): gevent's frame and its ``*args`` tuple are not paid per
    call. A subclass's own ``recv``/``recv_into``/``send`` are always called."""
    direct = (recv is _GeventSocket.recv and recv_into is _GeventSocket.recv_into
              and send is _GeventSocket.send)

    def recv_(self: Any, *args: Any) -> Any:
        m = self._rs_m
        if m is None or m.state is not CONNECTED:
            return self._rs_read(recv, args, RECV)
        mark = m.journal.seq  # Journal.mark(), read as its attribute (a frame less a read)
        gen = m.gen
        t0 = _clock() if self.timeout is not None else None
        m.reading += 1
        try:
            if direct:
                while True:  # gevent's recv, in this frame
                    try:
                        data = self._sock.recv(*args)
                        break
                    except BlockingIOError:
                        if self.timeout == 0.0:
                            raise
                    self._wait(self._read_event)
            else:
                data = recv(self, *args)
        except BaseException as exc:
            try:
                return self._rs_read(recv, args, RECV, t0, exc, gen)
            finally:
                m.reading -= 1
        if data:
            m.reading -= 1
            if len(args) < 2 or not args[1] & _MSG_PEEK:  # a peek's bytes count when read
                m.read_data(data, mark)
            return data
        try:
            return self._rs_read_eof(recv, args, RECV, data, t0, gen)
        finally:
            m.reading -= 1

    def recv_into_(self: Any, buffer: Any, nbytes: int = 0, flags: int = 0) -> Any:
        m = self._rs_m
        if m is None or m.state is not CONNECTED:
            return self._rs_read(recv_into, (buffer, nbytes, flags), RECV_INTO)
        mark = m.journal.seq
        gen = m.gen
        t0 = _clock() if self.timeout is not None else None
        m.reading += 1
        try:
            if direct:
                while True:  # gevent's recv_into, in this frame
                    try:
                        n = self._sock.recv_into(buffer, nbytes, flags)
                        break
                    except BlockingIOError:
                        if self.timeout == 0.0:
                            raise
                    self._wait(self._read_event)
            else:
                n = recv_into(self, buffer, nbytes, flags)
        except BaseException as exc:
            try:
                return self._rs_read(recv_into, (buffer, nbytes, flags), RECV_INTO, t0, exc, gen)
            finally:
                m.reading -= 1
        if n:
            m.reading -= 1
            if not flags & _MSG_PEEK:  # a peek's bytes are counted when they are read
                if type(buffer) is not memoryview or buffer.format != "B" or buffer.ndim != 1:
                    buffer = memoryview(buffer).cast("B")
                # A full read passes the view itself: no slice object on the common path.
                m.read_data(buffer if n == len(buffer) else buffer[:n], mark)
            return n
        try:
            return self._rs_read_eof(recv_into, (buffer, nbytes, flags), RECV_INTO, n, t0, gen)
        finally:
            m.reading -= 1

    def send_(self: Any, data: Any, flags: int = 0, timeout: Any = _timeout_default) -> Any:
        m = self._rs_m
        if m is None or m.state is not CONNECTED:
            return self._rs_write(send, (data, flags, timeout), data, True)
        gen = m.gen
        t0 = _clock() if self.timeout is not None else None
        if m.fin_probe and m.journal._done == m.journal._total:  # a new exchange
            self._rs_fin_probe(m)
        m.writing += 1
        try:
            n = send(self, data, flags, timeout)
        except BaseException as exc:
            m.writing -= 1
            return self._rs_write(send, (data, flags, timeout), data, True, t0, exc, gen)
        m.writing -= 1
        if n:
            m.wrote_data(data if type(data) is bytes and n >= len(data) else _sent(data, n))
            journal = m.journal
            if m.tcp_ack or journal._total - journal._done > m.warn_at:
                self._rs_after_write(m)
        return n

    def sendall_raw(self: Any, data: Any, flags: int = 0) -> None:
        _sendall_with(send, self, data, flags)

    def sendall_(self: Any, data: Any, flags: int = 0) -> None:
        m = self._rs_m
        if m is None or m.state is not CONNECTED:
            return self._rs_write(sendall_raw, (data, flags), data, False)  # type: ignore[no-any-return]
        gen = m.gen
        t0 = _clock() if self.timeout is not None else None
        if m.fin_probe and m.journal._done == m.journal._total:  # a new exchange
            self._rs_fin_probe(m)
        m.writing += 1
        try:
            # One send() takes a small write whole; a larger one goes round the loop.
            if direct:
                try:
                    n = self._sock.send(data, flags)
                except BlockingIOError:  # no room now: the loop waits as gevent's send does
                    if self.timeout == 0.0:
                        raise
                    n = 0
            else:
                n = send(self, data, flags, _timeout_default)
            record: Any
            if type(data) is bytes:
                record = data
                if n < len(data):
                    _sendall_with(send, self, memoryview(data)[n:], flags)
            else:  # its bytes, as a view (len() of an array or a view may count items)
                record = memoryview(data)
                if record.format != "B" or record.ndim != 1:
                    record = record.cast("B")
                if n < len(record):
                    _sendall_with(send, self, record[n:], flags)
        except BaseException as exc:
            m.writing -= 1
            return self._rs_write(sendall_raw, (data, flags), data, False, t0, exc, gen)  # type: ignore[no-any-return]
        m.writing -= 1
        if n or record:  # (nothing written, nothing journaled)
            m.wrote_data(record)
            journal = m.journal
            if m.tcp_ack or journal._total - journal._done > m.warn_at:
                self._rs_after_write(m)
        return None

    recv_.__doc__ = _GeventSocket.recv.__doc__
    recv_into_.__doc__ = _GeventSocket.recv_into.__doc__
    send_.__doc__ = _GeventSocket.send.__doc__
    sendall_.__doc__ = _GeventSocket.sendall.__doc__
    return {"recv": recv_, "recv_into": recv_into_, "send": send_, "sendall": sendall_}


def _plain_extra_methods() -> dict[str, Any]:
    """Every other read method confirms too (design.md §5, review r14); sendmsg and sendto
    are journaled (their address is ignored on a connected stream socket, as by the kernel)."""

    def recvfrom(self: Any, *args: Any) -> Any:
        return self._rs_read(_GeventSocket.recvfrom, args, RECVFROM)

    def recvfrom_into(self: Any, *args: Any) -> Any:
        return self._rs_read(_GeventSocket.recvfrom_into, args, RECVFROM_INTO)

    def recvmsg(self: Any, *args: Any) -> Any:
        return self._rs_read(_GeventSocket.recvmsg, args, RECVMSG)

    def recvmsg_into(self: Any, *args: Any) -> Any:
        return self._rs_read(_GeventSocket.recvmsg_into, args, RECVMSG_INTO)

    def sendmsg(self: Any, buffers: Any, ancdata: Any = (), flags: int = 0,
                address: Any = None) -> Any:
        if ancdata:
            # Ancillary data (fd passing) cannot be replayed: this socket is plain from here
            # on (a write kept out of the journal would be lost silently by a recovery).
            if self._rs_m is not None:
                self._rs_unprotect()
            return _GeventSocket.sendmsg(self, buffers, ancdata, flags, address)
        data = b"".join(buffers)  # TypeError for what is not an iterable of bytes-like objects
        # An address on a connected stream socket is ignored by the kernel, as for sendto.
        return self._rs_write(_sendmsg_raw, (data, flags, address), data, True)

    def sendto(self: Any, data: Any, flags_or_address: Any, *address: Any) -> Any:
        # A connected stream socket sends as send() does (Linux ignores the address): a write
        # like any other, journaled (docs/design.md §5, no silent loss).
        if len(address) > 1:
            return _GeventSocket.sendto(self, data, flags_or_address, *address)  # TypeError
        args = (data, flags_or_address, address[0]) if address else (data, 0, flags_or_address)
        return self._rs_write(_sendto_raw, args, data, True)

    return {"recvfrom": recvfrom, "recvfrom_into": recvfrom_into, "recvmsg": recvmsg,
            "recvmsg_into": recvmsg_into, "sendmsg": sendmsg, "sendto": sendto}


def _sendmsg_raw(sock: Any, data: bytes, flags: int, address: Any = None) -> int:
    if address is None:
        return int(_GeventSocket.sendmsg(sock, [data], (), flags))
    return int(_GeventSocket.sendmsg(sock, [data], (), flags, address))


def _sendto_raw(sock: Any, data: Any, flags: int, address: Any) -> int:
    return int(_GeventSocket.sendto(sock, data, flags, address))


def _twin(cls: type, attr: str, methods: dict[str, Any]) -> type:
    """The subclass of ``cls`` with ``methods`` over its own, built once and kept on ``cls``
    as ``attr``."""
    twin = cls.__dict__.get(attr)
    if twin is None:
        twin = type(cls.__name__, (cls,), {
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
            **methods,
        })
        type.__setattr__(cls, attr, twin)
    return twin


def _guarded_twin(cls: type) -> type:
    """The guarded subclass of ``cls`` (rule 2). Its raw calls are ``cls``'s own methods, so a
    subclass's overrides still run under the guard."""
    twin: type | None = cls.__dict__.get("_rs_twin")
    if twin is not None:
        return twin
    return _twin(cls, "_rs_twin", {"_rs_is_guarded": True,
                                   **cls._rs_guard_methods()})  # type: ignore[attr-defined]


def _session_twin(cls: type) -> type:
    """The subclass of ``cls`` whose writes frame onto a session's link (session mode,
    docs/design.md §11; ``session.client.direct_methods``)."""
    twin: type | None = cls.__dict__.get("_rs_session_twin")
    if twin is not None:
        return twin
    from .session.client import direct_methods

    return _twin(cls, "_rs_session_twin", direct_methods(cls))


# Addresses this process listens on (for the internal-connection count).
_own_listeners: set[Any] = set()
_own_ports: set[int] = set()  # ports of wildcard listeners


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
    if _libraries.one_shot_now() is not None:
        # A one-shot connection (ftplib's data connection, _libraries.ONE_SHOT): connected
        # and kept as a plain socket would be, of this class so that isinstance holds.
        kwargs = {"all_errors": True} if all_errors else {}
        plain = _gevent_create_connection(address, timeout, source_address, **kwargs)
        try:
            sock = ResilientSocket(plain.family, plain.type, plain.proto, plain.detach())
        except BaseException:
            plain.close()
            raise
        sock.settimeout(timeout)
        return sock
    holder: list[ResilientSocket] = []
    try:
        return ResilientSocket._connect_new(address, None, timeout=timeout,
                                            source_address=source_address, holder=holder)
    except OSError as exc:
        if not all_errors or sys.version_info < (3, 11) or isinstance(exc, _std.gaierror):
            raise
        errors = holder[0].__dict__.get("_rs_all_errors") if holder else None
        group = ExceptionGroup(  # type: ignore[name-defined]  # noqa: F821 - 3.11+
            "create_connection failed", list(errors or [exc]))
        for note in getattr(exc, "__notes__", ()):
            group.add_note(note)
        raise group from None
