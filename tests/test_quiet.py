"""Quiet where handled (issue 24 item 4): the library logger has a NullHandler, a WARNING
about the same target repeats at most once a minute (then a count), an application that
handles its own errors is not flooded, and the runner's gave-up traceback is the plain one
plus our note."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest
from conftest import run_py

from resilientsock import _events

pytestmark = pytest.mark.timeout(120)

REFUSED_200 = """
import socket{extra}
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]  # never listens
fails = 0
for i in range(200):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.05).close()
    except OSError:
        fails += 1  # handled by the application itself
print(fails)
"""


def test_the_library_logger_has_a_null_handler():
    out = run_py(["-c", "import logging, resilientsock; print(any(isinstance(h, "
                  "logging.NullHandler) for h in logging.getLogger('resilientsock').handlers))"])
    assert out.stdout.strip() == "True", out.stderr


@pytest.mark.parametrize("extra", ["", "\nimport logging; logging.basicConfig()"],
                         ids=["default-logging", "basicConfig"])
def test_a_script_polling_a_refused_port_200_times_prints_at_most_5_lines(tmp_path: Path,
                                                                        extra: str):
    script = tmp_path / "poll.py"
    script.write_text(REFUSED_200.format(extra=extra))
    out = run_py(["-m", "resilientsock", str(script)], timeout=100)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "200"
    lines = out.stderr.splitlines()
    assert 1 <= len(lines) <= 5, out.stderr  # one warning, not 200
    assert "gave up" in lines[0]


def test_repeated_warnings_for_one_target_are_rate_limited(caplog):
    caplog.set_level(logging.DEBUG, logger="resilientsock")
    now = [1000.0]
    _events._recent.clear()
    peer = ("127.0.0.1", 9)
    levels = []
    for _ in range(5):
        levels.append(_events._limit("gave_up", peer, logging.WARNING, "gave up",
                                     clock=lambda: now[0])[0])
        now[0] += 1.0
    assert levels == [logging.WARNING] + [logging.DEBUG] * 4
    now[0] += _events.RATE_WINDOW
    level, message = _events._limit("gave_up", peer, logging.WARNING, "gave up",
                                    clock=lambda: now[0])
    assert level == logging.WARNING and "4 more like this in the last" in message
    other = _events._limit("gave_up", ("127.0.0.1", 10), logging.WARNING, "x",
                           clock=lambda: now[0])
    assert other[0] == logging.WARNING  # another target is not limited by this one
    _events._recent.clear()


GIVE_UP = """
import socket
socket.create_connection(("127.0.0.1", {port}), timeout=1)
"""


def test_the_runners_gave_up_traceback_is_the_plain_one_plus_our_note(tmp_path: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
        script = tmp_path / "give_up.py"
        script.write_text(GIVE_UP.format(port=port))
        plain = run_py([str(script)])
        ours = run_py(["-m", "resilientsock", "--deadline", "1", str(script)])
    assert plain.returncode == ours.returncode == 1
    plain_lines = plain.stderr.splitlines()
    our_lines = ours.stderr.splitlines()
    # The application's frames and the error line as plain python shows them (plain python's
    # stdlib socket.py frames are ours to replace), and nothing else but our own lines.
    assert [ln for ln in our_lines if not ln.startswith("resilientsock:")] == [
        ln for ln in plain_lines if "/socket.py" not in ln and "raise exceptions" not in ln
        and "sock.connect(sa)" not in ln], (plain.stderr, ours.stderr)
    assert len(our_lines) - len(plain_lines) <= 6, ours.stderr
    assert our_lines[-1].startswith("resilientsock: gave up"), ours.stderr


def test_a_recovered_drop_logs_no_warning_and_a_given_up_episode_one(server, proxy, caplog):
    from conftest import readline

    from resilientsock import ResilientSocket, RetryPolicy

    caplog.set_level(logging.DEBUG, logger="resilientsock")
    _events._recent.clear()
    policy = RetryPolicy(deadline=5, backoff_initial=0.01, backoff_max=0.1)
    proxy.cut_after(0, "down")  # the answer's first byte meets an RST instead
    with ResilientSocket.connect(proxy.address, policy, timeout=10) as s:
        s.sendall(b"MSG 1 x\n")
        assert readline(s) == b"ACK 1\n"
        assert s.reconnects == 1
    ours = [r for r in caplog.records if r.name == "resilientsock"]
    assert [r.getMessage() for r in ours if r.levelno > logging.DEBUG] == []
    assert any("reconnected" in r.getMessage() for r in ours)
    caplog.clear()
    proxy.refuse_now()
    with pytest.raises(ConnectionRefusedError):
        ResilientSocket.connect(proxy.address, policy.replace(deadline=0.3), timeout=10)
    warnings = [r for r in caplog.records
                if r.name == "resilientsock" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "gave up" in warnings[0].getMessage()
    _events._recent.clear()
