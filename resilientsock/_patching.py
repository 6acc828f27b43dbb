"""patch() / unpatch(): make every client socket in the process resilient.

Rules of this module (docs/design.md §7):

1. gevent first: ``gevent.monkey.patch_all()`` (keywords only) runs before anything here
   imports ssl, socket classes or wrapt.
2. Every replacement goes through ``gevent.monkey.patch_item`` (so ``get_original`` still
   returns the stdlib object) and is also recorded here, so ``unpatch()`` restores exactly what
   was there before, by identity. ``patch()`` twice is harmless (the second call only updates
   the policy).
3. A later ``gevent.monkey.patch_socket()`` / ``patch_ssl()`` would put gevent's classes back:
   a ``zope.event`` subscriber on ``GeventDidPatchModuleEvent`` re-applies ours. No entry point
   is registered (that would make every ``patch_all()`` resilient).
4. Modules that bound ``socket``/``ssl`` objects before patching keep the old ones: we name
   them in a warning instead of guessing.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import TYPE_CHECKING, Any

from ._policy import RetryPolicy

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ._policy import PatchFields

__all__ = ["patch", "unpatch", "is_patched"]

log = logging.getLogger("resilientsock")

# (owner object, attribute) -> the value before patch(); in patch order.
_saved: list[tuple[Any, str, Any]] = []
_subscriber: Any = None
_patched = False
_ABSENT = object()  # an attribute that did not exist before patch(): unpatch() deletes it


class ResilientsockPatchWarning(RuntimeWarning):
    """A module kept a reference to a socket/ssl object from before ``patch()``."""


def is_patched() -> bool:
    """True between ``patch()`` and ``unpatch()``."""
    return _patched


def patch(policy: RetryPolicy | None = None, *, session: Any = None,
          **policy_fields: Unpack[PatchFields]) -> None:
    """Monkey-patch with gevent, then make every client stream socket resilient.

    ``policy`` (default: ``RetryPolicy.from_env()``, i.e. the defaults overridden by
    ``RESILIENTSOCK_*`` variables) with ``policy_fields`` applied on top becomes the policy of
    every socket created afterwards; a second call (already patched) starts from the policy in
    force instead, so it changes only what it names. ``session`` (a list of ``"HOST:PORT"`` or
    ``(host, port)`` pairs, or one string with commas; None: ``RESILIENTSOCK_SESSION`` on the
    first call, the targets in force on a later one; False: none) names the targets whose
    connections become sessions through a relay (docs/design.md §11); only those speak the
    session protocol. An unknown keyword is a ``TypeError`` naming it, an invalid field or target a
    ``ValueError``: both raised before anything is patched.
    """
    global _patched, _subscriber
    if policy is not None and not isinstance(policy, RetryPolicy):
        raise TypeError(f"patch(policy=...) needs a RetryPolicy, got {policy!r}")
    if policy is None and _patched:
        # A second call changes what it names and keeps the rest (docs/design.md §2: "patch()
        # twice is harmless"): a script that calls patch() itself under the runner keeps the
        # runner's options and session targets.
        from . import _socket

        policy = _socket.default_policy()
    effective = (policy or RetryPolicy.from_env()).replace(**policy_fields)
    where = "patch(session=...)"
    keep_targets = session is None and _patched
    if session is None and not _patched:
        import os

        session = os.environ.get("RESILIENTSOCK_SESSION") or None
        where = f"RESILIENTSOCK_SESSION={session!r}"
    targets = _parse_session(session, where)

    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        monkey.patch_all(socket=True, ssl=True, thread=True, select=True)
        _watch_children()
        _quiet_signal_errors()
    elif not monkey.is_module_patched("ssl"):
        # monkey.patch_socket() alone ran before us: the stdlib SSLContext would build our
        # TLS class through an API it lacks (review r08). gevent's ssl goes in first.
        monkey.patch_ssl()
    from .session import targets as _targets  # no gevent, no client: just the registry

    if not keep_targets and (targets or _targets.session_targets()):
        _targets.set_session_targets(targets or None)

    from . import _socket

    _socket.set_default_policy(effective)
    if _patched:
        return
    _apply()
    from . import _libraries, _machine

    _machine.preload_dialects()  # not on the first write (docs/design.md §12)

    _libraries.install()  # which sockets a retrying client library opens (wrapt hooks)
    _warn_early_bindings()
    if _subscriber is None:
        import zope.event

        _subscriber = _on_gevent_event
        zope.event.subscribers.append(_subscriber)
    _patched = True
    log.debug("resilientsock patched: %s", effective.summary())


def unpatch() -> None:
    """Restore every attribute ``patch()`` replaced, exactly (by identity).

    gevent's own monkey-patching stays in place: it cannot be undone safely.
    """
    global _patched, _subscriber
    if not _patched:
        return
    _restore()
    if _subscriber is not None:
        import zope.event

        try:
            zope.event.subscribers.remove(_subscriber)
        except ValueError:
            pass
        _subscriber = None
    from . import _socket

    _socket.set_default_policy(None)
    from .session import targets as _targets

    if _targets.session_targets():
        _targets.set_session_targets(None)
    _patched = False


def _watch_children() -> None:
    """Install libev's SIGCHLD handler now, as ``gevent.subprocess`` does before it forks.

    gevent's patched ``os.fork`` starts a child watcher and its ``os.waitpid`` waits on one,
    but neither installs the handler that makes child watchers fire: until something else
    (``subprocess``) did, ``os.fork()`` then ``os.waitpid(pid, 0)`` waited for ever once the
    child had exited (gevent 26.9: 40 hangs in 40 runs under ``patch_all()``, 16 in 40 under
    the runner; plain python: none). Only the default loop (the main thread's) watches
    children."""
    import threading

    from gevent import get_hub, monkey

    if not monkey.is_module_patched("os") or threading.current_thread() is not \
            threading.main_thread():
        return
    loop = get_hub().loop
    install = getattr(loop, "install_sigchld", None)
    if install is not None and getattr(loop, "default", False):
        install()


def _quiet_signal_errors() -> None:
    """An exception raised by a Python signal handler (``KeyboardInterrupt`` at Ctrl-C, a
    ``SIGALRM`` handler's timeout) reaches the main greenlet, as plain python raises it in the
    main thread; gevent's hub printed it first as well (context ``None``, a traceback and a
    timestamp on stderr), so the user saw it twice. The main hub now only throws it: the
    application handles it, or Python prints it once. Other hub errors (a libev
    ``SystemError``, a greenlet's exception) are printed as before."""
    import threading

    from gevent import get_hub
    from gevent.exceptions import HubDestroyed

    if threading.current_thread() is not threading.main_thread():
        return
    hub = get_hub()
    original = hub.handle_error

    def handle_error(context: Any, kind: Any, value: Any, tb: Any) -> None:
        if (context is None and isinstance(value, BaseException)
                and not isinstance(value, SystemError | HubDestroyed)):
            hub.handle_system_error(type(value), value, tb)
            return
        original(context, kind, value, tb)

    hub.handle_error = handle_error


def _is_address(value: Any) -> bool:
    # (host, port), or IPv6's (host, port, flowinfo, scope_id)
    return (isinstance(value, tuple) and len(value) in (2, 4) and isinstance(value[0], str)
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def _parse_session(value: Any, where: str = "patch(session=...)") -> list[str]:
    if value is None or value is False:
        return []  # no session targets (``False`` as ``RetryPolicy(session=False)`` says it)
    items: list[Any]
    if isinstance(value, str):
        items = [t.strip() for t in value.split(",")]
    elif _is_address(value):
        items = [value]  # one (host, port), as socket addresses and ``Relay.address`` are
    elif isinstance(value, list | tuple | set | frozenset):
        items = list(value)
    else:
        raise ValueError(f"{where}: expected 'HOST:PORT[,HOST:PORT...]' or a "
                         f"list of them, got {value!r}")
    # A (host, port) pair is the target a socket address names: ``Relay.address`` or what
    # the application passes to create_connection. IPv6 hosts get their brackets.
    from .session.targets import format_address, parse_address

    items = [format_address(t[0], t[1]) if _is_address(t) else t for t in items if t]
    if items:
        for item in items:
            if not isinstance(item, str):
                raise ValueError(f"{where}: {item!r} is not a 'HOST:PORT' string or a "
                                 "(host, port) pair")
            try:
                parse_address(item)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
    return items


def _replacements() -> list[tuple[Any, str, Any]]:
    import socket
    import ssl

    from . import _socket, _tls

    items: list[tuple[Any, str, Any]] = [
        (socket, "socket", _socket.ResilientSocket),
        (socket, "SocketType", _socket.ResilientSocket),
        (socket, "create_connection", _socket.create_connection),
        (socket, "fromfd", _fromfd),
        (socket, "socketpair", _socketpair),
        (ssl.SSLContext, "sslsocket_class", _tls.ResilientSSLSocket),
    ]
    if hasattr(socket, "_fallback_socketpair"):  # 3.13 and backports; not 3.10-3.12.1
        fallback = _fallback_socketpair()
        if fallback is not None:
            items.append((socket, "_fallback_socketpair", fallback))
    if hasattr(ssl, "wrap_socket"):  # removed in 3.12
        items.append((ssl, "wrap_socket", _tls.wrap_socket))
    return items


def _apply() -> None:
    from gevent import monkey

    for owner, attr, new in _replacements():
        current = getattr(owner, attr, _ABSENT)
        if current is new:
            continue
        _saved.append((owner, attr, current))
        if isinstance(owner, type):
            setattr(owner, attr, new)  # a class attribute; patch_item keys by module name
        else:
            monkey.patch_item(owner, attr, new)


def _restore() -> None:
    while _saved:
        owner, attr, old = _saved.pop()
        if old is _ABSENT:
            if attr in vars(owner):
                delattr(owner, attr)
        else:
            setattr(owner, attr, old)


def _on_gevent_event(event: Any) -> None:
    """Re-apply after gevent patches socket/ssl again (it would put its own classes back)."""
    name = getattr(event, "module_name", None)
    if _patched and name in ("socket", "ssl") and type(event).__name__.startswith("GeventDid"):
        for owner, attr, new in _replacements():
            if getattr(owner, attr, None) is not new:
                log.debug("re-applying resilientsock to %s.%s after gevent re-patched it",
                          getattr(owner, "__name__", owner), attr)
                setattr(owner, attr, new)


def _warn_early_bindings() -> None:
    """Name modules that did ``from socket import create_connection`` (etc.) before patch()."""
    from gevent import monkey

    originals = {}
    for name in ("socket", "create_connection", "SocketType"):
        value = monkey.get_original("socket", name)
        originals[id(value)] = f"socket.{name}"
    try:
        import gevent._socket3 as g3
        import gevent.socket as gsock

        originals[id(g3.socket)] = "gevent socket class"
        originals[id(gsock.create_connection)] = "gevent create_connection"
    except ImportError:  # pragma: no cover
        pass
    offenders = []
    for modname, module in list(sys.modules.items()):
        if module is None or modname.startswith(("gevent", "resilientsock", "socket", "_")):
            continue
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for attr, value in list(namespace.items()):
            what = originals.get(id(value))
            if what is not None and modname not in ("ssl", "socket"):
                offenders.append(f"{modname}.{attr} ({what})")
    if offenders:
        warnings.warn(
            "resilientsock.patch(): these names were bound before patching and stay "
            "unprotected: " + ", ".join(sorted(offenders)[:10])
            + " (call patch() earlier, before importing them)",
            ResilientsockPatchWarning, stacklevel=3)


def _fromfd(fd: int, family: int, type: int, proto: int = 0) -> Any:
    """``socket.fromfd`` returning our class (never resilient: nobody connected it here)."""
    import os

    from ._socket import ResilientSocket

    return ResilientSocket(family, type, proto, fileno=os.dup(fd))


_fallback_cache: dict[int, Any] = {}


def _fallback_socketpair() -> Any:
    """gevent's ``socket._fallback_socketpair``, building our class instead of gevent's.

    gevent installs its own copy of the stdlib function (the pure-Python socketpair over a
    loopback TCP connection); its ``socket`` global is gevent's class, so under ``patch()`` it
    would hand out sockets that are not ``socket.socket`` instances and that ignore anything a
    caller changed on ``socket.socket`` (CPython's test_socket patches ``getsockname`` there to
    inject a rogue peer). The copy below runs the same code with ``socket`` bound to
    ``ResilientSocket``. Its sockets stay pass-through: the connect is non-blocking.
    """
    import types

    try:
        import gevent._socket3 as g3
    except ImportError:  # pragma: no cover
        return None
    original = getattr(g3, "_fallback_socketpair", None)
    if not isinstance(original, types.FunctionType):
        return None
    cached = _fallback_cache.get(id(original))
    if cached is None:
        from ._socket import ResilientSocket

        namespace = dict(original.__globals__, socket=ResilientSocket)
        cached = types.FunctionType(original.__code__, namespace, original.__name__,
                                    original.__defaults__, original.__closure__)
        cached.__kwdefaults__ = original.__kwdefaults__
        cached.__doc__ = original.__doc__
        cached.__qualname__ = original.__qualname__
        cached.__module__ = __name__
        _fallback_cache[id(original)] = cached
    return cached


def _socketpair(family: Any = None, type: Any = None, proto: int = 0) -> tuple[Any, Any]:
    """``socket.socketpair`` returning two of our (pass-through) sockets."""
    import socket as _std

    from gevent import monkey

    from ._socket import ResilientSocket

    original = monkey.get_original("socket", "socketpair")
    if family is None:
        family = getattr(_std, "AF_UNIX", _std.AF_INET)
    if type is None:
        type = _std.SOCK_STREAM
    a, b = original(family, type, proto)
    pair = (ResilientSocket(family, type, proto, fileno=a.detach()),
            ResilientSocket(family, type, proto, fileno=b.detach()))
    return pair
