"""Events (structured log records), OpenTelemetry metrics read through the SDK's in-memory
reader, advice naming the knob the user can set, and the per-socket stats view."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import run_py

from resilientsock import _events, _stats

otel_sdk = pytest.importorskip("opentelemetry.sdk.metrics")
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402


@pytest.fixture
def reader() -> Iterator[InMemoryMetricReader]:
    memory = InMemoryMetricReader()
    provider = otel_sdk.MeterProvider(metric_readers=[memory], shutdown_on_exit=False)
    _events.use_meter_provider(provider)
    try:
        yield memory
    finally:
        _events.use_meter_provider(None)
        provider.shutdown()


def _points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    """metric name -> its data points."""
    data = reader.get_metrics_data()
    out: dict[str, list[Any]] = {}
    if data is None:
        return out
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                out.setdefault(metric.name, []).extend(metric.data.data_points)
    return out


def test_emit_logs_one_record_with_structured_extra(caplog):
    caplog.set_level(logging.DEBUG, logger="resilientsock")
    _events.emit("reconnect", logging.INFO, "hub:9000: reconnected (attempt 2)",
                 peer=("127.0.0.1", 9000), attempts=2, seconds=0.25, internal=False)
    (record,) = [r for r in caplog.records if r.name == "resilientsock"]
    assert record.levelno == logging.INFO
    assert record.getMessage() == "hub:9000: reconnected (attempt 2)"
    assert record.resilientsock_event == "reconnect"  # type: ignore[attr-defined]
    assert record.resilientsock_peer == ("127.0.0.1", 9000)  # type: ignore[attr-defined]
    assert record.resilientsock_attempts == 2  # type: ignore[attr-defined]
    assert record.resilientsock_seconds == 0.25  # type: ignore[attr-defined]
    assert record.resilientsock_internal is False  # type: ignore[attr-defined]


def test_emit_respects_the_level(caplog):
    """A surfaced read timeout the application asked for is DEBUG: invisible at INFO."""
    caplog.set_level(logging.INFO, logger="resilientsock")
    _events.emit("surfaced", logging.DEBUG, "read timeout the application set",
                 category="TIMEOUT", error_type="TimeoutError")
    assert [r for r in caplog.records if r.name == "resilientsock"] == []
    assert _events.LEVELS["gave_up"] == logging.WARNING
    assert set(_events.LEVELS) == _events.EVENTS


def test_unknown_event_is_a_value_error(caplog):
    caplog.set_level(logging.DEBUG, logger="resilientsock")
    with pytest.raises(ValueError, match="no_such_event"):
        _events.emit("no_such_event", logging.INFO, "x")
    assert caplog.records == []


def test_metrics_counters_and_histogram(reader):
    peer = ("10.0.0.7", 6379)
    _events.emit("connect", logging.DEBUG, "c", peer=peer)
    _events.emit("drop", logging.INFO, "d", peer=peer, category="CONNECTION_LOST",
                 error_type="ConnectionResetError")
    _events.emit("reconnect", logging.INFO, "r", peer=peer, attempts=1, seconds=0.125)
    _events.emit("reconnect", logging.INFO, "r", peer=peer, attempts=3, seconds=1.5)
    _events.emit("replay", logging.INFO, "p", peer=peer, records=2, nbytes=300)
    _events.emit("replay", logging.INFO, "p", peer=peer, records=1, nbytes=12)
    _events.emit("surfaced", logging.INFO, "s", peer=peer, category="CONNECTION_LOST",
                 error_type="ConnectionResetError")
    _events.emit("gave_up", logging.WARNING, "g", peer=peer, category="REFUSED",
                 error_type="ConnectionRefusedError", attempts=9, seconds=2.0)
    points = _points(reader)
    tcp = {"network.peer.address": "10.0.0.7", "network.peer.port": 6379,
           "network.transport": "tcp"}

    (reconnects,) = points["resilientsock.reconnects"]
    assert reconnects.value == 2 and dict(reconnects.attributes) == tcp
    (replayed,) = points["resilientsock.replayed_bytes"]
    assert replayed.value == 312 and dict(replayed.attributes) == tcp
    surfaced = {p.attributes["error.type"]: p for p in points["resilientsock.surfaced"]}
    assert set(surfaced) == {"ConnectionResetError", "ConnectionRefusedError"}
    assert surfaced["ConnectionRefusedError"].value == 1
    assert dict(surfaced["ConnectionResetError"].attributes) == {
        **tcp, "error.type": "ConnectionResetError", "resilientsock.category": "CONNECTION_LOST"}
    durations = {p.attributes["resilientsock.outcome"]: p
                 for p in points["resilientsock.recovery.duration"]}
    assert durations["recovered"].count == 2 and durations["recovered"].sum == pytest.approx(1.625)
    assert durations["gave_up"].count == 1 and durations["gave_up"].sum == pytest.approx(2.0)


def test_metrics_unix_peer_and_internal_sockets_not_counted(reader):
    _events.emit("reconnect", logging.INFO, "r", peer="/run/app.sock", seconds=0.01)
    _events.emit("reconnect", logging.INFO, "r", peer=("127.0.0.1", 1), seconds=0.01,
                 internal=True)
    (point,) = _points(reader)["resilientsock.reconnects"]
    assert point.value == 1
    assert dict(point.attributes) == {"network.peer.address": "/run/app.sock",
                                      "network.transport": "unix"}


class _BrokenInstrument:
    def add(self, *args: object) -> None:
        raise RuntimeError("exporter exploded")

    record = add


class _BrokenMeter:
    def create_counter(self, *args: object, **kwargs: object) -> _BrokenInstrument:
        return _BrokenInstrument()

    create_histogram = create_counter


class _BrokenProvider:
    def get_meter(self, *args: object, **kwargs: object) -> _BrokenMeter:
        return _BrokenMeter()


def test_a_metrics_error_never_escapes_and_switches_metrics_off(caplog):
    caplog.set_level(logging.INFO, logger="resilientsock")
    _events.use_meter_provider(_BrokenProvider())
    try:
        _events.emit("reconnect", logging.INFO, "first", seconds=0.1)
        _events.emit("reconnect", logging.INFO, "second", seconds=0.1)
    finally:
        _events.use_meter_provider(None)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "first" and "second" in messages
    warnings = [m for m in messages if "switched off" in m]
    assert len(warnings) == 1 and "exporter exploded" in warnings[0]


def test_global_meter_provider_is_found_lazily_and_nothing_imported_early():
    code = (
        "import sys, logging\n"
        "import resilientsock\n"
        "assert 'opentelemetry' not in sys.modules, 'imported by import resilientsock'\n"
        "assert 'resilientsock._events' not in sys.modules\n"
        "from opentelemetry import metrics\n"
        "from opentelemetry.sdk.metrics import MeterProvider\n"
        "from opentelemetry.sdk.metrics.export import InMemoryMetricReader\n"
        "reader = InMemoryMetricReader()\n"
        "metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))\n"
        "from resilientsock import _events\n"
        "_events.emit('replay', logging.INFO, 'p', peer=('::1', 80, 0, 0), nbytes=5)\n"
        "(m,) = reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics\n"
        "(p,) = m.data.data_points\n"
        "print(m.name, p.value, p.attributes['network.peer.address'])\n"
    )
    out = run_py(["-c", code])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "resilientsock.replayed_bytes 5 ::1"


def test_without_opentelemetry_emit_still_logs():
    code = (
        "import sys, logging\n"
        "sys.modules['opentelemetry'] = None  # as if the [otel] extra were not installed\n"
        "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')\n"
        "from resilientsock import _events\n"
        "for _ in range(3):\n"
        "    _events.emit('gave_up', logging.WARNING, 'gave up', category='REFUSED')\n"
        "print(_events._instruments)\n"
    )
    out = run_py(["-c", code])
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("WARNING gave up") == 3
    assert out.stdout.strip() == "None"


# -- advice ---------------------------------------------------------------------------------------

def test_advice_in_code_names_the_retry_policy_field():
    assert _events.advice("confirm", "tcp-ack") == 'RetryPolicy(confirm="tcp-ack")'
    assert _events.advice("retry_read_timeouts", "1") == "RetryPolicy(retry_read_timeouts=True)"
    assert _events.advice("deadline", "60") == "RetryPolicy(deadline=60.0)"
    with pytest.raises(ValueError, match="not a RetryPolicy field"):
        _events.advice("no_such_field", "1")
    with pytest.raises(ValueError):
        _events.advice("confirm", "sometimes")


def test_advice_under_the_runner_names_the_option():
    code = ("from resilientsock import _events\n"
            "print(_events.advice('confirm', 'tcp-ack'))\n"
            "print(_events.advice('dead_peer_timeout', 'none'))\n")
    out = run_py(["-m", "resilientsock", "-c", code])
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["--confirm tcp-ack", "--dead-peer-timeout none"]


# -- stats ----------------------------------------------------------------------------------------

def test_socket_stats_is_a_frozen_typed_view():
    view = _stats.SocketStats(connects=2, reconnects=1, peer=("hub", 9000))
    assert view.drops == 0 and view.internal is False and view.peer == ("hub", 9000)
    with pytest.raises(dataclasses.FrozenInstanceError):
        view.connects = 3  # type: ignore[misc]
    assert [f.name for f in dataclasses.fields(_stats.SocketStats)] == [
        "connects", "reconnects", "drops", "replayed_records", "replayed_bytes", "surfaced",
        "answers_resumed", "answers_changed", "internal", "peer"]


def test_summary_counts_internal_sockets_apart():
    _stats.bump("connects", 2)
    _stats.bump("internal_connects", 5)
    _stats.bump("surfaced.TIMEOUT")
    text = _stats.summary()
    lines = [line.split() for line in text.splitlines()[1:]]
    assert ["connects", "2"] in lines and ["internal_connects", "5"] in lines
    assert ["surfaced.TIMEOUT", "1"] in lines
    assert [key for key, *_ in lines][:len(_stats.SUMMARY_KEYS)] == list(_stats.SUMMARY_KEYS)
