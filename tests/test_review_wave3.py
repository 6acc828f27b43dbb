"""Adversarial review, wave 3: differential tests (docs/design.md §5, §5a, §5b).

The same real client runs twice, plain (no resilientsock) and under
``python -m resilientsock``, against the same real server through the same fault plan;
every count is taken on the server side. Running under resilientsock must never be worse:
no message delivered more often, none lost where plain delivered it, no request run more
often than plain ran it, no wrong answer handed to the caller.
"""

from __future__ import annotations

import http.server
import random
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import MODES, ThreadedServer, run_as

from resilientsock.testing import FaultProxy

pytestmark = pytest.mark.timeout(120)



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- smtplib against aiosmtpd: a mail is delivered as often under resilientsock as plain ------

SMTP_CLIENT = '''\
import smtplib, sys
port = int(sys.argv[1])
body = "Subject: reading 1\\r\\n\\r\\nRSET\\r\\nMAIL FROM:<other@example.test>\\r\\nhello\\r\\n"
try:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        print("sent", smtp.sendmail("robot@example.test", ["ops@example.test"], body))
except Exception as e:
    print("error", type(e).__name__)
'''


@pytest.fixture
def smtp_server() -> Iterator[tuple[tuple[str, int], list[bytes]]]:
    controller_mod = pytest.importorskip("aiosmtpd.controller")
    delivered: list[bytes] = []

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            delivered.append(envelope.content)
            return "250 Message accepted for delivery"

    port = _free_port()
    controller = controller_mod.Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield ("127.0.0.1", port), delivered
    finally:
        controller.stop()


# (direction, pattern): where the connection is reset; the body holds lines that are SMTP
# commands, so a body re-sent into a fresh session would be run as commands.
SMTP_FAULTS = [
    ("down", b"250 Message accepted"),  # the server stored the mail, its answer is lost
    ("down", b"354"),  # DATA's go-ahead is lost
    ("up", b"rcpt TO"),  # the recipient never reaches the server
    ("up", b"hello\r\n"),  # the body is cut mid-way
    ("down", b"221"),  # QUIT's answer is lost after the mail was accepted
]


@pytest.mark.parametrize("direction,pattern", SMTP_FAULTS,
                         ids=[p.decode().strip() for _, p in SMTP_FAULTS])
def test_smtp_mail_delivered_as_often_as_plain(smtp_server, tmp_path, direction, pattern):
    address, delivered = smtp_server
    script = tmp_path / "smtp_client.py"
    script.write_text(SMTP_CLIENT)
    seen: dict[str, tuple[int, str]] = {}
    for mode in MODES:
        delivered.clear()
        with FaultProxy(address) as proxy:
            proxy.plan.on_pattern(pattern, direction, nth=1, action="reset")
            out = run_as(mode, script, proxy.address[1])
            assert len(proxy.plan.fired) == 1, (mode, proxy.plan.fired)
        assert out.returncode == 0, out.stderr
        seen[mode] = (len(delivered), out.stdout.split()[0] if out.stdout else "")
        assert all(b"MAIL FROM:<other" in mail for mail in delivered)
    assert seen["resilientsock"][0] == seen["plain"][0], seen
    if seen["plain"][1] == "sent":  # never an error the plain client did not have
        assert seen["resilientsock"][1] == "sent", seen


# -- http.client keep-alive GET/POST loop through resets every 50-200 ms ----------------------

HTTP_CLIENT = '''\
import http.client, sys
port, count = int(sys.argv[1]), int(sys.argv[2])
bad = errors = 0
c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
for i in range(count):
    method = "POST" if i % 2 else "GET"
    try:
        c.request(method, f"/{i}", body=b"x" * 100 if method == "POST" else None)
        data = c.getresponse().read()
        if data != f"{method} /{i}\\n".encode() * 2000:
            bad += 1
    except (OSError, http.client.HTTPException):
        errors += 1
        c.close()
print("bad", bad, "errors", errors)
'''


class CountingHTTP(ThreadedServer):
    """http.server (HTTP/1.1 keep-alive), headers and body in separate writes, counting
    every request by method and path."""

    def __init__(self) -> None:
        counts: Counter[str] = Counter()
        self.counts = counts

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                size = int(self.headers.get("Content-Length") or 0)
                if size:
                    self.rfile.read(size)
                counts[f"{self.command} {self.path}"] += 1
                body = f"{self.command} {self.path}\n".encode() * 2000
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                for i in range(0, len(body), 4096):
                    self.wfile.write(body[i:i + 4096])

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self._start(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler))


def test_http_post_loop_through_random_resets_never_runs_a_post_twice(tmp_path):
    script = tmp_path / "http_client.py"
    script.write_text(HTTP_CLIENT)
    server = CountingHTTP()
    try:
        for mode in MODES:
            server.counts.clear()
            with FaultProxy(server.address) as proxy:
                stop = threading.Event()
                resets = [0]

                def chaos(stop: threading.Event, resets: list[int], proxy: FaultProxy) -> None:
                    rnd = random.Random(1)
                    while not stop.wait(rnd.uniform(0.05, 0.2)):
                        resets[0] += proxy.reset_all()

                thread = threading.Thread(target=chaos, args=(stop, resets, proxy))
                thread.start()
                try:
                    out = run_as(mode, script, proxy.address[1], 200)
                finally:
                    stop.set()
                    thread.join(5)
            assert out.returncode == 0, out.stderr
            assert resets[0] >= 1, mode  # the loop met the faults (it runs for seconds)
            words = out.stdout.split()
            assert words[:2] == ["bad", "0"], (mode, out.stdout)  # never a wrong answer
            twice = [k for k, n in server.counts.items() if n > 1 and k.startswith("POST")]
            assert twice == [], (mode, twice)  # a POST never runs twice
            assert sum(n for k, n in server.counts.items() if k.startswith("POST")) <= 100
    finally:
        server.close()


# -- ftplib STOR/RETR against pyftpdlib: a file is stored as often as plain -------------------

FTP_CLIENT = '''\
import ftplib, io, sys
port = int(sys.argv[1])
def login():
    ftp = ftplib.FTP()
    ftp.connect("127.0.0.1", port, timeout=10)
    ftp.login("robot", "secret")
    return ftp
ftp = login()
for i in range(3):
    data = b"%d" % i * 20000
    try:
        ftp.storbinary(f"STOR f{i}", io.BytesIO(data))
        buf = io.BytesIO()
        ftp.retrbinary(f"RETR f{i}", buf.write)
        print("ok", i, buf.getvalue() == data)
    except Exception as e:
        print("error", i, type(e).__name__)
        ftp.close()
        ftp = login()
ftp.quit()
'''

# the control connection is reset where: STOR's final answer lost (the file is stored), PASV
# lost, the go-ahead for RETR lost, RETR never reaching the server.
FTP_FAULTS = [("down", b"226 Transfer"), ("up", b"PASV"), ("up", b"RETR f1")]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("direction,pattern", FTP_FAULTS,
                         ids=[p.decode() for _, p in FTP_FAULTS])
def test_ftplib_files_stored_as_plain_stores_them(tmp_path, direction, pattern):
    pytest.importorskip("pyftpdlib")
    from pyftpdlib.authorizers import DummyAuthorizer
    from pyftpdlib.handlers import FTPHandler
    from pyftpdlib.servers import FTPServer

    root = tmp_path / "root"
    root.mkdir()
    authorizer = DummyAuthorizer()
    authorizer.add_user("robot", "secret", str(root), perm="elradfmw")
    handler = type("Handler", (FTPHandler,), {"authorizer": authorizer})
    handler.log_prefix = ""
    server = FTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"timeout": 0.05},
                              daemon=True)
    thread.start()
    script = tmp_path / "ftp_client.py"
    script.write_text(FTP_CLIENT)
    seen: dict[str, tuple[dict[str, bytes], list[str]]] = {}
    try:
        for mode in MODES:
            for f in root.iterdir():
                f.unlink()
            with FaultProxy(server.address[:2]) as proxy:
                proxy.plan.on_pattern(pattern, direction, nth=1, action="reset")
                out = run_as(mode, script, proxy.address[1])
                assert len(proxy.plan.fired) == 1, (mode, proxy.plan.fired)
            assert out.returncode == 0, out.stderr
            files = {f.name: f.read_bytes() for f in root.iterdir()}
            seen[mode] = (files, out.stdout.splitlines())
            for name, data in files.items():  # never a file with wrong content
                assert data == name[1:].encode() * 20000, (mode, name)
    finally:
        server.close_all()
        thread.join(5)
    assert sorted(seen["resilientsock"][0]) == sorted(seen["plain"][0]), seen
    plain_ok = {line for line in seen["plain"][1] if line.startswith("ok")}
    assert plain_ok <= set(seen["resilientsock"][1]), seen  # no error plain did not have


# -- redis-py non-transaction pipeline mixing reads and INCR/RPUSH, retries off --------------

REDIS_CLIENT = '''\
import sys, redis
from redis.backoff import NoBackoff
from redis.retry import Retry
port = int(sys.argv[1])
r = redis.Redis(port=port, socket_timeout=5, retry=Retry(NoBackoff(), 0),
                health_check_interval=0)
for i in range(4):
    try:
        p = r.pipeline(transaction=False)
        p.set("s", i).get("s").incr(f"c:{i}").rpush(f"l:{i}", "x").get("s")
        print("ok", i, p.execute() == [True, str(i).encode(), 1, 1, str(i).encode()])
    except redis.ConnectionError:
        print("error", i)
'''


@pytest.mark.parametrize("how", ["answer-lost", "answer-cut"])
def test_redis_pipeline_with_incr_runs_no_more_often_than_plain(redis_server, tmp_path, how):
    import redis

    port = redis_server[1]
    script = tmp_path / "redis_client.py"
    script.write_text(REDIS_CLIENT)
    direct = redis.Redis(port=port)
    seen: dict[str, tuple[list[int], list[str]]] = {}
    try:
        for mode in MODES:
            direct.flushall()
            with FaultProxy(("127.0.0.1", port)) as proxy:
                if how == "answer-lost":  # the server ran the pipeline of call 2, no answer
                    proxy.plan.on_pattern(b"+OK\r\n$1\r\n1\r\n", "down", nth=1,
                                          action="reset")
                else:  # the answer of call 2 is cut after its first replies
                    proxy.plan.on_pattern(b":1\r\n$1\r\n1\r\n", "down", nth=1,
                                          action="reset")
                out = run_as(mode, script, proxy.address[1])
                assert len(proxy.plan.fired) == 1, (mode, proxy.plan.fired)
            assert out.returncode == 0, out.stderr
            runs = [int(direct.get(f"c:{i}") or 0) for i in range(4)]
            pushes = [int(direct.llen(f"l:{i}")) for i in range(4)]
            assert runs == pushes, (mode, runs, pushes)
            seen[mode] = (runs, out.stdout.splitlines())
            assert "ok 1 False" not in out.stdout and "ok 2 False" not in out.stdout, out.stdout
    finally:
        direct.close()
    assert seen["resilientsock"][0] == seen["plain"][0] == [1, 1, 1, 1], seen  # never twice
    plain_ok = {line for line in seen["plain"][1] if line.startswith("ok")}
    assert plain_ok <= set(seen["resilientsock"][1]), seen
