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
