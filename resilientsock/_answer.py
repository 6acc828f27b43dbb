"""Answer resume's small parts: what a read call asked for and got, and the markers of an
answer that could not be continued (docs/design.md §5b).

Rules of this module:

1. No I/O and no state: functions of a read call's arguments and result, and exception types.
2. A read call is named by its kind (``RECV`` ... ``TLS_READ``), so one bookkeeping path
   serves ``recv``, ``recv_into``, ``recvfrom``, ``recvfrom_into``, ``recvmsg``,
   ``recvmsg_into`` and TLS's ``read``.
"""

from __future__ import annotations

import socket as _std
from typing import Any

__all__ = ["RECV", "RECV_INTO", "RECVFROM", "RECVFROM_INTO", "RECVMSG", "RECVMSG_INTO",
           "TLS_READ"]

# How a read call names its result (for the bookkeeping after it).
RECV, RECV_INTO, RECVFROM, RECVFROM_INTO, RECVMSG, RECVMSG_INTO, TLS_READ = range(7)


class _SetupMismatch(ConnectionError):
    """The connection's setup (a dialect's restore) got a different answer: not retried."""


class _CutNotResumed(Exception):
    """An EOF cut could not be resumed: refused for CUT_RETRY (internal); the caller gets
    the EOF."""


class _AnswerChanged(ConnectionError):
    """Answer resume found a different answer: surfaced (internal marker)."""


def _eof_result(kind: int, args: tuple[Any, ...]) -> Any:
    if kind == RECV_INTO:
        return 0
    if kind == TLS_READ:
        return 0 if len(args) > 1 and args[1] is not None else b""
    if kind == RECVFROM:
        return b"", None
    if kind == RECVFROM_INTO:
        return 0, None
    if kind == RECVMSG:
        return b"", [], 0, None
    if kind == RECVMSG_INTO:
        return 0, [], 0, None
    return b""


def _requested(kind: int, args: tuple[Any, ...]) -> int:
    """How many bytes a read call asked for (0 asks for nothing: its b"" is no EOF)."""
    if kind in (RECV_INTO, RECVFROM_INTO):
        if len(args) > 1 and args[1]:
            return int(args[1])
        return memoryview(args[0]).nbytes
    if kind == RECVMSG_INTO:
        return sum(memoryview(b).nbytes for b in args[0])
    if kind == TLS_READ:
        if len(args) > 1 and args[1] is not None and not args[0]:
            return memoryview(args[1]).nbytes
        return int(args[0]) if args else 1024
    return int(args[0]) if args else 1024


# Where each read call's flags argument sits (recv(bufsize, flags), recv_into(buffer, nbytes,
# flags), recvmsg(bufsize, ancbufsize, flags), ...); TLS reads take none.
_FLAGS_AT = {RECV: 1, RECV_INTO: 2, RECVFROM: 1, RECVFROM_INTO: 2, RECVMSG: 2, RECVMSG_INTO: 2}


# A plain int: `flags & MsgFlag.MSG_PEEK` builds an IntFlag member, ~0.65 µs on every read.
_MSG_PEEK = int(_std.MSG_PEEK)


def _peeking(kind: int, args: tuple[Any, ...]) -> bool:
    """The read is a MSG_PEEK: its bytes stay queued for the next read, which counts them."""
    at = _FLAGS_AT.get(kind)
    return at is not None and len(args) > at and bool(args[at] & _MSG_PEEK)


def _extract(kind: int, args: tuple[Any, ...], result: Any) -> tuple[int, Any]:
    """(bytes read, the data as a buffer) of a read call's result."""
    if kind == RECV:
        return len(result), result
    if kind == RECV_INTO:
        return result, memoryview(args[0]).cast("B")[:result]
    if kind == RECVFROM:
        return len(result[0]), result[0]
    if kind == RECVFROM_INTO:
        n = result[0]
        return n, memoryview(args[0]).cast("B")[:n]
    if kind == RECVMSG:
        return len(result[0]), result[0]
    if kind == RECVMSG_INTO:
        n = result[0]
        out = bytearray()
        for buf in args[0]:
            view = memoryview(buf).cast("B")
            out += view[: n - len(out)]
            if len(out) >= n:
                break
        return n, out
    # TLS read(nbytes, buffer)
    if isinstance(result, int):
        return result, memoryview(args[1]).cast("B")[:result]
    return len(result), result

