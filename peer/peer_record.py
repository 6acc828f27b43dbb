"""pytest plugin loaded into every peer-suite run (``-p peer_record``): outcomes as they happen,
resumable runs, and a loopback-only tripwire.

Rules:

1. Every test's outcome is appended to ``--peer-out`` (JSON lines) as it happens, preceded by a
   ``start`` line, so a run killed by the watchdog still tells which test was running (hung).
2. ``--peer-skip FILE`` deselects the node ids listed in FILE (one a line): the runner resumes
   a killed run with what already ran deselected, so one hang does not lose the rest.
3. Only loopback. An audit hook (PEP 578, so it sees the C-level call whatever wraps it:
   gevent, resilientsock, pytest-socket) refuses ``socket.connect`` to an address outside
   127.0.0.0/8, ::1 and the unspecified address, and ``socket.getaddrinfo`` of a name that is
   not an IP literal or ``localhost``. The refusal is a ``PermissionError`` (EACCES): not a
   connection error, so no layer retries it; the test is recorded as ``blocked``. It is a
   safety net: the runner's deselect lists take such tests out before the first run.
4. The plugin is identical in every way (plain, gevent, resilientsock): only the patching
   differs between runs.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import sys
import time
from typing import Any

import pytest

_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
_current: dict[str, str] = {"id": ""}
_blocked: list[str] = []


def _is_local_ip(text: str) -> bool | None:
    """True/False for an IP literal (loopback or unspecified = local), None for a name."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_unspecified


def _refuse(what: str) -> None:
    _blocked.append(f"{_current['id'] or '(outside a test)'}: {what}")
    raise PermissionError(errno.EACCES, f"peer-suites: non-loopback {what} blocked")


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "socket.connect":
        address = args[1]
        if isinstance(address, tuple) and address and isinstance(address[0], str):
            if _is_local_ip(address[0]) is False:
                _refuse(f"connect to {address[0]}")
    elif event == "socket.getaddrinfo":
        host = args[0]
        if isinstance(host, bytes):
            host = host.decode("ascii", "replace")
        if not host or not isinstance(host, str):
            return
        local = _is_local_ip(host)
        if local is None:
            name = host.rstrip(".").lower()
            if name not in _LOCAL_NAMES and not name.endswith(".localhost"):
                _refuse(f"name lookup of {host!r}")


sys.addaudithook(_audit)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("peer_record")
    group.addoption("--peer-out", default=None, help="JSON-lines file for per-test outcomes")
    group.addoption("--peer-skip", default=None, help="file of node ids to deselect")


class _Writer:
    def __init__(self, path: str) -> None:
        self.f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives for the session
        self.outcome: dict[str, str] = {}
        self.detail: dict[str, str] = {}
        self.t0: dict[str, float] = {}

    def write(self, record: dict[str, Any]) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())


_writer: _Writer | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _writer
    path = config.getoption("--peer-out")
    if path:
        _writer = _Writer(path)
        _writer.write({"id": "", "outcome": "session", "pid": os.getpid()})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    path = config.getoption("--peer-skip")
    if not path or not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        skip = {line.strip() for line in f if line.strip()}
    keep, drop = [], []
    for item in items:
        (drop if item.nodeid in skip else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_collection_finish(session: pytest.Session) -> None:
    if _writer is not None:
        _writer.write({"id": "", "outcome": "collected", "count": len(session.items)})


def pytest_runtest_logstart(nodeid: str, location: Any) -> None:
    _current["id"] = nodeid
    if _writer is not None:
        _writer.t0[nodeid] = time.monotonic()
        _writer.outcome[nodeid] = "pass"
        _writer.write({"id": nodeid, "outcome": "start"})


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if _writer is None:
        return
    nid = report.nodeid
    if report.skipped:
        new = "xfail" if hasattr(report, "wasxfail") else "skip"
        detail = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""
    elif report.failed:
        new = "fail" if report.when == "call" else "error"
        detail = report.longreprtext[-1500:]
    else:
        if report.when == "call" and hasattr(report, "wasxfail"):
            _writer.outcome[nid] = "xpass"  # a non-strict xfail that passed
        return
    if _writer.outcome.get(nid) in ("fail", "error"):
        return  # a teardown skip does not undo a failure
    _writer.outcome[nid] = new
    _writer.detail[nid] = detail


def pytest_runtest_logfinish(nodeid: str, location: Any) -> None:
    if _writer is None:
        return
    outcome = _writer.outcome.get(nodeid, "pass")
    detail = _writer.detail.get(nodeid, "")
    if any(b.startswith(nodeid + ":") for b in _blocked):
        outcome = "blocked"
        detail = "; ".join(b[len(nodeid) + 2:] for b in _blocked if b.startswith(nodeid + ":"))
    seconds = time.monotonic() - _writer.t0.get(nodeid, time.monotonic())
    _writer.write({"id": nodeid, "outcome": outcome, "seconds": round(seconds, 3),
                   "detail": detail})
    _current["id"] = ""


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _writer is not None:
        outside = [b for b in _blocked if b.startswith("(outside a test)")]
        _writer.write({"id": "", "outcome": "done", "exitstatus": int(exitstatus),
                       "blocked_outside_tests": outside})


def pytest_unconfigure(config: pytest.Config) -> None:
    global _writer
    if _writer is not None:
        _writer.f.close()
        _writer = None
