"""Protocol knowledge for the recovery core, as sans-IO modules (docs/design.md §5a, §5b).

``detect(first_write, first_read, prelude=N)`` picks a dialect from a connection lineage's
first bytes; the core then feeds it every record written and chunk read and asks it whether a
drop may be recovered (``refusal``), what setup a new connection needs (``restore``), whether
an exchange must be kept whole (``hold``), whether the answer in progress may be re-requested
(``resumable``) and which bytes of an answer are exempt from comparison (``mask``).

Rules of this module: it imports nothing heavy at import time (h11 is imported by the HTTP
dialect when one is made); ``detect`` is cheap and never raises; None means an unknown protocol
and the core's byte rules (including the banner rule for SMTP, FTP, POP3, IMAP).
"""

from __future__ import annotations

from ._base import Dialect as Dialect
from ._base import Restore as Restore
from ._base import SetupMismatch as SetupMismatch

__all__ = ["Dialect", "Restore", "SetupMismatch", "detect"]


def detect(first_write: bytes | None, first_read: bytes | None, *,
           prelude: int = 0) -> Dialect | None:
    """The dialect for a connection whose first bytes are these, or None (unknown protocol).

    ``first_write``: the first record, when the application wrote before reading;
    ``first_read``: the first chunk, when the server spoke first. ``prelude`` > 0 with no
    specific dialect gives a ``PreludeDialect(prelude)`` (not for a server-first protocol:
    its banner stays the core's banner rule). Never raises.
    """
    try:
        return _detect(first_write, first_read, prelude)
    except Exception:  # garbage must never break a connection
        return None


def _detect(first_write: bytes | None, first_read: bytes | None, prelude: int) -> Dialect | None:
    from . import handshake, resp

    if first_write:
        first_write = bytes(first_write)
        if _looks_like_http(first_write):
            from .http import HttpDialect

            return HttpDialect()
        if resp.looks_like(first_write):
            return resp.RespDialect()
        from . import memcached

        if memcached.looks_like(first_write):
            return memcached.MemcachedDialect()
        from . import stomp

        if stomp.looks_like(first_write):
            return stomp.StompDialect()
        from . import ldap

        if ldap.looks_like(first_write):
            return ldap.LdapDialect()
    elif first_read:
        first_read = bytes(first_read)
    found = handshake.detect(first_write or None, first_read or None)
    if found is not None:
        return found
    if prelude > 0 and first_write:
        from .prelude import PreludeDialect

        return PreludeDialect(prelude)
    return None


_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"TRACE ",
            b"PATCH ", b"CONNECT ", b"PROPFIND ", b"PROPPATCH ", b"MKCOL ", b"COPY ",
            b"MOVE ", b"LOCK ", b"UNLOCK ", b"REPORT ", b"SEARCH ", b"PURGE ")


def _looks_like_http(first_write: bytes) -> bool:
    """Is this first record an HTTP/1.x request (a request line, or the start of one)?"""
    if not first_write.startswith(_METHODS):
        return False
    end = first_write.find(b"\r\n", 0, 8192)
    if end < 0:
        end = first_write.find(b"\n", 0, 8192)
    if end < 0:
        return len(first_write) < 8192 and b"\n" not in first_write
    line = first_write[:end].rstrip(b"\r")
    return line.endswith((b" HTTP/1.1", b" HTTP/1.0")) and line.count(b" ") == 2
