"""A gevent hub in its own native thread, for test servers and the fault proxy.

Why a thread: a test (or the demo) often blocks the main thread - waiting on a subprocess, or
running plain blocking sockets - and a proxy sharing that thread's hub would stall. Each
LoopThread has its own hub; ``call`` runs a function there and returns its result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import gevent
import gevent.event
from gevent import monkey

T = TypeVar("T")

# The real thread primitives, even when the process is monkey-patched.
_start_thread = monkey.get_original("_thread", "start_new_thread")
_allocate_lock = monkey.get_original("_thread", "allocate_lock")
_get_ident = monkey.get_original("_thread", "get_ident")


class LoopThread:
    """A native thread running a gevent hub until ``stop()``."""

    def __init__(self, name: str = "resilientsock-loop") -> None:
        self.name = name
        self._ready = _allocate_lock()
        self._ready.acquire()
        self._hub: Any = None
        self._stop_event: Any = None
        self._stopper: Any = None
        self._ident: int | None = None
        self._done = _allocate_lock()
        self._done.acquire()

    def start(self) -> LoopThread:
        """Start the thread and wait until its hub runs; a second call does nothing."""
        if self._ident is not None:
            return self
        _start_thread(self._run, ())
        if not self._ready.acquire(timeout=10):
            raise RuntimeError(f"{self.name}: loop thread did not start")
        return self

    def _run(self) -> None:
        try:
            self._ident = _get_ident()
            self._hub = gevent.get_hub()
            self._stop_event = gevent.event.Event()
            # An active async watcher keeps this hub's loop alive while idle (otherwise the wait
            # below is a LoopExit) and is the thread-safe way to ask it to stop.
            self._stopper = self._hub.loop.async_()
            self._stopper.start(self._stop_event.set)
            self._ready.release()
            self._stop_event.wait()
            self._stopper.close()
        finally:
            try:
                self._hub.destroy(destroy_loop=True)
            except Exception:  # pragma: no cover - best effort at teardown
                pass
            self._done.release()

    def call(self, func: Callable[..., T], *args: Any, timeout: float = 10.0) -> T:
        """Run ``func(*args)`` in a greenlet of this loop and return its result (or raise)."""
        if _get_ident() == self._ident:
            return func(*args)
        done = _allocate_lock()
        done.acquire()
        box: dict[str, Any] = {}

        def runner() -> None:
            try:
                box["value"] = func(*args)
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller
                box["error"] = exc
            finally:
                done.release()

        self._hub.loop.run_callback_threadsafe(lambda: gevent.spawn(runner))
        if not done.acquire(timeout=timeout):
            raise TimeoutError(f"{self.name}: call to {func!r} did not finish in {timeout} s")
        if "error" in box:
            raise box["error"]
        return box["value"]  # type: ignore[no-any-return]

    def spawn(self, func: Callable[..., Any], *args: Any) -> None:
        """Start ``func(*args)`` in this loop without waiting for it."""
        self._hub.loop.run_callback_threadsafe(lambda: gevent.spawn(func, *args))

    def stop(self) -> None:
        if self._stop_event is None:
            return
        self._stopper.send()
        self._done.acquire(timeout=10)
        self._stop_event = None


S = TypeVar("S", bound="ListenerService")


class ListenerService:
    """A TCP listener served on a LoopThread: its own, or one shared with other services.

    Subclasses handle each accepted connection (``_handle``, in its own greenlet) and say what
    ``shutdown`` must close besides the listener (``_teardown``).
    """

    _backlog = 1024

    def __init__(self, name: str, host: str, port: int, loop: LoopThread | None) -> None:
        self._own_loop = loop is None
        self._loop = loop or LoopThread(name)
        self._host = host
        self._port = port
        self._listener: Any = None
        self._acceptor: Any = None
        self._handlers: dict[Any, Any] = {}  # handler greenlet -> the socket it was given
        self._shut = False
        self.connections = 0
        self.address: tuple[str, int] = (host, port)

    def start(self: S) -> S:
        if self._own_loop:
            self._loop.start()
        self._loop.call(self._listen)
        return self

    def shutdown(self) -> None:
        """Close everything; stop the loop thread if it is this service's own. A second
        call does nothing."""
        if self._shut:
            return
        self._shut = True
        try:
            self._loop.call(self._shutdown_here)
        finally:
            if self._own_loop:
                self._loop.stop()

    def close(self) -> None:
        """The same as ``shutdown()``: the one way to stop any service (FaultProxy,
        MessageServer, ToxiproxyAPI; Relay has it too). Safe to call twice."""
        self.shutdown()

    def __enter__(self: S) -> S:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # -- inside the loop thread ---------------------------------------------------------------

    def _shutdown_here(self) -> None:
        self._teardown()
        self._drop_handlers()

    def _spawn_handler(self, func: Callable[..., Any], client: Any, *args: Any) -> None:
        """Run ``func(client, *args)`` in a greenlet that ``_drop_handlers`` can end: a
        connection accepted just before shutdown is closed then, not left to the garbage
        collector (a ResourceWarning, under load, in whatever code runs next)."""
        g = gevent.spawn(func, client, *args)
        self._handlers[g] = client
        g.link(lambda done: self._handlers.pop(done, None))

    def _drop_handlers(self) -> None:
        """End every handler greenlet still running and close the socket each was given."""
        current = gevent.getcurrent()
        for g, client in list(self._handlers.items()):
            if g is not current:
                g.kill(block=True, timeout=5)
            client.close()
        self._handlers.clear()

    def _listen(self) -> None:
        """Listen (again) on the same port: SO_REUSEADDR, so a restart finds it free."""
        if self._listener is not None:
            return
        import gevent.socket as gsocket

        family = gsocket.AF_INET6 if ":" in self._host else gsocket.AF_INET  # "::1" too
        sock = gsocket.socket(family, gsocket.SOCK_STREAM)
        sock.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._port))
        sock.listen(self._backlog)
        self._port = sock.getsockname()[1]
        self.address = (self._host, self._port)
        self._listener = sock
        self._acceptor = gevent.spawn(self._accept_loop, sock)

    def _close_listener(self) -> None:
        """Close the listening socket now: a connect right after this is refused."""
        if self._listener is not None:
            # Kill the acceptor first and wait for it: gevent defers the close of a socket a
            # greenlet is still waiting on to a later loop turn, and a connect made before
            # that turn would still be accepted.
            if self._acceptor is not gevent.getcurrent():
                self._acceptor.kill(block=True, timeout=5)
            self._listener.close()
            self._listener = None

    def _accept_loop(self, listener: Any) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            self.connections += 1
            self._spawn_handler(self._handle, client)

    def _handle(self, client: Any) -> None:
        raise NotImplementedError

    def _teardown(self) -> None:
        self._close_listener()
