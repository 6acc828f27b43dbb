"""patch() and the runner, with unmodified clients under real faults (subprocesses)."""

from __future__ import annotations

import http.server
import os
import random
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
import time
import xmlrpc.server
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, run_py

from resilientsock.testing import FaultProxy

SCRIPTS = Path(__file__).parent / "scripts"
ROBOT = ROOT / "resilientsock" / "_scripts" / "robot_client.py"


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Whole answers in one write. A drop between a header write and a body write would be a
    # mid-answer drop, which resilientsock surfaces by design (DESIGN §5): not what these
    # tests are about.
    wbufsize = 65536

    def do_GET(self) -> None:  # noqa: N802
        body = ("item " + self.path.rsplit("/", 1)[-1]).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
        pass


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


@pytest.fixture
def http_server() -> Iterator[tuple[str, int]]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    yield from _serve(srv)


@pytest.fixture
def xmlrpc_server() -> Iterator[tuple[str, int]]:
    srv = _ThreadingXMLRPC(("127.0.0.1", 0), requestHandler=_XMLRPCHandler, logRequests=False)
    srv.register_function(lambda a, b: a + b, "add")
    yield from _serve(srv)


def run_with_faults(args: list[str], proxy: FaultProxy, resilient: bool, kinds: tuple[str, ...],
                    period: tuple[float, float] = (0.05, 0.15), timeout: float = 60,
                    env: dict[str, str] | None = None, seed: int = 1
                    ) -> subprocess.CompletedProcess[str]:
    """Run a script (plain or under the runner) while faults fire at random, bounded."""
    cmd = [sys.executable] + (["-m", "resilientsock", "--deadline", "15"] if resilient else [])
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    proc = subprocess.Popen(cmd + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=full_env)
    rng = random.Random(seed)
    end = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < end:
            try:
                proc.wait(timeout=rng.uniform(*period))
            except subprocess.TimeoutExpired:
                kind = rng.choice(kinds)
                proxy.reset_all() if kind == "reset" else proxy.close_all()
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = proc.communicate(timeout=10)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


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


def test_patch_app_survives_resets(server):
    with FaultProxy(server.address) as proxy:
        proxy.cut_after(0, "down")
        out = run_py([str(SCRIPTS / "patch_app.py"), *map(str, proxy.address)])
    assert out.returncode == 0, out.stderr
    assert "50 ok" in out.stdout
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
    with FaultProxy(http_server) as proxy:
        args = [str(ROOT / "examples" / "http_poller.py"), *map(str, proxy.address), "150"]
        plain = run_with_faults(args, proxy, resilient=False, kinds=("reset", "close"))
        assert plain.returncode != 0
        res = run_with_faults(args, proxy, resilient=True, kinds=("reset", "close"))
    assert res.returncode == 0, res.stderr
    assert "http: 150 ok" in res.stdout


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
                              kinds=("reset", "close"))
        assert proxy.faults["reset"] + proxy.faults["close"] >= 3
    assert res.returncode == 0, res.stderr
    assert "xmlrpc: 150 ok" in res.stdout
    reconnects = int(res.stderr.split("reconnects", 1)[1].split()[0])
    assert reconnects >= 1


@pytest.fixture
def redis_server(tmp_path) -> Iterator[tuple[dict[str, Any], int]]:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (make test installs it as root)")
    pytest.importorskip("redis")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--dir", str(tmp_path)]
    state: dict[str, Any] = {"proc": subprocess.Popen(cmd, stdout=subprocess.DEVNULL)}

    def wait_up() -> None:
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                state["proc"].wait(timeout=0.05) if state["proc"].poll() is not None else None
        raise AssertionError("redis-server did not start")

    wait_up()
    def restart() -> None:
        state["proc"].kill()
        state["proc"].wait()
        state["proc"] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        wait_up()

    state["restart"] = restart
    try:
        yield state, port
    finally:
        state["proc"].kill()
        state["proc"].wait()


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


def test_give_up_through_runner_raises_refused_with_note():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    script = ("import socket\nsocket.create_connection(('127.0.0.1', %d))\n" % port)
    path = ROOT / "tests" / "scripts" / "_giveup.py"
    path.write_text(script)
    try:
        start = time.monotonic()
        out = run_py(["-m", "resilientsock", str(path)], env={"RESILIENTSOCK_DEADLINE": "2"})
        elapsed = time.monotonic() - start
    finally:
        path.unlink()
    assert out.returncode == 1
    assert "ConnectionRefusedError" in out.stderr
    assert "resilientsock: gave up after" in out.stderr
    assert 1.8 <= elapsed < 6
