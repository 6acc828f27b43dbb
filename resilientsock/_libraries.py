"""Which sockets belong to a client library that retries on its own (docs/design.md §4, §9).

Layered retries multiply (the library's × ours), so a socket that a retrying library opens
is treated differently: its first connect is the library's to retry, and a refused reconnect
after a drop inside a call the library will retry is surfaced at once. This module decides
*which* sockets those are, when they are created, never by walking the stack at error time
(a stack walk took application code called back from inside the library — redis-py's
``r.transaction(func)`` — for the library's own, wave 3 w8).

Rules of this module:

1. ``patch()`` calls ``install()``: wrapt post-import hooks wrap each known library's own
   connect function (``KNOWN``). While one runs, a context variable names the library and
   the object whose connect it is (a redis-py ``Connection``); ``_socket`` reads it once, at
   the socket's first connect, and keeps the ``Owner`` on the socket's machine. A socket
   opened anywhere else — application code, even code called back from inside the library —
   has no owner.
2. Calls of the library that say how many retries it has left (urllib3's ``urlopen`` and its
   ``Retry``; a redis-py ``RedisCluster`` call, whose node connections have ``Retry(0)``)
   are marked the same way, and are consulted only for sockets the library owns.
3. A context variable is per thread and per greenlet (greenlet >= 1.0): one greenlet's mark
   is never another's.
4. Nothing here does I/O, and nothing fails the application: a library version whose
   functions are not where ``KNOWN`` says is left unmarked (its sockets are plain clients).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any

__all__ = ["Owner", "KNOWN", "ONE_SHOT", "install", "owner_now", "retrying_now", "draining",
           "connect_retried_by_library", "one_shot_now"]

# (library, module, qualified names of its connect functions). The library's name is the one
# notes and logs show.
KNOWN: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("redis", "redis.connection", ("*._connect",)),
    ("urllib3", "urllib3.util.connection", ("create_connection",)),
    ("pymysql", "pymysql.connections", ("Connection.connect",)),
    ("pymemcache", "pymemcache.client.base", ("Client._connect",)),
    ("httpcore", "httpcore._backends.sync", ("SyncBackend.connect_tcp",
                                             "SyncBackend.connect_unix_socket")),
    ("kombu", "amqp.transport", ("_AbstractTransport.connect",)),
    ("pika", "pika.adapters.utils.connection_workflow", ("_TCPConnector._connect",)),
    # pg8000 has no retry layer: its caller (a pool, the application) decides, as for PyMySQL.
    # Measured: a server down for good, pg8000's default timeout=None: plain fails at once,
    # under resilientsock each connect took the whole 30 s deadline.
    ("pg8000", "pg8000.core", ("_make_socket",)),
)

# (module, qualified name, what the connection is): functions whose connections are one-shot.
# A connection opened while one runs is a plain socket, never protected: the listener it
# connects to accepts one connection for one transfer (ftplib's passive data connection; the
# server closes its passive listener after the accept), so a new connection can carry neither
# the rest of a download nor the rest of an upload: reconnecting meets a refused port until the
# budget runs out, or a listener that never serves it, and replays the upload into nothing.
ONE_SHOT: tuple[tuple[str, str, str], ...] = (
    ("ftplib", "FTP.ntransfercmd", "ftplib's data connection"),
)

_connecting: contextvars.ContextVar[Owner | None] = contextvars.ContextVar(
    "resilientsock_library_connect", default=None)
_urlopen_retries: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "resilientsock_urllib3_retries", default=None)
_cluster_retry: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "resilientsock_redis_cluster_retry", default=None)
_draining: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "resilientsock_urllib3_draining", default=False)
_one_shot: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "resilientsock_one_shot", default=None)

_installed = False


@dataclass(frozen=True)
class Owner:
    """The library whose connect function opened a socket, and the object it connected for
    (a redis-py ``Connection``; None where the function is not a method)."""

    library: str
    obj: Any = None


def owner_now() -> Owner | None:
    """The library connecting right now in this greenlet (read at a socket's first connect)."""
    return _connecting.get()


def _redis_retries(obj: Any) -> int | None:
    retry = getattr(obj, "retry", None)
    left = getattr(retry, "_retries", None)
    return left if isinstance(left, int) and not isinstance(left, bool) else None


def connect_retried_by_library(owner: Owner | None) -> bool:
    """Is the first connect of a socket with this owner retried by the library itself?
    Not when the application turned the library's retries off (the README's advice:
    ``redis.Redis(retry=None)``-style ``Retry(0)`` keeps one layer, ours), unless a cluster
    client above it retries."""
    if owner is None:
        return False
    if owner.library == "redis":
        if _positive(_redis_retries_of(_cluster_retry.get())):
            return True
        left = _redis_retries(owner.obj)
        return left is None or left > 0
    return True


def _redis_retries_of(retry: Any) -> int | None:
    left = getattr(retry, "_retries", None)
    return left if isinstance(left, int) and not isinstance(left, bool) else None


def _positive(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n > 0


def retrying_now(owner: Owner | None) -> str | None:
    """The library that will retry the call in progress on a socket it owns (a drop met
    inside it): redis-py with retries left on the connection, or on the cluster client whose
    call this is; urllib3 with retries left in the ``Retry`` of the ``urlopen`` in progress.
    None otherwise (no owner, a library without retries of its own, or retries off): the
    waiting is then resilientsock's policy's."""
    if owner is None:
        return None
    if owner.library == "redis":
        if _positive(_redis_retries_of(_cluster_retry.get())):
            return "redis"
        return "redis" if _positive(_redis_retries(owner.obj)) else None
    if owner.library == "urllib3":
        retries = _urlopen_retries.get()
        total = getattr(retries, "total", retries)
        return "urllib3" if _positive(total) else None
    return None


def one_shot_now() -> str | None:
    """What a connection opened now in this greenlet is, if it is one-shot (``ONE_SHOT``):
    such a socket connects as a plain one and stays plain."""
    return _one_shot.get()


def draining() -> str | None:
    """urllib3 reading the rest of an answer only to throw it away (``drain_conn``)."""
    return "urllib3's drain_conn" if _draining.get() else None


# -- the hooks ----------------------------------------------------------------------------------

def install() -> None:
    """Register the post-import hooks (once; ``patch()`` calls this). A library imported
    already is wrapped at once."""
    global _installed
    if _installed:
        return
    _installed = True
    import wrapt

    for library, module, names in KNOWN:
        wrapt.register_post_import_hook(_hook(library, names), module)
    wrapt.register_post_import_hook(_wrap_urlopen, "urllib3.connectionpool")
    wrapt.register_post_import_hook(_wrap_drain, "urllib3.response")
    wrapt.register_post_import_hook(_wrap_cluster, "redis.cluster")
    for module, name, what in ONE_SHOT:
        wrapt.register_post_import_hook(_one_shot_hook(name, what), module)


def _hook(library: str, names: tuple[str, ...]) -> Any:
    def hook(module: Any) -> None:
        for name in names:
            if name.startswith("*."):
                method = name[2:]
                for value in list(vars(module).values()):
                    if isinstance(value, type) and method in value.__dict__ \
                            and value.__module__ == module.__name__:
                        _wrap(module, f"{value.__name__}.{method}", library)
            else:
                _wrap(module, name, library)
    return hook


def _wrap(module: Any, name: str, library: str) -> None:
    import wrapt

    def connecting(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        if _connecting.get() is not None:
            return wrapped(*args, **kwargs)  # nested (SSLConnection._connect calls super's)
        token = _connecting.set(Owner(library, instance))
        try:
            return wrapped(*args, **kwargs)
        finally:
            _connecting.reset(token)

    try:
        wrapt.wrap_function_wrapper(module, name, connecting)
    except (AttributeError, ImportError, TypeError):
        pass  # not in this version of the library: its sockets stay plain clients


def _set_during(var: contextvars.ContextVar[Any], value_of: Any) -> Any:
    def wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        token = var.set(value_of(instance, args, kwargs))
        try:
            return wrapped(*args, **kwargs)
        finally:
            var.reset(token)
    return wrapper


def _urlopen_retries_of(instance: Any, args: Any, kwargs: Any) -> Any:
    retries = kwargs.get("retries", args[4] if len(args) > 4 else None)
    if retries is None:
        retries = getattr(instance, "retries", None)
    return retries


def _wrap_urlopen(module: Any) -> None:
    _wrap_with(module, "HTTPConnectionPool.urlopen", _set_during(_urlopen_retries,
                                                                 _urlopen_retries_of))


def _wrap_drain(module: Any) -> None:
    for name in ("BaseHTTPResponse.drain_conn", "HTTPResponse.drain_conn"):
        if name.split(".")[0] in vars(module) and "drain_conn" in vars(
                vars(module)[name.split(".")[0]]):
            _wrap_with(module, name, _set_during(_draining, lambda i, a, k: True))


def _wrap_cluster(module: Any) -> None:
    _wrap_with(module, "RedisCluster.execute_command",
               _set_during(_cluster_retry, lambda i, a, k: getattr(i, "retry", None)))


def _one_shot_hook(name: str, what: str) -> Any:
    def hook(module: Any) -> None:
        _wrap_with(module, name, _set_during(_one_shot, lambda i, a, k: what))
    return hook


def _wrap_with(module: Any, name: str, wrapper: Any) -> None:
    import wrapt

    try:
        wrapt.wrap_function_wrapper(module, name, wrapper)
    except (AttributeError, ImportError, TypeError):
        pass
