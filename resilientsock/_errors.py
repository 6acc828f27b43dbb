"""Error classification: is this exception a dropped connection, and is it worth a retry?

Rules of this module (docs/design.md §3):

1. Symbols, never numbers. Every errno is looked up on the running platform with
   ``getattr(errno, name, None)``, so one table serves Linux (ECONNRESET 104), macOS/BSD (54)
   and Windows (10054, also checked in ``.winerror``). A symbol the platform lacks (``ENONET``
   exists only on Linux) is skipped, never an ``AttributeError``.
2. The class before the number. ``gaierror.errno`` holds EAI codes and ``SSLError.errno`` holds
   SSL_ERROR_* codes; both collide with real errno values, so they are read only after the class
   says which number space they are in.
3. Two passes over the chain (``__cause__``, ``__context__``, ``.reason``, exception ``.args``):
   first look for a real OS / ssl / resolver error anywhere; only when there is none, trust
   wrapper types (http.client, urllib3, requests, redis), which mislead (``requests.SSLError``
   is a ``requests.ConnectionError``; redis ``AuthenticationError`` is a
   ``redis.ConnectionError``; ``urllib.error.HTTPError`` is an ``OSError`` but an answer).
4. Never classified: flow control (``BlockingIOError``, want-read/write, EINTR), local misuse
   (EBADF, ENOTSOCK, EINVAL, EISCONN, ``ValueError``), exhaustion (EMFILE, ENFILE, ENOBUFS,
   ENOMEM) and anything that is not an ``Exception`` (``KeyboardInterrupt``, ``gevent.Timeout``).
5. ``classify`` cannot see a read from a write; the socket passes ``phase`` when it knows.
"""

from __future__ import annotations

import enum
import errno
import socket
import sys
from dataclasses import dataclass
from types import ModuleType

__all__ = [
    "ErrorCategory",
    "ErrorInfo",
    "UnansweredEOFError",
    "classify",
    "is_connection_error",
    "register",
]


class ErrorCategory(str, enum.Enum):
    """What kind of connection problem an exception is. Values are stable strings."""

    DNS_TEMPORARY = "dns_temporary"
    DNS_PERMANENT = "dns_permanent"
    REFUSED = "refused"
    UNREACHABLE = "unreachable"
    CONNECTION_LOST = "connection_lost"
    CONNECT_TIMEOUT = "connect_timeout"
    DEAD_PEER = "dead_peer"
    TIMEOUT = "timeout"
    TLS_TRANSPORT = "tls_transport"
    TLS_PERMANENT = "tls_permanent"

    def __str__(self) -> str:
        return self.name


# Whether resilientsock retries each category, and why (shown by `explain`).
RETRYABLE: dict[ErrorCategory, bool] = {
    ErrorCategory.DNS_TEMPORARY: True,
    ErrorCategory.DNS_PERMANENT: False,
    ErrorCategory.REFUSED: True,
    ErrorCategory.UNREACHABLE: True,
    ErrorCategory.CONNECTION_LOST: True,
    ErrorCategory.CONNECT_TIMEOUT: True,
    ErrorCategory.DEAD_PEER: True,
    # The socket retries a *write* timeout (docs/design.md §3) but surfaces a read timeout unless
    # RetryPolicy(retry_read_timeouts=True); classify() alone reports it as not retryable.
    ErrorCategory.TIMEOUT: False,
    ErrorCategory.TLS_TRANSPORT: True,
    ErrorCategory.TLS_PERMANENT: False,
}

REASONS: dict[ErrorCategory, str] = {
    ErrorCategory.DNS_TEMPORARY: "the resolver could not answer now (DHCP renewal, roaming); "
    "a later lookup usually works",
    ErrorCategory.DNS_PERMANENT: "the name does not exist; asking again gives the same answer",
    ErrorCategory.REFUSED: "nothing listens there right now (a server restarting)",
    ErrorCategory.UNREACHABLE: "this machine has no route right now (link down, roaming)",
    ErrorCategory.CONNECTION_LOST: "an established connection was reset or closed; a new one "
    "usually works",
    ErrorCategory.CONNECT_TIMEOUT: "connecting or the TLS handshake took too long; the next "
    "attempt may be luckier",
    ErrorCategory.DEAD_PEER: "the kernel gave up on a silent peer (keepalive / "
    "TCP_USER_TIMEOUT); the link died",
    ErrorCategory.TIMEOUT: "the application's own timeout on a live connection: a write "
    "timeout is retried on a new connection, a read timeout is surfaced (the peer is probably "
    "busy, a re-send would likely duplicate) unless retry_read_timeouts=True",
    ErrorCategory.TLS_TRANSPORT: "a TLS record was damaged in transit; a new connection "
    "usually works (small retry cap)",
    ErrorCategory.TLS_PERMANENT: "certificate, protocol or configuration problem; retrying "
    "gives the same failure",
}


@dataclass(frozen=True)
class ErrorInfo:
    """The classification of one exception.

    ``maybe_delivered`` is False when the error happened before any byte could reach the peer
    (DNS, refused, anything while connecting or in the TLS handshake) and True once a byte of
    a record may have been written.
    """

    category: ErrorCategory
    retryable: bool
    maybe_delivered: bool
    errno_name: str | None


class UnansweredEOFError(ConnectionResetError):
    """The peer closed the connection without answering requests that were written to it.

    Raised by a resilient socket when it cannot recover from such an EOF (replay off, journal
    over its limit, or the retry budget spent). It subclasses ``ConnectionResetError`` so that
    ``except ConnectionResetError`` in legacy code handles it.
    """

    errno_name = "EOF_UNANSWERED"


# --- tables (symbols) ---------------------------------------------------------------------

_ERRNO_TABLE: dict[str, ErrorCategory] = {
    "ECONNREFUSED": ErrorCategory.REFUSED,
    "ENETUNREACH": ErrorCategory.UNREACHABLE,
    "EHOSTUNREACH": ErrorCategory.UNREACHABLE,
    "EHOSTDOWN": ErrorCategory.UNREACHABLE,
    "ENETDOWN": ErrorCategory.UNREACHABLE,
    "ENONET": ErrorCategory.UNREACHABLE,  # Linux only
    "ECONNRESET": ErrorCategory.CONNECTION_LOST,
    "ECONNABORTED": ErrorCategory.CONNECTION_LOST,
    "EPIPE": ErrorCategory.CONNECTION_LOST,
    "ESHUTDOWN": ErrorCategory.CONNECTION_LOST,
    "ENETRESET": ErrorCategory.CONNECTION_LOST,
    "ENOTCONN": ErrorCategory.CONNECTION_LOST,
    "EPROTO": ErrorCategory.CONNECTION_LOST,
    "ETIMEDOUT": ErrorCategory.DEAD_PEER,
    # Windows spells the same things WSAE*; CPython maps most to the E* symbol, but a raw
    # ``.winerror`` may still carry them.
    "WSAECONNREFUSED": ErrorCategory.REFUSED,
    "WSAENETUNREACH": ErrorCategory.UNREACHABLE,
    "WSAEHOSTUNREACH": ErrorCategory.UNREACHABLE,
    "WSAEHOSTDOWN": ErrorCategory.UNREACHABLE,
    "WSAENETDOWN": ErrorCategory.UNREACHABLE,
    "WSAECONNRESET": ErrorCategory.CONNECTION_LOST,
    "WSAECONNABORTED": ErrorCategory.CONNECTION_LOST,
    "WSAESHUTDOWN": ErrorCategory.CONNECTION_LOST,
    "WSAENETRESET": ErrorCategory.CONNECTION_LOST,
    "WSAENOTCONN": ErrorCategory.CONNECTION_LOST,
    "WSAETIMEDOUT": ErrorCategory.DEAD_PEER,
}

# Never a connection problem, whatever the wrapper says (rule 4).
_NEVER_ERRNO = (
    "EAGAIN", "EWOULDBLOCK", "EINPROGRESS", "EALREADY", "EINTR", "EBADF", "ENOTSOCK", "EINVAL",
    "EISCONN", "EMFILE", "ENFILE", "ENOBUFS", "ENOMEM", "WSAEWOULDBLOCK", "WSAEINTR",
    "WSAEBADF", "WSAENOTSOCK", "WSAEINVAL", "WSAEISCONN", "WSAEMFILE", "WSAENOBUFS",
)

_EAI_TABLE: dict[str, ErrorCategory] = {
    "EAI_AGAIN": ErrorCategory.DNS_TEMPORARY,
    "EAI_NONAME": ErrorCategory.DNS_PERMANENT,
    "EAI_NODATA": ErrorCategory.DNS_PERMANENT,
    "EAI_FAIL": ErrorCategory.DNS_PERMANENT,
}

# OpenSSL reason codes (``SSLError.reason``). Transport damage vs. a permanent refusal.
_TLS_TRANSPORT_REASONS = frozenset({
    "BAD_RECORD_MAC", "DECRYPTION_FAILED_OR_BAD_RECORD_MAC", "TLSV1_ALERT_INTERNAL_ERROR",
    "SSLV3_ALERT_BAD_RECORD_MAC", "TLSV1_ALERT_DECRYPT_ERROR",
})
_TLS_LOST_REASONS = frozenset({
    "UNEXPECTED_EOF_WHILE_READING", "EOF", "SHUTDOWN_WHILE_IN_INIT",
})


def _build(names: dict[str, ErrorCategory]) -> dict[int, tuple[str, ErrorCategory]]:
    table: dict[int, tuple[str, ErrorCategory]] = {}
    for name, category in names.items():
        number = getattr(errno, name, None)
        if number is not None and number not in table:
            table[number] = (name, category)
    return table


_BY_ERRNO = _build(_ERRNO_TABLE)
_NEVER = frozenset(n for n in (getattr(errno, s, None) for s in _NEVER_ERRNO) if n is not None)
_BY_EAI: dict[int, tuple[str, ErrorCategory]] = {}
for _name, _category in _EAI_TABLE.items():
    _value = getattr(socket, _name, None)
    if _value is not None:
        _BY_EAI.setdefault(_value, (_name, _category))

# Wrapper exception types, by "module.QualName", matched on the MRO without importing the
# library. Checked only in the second pass.
_WRAPPERS: dict[str, ErrorCategory | None] = {
    "http.client.RemoteDisconnected": ErrorCategory.CONNECTION_LOST,
    "http.client.IncompleteRead": ErrorCategory.CONNECTION_LOST,
    "http.client.BadStatusLine": None,  # a protocol problem, unless RemoteDisconnected
    "urllib.error.HTTPError": None,  # an answer, not a drop
    "urllib3.exceptions.ProtocolError": ErrorCategory.CONNECTION_LOST,
    "urllib3.exceptions.NewConnectionError": ErrorCategory.REFUSED,
    "urllib3.exceptions.ConnectTimeoutError": ErrorCategory.CONNECT_TIMEOUT,
    "urllib3.exceptions.ReadTimeoutError": ErrorCategory.TIMEOUT,
    "urllib3.exceptions.SSLError": ErrorCategory.TLS_PERMANENT,
    "requests.exceptions.SSLError": ErrorCategory.TLS_PERMANENT,
    "requests.exceptions.ConnectTimeout": ErrorCategory.CONNECT_TIMEOUT,
    "requests.exceptions.ReadTimeout": ErrorCategory.TIMEOUT,
    "requests.exceptions.ConnectionError": ErrorCategory.CONNECTION_LOST,
    "redis.exceptions.AuthenticationError": None,
    "redis.exceptions.AuthorizationError": None,
    "redis.exceptions.TimeoutError": ErrorCategory.TIMEOUT,
    "redis.exceptions.ConnectionError": ErrorCategory.CONNECTION_LOST,
}
_REGISTERED: dict[type, ErrorCategory | None] = {}

_BEFORE_WRITE = frozenset({
    ErrorCategory.DNS_TEMPORARY, ErrorCategory.DNS_PERMANENT, ErrorCategory.REFUSED,
    ErrorCategory.CONNECT_TIMEOUT,
})


def register(exc_type: type[BaseException], category: ErrorCategory | None) -> None:
    """Classify a third-party exception type (and its subclasses) as ``category``.

    ``None`` declares the type "never a connection error", which also stops the chain walk from
    looking inside it. Registered types are consulted in the second pass, after any OS-level
    error in the chain, and before the built-in wrapper table.
    """
    if not (isinstance(exc_type, type) and issubclass(exc_type, BaseException)):
        raise TypeError(f"register() needs an exception type, got {exc_type!r}")
    if category is not None and not isinstance(category, ErrorCategory):
        raise ValueError(f"category must be an ErrorCategory or None, got {category!r}")
    _REGISTERED[exc_type] = category


def _info(category: ErrorCategory, name: str | None, phase: str | None) -> ErrorInfo:
    if phase == "connect":
        if category in (ErrorCategory.TIMEOUT, ErrorCategory.DEAD_PEER):
            category = ErrorCategory.CONNECT_TIMEOUT
        return ErrorInfo(category, RETRYABLE[category], False, name)
    # An unreachable network is almost always met while connecting; only a socket that knows
    # it was writing (phase="read"/"write") says a byte may have gone out.
    delivered = category not in _BEFORE_WRITE and not (
        phase is None and category is ErrorCategory.UNREACHABLE
    )
    return ErrorInfo(category, RETRYABLE[category], delivered, name)


def _ssl_module() -> ModuleType | None:
    # Never import ssl here: resilientsock's import must not pull it in before patch().
    return sys.modules.get("ssl")


def _classify_os(exc: BaseException, phase: str | None) -> ErrorInfo | None | bool:
    """First pass on one exception. Returns ErrorInfo, None (never a connection error: stop),
    or False (not an OS-level error: keep looking)."""
    if isinstance(exc, UnansweredEOFError):
        return _info(ErrorCategory.CONNECTION_LOST, "EOF_UNANSWERED", phase)
    ssl = _ssl_module()
    if ssl is not None and isinstance(exc, ssl.SSLError):
        return _classify_ssl(exc, ssl, phase)
    if isinstance(exc, socket.gaierror):
        found = _BY_EAI.get(exc.errno) if isinstance(exc.errno, int) else None
        if found is None:
            return None
        return _info(found[1], found[0], phase)
    if isinstance(exc, socket.herror):
        return None
    if isinstance(exc, BlockingIOError | InterruptedError):
        return None
    if isinstance(exc, socket.timeout) and not exc.errno:
        # socket.timeout is TimeoutError since 3.10; gevent raises it with no errno.
        return _info(ErrorCategory.TIMEOUT, None, phase)
    if isinstance(exc, OSError):
        if _is_wrapper(exc):
            return False
        for number in (getattr(exc, "winerror", None), exc.errno):
            if not isinstance(number, int):
                continue
            if number in _NEVER:
                return None
            found = _BY_ERRNO.get(number)
            if found is not None:
                return _info(found[1], found[0], phase)
        if exc.errno is None:
            # Raised by Python code without a number: trust the builtin subclass.
            by_class = _BUILTIN_CLASSES.get(type(exc))
            if by_class is None:
                for klass, category in _BUILTIN_CLASSES.items():
                    if isinstance(exc, klass):
                        by_class = category
                        break
            if by_class is not None:
                return False if _is_wrapper(exc) else _info(by_class, None, phase)
        return False
    return False


_BUILTIN_CLASSES: dict[type, ErrorCategory] = {
    ConnectionRefusedError: ErrorCategory.REFUSED,
    ConnectionResetError: ErrorCategory.CONNECTION_LOST,
    ConnectionAbortedError: ErrorCategory.CONNECTION_LOST,
    BrokenPipeError: ErrorCategory.CONNECTION_LOST,
}


def _classify_ssl(exc: BaseException, ssl: ModuleType, phase: str | None) -> ErrorInfo | None:
    if isinstance(exc, ssl.SSLWantReadError | ssl.SSLWantWriteError):
        return None
    if isinstance(exc, ssl.SSLEOFError):
        return _info(ErrorCategory.CONNECTION_LOST, "SSLEOFError", phase)
    if isinstance(exc, ssl.SSLZeroReturnError):
        return _info(ErrorCategory.CONNECTION_LOST, "SSLZeroReturnError", phase)
    if isinstance(exc, ssl.SSLCertVerificationError):
        # Only a handshake verifies a certificate: nothing of the application's can have gone
        # out (docs/design.md §3: maybe_delivered is False "in the handshake"), whatever phase.
        return _info(ErrorCategory.TLS_PERMANENT, "SSLCertVerificationError", "connect")
    if isinstance(exc, ssl.SSLSyscallError):
        # SSL_ERROR_SYSCALL: the OS error behind it, or an EOF that broke the protocol.
        return _info(ErrorCategory.CONNECTION_LOST, "SSLSyscallError", phase)
    reason = getattr(exc, "reason", None) or ""
    if reason in _TLS_TRANSPORT_REASONS:
        return _info(ErrorCategory.TLS_TRANSPORT, reason, phase)
    if reason in _TLS_LOST_REASONS:
        return _info(ErrorCategory.CONNECTION_LOST, reason, phase)
    # WRONG_VERSION_NUMBER (plaintext port), BAD_LENGTH, handshake failures, alerts, unknown
    # ones: not retried. "Every SSLError is a connection error" spins forever on a bad cert.
    return _info(ErrorCategory.TLS_PERMANENT, reason or type(exc).__name__, phase)


def _qualnames(exc: BaseException) -> list[str]:
    return [f"{k.__module__}.{k.__qualname__}" for k in type(exc).__mro__]


def _is_wrapper(exc: BaseException) -> bool:
    mro = _qualnames(exc)
    return any(name in _WRAPPERS for name in mro) or any(
        isinstance(exc, k) for k in _REGISTERED
    )


def _classify_wrapper(exc: BaseException, phase: str | None) -> ErrorInfo | None | bool:
    for klass in type(exc).__mro__:
        if klass in _REGISTERED:
            category = _REGISTERED[klass]
            return None if category is None else _info(category, klass.__name__, phase)
    for name in _qualnames(exc):
        if name in _WRAPPERS:
            category = _WRAPPERS[name]
            return None if category is None else _info(category, type(exc).__name__, phase)
    return False


def _chain(exc: BaseException, limit: int = 32, context: bool = True) -> list[BaseException]:
    """The exception and everything it points at, breadth first, each once. With
    ``context=False`` the implicit ``__context__`` links are not followed."""
    seen: set[int] = set()
    out: list[BaseException] = []
    queue = [exc]
    while queue and len(out) < limit:
        item = queue.pop(0)
        if id(item) in seen:
            continue
        seen.add(id(item))
        out.append(item)
        linked: list[object] = [item.__cause__, item.__context__ if context else None,
                                getattr(item, "reason", None)]
        linked.extend(getattr(item, "args", ()) or ())
        queue.extend(x for x in linked if isinstance(x, BaseException))
    return out


def classify(exc: BaseException, *, phase: str | None = None,
             context: bool = True) -> ErrorInfo | None:
    """Classify ``exc``: an :class:`ErrorInfo` for a connection problem, else ``None``.

    ``phase`` (``"connect"``, ``"read"`` or ``"write"``) is what the caller knows about where
    the error happened; ``"connect"`` turns timeouts into ``CONNECT_TIMEOUT`` and sets
    ``maybe_delivered=False``. Anything that is not an ``Exception`` is never classified.

    ``context=False`` classifies the error on its own: the implicit ``__context__`` (the
    exception being handled when it was raised) is not followed. The socket classifies errors
    raised while reconnecting this way, so the original drop cannot make an unrelated error (a
    ``ValueError`` from a hook, ``EADDRINUSE``) look retryable (docs/design.md §3, review r02).
    """
    if not isinstance(exc, Exception):
        return None
    chain = _chain(exc, context=context)
    # A type declared "never" stops the walk before we look inside it (e.g. HTTPError).
    for item in chain[:1]:
        if _classify_wrapper(item, phase) is None:
            return None
    for item in chain:  # pass 1: a real OS / ssl / resolver error anywhere
        if not isinstance(item, Exception):
            continue
        result = _classify_os(item, phase)
        if result is not False:
            return result if isinstance(result, ErrorInfo) else None
    for item in chain:  # pass 2: wrapper types
        result = _classify_wrapper(item, phase)
        if result is not False:
            return result if isinstance(result, ErrorInfo) else None
    return None


def is_connection_error(exc: BaseException) -> bool:
    """``classify(exc) is not None``."""
    return classify(exc) is not None
