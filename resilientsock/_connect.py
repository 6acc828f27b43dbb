"""Opening one connection: resolve the name again, try every address with its own timeout.

Rules of this module (docs/design.md §4, §6):

1. The host name the caller gave is re-resolved at every attempt (addresses change on DHCP or
   DNS failover), and every address it returns is tried in order, as
   ``socket.create_connection`` does.
2. Each address gets its own timeout, as ``create_connection`` gives each address the full
   timeout: a black-holed first address (broken IPv6) must not eat the time of the second
   (review r07). The caller's overall end bounds when a new address may still be started.
3. Options the caller set (``setsockopt``, ``bind``/``source_address``) and the dead-peer
   options are applied to every new connection. A fixed source port is bound with
   ``SO_REUSEADDR`` so that the dead connection it replaces does not keep it (review r22).
4. The result is a value (``Attempt``): the connected raw socket, or the error of every
   address tried. No state rides on the exceptions.
"""

from __future__ import annotations

import errno
import logging
import os
import socket as _std
import time
from _socket import getaddrinfo as _c_getaddrinfo  # the C function: never monkey-patched
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Attempt", "candidates", "open_connection", "dead_peer_options", "INET"]

log = logging.getLogger("resilientsock")

INET = tuple(f for f in (_std.AF_INET, getattr(_std, "AF_INET6", None)) if f is not None)
AF_UNIX = getattr(_std, "AF_UNIX", None)
_IN_PROGRESS = (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY, errno.EAGAIN)


@dataclass
class Attempt:
    """The outcome of one connection attempt."""

    raw: Any = None  # a connected gevent socket (non-blocking), or None
    errors: list[Exception] = field(default_factory=list)  # one per address tried

    @property
    def last(self) -> Exception | None:
        return self.errors[-1] if self.errors else None


def dead_peer_options(family: int, seconds: float | None) -> list[tuple[int, int, int]]:
    """Keepalive + TCP_USER_TIMEOUT so a silently dead link surfaces as ETIMEDOUT in about
    ``seconds``. Options the platform lacks are skipped."""
    if seconds is None or family not in INET:
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


def candidates(target: Any, family: int, any_family: bool) -> list[tuple[int, int, Any]]:
    """(family, proto, sockaddr) for every address of ``target``, resolved now."""
    if family == AF_UNIX and not isinstance(target, tuple):
        return [(family, 0, target)]
    host, port = target[0], target[1]
    resolve = _resolver()
    infos: Any = None
    if resolve is _gevent_resolve:
        # A numeric address needs no lookup: answered in C at once, where gevent's resolver
        # would hop to its thread pool and back (docs/design.md §12: recovery time that is not I/O).
        try:
            infos = _c_getaddrinfo(host, port, 0 if any_family else family, _std.SOCK_STREAM,
                                   0, _std.AI_NUMERICHOST)
        except (OSError, UnicodeError, TypeError, ValueError):
            infos = None  # a name (or something to fail the usual way): the resolver's
    if infos is None:
        infos = resolve(host, port, 0 if any_family else family, _std.SOCK_STREAM)
    out = []
    for af, _type, proto, _name, sockaddr in infos:
        if len(target) == 4 and af == getattr(_std, "AF_INET6", None):
            sockaddr = (sockaddr[0], sockaddr[1], target[2], target[3] or sockaddr[3])
        out.append((af, proto, sockaddr))
    return out


# The resolver (gevent's cooperative getaddrinfo). A module attribute so that a test can answer
# a name with addresses of its choosing: ``resilientsock._connect.getaddrinfo = fake``.
getaddrinfo: Any = None


_gevent_resolve: Any = None


def _resolver() -> Any:
    global getaddrinfo, _gevent_resolve
    if getaddrinfo is None:
        from gevent.socket import getaddrinfo as resolve

        getaddrinfo = _gevent_resolve = resolve
    return getaddrinfo


def try_setsockopt(raw: Any, level: int, opt: int, value: Any) -> None:
    try:
        raw.setsockopt(level, opt, value)
    except OSError as exc:  # e.g. TCP options on a platform that has the name only
        log.debug("setsockopt(%s, %s, %r) failed: %s", level, opt, value, exc)


def open_connection(make_raw: Any, addresses: list[tuple[int, int, Any]], *,
                    per_address: float | None, end: float | None, options: dict[Any, Any],
                    source: Any, dead_peer: float | None, pending: list[Any]) -> Attempt:
    """Connect to the first address that answers.

    ``make_raw(family, proto)`` builds an unconnected gevent socket; ``per_address`` is each
    address's own timeout, as ``create_connection`` gives each the full timeout (rule 2); no
    further address is started after ``end`` (time.monotonic()).
    ``pending`` receives ``[raw, watcher]`` while its connect is under way, so that a
    ``close()`` from another greenlet can cancel the wait and close it (review r05b).
    """
    from gevent.hub import get_hub
    from gevent.socket import wait

    attempt = Attempt()
    for af, proto, sockaddr in addresses:
        if attempt.errors and end is not None and time.monotonic() >= end:
            break
        limit = per_address
        raw = make_raw(af, proto)
        entry = [raw, None]
        pending.append(entry)
        try:
            raw.setblocking(False)
            for level, opt, value in dead_peer_options(af, dead_peer):
                try_setsockopt(raw, level, opt, value)
            for (level, opt), value in options.items():
                try_setsockopt(raw, level, opt, value)
            if source is not None:
                if af in INET and isinstance(source, tuple) and len(source) > 1 and source[1]:
                    try_setsockopt(raw, _std.SOL_SOCKET, _std.SO_REUSEADDR, 1)
                raw.bind(source)
            err = raw.connect_ex(sockaddr)
            if err in _IN_PROGRESS:
                watcher = entry[1] = get_hub().loop.io(raw.fileno(), 2)
                try:
                    wait(watcher, timeout=limit, timeout_exc=TimeoutError("timed out"))
                finally:
                    entry[1] = None
                    watcher.close()
                err = raw.getsockopt(_std.SOL_SOCKET, _std.SO_ERROR)
            if err and err != errno.EISCONN:
                raise OSError(err, _strerror(err))
            pending.remove(entry)
            attempt.raw = raw
            return attempt
        except BaseException as exc:
            if entry in pending:
                pending.remove(entry)
            raw.close()
            if not isinstance(exc, Exception):
                raise
            attempt.errors.append(exc)
    if not attempt.errors:
        attempt.errors.append(OSError(errno.EADDRNOTAVAIL, "no address to connect to"))
    return attempt


def _strerror(err: int) -> str:
    try:
        return os.strerror(err)
    except ValueError:  # pragma: no cover
        return f"error {err}"
