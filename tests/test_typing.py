"""The typed public API: unknown keywords are a TypeError naming them at run time, and
``mypy --strict`` on a user's script catches a bad mode string, a misspelled keyword and a
method ResilientSocket lacks (skipped where mypy, from the lint extra, is not installed)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import resilientsock
from resilientsock import RetryPolicy

ROOT = Path(__file__).resolve().parent.parent


def test_patch_with_an_unknown_keyword_is_a_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match="dedline"):
        resilientsock.patch(dedline=5)  # type: ignore[call-arg]
    assert not resilientsock.is_patched()  # raised before anything was patched


def test_retry_policy_with_an_unknown_keyword_is_a_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match="dedline"):
        RetryPolicy(dedline=5)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="dedline"):
        RetryPolicy().replace(dedline=5)  # type: ignore[call-arg]


def test_a_bad_mode_is_still_a_value_error_naming_the_field() -> None:
    with pytest.raises(ValueError, match="replay"):
        RetryPolicy(replay="sometimes")  # type: ignore[arg-type]


def _mypy(tmp_path: Path, source: str) -> list[str]:
    pytest.importorskip("mypy")
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(source))
    env = dict(os.environ, MYPYPATH=str(ROOT))  # this work tree's package, typed (py.typed)
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
         "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(script)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    return [line for line in proc.stdout.splitlines() if line.startswith(str(script))
            or line.startswith("user_script.py")]


@pytest.mark.timeout(300)
def test_mypy_strict_flags_mistakes_in_a_user_script(tmp_path: Path) -> None:
    errors = _mypy(tmp_path, """\
        import resilientsock
        from resilientsock import ResilientSocket, RetryPolicy

        resilientsock.patch(dedline=5)
        RetryPolicy(replay="sometimes")
        resilientsock.patch(confirm="tcp_ack")
        sock = ResilientSocket.connect(("127.0.0.1", 9000), timeout=5)
        sock.sendal(b"x")
        """)
    text = "\n".join(errors)
    assert ':4: error: Unexpected keyword argument "dedline"' in text, text
    assert ':5: error: Argument "replay" to "RetryPolicy"' in text, text
    assert ':6: error: Argument "confirm" to "patch"' in text, text
    assert ':8: error: "ResilientSocket" has no attribute "sendal"' in text, text
    assert len([e for e in errors if ": error: " in e]) == 4, text


@pytest.mark.timeout(300)
def test_mypy_strict_accepts_correct_use(tmp_path: Path) -> None:
    errors = _mypy(tmp_path, """\
        import resilientsock
        from resilientsock import ResilientSocket, RetryPolicy

        resilientsock.patch(deadline=5, replay="safe", eof="pass")
        policy = RetryPolicy(replay="none", confirm="tcp-ack").replace(max_attempts=3)
        sock: ResilientSocket = ResilientSocket.connect(("127.0.0.1", 9000), policy, timeout=5)
        sock.sendall(b"x")
        data: bytes = sock.recv(10)
        other = ResilientSocket()
        other.connect(("127.0.0.1", 9000))
        print(sock.policy.deadline, data)
        """)
    assert errors == []
