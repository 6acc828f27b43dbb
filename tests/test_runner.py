"""patch() and the runner, with unmodified clients under real faults (subprocesses)."""

from __future__ import annotations

import asyncio
import http.server
import os
import random
import socket
import socketserver
import subprocess
import sys
import threading
import time
import warnings
import xmlrpc.server
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import ROOT, run_py

from resilientsock.testing import FaultProxy, MessageServer

SCRIPTS = Path(__file__).parent / "scripts"
ROBOT = ROOT / "resilientsock" / "_scripts" / "robot_client.py"


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Whole answers in one write. A drop between a header write and a body write would be a
    # mid-answer drop, which resilientsock surfaces by design (docs/design.md §5): not what these
    # tests are about.
    wbufsize = 65536

    def do_GET(self) -> None:  # noqa: N802
        item = self.path.rsplit("/", 1)[-1]
        body = ("item " + item).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        if item.isdigit():
            _ANSWERED.setdefault(self.server.server_address[:2], []).append(int(item))

    def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
        pass


# The requests each test server has answered (i of /item/i, or of add(i, 1)), by server
# address: what the fault schedule of the keep-alive clients waits for (run_with_faults'
# ``progress``).
_ANSWERED: dict[tuple[str, int], list[int]] = {}


def _last_item_answered(address: tuple[str, int]) -> Callable[[], int]:
    return lambda: max(_ANSWERED.get(address, [-1]))


class _XMLRPCHandler(xmlrpc.server.SimpleXMLRPCRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the case worth testing
    wbufsize = 65536  # whole answers in one write (see _Handler)


class _ThreadingXMLRPC(socketserver.ThreadingMixIn, xmlrpc.server.SimpleXMLRPCServer):
    daemon_threads = True


def _serve(server: socketserver.BaseServer) -> Iterator[tuple[str, int]]:
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server.server_address[:2]  # type: ignore[misc]
    finally:
        server.shutdown()
        server.server_close()
        _ANSWERED.pop(server.server_address[:2], None)


@pytest.fixture
def http_server() -> Iterator[tuple[str, int]]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    yield from _serve(srv)


@pytest.fixture
def https_server(tmp_path) -> Iterator[tuple[tuple[str, int], str]]:
    """The same HTTP/1.1 server over TLS (a trustme CA); yields (address, CA file)."""
    import ssl

    import trustme

    ca = trustme.CA()
    cafile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True, do_handshake_on_connect=False)
    for address in _serve(srv):
        yield address, str(cafile)


@pytest.fixture
def xmlrpc_server() -> Iterator[tuple[str, int]]:
    srv = _ThreadingXMLRPC(("127.0.0.1", 0), requestHandler=_XMLRPCHandler, logRequests=False)
    address = srv.server_address[:2]

    def add(a: int, b: int) -> int:
        _ANSWERED.setdefault(address, []).append(a)  # xmlrpc_calls.py calls add(i, 1)
        return a + b

    srv.register_function(add, "add")
    yield from _serve(srv)


def _run_driving_faults(args: list[str], resilient: bool, step: Callable[..., None],
                        timeout: float, seed: int, env: dict[str, str] | None = None
                        ) -> subprocess.CompletedProcess[str]:
    """Run a script (plain or under the runner); ``step(proc, rng)`` fires faults until it
    ends, bounded by ``timeout``."""
    cmd = [sys.executable] + (["-m", "resilientsock", "--deadline", "15"] if resilient else [])
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    proc = subprocess.Popen(cmd + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=full_env)
    rng = random.Random(seed)
    end = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < end:
            step(proc, rng)
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = proc.communicate(timeout=10)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _reconnects(res: subprocess.CompletedProcess[str]) -> int:
    """The reconnect count from the runner's ``--stats`` summary on stderr."""
    return int(res.stderr.split("reconnects", 1)[1].split()[0])


def run_with_faults(args: list[str], proxy: FaultProxy, resilient: bool, kinds: tuple[str, ...],
                    period: tuple[float, float] = (0.05, 0.15), timeout: float = 60,
                    env: dict[str, str] | None = None, seed: int = 1,
                    progress: Callable[[], int] | None = None
                    ) -> subprocess.CompletedProcess[str]:
    """Run a script (plain or under the runner) while faults fire at random, bounded.

    With ``progress`` (the index of the last request the server answered), a fault fires only
    once the server has answered two requests past the one it had answered at the previous
    fault: the client has then finished every request that fault may have hit, so no request
    meets two faults, however slowly a loaded machine runs the client. (A re-sent request
    whose new connection closes again unanswered is passed on as EOF, by design: the server
    may be closing on that request; docs/design.md §5.)"""
    due = [-1]  # the progress the next fault waits for

    def step(proc: subprocess.Popen[str], rng: random.Random) -> None:
        try:
            proc.wait(timeout=rng.uniform(*period))
        except subprocess.TimeoutExpired:
            if progress is not None:
                if progress() < due[0]:
                    return
                due[0] = progress() + 2
            kind = rng.choice(kinds)
            proxy.reset_all() if kind == "reset" else proxy.close_all()

    return _run_driving_faults(args, resilient, step, timeout, seed, env)


def test_differential_output_equal_when_nothing_fails(server):
    args = [str(ROBOT), *map(str, server.address), "40"]
    plain = run_py(args)
    wrapped = run_py(["-m", "resilientsock", *args])
    assert plain.returncode == wrapped.returncode == 0, wrapped.stderr
    assert plain.stdout == wrapped.stdout and "40 readings acknowledged" in plain.stdout


def test_differential_exit_code_argv_and_path(tmp_path):
    script = tmp_path / "show.py"
    script.write_text(
        "import sys, os\n"
        "print(sys.argv, os.path.basename(sys.path[0]), __name__)\n"
        "raise SystemExit(7)\n")
    plain = run_py([str(script), "a", "--deadline", "b"])
    wrapped = run_py(["-m", "resilientsock", "--deadline", "3", "--", str(script), "a",
                      "--deadline", "b"])
    assert plain.returncode == wrapped.returncode == 7
    assert plain.stdout == wrapped.stdout
    assert tmp_path.name in wrapped.stdout and "__main__" in wrapped.stdout


def test_runner_runs_a_module(tmp_path):
    pkg = tmp_path / "legacy_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "tool.py").write_text(
        "import socket, sys\nprint(type(socket.socket).__name__, socket.socket.__name__, "
        "sys.argv[1:])\n")
    out = run_py(["-m", "resilientsock", "-m", "legacy_pkg.tool", "x", "-m", "y"],
                 cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "ResilientSocket ['x', '-m', 'y']" in out.stdout


def test_patch_identity_and_repatch():
    out = run_py([str(SCRIPTS / "patch_identity.py")])
    assert out.returncode == 3, out.stderr
    assert "identity ok" in out.stdout


def _loopback_v6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_fallback_socketpair_builds_our_class_and_authenticates(family):
    """CPython 3.13 test_socket's injected-peer test, reproduced (a conformance regression)."""
    if family == "ipv6" and not _loopback_v6():
        pytest.skip("no ::1 on this machine")
    out = run_py([str(SCRIPTS / "fallback_socketpair.py"), f"--{family}"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "fallback ok" in out.stdout
    if hasattr(socket, "_fallback_socketpair"):
        assert "refused: " in out.stdout


def test_create_connection_all_errors_raises_an_exception_group():
    out = run_py([str(SCRIPTS / "create_connection_all_errors.py")])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "plain: ConnectionRefusedError" in out.stdout
    if sys.version_info >= (3, 11):
        assert "all_errors: ExceptionGroup of " in out.stdout


def test_patch_app_survives_resets(server):
    with FaultProxy(server.address) as proxy:
        proxy.cut_after(0, "down")
        out = run_py([str(SCRIPTS / "patch_app.py"), *map(str, proxy.address)])
    assert out.returncode == 0, out.stderr
    assert "50 ok, reconnects 1" in out.stdout  # the cut answer was recovered
    assert sorted(set(server.received)) == list(range(1, 51))


def test_robot_under_runner_with_stats(server):
    with FaultProxy(server.address) as proxy:
        args = [str(ROBOT), *map(str, proxy.address), "300", "0.002"]
        plain = run_with_faults(args, proxy, resilient=False, kinds=("reset",))
        assert plain.returncode != 0  # the fault bites the unprotected client
        server.received.clear()
        res = run_with_faults(["--stats", *args], proxy, resilient=True, kinds=("reset", "close"))
    assert res.returncode == 0, res.stderr
    assert "resilientsock: summary" in res.stderr and "reconnects" in res.stderr
    assert set(server.received) == set(range(1, 301))


def test_http_client_keepalive_poller(http_server):
    progress = _last_item_answered(http_server)
    with FaultProxy(http_server) as proxy:
        args = [str(ROOT / "examples" / "http_poller.py"), *map(str, proxy.address), "150"]
        plain = run_with_faults(args, proxy, resilient=False, kinds=("reset", "close"),
                                progress=progress)
        assert plain.returncode != 0
        _ANSWERED.pop(http_server, None)
        res = run_with_faults(args, proxy, resilient=True, kinds=("reset", "close"),
                              progress=progress)
    assert res.returncode == 0, res.stderr
    assert "http: 150 ok" in res.stdout


def test_https_keepalive_poller(https_server):
    """http.client over TLS (ssl.create_default_context, unchanged) through resets and FINs:
    each recovery is a new TCP connection and a new handshake under the same context."""
    address, cafile = https_server
    progress = _last_item_answered(address)
    with FaultProxy(address) as proxy:
        args = [str(ROOT / "examples" / "http_poller.py"), *map(str, proxy.address), "150",
                cafile]
        plain = run_with_faults(args, proxy, resilient=False, kinds=("reset", "close"),
                                progress=progress)
        assert plain.returncode != 0
        _ANSWERED.pop(address, None)
        res = run_with_faults(["--stats", *args], proxy, resilient=True,
                              kinds=("reset", "close"), progress=progress)
        assert proxy.faults["reset"] + proxy.faults["close"] >= 3
    assert res.returncode == 0, res.stderr
    assert "https: 150 ok" in res.stdout
    assert _reconnects(res) >= 1


def test_urllib_request(http_server):
    with FaultProxy(http_server) as proxy:
        proxy.cut_after(0, "down")  # the first answer is cut: urllib would raise
        args = [str(SCRIPTS / "urllib_fetch.py"), *map(str, proxy.address), "30"]
        res = run_with_faults(args, proxy, resilient=True, kinds=("reset",))
    assert res.returncode == 0, res.stderr
    assert "urllib: 30 ok" in res.stdout


def test_xmlrpc_client(xmlrpc_server):
    with FaultProxy(xmlrpc_server) as proxy:
        # xmlrpc.client already re-sends once on a reset keep-alive connection (RFC 7230
        # §6.3.1), so a plain run may survive these faults: the layers multiply (README).
        args = [str(SCRIPTS / "xmlrpc_calls.py"), *map(str, proxy.address), "150"]
        res = run_with_faults(["--stats", *args], proxy, resilient=True,
                              kinds=("reset", "close"), progress=_last_item_answered(xmlrpc_server))
        assert proxy.faults["reset"] + proxy.faults["close"] >= 3
    assert res.returncode == 0, res.stderr
    assert "xmlrpc: 150 ok" in res.stdout
    assert _reconnects(res) >= 1


def test_redis_server_killed_and_restarted(redis_server):
    import redis

    state, port = redis_server
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "resilientsock", "--deadline", "20",
         str(SCRIPTS / "redis_writer.py"), "127.0.0.1", str(port), "400"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    client = redis.Redis(port=port)
    end = time.monotonic() + 20
    while time.monotonic() < end and client.dbsize() < 100:  # bounded: wait for progress
        proc.wait(timeout=0.02) if proc.poll() is not None else time.sleep(0.02)
    state["restart"]()  # kill -9 and start again: all in-memory data is gone
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    # Keys written before the kill died with the server (no persistence); every key the script
    # wrote after the restart must be there, and the script itself completed without error.
    client = redis.Redis(port=port)
    last = int(client.get("key:399"))
    assert last == 399
    present = [i for i in range(400) if client.exists(f"key:{i}")]
    assert present[-1] == 399 and present == list(range(present[0], 400))


def test_give_up_through_runner_raises_refused_with_note(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    # Timed inside the script: the interpreter's start on a loaded machine is not ours.
    script = ("import socket, time\nt0 = time.monotonic()\ntry:\n"
              "    socket.create_connection(('127.0.0.1', %d))\nfinally:\n"
              "    print('elapsed', time.monotonic() - t0, flush=True)\n" % port)
    path = tmp_path / "_giveup.py"
    path.write_text(script)
    out = run_py(["-m", "resilientsock", str(path)], env={"RESILIENTSOCK_DEADLINE": "2"})
    assert out.returncode == 1
    assert "ConnectionRefusedError" in out.stderr
    assert "resilientsock: gave up after" in out.stderr
    elapsed = float(out.stdout.split("elapsed", 1)[1].split()[0])
    assert 1.8 <= elapsed < 4, elapsed  # the 2 s deadline, then the error at once


def test_give_up_note_is_the_last_line_when_a_library_wraps_the_error(tmp_path):
    """urllib turns the refused connect into URLError(reason=...): the note sits one level
    down the chain, and the runner prints it again as the last line of the output."""
    port = _free_port()  # nothing listens there
    script = tmp_path / "fetch.py"
    script.write_text("import urllib.request\n"
                      f"urllib.request.urlopen('http://127.0.0.1:{port}/', timeout=30)\n")
    out = run_py(["-m", "resilientsock", "--deadline", "1", str(script)])
    assert out.returncode == 1
    lines = out.stderr.rstrip("\n").splitlines()
    assert any(line.startswith("urllib.error.URLError") for line in lines), out.stderr
    assert lines[-1].startswith("resilientsock: gave up after"), out.stderr


# -- server-first protocols: smtplib and ftplib --------------------------------------------------
#
# Both protocols greet first (a banner) and then hold session state (EHLO, login). resilientsock
# recovers a drop that lands before the session exists: the server restarting (refused
# connects), a reset before the banner, the first command cut on its way (the new banner is
# skipped, the command re-sent). A drop inside an established session is surfaced instead of
# re-sending commands into a new session out of context (docs/decisions.md, "Banners").

BANNER_FAULTS = ("refuse", "reset-before-banner", "first-command-reset", "first-command-close")


class _Lockstep:
    """A gate in the server's last step of a session: each session waits there until the
    driver has armed the fault for the next one and lets it through, so every session meets
    exactly one fault however fast or slow the client runs next to the driver."""

    def __init__(self) -> None:
        self.arrived = 0
        self._tokens = threading.Semaphore(0)

    def wait_here(self) -> bool:
        """The server's side (in a worker thread): arrive, then wait (bounded) to go on."""
        self.arrived += 1
        return self._tokens.acquire(timeout=30)

    def let_through(self) -> None:
        self._tokens.release()


def run_with_banner_faults(args: list[str], proxy: FaultProxy, resilient: bool,
                           progress: Callable[[], int], timeout: float = 60, seed: int = 3,
                           lockstep: _Lockstep | None = None
                           ) -> subprocess.CompletedProcess[str]:
    """Run a script while faults land at the start of its sessions, one after another.

    ``progress`` counts the sessions the server has seen through: after a fault lands, the
    next one is armed only once that count has grown, so the session the fault hit has
    finished and no session meets two faults, however slowly a loaded machine runs the client
    (a re-sent command whose new connection closes again unanswered is passed on as EOF, by
    design: the server may be closing on that command; docs/design.md §5).

    With ``lockstep`` (a gate the server passes at the end of each session), every session
    meets exactly one fault: the next fault is armed while the session before it waits at
    the gate, and that session is let through only then."""
    if lockstep is not None:
        return _run_driving_faults(args, resilient, _lockstep_step(proxy, lockstep, timeout),
                                   timeout, seed)

    def step(proc: subprocess.Popen[str], rng: random.Random) -> None:
        kind = rng.choice(BANNER_FAULTS)
        before = proxy.faults["cut"]
        _arm_banner_fault(proxy, kind)
        # Wait (bounded) for the cut to land before arming the next one.
        limit = time.monotonic() + (0.4 if kind == "refuse" else 5)
        while (proc.poll() is None and time.monotonic() < limit
               and (kind == "refuse" or proxy.faults["cut"] == before)):
            try:
                proc.wait(timeout=0.02)
            except subprocess.TimeoutExpired:
                pass
        # Then (bounded) for the session it hit to get through.
        done, limit = progress(), time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < limit and progress() == done:
            try:
                proc.wait(timeout=0.02)
            except subprocess.TimeoutExpired:
                pass

    return _run_driving_faults(args, resilient, step, timeout, seed)


def _arm_banner_fault(proxy: FaultProxy, kind: str) -> None:
    if kind == "refuse":
        proxy.refuse(0.2)
    elif kind == "reset-before-banner":
        proxy.cut_after(0, "down", new_only=True)
    else:
        proxy.cut_after(0, "up", how=kind.rsplit("-", 1)[1], new_only=True)


def _lockstep_step(proxy: FaultProxy, gate: _Lockstep, timeout: float
                   ) -> Callable[[subprocess.Popen[str], random.Random], None]:
    armed = [0]  # faults armed so far; session k meets fault k

    def step(proc: subprocess.Popen[str], rng: random.Random) -> None:
        _arm_banner_fault(proxy, rng.choice(BANNER_FAULTS))
        if armed[0]:
            gate.let_through()  # the session before this fault ends; the next one meets it
        armed[0] += 1
        limit = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < limit and gate.arrived < armed[0]:
            try:
                proc.wait(timeout=0.02)
            except subprocess.TimeoutExpired:
                pass
    return step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _MailBox:
    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.lockstep: _Lockstep | None = None

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]  # noqa: N802
        gate = self.lockstep
        if gate is not None and not await asyncio.to_thread(gate.wait_here):
            return "451 the test's driver never let this session through"
        self.messages.append(envelope.content)
        return "250 OK"


@pytest.fixture
def smtp_server() -> Iterator[tuple[tuple[str, int], _MailBox]]:
    controller_mod = pytest.importorskip("aiosmtpd.controller")
    box = _MailBox()
    controller = controller_mod.Controller(box, hostname="127.0.0.1", port=_free_port())
    controller.start()
    try:
        yield ("127.0.0.1", controller.port), box
    finally:
        controller.stop()


def test_smtplib_survives_faults_at_session_start(smtp_server):
    address, box = smtp_server
    count = 40

    def progress() -> int:
        return len(box.messages)

    with FaultProxy(address) as proxy:
        args = [str(SCRIPTS / "smtp_sender.py"), *map(str, proxy.address), str(count)]
        box.lockstep = _Lockstep()
        plain = run_with_banner_faults(args, proxy, resilient=False, progress=progress,
                                       lockstep=box.lockstep)
        assert plain.returncode != 0  # the faults bite smtplib on its own
        assert "SMTPServerDisconnected" in plain.stderr or "Error" in plain.stderr
        box.messages.clear()
        box.lockstep = gate = _Lockstep()
        before = proxy.faults["cut"]
        res = run_with_banner_faults(["--stats", *args], proxy, resilient=True,
                                     progress=progress, lockstep=gate)
        cuts = proxy.faults["cut"] - before  # the resets and closes this run met
    assert res.returncode == 0, res.stderr
    assert f"smtp: {count} ok" in res.stdout
    bodies = sorted(m.split(b"\r\n\r\n", 1)[1] for m in box.messages)
    assert bodies == sorted(f"reading {i}\r\n".encode() for i in range(count))  # once each
    assert gate.arrived == count and cuts >= count // 2  # every session met a fault
    # Each cut cost one reconnect; a refusal adds one when the session came within its 0.2 s.
    assert cuts <= _reconnects(res) <= count


def test_smtplib_drop_inside_a_session_surfaces_as_smtplib_expects(smtp_server):
    """Mid-session, smtplib gets its own SMTPServerDisconnected, not a banner as an answer,
    and no command is re-sent into a new session."""
    import smtplib

    from resilientsock import ResilientSocket, RetryPolicy

    class ResilientSMTP(smtplib.SMTP):
        def _get_socket(self, host, port, timeout):  # type: ignore[no-untyped-def]
            return ResilientSocket.connect((host, port), RetryPolicy(deadline=3),
                                           timeout=timeout)

    address, box = smtp_server
    with FaultProxy(address) as proxy:
        smtp = ResilientSMTP(*proxy.address, timeout=10)
        try:
            assert smtp.ehlo()[0] == 250  # the session now exists
            assert proxy.reset_all() == 1
            with pytest.raises(smtplib.SMTPServerDisconnected):
                smtp.sendmail("robot@example.test", ["ops@example.test"], "Subject: x\r\n\r\nx")
        finally:
            smtp.close()
    assert box.messages == []


@pytest.fixture
def ftp_server(tmp_path) -> Iterator[tuple[tuple[str, int], Path]]:
    pytest.importorskip("pyftpdlib")
    with warnings.catch_warnings():  # pyftpdlib imports asyncore before Python 3.12
        warnings.simplefilter("ignore", DeprecationWarning)
        from pyftpdlib.authorizers import DummyAuthorizer
        from pyftpdlib.handlers import FTPHandler
        from pyftpdlib.servers import ThreadedFTPServer

    home = tmp_path / "ftp"
    home.mkdir()
    auth = DummyAuthorizer()
    auth.add_user("robot", "secret", str(home), perm="elrw")
    handler = type("Handler", (FTPHandler,), {"authorizer": auth, "banner": "pyftpdlib ready"})
    server = ThreadedFTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, kwargs={"timeout": 0.05}, daemon=True)
    t.start()
    try:
        yield server.address[:2], home
    finally:
        server.close_all()
        t.join(10)


def test_ftplib_survives_faults_at_session_start(ftp_server):
    address, home = ftp_server
    count = 25

    def progress() -> int:
        return len(list(home.iterdir()))  # one file stored per session

    with FaultProxy(address) as proxy:
        args = [str(SCRIPTS / "ftp_uploader.py"), *map(str, proxy.address), str(count)]
        plain = run_with_banner_faults(args, proxy, resilient=False, progress=progress)
        assert plain.returncode != 0
        for f in home.iterdir():
            f.unlink()
        res = run_with_banner_faults(["--stats", *args], proxy, resilient=True,
                                     progress=progress)
        assert proxy.faults["cut"] >= 3
    assert res.returncode == 0, res.stderr
    assert f"ftp: {count} ok" in res.stdout
    for i in range(count):
        assert (home / f"reading{i}.txt").read_bytes() == f"reading {i}\n".encode() * 50


def test_patch_warns_about_names_bound_before_it():
    early = run_py([str(SCRIPTS / "patch_warning.py"), "early"])
    assert early.returncode == 0, early.stderr
    assert "warnings: 1" in early.stdout
    assert "legacy_client.create_connection (socket.create_connection)" in early.stdout
    assert "legacy_client.Sock (socket.socket)" in early.stdout
    clean = run_py([str(SCRIPTS / "patch_warning.py"), "clean"])
    assert clean.returncode == 0, clean.stderr
    assert "warnings: 0" in clean.stdout


def test_sys_path_0_resolves_symlinks_as_python_does(tmp_path):
    real = tmp_path / "real"
    link = tmp_path / "link"
    real.mkdir()
    link.mkdir()
    (real / "helper.py").write_text("WHERE = 'real'\n")
    (real / "s.py").write_text("import sys, helper\nprint(sys.path[0], helper.WHERE)\n")
    (link / "s.py").symlink_to(real / "s.py")
    plain = run_py([str(link / "s.py")])
    ours = run_py(["-m", "resilientsock", str(link / "s.py")])
    assert plain.returncode == 0 and ours.returncode == 0, ours.stderr
    assert ours.stdout == plain.stdout == f"{real} real\n"


def test_the_journal_warning_names_the_runner_option_under_the_runner(tmp_path):
    """Advice names what the user can set where they are: ``--confirm tcp-ack`` under the
    runner, ``RetryPolicy(confirm="tcp-ack")`` in code."""
    script = tmp_path / "telemetry.py"
    script.write_text(
        "import socket, sys\n"
        "s = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n"
        "for _ in range(100):\n"
        "    s.sendall(b'x' * 65536)\n"  # 6.4 MB, never answered
        "s.close()\n")
    with MessageServer("sink") as sink:
        out = run_py(["-m", "resilientsock", str(script), str(sink.address[1])], timeout=60)
    assert out.returncode == 0, out.stderr
    assert "use --confirm tcp-ack" in out.stderr
    assert "RetryPolicy(" not in out.stderr
