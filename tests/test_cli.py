"""explain, the runner's argument handling (-c, -, --version, --show-policy, --session,
relay), --help, and the resilientsock notes printed after a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, run_py

from resilientsock._cli import explain, parse_session, resilientsock_notes
from resilientsock._policy import FIELDS


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


# -- explain refuses what it does not recognise -------------------------------------------------

@pytest.mark.parametrize("text", ["no-such-error-xyz", "error", "timeout",
                                  "requests.exceptions.ConnectionError: boom"])
def test_explain_unrecognised_input_exits_2(text):
    out = run_py(["-m", "resilientsock", "explain", text])
    assert out.returncode == 2, out.stdout
    assert out.stdout == "" and "Traceback" not in out.stderr
    assert out.stderr.startswith("resilientsock: error: cannot tell what")


def test_explain_qualified_stdlib_names_still_work():
    assert explain("socket.timeout: timed out")[0]["category"] == "TIMEOUT"
    assert explain("http.client.RemoteDisconnected: x")[0]["category"] == "CONNECTION_LOST"
    assert explain("ValueError")[0]["category"] is None  # known, and not a connection error


# -- --version, -c, -, --show-policy, --session, relay ---------------------------------------

def test_version_has_one_source():
    import configparser

    import resilientsock
    from resilientsock import _version

    out = run_py(["-m", "resilientsock", "--version"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"resilientsock {_version.__version__}"
    assert resilientsock.__version__ is _version.__version__
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["metadata"]["version"] == "attr: resilientsock._version.__version__"


def test_dash_c_runs_code_as_python_does(tmp_path):
    code = ("import sys, socket\n"
            "print(sys.argv, repr(sys.path[0]), __name__, socket.socket.__name__)\n"
            "raise SystemExit(5)")
    out = run_py(["-m", "resilientsock", "--deadline", "3", "-c", code, "a", "--deadline"],
                 cwd=str(tmp_path))
    assert out.returncode == 5, out.stderr
    assert out.stdout.strip() == "['-c', 'a', '--deadline'] '' __main__ ResilientSocket"
    plain = run_py(["-c", "import sys; print(sys.argv, repr(sys.path[0]))", "a"])
    glued = run_py(["-m", "resilientsock", "-cimport sys; print(sys.argv, repr(sys.path[0]))",
                    "a"])
    assert glued.returncode == 0 and glued.stdout == plain.stdout


def test_dash_reads_the_script_from_stdin():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-m", "resilientsock", "-", "x"], input=(
            "import sys, socket\nprint(sys.argv, __name__, socket.socket.__name__)\n"
            "raise SystemExit(3)\n"),
        capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 3, out.stderr
    assert out.stdout.strip() == "['-', 'x'] __main__ ResilientSocket"


def test_show_policy_says_where_each_value_came_from(tmp_path):
    script = tmp_path / "never.py"
    script.write_text("print('the script ran')\n")
    out = run_py(["-m", "resilientsock", "--replay", "none", "--show-policy", str(script)],
                 env={"RESILIENTSOCK_MAX_ATTEMPTS": "4", "RESILIENTSOCK_REPLAY": "safe",
                      "RESILIENTSOCK_SESSION": "hub:9000"})
    assert out.returncode == 0, out.stderr
    assert "the script ran" not in out.stdout
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in out.stdout.splitlines()[1:]}
    assert set(rows) == set(FIELDS) | {"session"}
    assert rows["replay"] == ["'none'", "option --replay"]
    assert rows["max_attempts"] == ["4", "environment RESILIENTSOCK_MAX_ATTEMPTS"]
    assert rows["deadline"] == ["30.0", "default"]
    assert rows["session"] == ["hub:9000", "environment RESILIENTSOCK_SESSION"]


def test_session_option_is_parsed_and_checked():
    assert parse_session("hub:9000, [::1]:80,10.0.0.1:1") == [
        ("hub", 9000), ("::1", 80), ("10.0.0.1", 1)]
    for bad in ("hub", "hub:0", "hub:70000", "::1:80", "hub:9000,"):
        with pytest.raises(ValueError):
            parse_session(bad)
    out = run_py(["-m", "resilientsock", "--session", "hub", "-c", "pass"])
    assert out.returncode == 2 and "--session 'hub'" in out.stderr
    assert "Traceback" not in out.stderr


def test_relay_subcommand_dispatches_to_relay_cli():
    """``relay ...`` calls resilientsock.session.cli.main(argv) and exits with its result (a
    stand-in module here: the relay's own tests test the relay)."""
    code = ("import sys, types\n"
            "stub = types.ModuleType('resilientsock.session.cli')\n"
            "stub.main = lambda argv: print('relay got', argv) or 7\n"
            "sys.modules['resilientsock.session.cli'] = stub\n"
            "from resilientsock._cli import main\n"
            "main(['relay', '--listen', '127.0.0.1:1', '--upstream', '127.0.0.1:2'])\n")
    out = run_py(["-c", code])
    assert out.returncode == 7, out.stderr
    assert out.stdout.strip() == (
        "relay got ['--listen', '127.0.0.1:1', '--upstream', '127.0.0.1:2']")


def test_help_lists_every_policy_field():
    out = run_py(["-m", "resilientsock", "--help"])
    for name in FIELDS:
        assert "--" + name.replace("_", "-") in out.stdout, name
    for opt in ("--session", "--show-policy", "--version", "-c CODE", "relay"):
        assert opt in out.stdout, opt


# -- notes in sight ------------------------------------------------------------------------------

def _noted(exc: BaseException, note: str) -> BaseException:
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:
        exc.__notes__ = [note]  # type: ignore[attr-defined]
    return exc


def test_notes_found_anywhere_in_the_chain_cycle_safe():
    inner = _noted(ConnectionResetError(104, "reset"), "resilientsock: gave up after 3")
    other = _noted(OSError("x"), "not ours")
    reason = type("MaxRetryError", (Exception,), {})("pool")
    reason.reason = inner  # type: ignore[attr-defined]
    wrapper = RuntimeError("request failed", reason)
    wrapper.__context__ = other
    other.__context__ = wrapper  # a cycle
    kept = ValueError("kept")
    kept.errors = [_noted(TimeoutError(), "resilientsock: timed out")]  # type: ignore
    wrapper.kept = kept  # type: ignore[attr-defined]
    assert resilientsock_notes(wrapper) == ["resilientsock: gave up after 3",
                                            "resilientsock: timed out"]
    if sys.version_info >= (3, 11):
        group = ExceptionGroup("all", [ValueError(), inner])  # noqa: F821
        assert resilientsock_notes(RuntimeError("y")) == []
        assert resilientsock_notes(group) == ["resilientsock: gave up after 3"]


def test_runner_prints_buried_notes_after_the_traceback(tmp_path):
    script = tmp_path / "wrapped.py"
    script.write_text(
        "err = ConnectionResetError(104, 'Connection reset by peer')\n"
        "note = 'resilientsock: gave up after 4 attempts in 2.0 s (deadline 2 s)'\n"
        "if hasattr(err, 'add_note'):\n"
        "    err.add_note(note)\n"
        "else:\n"
        "    err.__notes__ = [note]\n"
        "class LibraryError(Exception):\n"
        "    pass\n"
        "try:\n"
        "    try:\n"
        "        raise err\n"
        "    except OSError as e:\n"
        "        raise LibraryError('wrapped', e) from None\n"
        "except LibraryError as e:\n"
        "    raise RuntimeError('x') from e\n")
    out = run_py(["-m", "resilientsock", str(script)])
    assert out.returncode == 1
    lines = out.stderr.rstrip("\n").splitlines()
    assert lines[-2] == "RuntimeError: x"
    assert lines[-1] == "resilientsock: gave up after 4 attempts in 2.0 s (deadline 2 s)"
    plain = run_py([str(script)])
    assert "resilientsock: gave up" not in plain.stderr  # buried: plain python never shows it


def test_runner_prints_buried_notes_of_a_thread_that_dies(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(
        "import threading\n"
        "def work():\n"
        "    err = OSError('inner')\n"
        "    note = 'resilientsock: gave up in a thread'\n"
        "    if hasattr(err, 'add_note'):\n"
        "        err.add_note(note)\n"
        "    else:\n"
        "        err.__notes__ = [note]\n"
        "    raise RuntimeError('outer', err)\n"
        "t = threading.Thread(target=work)\n"
        "t.start()\n"
        "t.join(30)\n"
        "print('main done')\n")
    out = run_py(["-m", "resilientsock", str(script)])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "main done"
    lines = out.stderr.rstrip("\n").splitlines()
    assert lines[-1] == "resilientsock: gave up in a thread", out.stderr


@pytest.mark.parametrize("what", ["not pem", "missing"])
def test_relay_with_a_bad_tls_certificate_says_so(tmp_path, what):
    """A certificate that does not load is named as such, not as "cannot listen"."""
    cert = tmp_path / "cert.pem"
    if what == "not pem":
        cert.write_text("this is not a certificate\n")
    key = tmp_path / "key.pem"
    key.write_text("nor a key\n")
    out = run_py(["-m", "resilientsock", "relay", "--listen", "127.0.0.1:0", "--upstream",
                  "127.0.0.1:9", "--tls-cert", str(cert), "--tls-key", str(key)])
    assert out.returncode == 2, out.stderr
    assert "cannot listen" not in out.stderr
    assert f"--tls-cert {cert}" in out.stderr and "certificate" in out.stderr, out.stderr


@pytest.mark.parametrize("module,says", [
    ("no_such_module_here", "No module named no_such_module_here"),
    ("os.path.nothere", "os.path.nothere"),
    ("json", "'json' is a package and cannot be directly executed"),
])
def test_runner_missing_module_is_one_line_as_python_gives_it(module, says):
    """``-m`` naming no runnable module: python prints one line and exits 1; the runner did
    the same only after a traceback out of runpy (found by the chaos review)."""
    ours = run_py(["-m", "resilientsock", "-m", module])
    plain = run_py(["-m", module])
    assert ours.returncode == plain.returncode == 1
    assert "Traceback" not in ours.stderr, ours.stderr
    assert says in ours.stderr and len(ours.stderr.strip().splitlines()) == 1, ours.stderr


def test_runner_module_import_error_inside_the_module_still_has_its_traceback(tmp_path):
    """Only the lookup of the module is python's one line: an ImportError raised by the
    module's own code is the script's error, with its traceback, as python shows it."""
    (tmp_path / "broken_mod.py").write_text("import no_such_dependency_xyz\n")
    ours = run_py(["-m", "resilientsock", "-m", "broken_mod"], cwd=str(tmp_path))
    assert ours.returncode == 1
    assert "Traceback" in ours.stderr and "no_such_dependency_xyz" in ours.stderr


def test_stats_file_that_cannot_be_written_is_named_not_a_traceback(tmp_path):
    """``RESILIENTSOCK_STATS_FILE`` in a directory that does not exist: exit 2 naming the
    variable before the script runs (was: the script ran, then a traceback at exit)."""
    bad = str(tmp_path / "no-such-dir" / "stats.json")
    ours = run_py(["-m", "resilientsock", "-c", "print('ran')"],
                  env={"RESILIENTSOCK_STATS_FILE": bad})
    assert ours.returncode == 2, ours.stderr
    assert "Traceback" not in ours.stderr
    assert "RESILIENTSOCK_STATS_FILE" in ours.stderr and "ran" not in ours.stdout


def test_stats_file_that_fails_at_exit_is_one_line_and_keeps_the_exit_status(tmp_path):
    """The directory goes away while the script runs: one line on stderr at exit, the
    script's own exit status kept."""
    where = tmp_path / "gone"
    where.mkdir()
    code = f"import os, sys; os.rmdir({str(where)!r}); sys.exit(3)"
    ours = run_py(["-m", "resilientsock", "-c", code],
                  env={"RESILIENTSOCK_STATS_FILE": str(where / "stats.json")})
    assert ours.returncode == 3, ours.stderr
    assert "Traceback" not in ours.stderr
    assert "RESILIENTSOCK_STATS_FILE" in ours.stderr


@pytest.mark.parametrize("value,on", [("1", True), ("yes", True), ("0", False),
                                      ("off", False)])
def test_stats_variable_takes_the_boolean_forms(value, on):
    ours = run_py(["-m", "resilientsock", "-c", "pass"], env={"RESILIENTSOCK_STATS": value})
    assert ours.returncode == 0, ours.stderr
    assert ("reconnects" in ours.stderr) is on, ours.stderr


def test_stats_variable_with_a_bad_value_exits_2_naming_it():
    ours = run_py(["-m", "resilientsock", "-c", "print('ran')"],
                  env={"RESILIENTSOCK_STATS": "maybe"})
    assert ours.returncode == 2 and "RESILIENTSOCK_STATS" in ours.stderr, ours.stderr
    assert "Traceback" not in ours.stderr and "ran" not in ours.stdout


@pytest.mark.parametrize("value", ["1", "True", "3.5", "object()", "[1]"])
def test_patch_session_of_a_wrong_type_is_a_value_error_naming_it(value):
    """``patch(session=1)`` was ``TypeError: 'int' object is not iterable``, naming
    nothing; now a ValueError naming ``session``, raised before anything is patched. Run in
    a subprocess: the pytest process is never patched."""
    code = ("import resilientsock, socket\n"
            f"try:\n    resilientsock.patch(session={value})\n"
            "except ValueError as e:\n    print('VE', e)\n"
            "print('patched', resilientsock.is_patched())\n")
    ours = run_py(["-c", code])
    assert ours.returncode == 0, ours.stderr
    assert "VE " in ours.stdout and "session" in ours.stdout, ours.stdout
    assert "patched False" in ours.stdout


def test_patch_session_false_means_no_session_targets():
    code = ("import resilientsock\nresilientsock.patch(session=False)\n"
            "print('patched', resilientsock.is_patched())\n")
    ours = run_py(["-c", code])
    assert ours.returncode == 0 and "patched True" in ours.stdout, ours.stderr


def test_stats_file_lands_where_it_was_checked_when_the_script_changes_directory(tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    ours = run_py(["-m", "resilientsock", "-c", f"import os; os.chdir({str(other)!r})"],
                  env={"RESILIENTSOCK_STATS_FILE": "stats.json"}, cwd=str(tmp_path))
    assert ours.returncode == 0, ours.stderr
    assert (tmp_path / "stats.json").exists() and not (other / "stats.json").exists()
    assert isinstance(json.loads((tmp_path / "stats.json").read_text()), dict)


def test_explain_a_certificate_error_log_line_says_nothing_was_delivered():
    """The log line of a certificate failure is the handshake's: "nothing written could have
    reached the peer" (docs/design.md §3), not "written data may have reached the peer"."""
    out = run_py(["-m", "resilientsock", "explain", "--json",
                  "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed (_ssl.c:1006)"])
    assert out.returncode == 0, out.stderr
    (entry,) = json.loads(out.stdout)
    assert entry["category"] == "TLS_PERMANENT" and entry["maybe_delivered"] is False


def test_relay_fd_reserve_below_zero_says_zero_is_the_floor():
    """``--fd-reserve 0`` is accepted (as ``Relay(fd_reserve=0)``); ``-1`` said "must be at
    least 1"."""
    out = run_py(["-m", "resilientsock", "relay", "--listen", "127.0.0.1:0", "--upstream",
                  "127.0.0.1:9", "--fd-reserve", "-1"])
    assert out.returncode == 2 and "must be at least 0" in out.stderr, out.stderr
