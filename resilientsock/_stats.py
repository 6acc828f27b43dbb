"""Process-wide counters and the exit summary (``--stats``).

Rule: counters only go up, and every surfaced error is counted by category, so a summary can
say "nothing was lost silently": every drop was either recovered (reconnect + replay) or shown
to the application.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from typing import Any

_lock = threading.Lock()  # captured at import: before patch(), so a real lock
_counters: Counter[str] = Counter()


def bump(name: str, amount: int = 1) -> None:
    with _lock:
        _counters[name] += amount


def stats() -> dict[str, int]:
    """A snapshot of the process-wide counters.

    Keys: ``connects`` (first connects made resilient), ``disconnects`` (drops noticed),
    ``reconnect_attempts``, ``reconnects`` (successful), ``replayed_records``,
    ``replayed_bytes``, ``gave_up`` (budget spent, error raised), ``surfaced`` (errors shown
    to the application instead of being recovered), ``disconnects.<category>`` /
    ``surfaced.<category>`` per error category, and ``attempt_failed.<category>`` /
    ``attempt_failed.<ERRNO>`` for connect attempts that failed (the first one included),
    e.g. ``attempt_failed.ENETUNREACH``.
    """
    with _lock:
        return dict(_counters)


def reset() -> None:
    """Zero every counter (for tests and benchmarks)."""
    with _lock:
        _counters.clear()


def summary(snapshot: dict[str, int] | None = None) -> str:
    """A human summary, as printed by ``--stats`` at exit."""
    s = stats() if snapshot is None else snapshot
    lines = ["resilientsock: summary"]
    for key in ("connects", "disconnects", "reconnect_attempts", "reconnects",
                "replayed_records", "replayed_bytes", "surfaced", "gave_up"):
        lines.append(f"  {key:<20} {s.get(key, 0)}")
    detail = sorted(k for k in s if "." in k)
    for key in detail:
        lines.append(f"  {key:<32} {s[key]}")
    return "\n".join(lines)


def dump_json(path: str, extra: dict[str, Any] | None = None) -> None:
    data: dict[str, Any] = dict(stats())
    if extra:
        data.update(extra)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
