"""Process-wide counters, the exit summary (``--stats``) and the per-socket view.

Rules of this module:

1. Counters only go up, and every surfaced error is counted by category, so a summary can say
   "nothing was lost silently": every drop was either recovered (reconnect + replay) or shown
   to the application.
2. The process's own internal sockets (socketpairs, wake-up connections to itself, as pika
   and asyncio make) are counted apart: ``internal_connects``, never ``connects``. The
   summary's numbers describe connections to servers.
3. A read timeout the application set is not an error: it is not counted as ``surfaced``
   (the core counts it as ``read_timeouts`` instead).
4. ``SocketStats`` is an immutable snapshot of one socket (the core builds it); ``stats()`` is
   the process-wide dict and keeps its keys.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

__all__ = ["SocketStats", "bump", "stats", "reset", "summary", "dump_json", "SUMMARY_KEYS"]

_lock = threading.Lock()  # captured at import: before patch(), so a real lock
_counters: Counter[str] = Counter()


# The summary's first lines, in this order (the rest, "<key>.<detail>", follow sorted).
SUMMARY_KEYS = ("connects", "internal_connects", "disconnects", "reconnect_attempts",
                "reconnects", "replayed_records", "replayed_bytes", "answers_resumed",
                "answers_changed", "surfaced", "gave_up")


@dataclass(frozen=True)
class SocketStats:
    """What one resilient socket has been through (a snapshot; the core fills it).

    ``connects``: connections opened (the first one and every reconnect); ``reconnects``:
    connections re-established after a drop; ``drops``: classified connection errors noticed;
    ``replayed_records`` / ``replayed_bytes``: unconfirmed writes re-sent; ``surfaced``: errors
    shown to the application; ``answers_resumed`` / ``answers_changed``: answers cut mid-way
    that continued on the new connection, or differed and were surfaced (docs/design.md §5b);
    ``internal``: a socket of the process to itself (socketpair, wake-up connection), not a
    connection to a server; ``peer``: the address the caller named (tuple, or a Unix path).
    """

    connects: int = 0
    reconnects: int = 0
    drops: int = 0
    replayed_records: int = 0
    replayed_bytes: int = 0
    surfaced: int = 0
    answers_resumed: int = 0
    answers_changed: int = 0
    internal: bool = False
    peer: object = None


def bump(name: str, amount: int = 1) -> None:
    """Add ``amount`` to counter ``name`` (thread- and greenlet-safe; never raises)."""
    with _lock:
        _counters[name] += amount


def stats() -> dict[str, int]:
    """A snapshot of the process-wide counters.

    Keys: ``connects`` (first connects made resilient, to servers), ``internal_connects``
    (the same for the process's own sockets to itself: socketpairs, wake-up connections),
    ``disconnects`` (drops noticed),
    ``reconnect_attempts``, ``reconnects`` (successful), ``replayed_records``,
    ``replayed_bytes``, ``answers_resumed``, ``answers_changed``, ``gave_up`` (budget spent,
    error raised), ``surfaced`` (errors shown to the application instead of being recovered;
    not the read timeouts the application asked for), ``disconnects.<category>`` /
    ``surfaced.<category>`` per error category, and ``attempt_failed.<category>`` /
    ``attempt_failed.<ERRNO>`` for connect attempts that failed (the first one included),
    e.g. ``attempt_failed.ENETUNREACH``. The keys of the ``--stats`` summary are always
    there (0 before anything happened), so ``stats()["reconnects"]`` never raises KeyError.
    """
    with _lock:
        return {**dict.fromkeys(SUMMARY_KEYS, 0), **_counters}


def reset() -> None:
    """Zero every counter (for tests and benchmarks)."""
    with _lock:
        _counters.clear()


def summary(snapshot: dict[str, int] | None = None) -> str:
    """A human summary, as printed by ``--stats`` at exit."""
    s = stats() if snapshot is None else snapshot
    lines = ["resilientsock: summary"]
    for key in SUMMARY_KEYS:
        lines.append(f"  {key:<20} {s.get(key, 0)}")
    detail = sorted(k for k in s if "." in k)
    for key in detail:
        lines.append(f"  {key:<32} {s[key]}")
    return "\n".join(lines)


def dump_json(path: str, extra: dict[str, Any] | None = None) -> None:
    """Write ``stats()`` (plus ``extra``) to ``path`` as JSON (``RESILIENTSOCK_STATS_FILE``).
    An OSError from writing propagates; the counters are unchanged."""
    data: dict[str, Any] = dict(stats())
    if extra:
        data.update(extra)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
