"""Events: one structured log record per thing a resilient socket does, and optional metrics.

Rules of this module:

1. Every event goes through ``logging.getLogger("resilientsock")`` as one record, with the
   event's name and fields in ``extra`` (the names below), so a JSON log formatter or a
   logging filter can use them without parsing the message.
2. OpenTelemetry is optional. ``opentelemetry-api`` (extra ``[otel]``) is imported lazily, on
   the first ``emit()``, and the outcome cached: nothing here is imported by ``__init__``, and
   a process without it pays one failed import, once.
3. Telemetry never breaks I/O. An exception from a metrics instrument is caught, logged once
   (WARNING) and switches metrics off for the rest of the process; ``emit()`` then still logs.
   The only exception ``emit()`` raises is ``ValueError`` for an event name not in ``EVENTS``
   (a bug in the caller, found by the tests).
4. Internal sockets (the process's own socketpairs and wake-up connections to itself,
   ``internal=True``) are logged but never counted in metrics: they are not connections to a
   server.
6. A WARNING about a target repeats at most once a minute (``RATE_WINDOW``) per event; the
   repeats in between are DEBUG records, counted in the next WARNING's text.
5. Advice names the knob the way the user can set it: ``--confirm tcp-ack`` under the runner
   (``python -m resilientsock``), ``RetryPolicy(confirm="tcp-ack")`` in code (``advice``).

Log record ``extra`` names (attributes of the ``logging.LogRecord``):

    resilientsock_event       the event name (one of EVENTS)
    resilientsock_<field>     each field passed to emit(), e.g. resilientsock_peer,
                              resilientsock_category, resilientsock_error_type,
                              resilientsock_attempts, resilientsock_seconds,
                              resilientsock_records, resilientsock_nbytes,
                              resilientsock_internal

Metrics (meter ``resilientsock``), attributes per the OpenTelemetry semantic conventions
(``network.peer.address``, ``network.peer.port``, ``network.transport`` = ``tcp`` | ``unix``,
``error.type``):

    resilientsock.reconnects           counter, {reconnect}; +1 per "reconnect" event
    resilientsock.replayed_bytes       counter, By; +nbytes per "replay" event
    resilientsock.surfaced             counter, {error}; +1 per "surfaced" or "gave_up" event,
                                       attributes error.type (the exception class name) and
                                       resilientsock.category (the ErrorCategory name)
    resilientsock.recovery.duration    histogram, s; ``seconds`` of each "reconnect" (attribute
                                       resilientsock.outcome = recovered) and "gave_up"
                                       (resilientsock.outcome = gave_up) event

An error the application sees is one "surfaced" event or one "gave_up" event, never both.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

__all__ = ["EVENTS", "LEVELS", "emit", "advice", "set_runner", "is_runner",
           "use_meter_provider"]

log = logging.getLogger("resilientsock")

EVENTS = frozenset({
    "connect",         # a connection made resilient (first connect)
    "drop",            # a classified connection error noticed
    "reconnect",       # a new connection is up (seconds: time since the drop)
    "replay",          # unconfirmed records re-sent (records, nbytes)
    "answer_resumed",  # an answer cut mid-way continued on the new connection (docs/design.md §5b)
    "answer_changed",  # ... and the new answer differed: surfaced instead
    "surfaced",        # an error shown to the application instead of recovered
    "gave_up",         # the recovery budget ran out (attempts, seconds): error shown
})

# The level each event is meant to be logged at (the caller passes it; a surfaced read
# timeout the application asked for is DEBUG, not INFO: it is not an error).
LEVELS: dict[str, int] = {  # a recovered episode is DEBUG only; one given up, one WARNING
    "connect": logging.DEBUG,
    "drop": logging.DEBUG,
    "reconnect": logging.DEBUG,
    "replay": logging.DEBUG,
    "answer_resumed": logging.DEBUG,
    "answer_changed": logging.INFO,
    "surfaced": logging.INFO,
    "gave_up": logging.WARNING,
}

_PREFIX = "resilientsock_"

_lock = threading.Lock()
_runner = False

# Metrics state: _UNSET until the first emit() looks for opentelemetry; then None (not
# installed, or switched off after an error) or the instruments.
_UNSET: Any = object()
_instruments: Any = _UNSET


class _Instruments:
    def __init__(self, meter: Any) -> None:
        self.reconnects = meter.create_counter(
            "resilientsock.reconnects", unit="{reconnect}",
            description="Connections re-established after a drop")
        self.replayed_bytes = meter.create_counter(
            "resilientsock.replayed_bytes", unit="By",
            description="Bytes re-sent after a reconnect (unconfirmed writes)")
        self.surfaced = meter.create_counter(
            "resilientsock.surfaced", unit="{error}",
            description="Connection errors shown to the application instead of recovered")
        self.duration = meter.create_histogram(
            "resilientsock.recovery.duration", unit="s",
            description="Time from a drop to the new connection (or to giving up)")


def _meter_from(provider: Any) -> Any:
    from . import _version

    return provider.get_meter("resilientsock", _version.__version__)


def _load_instruments() -> Any:
    try:
        from opentelemetry import metrics
    except ImportError:
        return None
    try:
        return _Instruments(_meter_from(metrics.get_meter_provider()))
    except Exception as exc:  # noqa: BLE001 - rule 3: telemetry never breaks I/O
        log.warning("resilientsock: OpenTelemetry metrics switched off: %r", exc)
        return None


def use_meter_provider(provider: Any | None) -> None:
    """Record metrics through ``provider`` (an OpenTelemetry ``MeterProvider``) instead of the
    global one; ``None`` goes back to looking up the global provider on the next ``emit()``.
    Meant for tests and for applications that keep a provider of their own."""
    global _instruments
    with _lock:
        _instruments = _UNSET if provider is None else _Instruments(_meter_from(provider))


def _network_attributes(peer: object) -> dict[str, Any]:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return {"network.peer.address": str(peer[0]), "network.peer.port": int(peer[1]),
                "network.transport": "tcp"}
    if isinstance(peer, str | bytes) and peer:
        path = peer.decode(errors="replace") if isinstance(peer, bytes) else peer
        return {"network.peer.address": path, "network.transport": "unix"}
    return {}


def _record_metrics(instruments: Any, event: str, fields: dict[str, object]) -> None:
    attributes = _network_attributes(fields.get("peer"))
    if event == "reconnect":
        instruments.reconnects.add(1, attributes)
        seconds = fields.get("seconds")
        if isinstance(seconds, int | float):
            instruments.duration.record(float(seconds),
                                        {**attributes, "resilientsock.outcome": "recovered"})
    elif event == "replay":
        nbytes = fields.get("nbytes")
        if isinstance(nbytes, int) and nbytes > 0:
            instruments.replayed_bytes.add(nbytes, attributes)
    elif event in ("surfaced", "gave_up"):
        category = str(fields.get("category") or "UNKNOWN")
        error_type = str(fields.get("error_type") or category)
        instruments.surfaced.add(1, {**attributes, "error.type": error_type,
                                     "resilientsock.category": category})
        seconds = fields.get("seconds")
        if event == "gave_up" and isinstance(seconds, int | float):
            instruments.duration.record(float(seconds),
                                        {**attributes, "resilientsock.outcome": "gave_up"})


def emit(event: str, level: int, message: str, **fields: object) -> None:
    """Log ``message`` at ``level`` as event ``event`` and count it in the metrics.

    ``fields`` (all optional): ``peer`` (address tuple or Unix path), ``category`` (str),
    ``error_type`` (exception class name), ``attempts`` (int), ``seconds`` (float),
    ``records`` (int), ``nbytes`` (int), ``internal`` (bool). Each becomes the log record
    attribute ``resilientsock_<name>``.

    Raises ValueError (before logging anything) for an event name not in ``EVENTS``. Nothing
    else escapes: after a metrics error the record is still logged and metrics are off.
    """
    global _instruments
    if event not in EVENTS:
        raise ValueError(f"unknown resilientsock event {event!r}")
    if level >= logging.WARNING and fields.get("peer") is not None:
        level, message = _limit(event, fields.get("peer"), level, message)
    if log.isEnabledFor(level):
        extra: dict[str, object] = {_PREFIX + "event": event}
        for name, value in fields.items():
            extra[_PREFIX + name] = value
        log.log(level, message, extra=extra)
    if fields.get("internal"):
        return  # rule 4
    instruments = _instruments
    if instruments is _UNSET:
        with _lock:
            if _instruments is _UNSET:
                _instruments = _load_instruments()
            instruments = _instruments
    if instruments is None:
        return
    try:
        _record_metrics(instruments, event, fields)
    except Exception as exc:  # noqa: BLE001 - rule 3
        with _lock:
            _instruments = None
        log.warning("resilientsock: OpenTelemetry metrics switched off after an error: %r", exc)


# -- rate limit: one warning per target and event, then a summary (rule 6) ----------------------

RATE_WINDOW = 60.0  # seconds: one WARNING per (event, target) in this window
_RATE_KEYS = 1024  # targets remembered (the oldest forgotten first)
_recent: dict[tuple[str, Any], list[float]] = {}  # key -> [window start, repeats in it]


def _limit(event: str, peer: object, level: int, message: str,
           clock: Any = None) -> tuple[int, str]:
    """The level and message for a WARNING about ``peer``: the first in a window as is, the
    repeats at DEBUG, counted; the first after the window carries the count ("N more like
    this in the last 60 s"). An application that polls a dead server does not flood its
    log, and the first warning still shows at once."""
    import time

    now = (clock or time.monotonic)()
    try:
        key = (event, peer)
        hash(key)
    except TypeError:
        key = (event, repr(peer))
    with _lock:
        entry = _recent.get(key)
        if entry is not None and now - entry[0] < RATE_WINDOW:
            entry[1] += 1
            return logging.DEBUG, message
        _recent.pop(key, None)
        _recent[key] = [now, 0.0]
        while len(_recent) > _RATE_KEYS:
            _recent.pop(next(iter(_recent)))
    if entry is not None and entry[1]:
        message = (f"{message} ({int(entry[1])} more like this in the last "
                   f"{now - entry[0]:.0f} s)")
    return level, message


# -- advice: name the knob the way the user sets it ----------------------------------------------

def set_runner(active: bool) -> None:
    """Called by the runner (``python -m resilientsock``) before it runs the script."""
    global _runner
    _runner = bool(active)


def is_runner() -> bool:
    """True when the process runs under ``python -m resilientsock``."""
    return _runner


def advice(field: str, value: str) -> str:
    """How the user sets policy field ``field`` to ``value``, for messages.

    Under the runner the option spelling, ``--confirm tcp-ack``; otherwise the code spelling,
    ``RetryPolicy(confirm="tcp-ack")``, with the value parsed as the option would parse it
    (``advice("resume_answers", "1")`` is ``RetryPolicy(resume_answers=True)``), strings in
    double quotes. Raises ValueError for a field that is not a policy field or a value the
    field does not accept.
    """
    from ._policy import FIELDS

    spec = FIELDS.get(field)
    if spec is None:
        raise ValueError(f"{field!r} is not a RetryPolicy field")
    text = str(value)
    parsed = spec.parse(text)  # ValueError names what is wrong with the value
    if _runner:
        return f"--{field.replace('_', '-')} {text}"
    shown = f'"{parsed}"' if isinstance(parsed, str) and '"' not in parsed else repr(parsed)
    return f"RetryPolicy({field}={shown})"
