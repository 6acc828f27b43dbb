"""Shared helpers. The pytest process is never monkey-patched: tests of patch() and of the
runner start subprocesses. Servers and the FaultProxy run on their own gevent hub in a native
thread (resilientsock.testing.LoopThread), so they keep running while a test blocks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from resilientsock import _stats
from resilientsock.testing import FaultProxy, MessageServer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _fresh_stats() -> Iterator[None]:
    _stats.reset()
    yield


@pytest.fixture
def server() -> Iterator[MessageServer]:
    srv = MessageServer().start()
    try:
        yield srv
    finally:
        srv.shutdown()


@pytest.fixture
def proxy(server: MessageServer) -> Iterator[FaultProxy]:
    with FaultProxy(server.address) as p:
        yield p


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll a condition with a bound (never a bare sleep as synchronisation)."""
    import gevent

    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        gevent.sleep(0.005)


def readline(sock, limit: int = 1 << 16) -> bytes:  # type: ignore[no-untyped-def]
    """Read one line byte by byte-ish from a socket (no makefile buffering across drops)."""
    out = b""
    while not out.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            return out
        out += chunk
        if len(out) > limit:
            raise AssertionError("line too long")
    return out


def run_py(args: list[str], env: dict[str, str] | None = None, timeout: float = 60,
           cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python args...`` with this interpreter; the repo on PYTHONPATH."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.pop("RESILIENTSOCK_DEADLINE", None)
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd)
