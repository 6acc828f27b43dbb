"""The public contract (docs/design.md, the original in /work/shared/DESIGN.md) checked from
outside, as a user would: the runner against plain ``python``, ... Each test here failed on
the code before its fix (wave 5 contract audit)."""

from __future__ import annotations

import json
import sys
import time

import pytest
from conftest import Lines, run_py

from resilientsock import Relay, ResilientSocket, RetryPolicy
from resilientsock.testing import MessageServer


def _both(args: list[str], cwd: str) -> tuple[str, str]:
    plain = run_py(args, cwd=cwd)
    wrapped = run_py(["-m", "resilientsock", *args], cwd=cwd)
    assert plain.returncode == wrapped.returncode == 0, (plain.stderr, wrapped.stderr)
    return plain.stdout, wrapped.stdout


def test_runner_keeps_a_relative_script_path_in_argv0_and_file_as_python(tmp_path):
    """§2/§7: argv is passed to the script unchanged: ``sys.argv[0]`` is the script's path
    as given (runpy.run_path made it absolute), ``__file__`` what python makes of it."""
    (tmp_path / "show.py").write_text(
        "import sys, os\n"
        "print(sys.argv, __file__, __name__, os.path.basename(sys.path[0]))\n")
    for given in ("show.py", "./show.py"):
        plain, wrapped = _both([given, "a", "--deadline", "b"], cwd=str(tmp_path))
        assert wrapped == plain
        assert wrapped.startswith(f"[{given!r}, 'a', '--deadline', 'b'] ")


def test_script_and_dash_c_do_not_inherit_the_runners_future_imports(tmp_path):
    """The runner's own ``from __future__ import annotations`` must not leak into the code it
    runs: ``-c`` code compiled by the runner saw its annotations as strings."""
    code = "def f(x: int): pass\nprint(f.__annotations__)\n"
    (tmp_path / "ann.py").write_text(code)
    for args in (["-c", code], ["ann.py"]):
        plain, wrapped = _both(args, cwd=str(tmp_path))
        assert wrapped == plain == "{'x': <class 'int'>}\n"


def test_runner_runs_a_directory_with_main_as_python(tmp_path):
    """``python DIR`` runs DIR/__main__.py; so does the runner, argv[0] as given."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "__main__.py").write_text(
        "import sys, socket\nprint(sys.argv, __name__)\n"
        "print(socket.socket.__name__, file=sys.stderr)\n")
    plain = run_py(["app", "x"], cwd=str(tmp_path))
    wrapped = run_py(["-m", "resilientsock", "app", "x"], cwd=str(tmp_path))
    assert plain.returncode == wrapped.returncode == 0, wrapped.stderr
    assert wrapped.stdout == plain.stdout == "['app', 'x'] __main__\n"
    assert wrapped.stderr.strip() == "ResilientSocket"
    assert sys.executable  # the interpreter both ran under


# -- §11: a session that cannot be resumed is a ConnectionResetError with a note -------------


def test_a_session_the_restarted_relay_no_longer_holds_is_a_reset_with_a_note():
    """§11: "A session that cannot be resumed (relay restarted, expired, proof rejected) is
    surfaced (ConnectionResetError with a note: the relay no longer holds the session)". The
    reset came bare (the reason only in a log record), so ``except`` code that prints the
    error's notes saw nothing."""
    with MessageServer() as upstream:
        relay = Relay(("127.0.0.1", 0), upstream.address).start()
        address = relay.address
        app = ResilientSocket.connect(address, RetryPolicy(session=True, deadline=10))
        try:
            app.settimeout(10)
            lines = Lines(app)
            app.sendall(b"MSG 1 before\n")
            assert lines.readline() == b"ACK 1"
            relay.stop()
            relay = Relay(address, upstream.address).start()
            with pytest.raises(ConnectionResetError) as info:
                app.sendall(b"MSG 2 after the restart\n")
                while app.recv(100):
                    pass
            notes = getattr(info.value, "__notes__", None) or []
            assert any(note.startswith("resilientsock:") and
                       "no longer holds the session" in note for note in notes), notes
            assert upstream.received == [1]  # never re-sent into a new session
        finally:
            app.close()
            relay.stop()


def test_a_session_clients_close_reaches_the_upstream_at_once_without_the_hub():
    """§11: "a client's close() ends its session on the relay at once", and the session ends
    "as a plain connection would end (EOF after every byte before it)". A script that uses
    ``ResilientSocket`` without ``patch()`` and then waits with anything but gevent (a thread's
    join, ``time.sleep``, a blocking call) never ran the greenlet that carried the END: the
    upstream server never saw its EOF (held until the session timeout)."""
    import gevent.monkey

    blocking_sleep = gevent.monkey.get_original("time", "sleep")
    with MessageServer() as upstream, Relay(("127.0.0.1", 0), upstream.address) as relay:
        app = ResilientSocket.connect(relay.address, RetryPolicy(session=True, deadline=10))
        app.settimeout(10)
        app.sendall(b"MSG 1 hello\n")
        assert Lines(app).readline() == b"ACK 1"
        app.sendall(b"MSG 2 the last\n")
        app.close()
        start = time.monotonic()
        # The upstream (a MessageServer) closes when it reads its client's EOF: the relay
        # counts that as the upstream's EOF.
        while relay.stats()["upstream_eofs"] == 0 and time.monotonic() - start < 5:
            blocking_sleep(0.01)  # the calling thread's hub does not run meanwhile
        assert relay.stats()["upstream_eofs"] == 1
        assert upstream.received == [1, 2]  # EOF after every byte before it


# -- stats() ------------------------------------------------------------------------------------


def test_stats_has_its_documented_counters_from_the_start():
    """``resilientsock.stats()`` documents its keys (``connects``, ``reconnects``, ``gave_up``,
    ...); a fresh process had none of them, so ``stats()["reconnects"]`` (a before/after
    count) raised KeyError until the first reconnect."""
    out = run_py(["-c", "import json, resilientsock; print(json.dumps(resilientsock.stats()))"])
    assert out.returncode == 0, out.stderr
    counters = json.loads(out.stdout)
    for key in ("connects", "internal_connects", "disconnects", "reconnect_attempts",
                "reconnects", "replayed_records", "replayed_bytes", "answers_resumed",
                "answers_changed", "surfaced", "gave_up"):
        assert counters[key] == 0, key


# -- a bad value names where it came from --------------------------------------------------------


@pytest.mark.parametrize("how", ["environment", "option"])
@pytest.mark.parametrize("field,value", [("deadline", "-1"), ("journal_limit", "-5"),
                                         ("max_attempts", "0"), ("backoff_multiplier", "0.5")])
def test_a_value_out_of_range_names_its_option_or_variable(tmp_path, how, field, value):
    """§2: every knob is an option and a variable; a bad one is one line naming it, exit 2.
    A value that parsed but was out of range named only ``RetryPolicy.<field>`` (and
    "from RESILIENTSOCK_* environment"), not the option or the variable the user set."""
    script = tmp_path / "never.py"
    script.write_text("print('the script ran')\n")
    option, var = "--" + field.replace("_", "-"), "RESILIENTSOCK_" + field.upper()
    if how == "environment":
        out = run_py(["-m", "resilientsock", str(script)], env={var: value})
        named = var
    else:
        out = run_py(["-m", "resilientsock", option, value, str(script)])
        named = option
    assert out.returncode == 2 and "the script ran" not in out.stdout
    assert named in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_patch_names_the_variable_of_a_value_out_of_range():
    code = ("import resilientsock\ntry:\n    resilientsock.patch()\n"
            "except ValueError as exc:\n    print('ValueError', exc)\n")
    out = run_py(["-c", code], env={"RESILIENTSOCK_JOURNAL_LIMIT": "-5"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ValueError RESILIENTSOCK_JOURNAL_LIMIT='-5'"), out.stdout


def test_an_option_completes_what_a_variable_needs(tmp_path):
    """Options win over the environment, and the two are judged together:
    ``RESILIENTSOCK_DEADLINE=none`` is valid with ``--max-attempts 3`` (the environment was
    validated alone first, so the runner refused it)."""
    script = tmp_path / "ok.py"
    script.write_text("print('the script ran')\n")
    out = run_py(["-m", "resilientsock", "--max-attempts", "3", str(script)],
                 env={"RESILIENTSOCK_DEADLINE": "none"})
    assert out.returncode == 0, out.stderr
    assert "the script ran" in out.stdout


def test_a_directory_without_main_is_one_line_and_status_1(tmp_path):
    """As ``python DIR`` says it (and as the runner says it for ``-m``): one line, status 1,
    never a traceback out of runpy."""
    (tmp_path / "nothing_here").mkdir()
    plain = run_py(["nothing_here"], cwd=str(tmp_path))
    wrapped = run_py(["-m", "resilientsock", "nothing_here"], cwd=str(tmp_path))
    assert plain.returncode == wrapped.returncode == 1
    assert "Traceback" not in wrapped.stderr, wrapped.stderr
    assert "can't find '__main__' module" in wrapped.stderr


# -- session 13 audit: the environment, as a stranger sets it ------------------------------------


@pytest.mark.parametrize("var,value", [("RESILIENTSOCK_LOG_LEVEL", "LOUD"),
                                       ("RESILIENTSOCK_SESSION", "nohost")])
def test_a_bad_runner_variable_is_named_as_the_variable(tmp_path, var, value):
    """§2: a bad value is one line naming where it came from, exit 2. A bad
    ``RESILIENTSOCK_LOG_LEVEL`` or ``RESILIENTSOCK_SESSION`` was reported as the option
    (``--log-level 'LOUD'``), which the user never typed."""
    script = tmp_path / "never.py"
    script.write_text("print('the script ran')\n")
    out = run_py(["-m", "resilientsock", str(script)], env={var: value})
    assert out.returncode == 2 and "the script ran" not in out.stdout
    assert out.stderr.startswith(f"resilientsock: error: {var}={value!r}"), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_patch_names_the_session_variable_of_a_bad_target():
    code = ("import resilientsock\ntry:\n    resilientsock.patch()\n"
            "except ValueError as exc:\n    print('ValueError', exc)\n")
    out = run_py(["-c", code], env={"RESILIENTSOCK_SESSION": "nohost"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ValueError RESILIENTSOCK_SESSION='nohost'"), out.stdout


@pytest.mark.parametrize("empty", ["", " "])
@pytest.mark.parametrize("how", ["runner", "patch"])
def test_an_empty_policy_variable_is_unset(tmp_path, how, empty):
    """``RESILIENTSOCK_RETRY_CONNECT=`` (a variable emptied in a shell or a compose file) read
    as ``False``, ``RESILIENTSOCK_RESUME_ANSWERS=`` turned answer resume off, and
    ``RESILIENTSOCK_DEADLINE=`` refused to start ("deadline=None needs max_attempts"): an
    empty variable is unset, as ``RESILIENTSOCK_SESSION=`` and ``RESILIENTSOCK_LOG_LEVEL=``
    already were."""
    from resilientsock._policy import FIELDS

    env = {"RESILIENTSOCK_" + name.upper(): empty
           for name in [*FIELDS, "session", "log_level", "stats"]}
    script = tmp_path / "show.py"
    script.write_text("import resilientsock._socket as s\nprint(s.default_policy() == "
                      "__import__('resilientsock').RetryPolicy())\n")
    if how == "runner":
        out = run_py(["-m", "resilientsock", str(script)], env=env)
    else:
        out = run_py(["-c", "import resilientsock; resilientsock.patch()\n"
                      + script.read_text()], env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "True\n", out.stdout


@pytest.mark.parametrize("args,kwargs,named", [
    ((), {"deadline": 1}, "'deadline'"),
    ((RetryPolicy(), 5), {}, "3 positional arguments"),
])
def test_class_connect_names_itself_for_a_wrong_argument(args, kwargs, named):
    """§2's ``ResilientSocket.connect(address, policy=RetryPolicy(...))``: a policy field given
    to it directly (``deadline=1``) was a TypeError naming the private ``_connect_new()``."""
    with pytest.raises(TypeError) as info:
        ResilientSocket.connect(("127.0.0.1", 9), *args, **kwargs)
    assert str(info.value).startswith("ResilientSocket.connect() got"), info.value
    assert named in str(info.value) and "_connect_new" not in str(info.value)


def test_a_socket_without_a_policy_honours_the_environment_without_patch():
    """§2: "every policy knob is also ... an environment variable". ``patch()`` and the
    runner read them; a ``ResilientSocket`` used directly (the second way in) without a
    policy took the built-in defaults: ``RESILIENTSOCK_DEADLINE=1`` still waited 30 s for a
    server that is down. An explicit policy still wins over the environment."""
    code = ("import socket, time, resilientsock\n"
            "s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]\n"
            "s.close()\n"
            "print(resilientsock.ResilientSocket().policy.deadline)\n"
            "explicit = resilientsock.RetryPolicy(deadline=7)\n"
            "print(resilientsock.ResilientSocket(policy=explicit).policy.deadline)\n"
            "start = time.monotonic()\n"
            "try:\n"
            "    resilientsock.ResilientSocket.connect(('127.0.0.1', port))\n"
            "except ConnectionRefusedError:\n"
            "    print(round(time.monotonic() - start) <= 2)\n")
    out = run_py(["-c", code], env={"RESILIENTSOCK_DEADLINE": "1"}, timeout=45)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1.0", "7", "True"], out.stdout


def test_a_bad_variable_names_itself_when_a_socket_without_a_policy_reads_it():
    code = ("import resilientsock\ntry:\n    resilientsock.ResilientSocket().policy\n"
            "except ValueError as exc:\n    print('ValueError', exc)\n")
    out = run_py(["-c", code], env={"RESILIENTSOCK_REPLAY": "twice"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ValueError RESILIENTSOCK_REPLAY='twice'"), out.stdout


@pytest.mark.parametrize("given", ["[relay.address]", "relay.address"])
def test_patch_session_takes_the_relays_address_as_a_socket_address(given):
    """§11's ``patch(session=["robot-hub:9000"])`` with the address as Python code holds it:
    ``Relay.address`` (a ``(host, port)`` tuple, §11) or what the application passes to
    ``create_connection``. ``patch(session=[relay.address])`` was a ValueError ("is not a
    'HOST:PORT' string"), and ``patch(session=relay.address)`` read the tuple as two targets.
    Run in a subprocess: the pytest process is never patched."""
    code = ("import resilientsock\nresilientsock.patch(session=[])\n"
            "import socket\n"
            "from resilientsock.testing import MessageServer\n"
            "with MessageServer() as up, resilientsock.Relay(('127.0.0.1', 0), up.address) "
            "as relay:\n"
            f"    resilientsock.patch(session={given})\n"
            "    s = socket.create_connection(relay.address, timeout=10)\n"
            "    s.sendall(b'MSG 1 hello\\n')\n"
            "    print(s.recv(100), relay.stats()['sessions_created'])\n"
            "    s.close()\n")
    out = run_py(["-c", code], timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "b'ACK 1\\n' 1\n", out.stdout


@pytest.mark.parametrize("bad", [("127.0.0.1", 99999), ("127.0.0.1", -1), ("", 9000),
                                 ("127.0.0.1",), ("127.0.0.1", None)])
def test_a_relay_address_out_of_range_is_a_value_error_at_construction(bad):
    """§11 ``Relay(listen, upstream, **options)``: an upstream given as a tuple was taken as
    it came (``("127.0.0.1", 99999)`` built a relay whose every session failed later, and a
    one-element tuple was an IndexError); the ``"HOST:PORT"`` form was already checked."""
    for listen, upstream in ((("127.0.0.1", 0), bad), (bad, ("127.0.0.1", 9))):
        if listen == ("", 9000):
            continue  # a listener's empty host is every interface, as socket.bind() has it
        with pytest.raises(ValueError, match="expected"):
            Relay(listen, upstream)
    assert Relay(("127.0.0.1", "0"), ("127.0.0.1", 9)).listen == ("127.0.0.1", 0)
    assert Relay(("", 0), ("127.0.0.1", 9)).listen == ("", 0)  # as before the check


@pytest.mark.parametrize("relay", ["refused", "resets"])
def test_creating_a_session_honours_the_applications_timeout_and_notes_why(relay):
    """§4 "the application's timeout is honoured" and §5 "gave up: the original exception
    type with a note", for a session's creation (§11: "retried under the policy like any
    first connect"). ``create_connection(relay, timeout=2)`` to a session target whose relay
    refused or reset every handshake took the policy's whole deadline (30.0 s measured) and
    raised the error bare; a plain target gives up in 2 s with the note."""
    code = ("import resilientsock\nresilientsock.patch(session=[])\n"
            "import socket, struct, time, gevent\n"
            "lst = socket.socket(); lst.bind(('127.0.0.1', 0)); lst.listen()\n"
            "addr = lst.getsockname()\n"
            f"if {relay!r} == 'refused':\n"
            "    lst.close()\n"
            "else:\n"
            "    def serve():\n"
            "        while True:\n"
            "            c, _ = lst.accept(); c.recv(100)\n"
            "            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,\n"
            "                         struct.pack('ii', 1, 0)); c.close()\n"
            "    gevent.spawn(serve)\n"
            "resilientsock.patch(session=[addr])\n"
            "start = time.monotonic()\n"
            "try:\n"
            "    socket.create_connection(addr, timeout=2)\n"
            "except (ConnectionRefusedError, ConnectionResetError) as exc:\n"
            "    print(round(time.monotonic() - start) <= 3)\n"
            "    print(exc.__notes__)\n")
    out = run_py(["-c", code], timeout=60)
    assert out.returncode == 0, out.stderr
    took, notes = out.stdout.splitlines()
    assert took == "True", out.stdout
    assert "resilientsock: gave up: the socket's timeout of 2 s ran out after" in notes


def test_a_script_that_calls_patch_itself_keeps_the_runners_options(tmp_path):
    """§2: "``patch()`` twice is harmless". A script written to work both ways (it calls
    ``resilientsock.patch()`` itself) and run as ``python -m resilientsock --deadline 5
    --replay safe --session HOST:PORT script.py`` lost every option: its ``patch()`` rebuilt
    the policy from the defaults (deadline 30, replay idempotent) and cleared the session
    targets, so its connections silently stopped being sessions. A second call changes what
    it names and keeps the rest."""
    script = tmp_path / "self_patching.py"
    script.write_text(
        "import resilientsock, resilientsock._socket as s\n"
        "from resilientsock.session import targets as t\n"
        "def show():\n"
        "    p = s.default_policy()\n"
        "    print(p.deadline, p.replay, t.session_targets())\n"
        "resilientsock.patch()\n"
        "show()\n"
        "resilientsock.patch(replay='none')\n"
        "show()\n"
        "resilientsock.patch(session=False)\n"
        "show()\n")
    out = run_py(["-m", "resilientsock", "--deadline", "5", "--replay", "safe",
                  "--session", "127.0.0.1:9000", str(script)])
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["5.0 safe ['127.0.0.1:9000']",
                                       "5.0 none ['127.0.0.1:9000']",
                                       "5.0 none []"], out.stdout
