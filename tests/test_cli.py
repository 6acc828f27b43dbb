"""explain, the runner's argument handling, --help."""

from __future__ import annotations

import json

import pytest
from conftest import run_py

from resilientsock._cli import explain


def test_explain_number_shows_each_platform_meaning():
    entries = explain("54")
    by_symbol = {e["symbol"]: e for e in entries}
    assert by_symbol["ECONNRESET"]["means_this_on"] == ["macos"]
    assert by_symbol["ECONNRESET"]["category"] == "CONNECTION_LOST"
    assert by_symbol["EXFULL"]["means_this_on"] == ["linux"]
    assert by_symbol["EXFULL"]["category"] is None
    assert by_symbol["ECONNRESET"]["numbers"] == {"linux": 104, "macos": 54, "windows": 10054}


@pytest.mark.parametrize("text,symbol,category,retried", [
    ("ECONNRESET", "ECONNRESET", "CONNECTION_LOST", True),
    ("EAI_AGAIN", "EAI_AGAIN", "DNS_TEMPORARY", True),
    ("[Errno 104] Connection reset by peer", "ECONNRESET", "CONNECTION_LOST", True),
    ("socket.gaierror: [Errno -3] Temporary failure in name resolution", "EAI_AGAIN",
     "DNS_TEMPORARY", True),
    ("ssl.SSLError: [SSL: BAD_LENGTH] bad length", "BAD_LENGTH", "TLS_PERMANENT", False),
    ("SSLEOFError", "SSLEOFError", "CONNECTION_LOST", True),
    ("[Errno 101] Network is unreachable", "ENETUNREACH", "UNREACHABLE", True),
    ("EBADF", "EBADF", None, False),
])
def test_explain_forms(text, symbol, category, retried):
    entry = explain(text)[0]
    assert (entry["symbol"], entry["category"], entry["retried"]) == (symbol, category, retried)


def test_explain_cli_text_json_and_bad_input():
    out = run_py(["-m", "resilientsock", "explain", "54"])
    assert out.returncode == 0
    assert "macOS/BSD: ECONNRESET" in out.stdout and "Linux: EXFULL" in out.stdout
    out = run_py(["-m", "resilientsock", "explain", "--json", "EAI_AGAIN"])
    data = json.loads(out.stdout)
    assert data[0]["numbers"] == {"linux": -3, "macos": 2, "windows": 11002}
    out = run_py(["-m", "resilientsock", "explain", "flux capacitor"])
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "cannot tell" in out.stderr


def test_help_lists_every_option_with_default_and_env():
    out = run_py(["-m", "resilientsock", "--help"])
    assert out.returncode == 0
    for opt in ("--deadline", "--max-attempts", "--backoff-initial", "--backoff-max", "--replay",
                "--confirm", "--journal-limit", "--dead-peer-timeout", "--log-level", "--stats"):
        assert opt in out.stdout, opt
    assert "RESILIENTSOCK_DEADLINE" in out.stdout and "default 30" in out.stdout


def test_bad_option_value_is_a_clear_error():
    out = run_py(["-m", "resilientsock", "--deadline", "-3", "x.py"])
    assert out.returncode == 2 and "deadline" in out.stderr and "Traceback" not in out.stderr
    out = run_py(["-m", "resilientsock", "--replay", "sometimes", "x.py"])
    assert out.returncode == 2 and "replay" in out.stderr
    out = run_py(["-m", "resilientsock", "--no-such", "x.py"])
    assert out.returncode == 2 and "unknown option" in out.stderr
    out = run_py(["-m", "resilientsock", "missing_script.py"], env={})
    assert out.returncode == 2 and "can't open file" in out.stderr
