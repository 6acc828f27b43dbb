"""Client side of the field matrix: run an application's loop and log each operation.

Rules of this module:

1. It never imports resilientsock: the same script runs under plain ``python`` and under
   ``python -m resilientsock``, and only the runner decides which. Under the runner it reads
   the counters of the resilientsock the runner loaded (``sys.modules``): an operation during
   which records were re-sent logs how many (``"replayed"``).
2. One JSON line per operation goes to ``$FIELD_OPLOG``: the key, ok or the exception's
   qualified type, its notes (down the ``__cause__``/``__context__`` chain, since client
   libraries wrap socket errors), the duration and the wall-clock end time (so the
   orchestrator can tell which operation a fault hit).
3. The loop is bounded: at most ``$FIELD_MAX_OPS`` operations, and it ends as soon as the
   file ``$FIELD_STOP`` exists. What the application does after an error (reconnect, carry
   on) is the script's ``on_error``: the loop itself never retries an operation.
4. A wrong answer is ``Garbage``: the scripts check every answer they can, so "never handed
   garbage" is measured, not assumed.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable


class Garbage(Exception):
    """The server's answer is not what this operation must get back."""


def qualname(exc: BaseException) -> str:
    """``module.Type``; builtins bare; a database error code kept: ``...OperationalError(2013)``
    (PyMySQL raises one type for a lost connection and for a refused login)."""
    cls = type(exc)
    mod = cls.__module__
    name = cls.__qualname__ if mod in ("builtins", "__main__", "fieldops") else \
        f"{mod}.{cls.__qualname__}"
    args = getattr(exc, "args", ())
    if not isinstance(exc, OSError) and args and type(args[0]) is int:
        name += f"({args[0]})"
    return name


def _notes(exc: BaseException) -> list[str]:
    out: list[str] = []
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo and len(seen) < 12:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        out += [str(n) for n in getattr(e, "__notes__", None) or []]
        for nxt in (e.__cause__, e.__context__, *getattr(e, "args", ())[:3],
                    getattr(e, "reason", None)):
            if isinstance(nxt, BaseException):
                todo.append(nxt)
    return out[:6]


def _chain(exc: BaseException) -> list[str]:
    out: list[str] = []
    e: BaseException | None = exc
    while e is not None and len(out) < 6:
        out.append(qualname(e))
        e = e.__cause__ or e.__context__
    return out


def _where(exc: BaseException) -> list[str]:
    """The innermost frames of the traceback: enough to tell the core's own bugs apart."""
    frames = traceback.extract_tb(exc.__traceback__)[-4:]
    return [f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in frames]


def _replayed() -> int:
    """Records resilientsock re-sent so far in this process (0 when it is not loaded)."""
    rs = sys.modules.get("resilientsock")
    return int(rs.stats().get("replayed_records", 0)) if rs is not None else 0


def run(op: Callable[[str], object], on_error: Callable[[], object] | None = None,
        pace: float = 0.005, error_pause: float = 0.05) -> int:
    """Call ``op(key)`` for key = $FIELD_PREFIX + n until $FIELD_STOP exists or
    $FIELD_MAX_OPS operations ran; log each; after a failure call ``on_error()`` and pause
    ``error_pause`` seconds (as an application's loop would, instead of spinning)."""
    prefix = os.environ.get("FIELD_PREFIX", "k")
    stop = os.environ.get("FIELD_STOP", "/nonexistent/stop")
    max_ops = int(os.environ.get("FIELD_MAX_OPS", "200"))
    log = open(os.environ.get("FIELD_OPLOG", os.devnull), "a", buffering=1)
    failed = done = 0
    for i in range(max_ops):
        if os.path.exists(stop):
            break
        key = f"{prefix}{i}"
        replayed = _replayed()
        t0 = time.monotonic()
        try:
            op(key)
        except Exception as exc:  # every failure is data, the loop carries on
            dt = time.monotonic() - t0
            failed += 1
            line = {"key": key, "ok": False, "dt": round(dt, 4),
                    "ts": round(time.time(), 4), "exc": qualname(exc),
                    "chain": _chain(exc), "msg": str(exc)[:200],
                    "notes": _notes(exc), "where": _where(exc)}
            if _replayed() > replayed:
                line["replayed"] = _replayed() - replayed
            log.write(json.dumps(line) + "\n")
            if on_error is not None:
                try:
                    on_error()
                except Exception as again:  # reconnecting may fail too: logged, not fatal
                    print(f"on_error: {qualname(again)}: {again}", file=sys.stderr)
            time.sleep(error_pause)
        else:
            dt = time.monotonic() - t0
            line = {"key": key, "ok": True, "dt": round(dt, 4), "ts": round(time.time(), 4)}
            if _replayed() > replayed:
                line["replayed"] = _replayed() - replayed
            log.write(json.dumps(line) + "\n")
        done += 1
        if pace:
            time.sleep(pace)
    log.close()
    print(f"field: {done} operations, {failed} failed", flush=True)
    return failed
