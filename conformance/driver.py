"""Run one CPython test file from the interpreter's own ``test`` package under one patching way.

    python conformance/driver.py WAY TEST_NAME OUT.jsonl [TEST_ID,...]

WAY is ``gevent`` (``gevent.monkey.patch_all()`` alone), ``replay-none``
(``resilientsock.patch(replay="none")``) or ``default`` (``resilientsock.patch()``).

Every test's outcome is appended to OUT.jsonl as it happens (``{"id", "outcome", "detail"}``),
preceded by a ``start`` line, so a file killed by the caller's timeout still reports what ran
and which test was running. The setup copies what ``gevent.testing.monkey_test`` does for the
same job: gevent's own disabled tests are skipped with their reason, thread-count checks that
cannot work under monkey-patching are neutralised, and ``import_fresh_module`` does not undo
the patching. The same setup is used for all three ways, so only the patching differs.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
import types
import unittest
from typing import Any, TextIO

# Resources the test package may use. Left out, with the reason the report prints:
EXCLUDED_RESOURCES = {
    "network": "reaches hosts outside this machine (only loopback is allowed here)",
    "urlfetch": "downloads test data from the internet",
    "largefile": "writes multi-GB files; says nothing about sockets",
    "cpu": "CPU-heavy variants; say nothing about sockets",
}

# Files that require the "network" resource but only ever talk to loopback (read, not assumed):
# they get it, so they run instead of skipping whole.
LOOPBACK_ONLY = {"test_socketserver": "requires('network') at import; uses socket_helper.HOST "
                                      "(127.0.0.1) and Unix sockets only"}

# Tests that cannot run on this kind of machine whatever the patching, checked with plain
# CPython (no gevent, no resilientsock): skipped in every way, with the reason.
MACHINE_SKIPS = {
    "ThreadedVSOCKSocketStreamTest": "machine: hangs under plain CPython too: this VM has "
                                     "/dev/vsock but no vsock loopback peer",
    # Passes under plain CPython, hangs under gevent.monkey.patch_all() alone (the baseline):
    # it pthread_kill()s the main thread while a patched "thread" (a greenlet) writes.
    # Untestable in all three ways, so it would only stop the rest of the file.
    "SocketWriterTest.test_write": "gevent: hangs under gevent.monkey.patch_all() alone "
                                   "(pthread_kill of the main thread during a write)",
}


def patch(way: str) -> None:
    if way == "gevent":
        from gevent import monkey

        monkey.patch_all()
    elif way in ("replay-none", "default"):
        import resilientsock

        if way == "replay-none":
            resilientsock.patch(replay="none")
        else:
            resilientsock.patch()
    else:
        raise SystemExit(f"unknown way {way!r}: gevent, replay-none or default")


def prepare_support(name: str = "") -> None:
    """What gevent.testing.monkey_test does to test.support before running a stdlib file."""
    import contextlib

    from test import support

    def threading_setup() -> tuple[int, tuple[()]]:
        return (1, ())

    def threading_cleanup(*_args: Any) -> None:
        return None

    @contextlib.contextmanager
    def wait_threads_exit(timeout: float | None = None):  # type: ignore[no-untyped-def]
        yield

    support.threading_setup = threading_setup
    support.threading_cleanup = threading_cleanup
    support.wait_threads_exit = wait_threads_exit
    try:
        from test.support import threading_helper
    except ImportError:
        pass
    else:
        threading_helper.threading_setup = threading_setup
        threading_helper.threading_cleanup = threading_cleanup
        threading_helper.wait_threads_exit = wait_threads_exit
    try:
        from test.support import import_helper
    except ImportError:
        pass
    else:
        import importlib

        def import_fresh_module(name: str, *_a: Any, **_k: Any) -> Any:
            return importlib.import_module(name)  # a fresh import would undo the patching

        import_helper.import_fresh_module = import_fresh_module
    try:
        from test.libregrtest.utils import ALL_RESOURCES  # 3.12+
    except ImportError:
        try:
            from test.libregrtest.cmdline import ALL_RESOURCES  # type: ignore[no-redef]
        except ImportError:
            from test.libregrtest import ALL_RESOURCES  # type: ignore[no-redef,attr-defined]
    support.use_resources = [r for r in ALL_RESOURCES if r not in EXCLUDED_RESOURCES]
    if name in LOOPBACK_ONLY:
        support.use_resources.append("network")
    support.verbose = 0


class Recorder(unittest.TestResult):
    """Writes every outcome as it happens; a subtest failure fails its test."""

    def __init__(self, out: TextIO) -> None:
        super().__init__()
        self.out = out

    def _write(self, test_id: str, outcome: str, detail: str = "") -> None:
        self.out.write(json.dumps({"id": test_id, "outcome": outcome, "detail": detail}) + "\n")
        self.out.flush()

    def startTest(self, test: unittest.TestCase) -> None:  # noqa: N802
        super().startTest(test)
        self._write(test.id(), "start")
        self._t0 = time.monotonic()

    def addSuccess(self, test: unittest.TestCase) -> None:  # noqa: N802
        self._write(test.id(), "pass", f"{time.monotonic() - self._t0:.3f}s")

    def addFailure(self, test: Any, err: Any) -> None:  # noqa: N802
        self._write(test.id(), "fail", self._exc_info_to_string(err, test)[-2000:])

    def addError(self, test: Any, err: Any) -> None:  # noqa: N802
        self._write(test.id(), "error", self._exc_info_to_string(err, test)[-2000:])

    def addSkip(self, test: Any, reason: str) -> None:  # noqa: N802
        self._write(test.id(), "skip", reason)

    def addExpectedFailure(self, test: Any, err: Any) -> None:  # noqa: N802
        self._write(test.id(), "pass", "expected failure")

    def addUnexpectedSuccess(self, test: Any) -> None:  # noqa: N802
        self._write(test.id(), "fail", "unexpected success")

    def addSubTest(self, test: Any, subtest: Any, err: Any) -> None:  # noqa: N802
        if err is not None:
            kind = "fail" if issubclass(err[0], test.failureException) else "error"
            self._write(test.id(), kind, f"{subtest.id()}: "
                        + self._exc_info_to_string(err, test)[-1500:])


def _flatten(suite: Any) -> Any:
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from _flatten(item)
        else:
            yield item


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    way, name, out_path = argv[:3]
    only = set(argv[3].split(",")) if len(argv) == 4 else None
    patch(way)
    prepare_support(name)
    import test
    from gevent.testing.patched_tests_setup import disable_tests_in_source

    path = os.path.join(os.path.dirname(test.__file__), name + ".py")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    devnull = open(os.devnull, "w")  # noqa: SIM115 - gevent's helper prints what it disabled
    saved, sys.stdout = sys.stdout, devnull
    try:
        source = disable_tests_in_source(source, name)
    finally:
        sys.stdout = saved
    module = types.ModuleType(f"test.{name}")
    module.__file__ = path
    sys.modules[module.__name__] = module  # unittest finds setUpModule through sys.modules
    os.chdir(os.path.dirname(path))
    with open(out_path, "a", encoding="utf-8") as out:
        recorder = Recorder(out)
        try:
            exec(compile(source, path, "exec", dont_inherit=True), module.__dict__)
            suite = unittest.defaultTestLoader.loadTestsFromModule(module)
            tests = [t for t in _flatten(suite) if only is None or t.id() in only]
            for t in tests:
                cls = type(t)
                why = MACHINE_SKIPS.get(cls.__name__)
                if why:
                    cls.__unittest_skip__ = True
                    cls.__unittest_skip_why__ = why
                method = f"{cls.__name__}.{getattr(t, '_testMethodName', '')}"
                if method in MACHINE_SKIPS:
                    func = getattr(cls, t._testMethodName)
                    setattr(cls, t._testMethodName, unittest.skip(MACHINE_SKIPS[method])(func))
            suite = unittest.TestSuite(tests)
        except unittest.SkipTest as exc:
            recorder._write(f"test.{name}", "skip", f"module skipped: {exc}")
            recorder._write(f"test.{name}", "done")
            return 0
        except Exception:
            recorder._write(f"test.{name}", "error", "import failed:\n" + traceback.format_exc())
            return 1
        suite.run(recorder)
        recorder._write(f"test.{name}", "done")
    sys.stdout.flush()
    os._exit(0)  # leftover non-daemon threads (servers of failed tests) must not hang the exit


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
