"""Never worse, wave 5: more real clients, differential (docs/design.md §5, §7).

The same client script runs plain and under ``python -m resilientsock`` against the same
server with the same fault; every count is taken on the server side. Running under
resilientsock must never be worse: nothing run more often, no error the plain client would
not have had, no wait the plain client did not have.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import MODES, CountingServer, run_as

pytestmark = pytest.mark.timeout(60)



def _reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# -- ftplib: a drop on the data connection ------------------------------------------------------
#
# An FTP data connection is one-shot: the server's passive listener accepts one connection for
# one transfer. Was (wave 5): ftplib's data socket was protected like any client socket, so an
# RST in the middle of a RETR or a STOR reconnected to the passive port: refused until the
# socket's timeout ran out (plain: the ConnectionResetError at once), or, where the listener
# still accepted, a second data connection the server never served (the download waited out
# the timeout) or that the upload was replayed into.

FILE = b"".join(b"line %05d\n" % i for i in range(20000))  # 200 kB

FTP_CLIENT = '''\
import ftplib, io, sys, time
port, op = int(sys.argv[1]), sys.argv[2]
FILE = b"".join(b"line %05d\\n" % i for i in range(20000))
ftp = ftplib.FTP()
ftp.connect("127.0.0.1", port, timeout=20)
ftp.login("robot", "secret")
try:
    if op == "RETR":
        buf = io.BytesIO()
        ftp.retrbinary("RETR f", buf.write)
        print("ok", buf.getvalue() == FILE)
    else:
        print("ok", ftp.storbinary("STOR f", io.BytesIO(FILE)))
except Exception as e:
    print("error", type(e).__name__, "|".join(getattr(e, "__notes__", [])))
ftp.close()
'''


class FtpServer(CountingServer):
    """A minimal FTP server (passive mode): the first transfer's data connection is reset
    mid-way (RETR: after 100 kB sent; STOR: after 50 kB read). ``keep_listener`` leaves the
    passive listener accepting after its first connection (and counts the extra ones)."""

    def __init__(self, keep_listener: bool) -> None:
        super().__init__(_FtpHandler)
        self.keep_listener = keep_listener
        self.open: list[socket.socket] = []

    def keep(self, sock: socket.socket) -> None:
        with self.lock:
            self.open.append(sock)

    def stop(self) -> None:
        super().stop()
        with self.lock:
            for sock in self.open:
                sock.close()


class _FtpHandler(socketserver.StreamRequestHandler):
    server: FtpServer

    def say(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")
        self.wfile.flush()

    def handle(self) -> None:
        self.say("220 ready")
        listener: socket.socket | None = None
        try:
            for raw in self.rfile:
                cmd = raw.decode().split(" ", 1)[0].strip().upper()
                if cmd == "USER":
                    self.say("331 password")
                elif cmd == "PASS":
                    self.say("230 logged in")
                elif cmd == "TYPE":
                    self.say("200 ok")
                elif cmd == "PASV":
                    listener = socket.create_server(("127.0.0.1", 0), backlog=5)
                    self.server.keep(listener)
                    listener.settimeout(10)
                    port = listener.getsockname()[1]
                    self.say(f"227 Entering Passive Mode (127,0,0,1,{port >> 8},{port & 255})")
                elif cmd in ("RETR", "STOR") and listener is not None:
                    self.say("150 opening data connection")
                    data, _ = listener.accept()
                    self.server.keep(data)
                    self.server.count("data connections")
                    if self.server.keep_listener:
                        threading.Thread(target=self.extra, args=(listener,), daemon=True).start()
                    else:
                        listener.close()
                    listener = None
                    first = self.server.count(cmd) == 1
                    self.say(self.transfer(cmd, data, first))
                elif cmd == "QUIT":
                    self.say("221 bye")
                    return
                else:
                    self.say("502 not implemented")
        except OSError:
            pass

    def transfer(self, cmd: str, data: socket.socket, first: bool) -> str:
        if cmd == "RETR":
            if first:
                data.sendall(FILE[:100_000])
                _reset(data)
                return "426 transfer aborted"
            data.sendall(FILE)
            data.close()
            return "226 done"
        got = 0
        try:
            while chunk := data.recv(65536):
                got += len(chunk)
                if first and got > 50_000:
                    _reset(data)
                    return "426 transfer aborted"
        except OSError:
            return "426 transfer aborted"
        data.close()
        if got == len(FILE):
            self.server.count("stored")
            return "226 stored"
        return "426 transfer aborted"

    def extra(self, listener: socket.socket) -> None:
        try:
            while True:
                sock, _ = listener.accept()  # accepted, never served
                self.server.keep(sock)
                self.server.count("extra data connections")
        except OSError:
            pass


@pytest.fixture
def ftp_script(tmp_path: Path) -> Path:
    script = tmp_path / "ftp_client.py"
    script.write_text(FTP_CLIENT)
    return script


@pytest.mark.parametrize("keep_listener", [False, True], ids=["listener-closed",
                                                              "listener-open"])
@pytest.mark.parametrize("op", ["RETR", "STOR"])
def test_ftplib_data_connection_reset_is_the_plain_clients_error(ftp_script, op,
                                                                 keep_listener):
    seen: dict[str, tuple[Counter[str], str]] = {}
    for mode in MODES:
        with FtpServer(keep_listener) as server:
            out = run_as(mode, ftp_script, server.server_address[1], op, timeout=45)
        assert out.returncode == 0, out.stderr
        seen[mode] = (server.counts, out.stdout.strip())
    counts, result = seen["resilientsock"]
    # one data connection for the one transfer, as plain: no reconnect to the passive port
    assert counts["data connections"] == seen["plain"][0]["data connections"] == 1, seen
    assert counts["extra data connections"] == 0, seen
    assert counts["stored"] == 0, seen  # the cut upload was never replayed into a new one
    if op == "RETR":  # the plain client's error, at once: no reconnect attempts, no note
        assert result == seen["plain"][1] == "error ConnectionResetError", seen
    else:  # where the RST meets the upload (sendall or the final answer) is timing
        assert result.startswith("error ") and "resilientsock" not in result, seen


# -- a server that resets every connection at once --------------------------------------------
#
# A server past its connection limit, a load balancer with no backend, a firewall's reset: the
# TCP handshake completes and the connection is reset before it carries a byte. Plain clients
# get the error at once. Was (wave 5): the socket reconnected until the application's timeout
# ran out (10 new connections and 5 s for smtplib with timeout=5; 30 s, the deadline, without
# one), and a TLS client's handshake was retried the same way. Now: POISON_CAP in a row are
# the server's answer (``_machine.SILENT_WINDOW``).

RESET_CLIENT = '''\
import smtplib, socket, ssl, sys, time
port, kind = int(sys.argv[1]), sys.argv[2]
t0 = time.monotonic()
try:
    if kind == "smtplib":
        smtplib.SMTP("127.0.0.1", port, timeout=20)
    else:  # a TLS client: the reset meets its handshake
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        raw = socket.create_connection(("127.0.0.1", port), timeout=20)
        ctx.wrap_socket(raw, server_hostname="localhost")
    print("connected")
except Exception as e:
    print("error", type(e).__name__)
    print("notes", getattr(e, "__notes__", None))
'''


class ResetServer(CountingServer):
    """Accepts every connection and resets it at once (counts them)."""

    def __init__(self) -> None:
        super().__init__(_ResetHandler)
        self.accepted = 0


class _ResetHandler(socketserver.BaseRequestHandler):
    server: ResetServer

    def handle(self) -> None:
        with self.server.lock:
            self.server.accepted += 1
        _reset(self.request)


@pytest.mark.parametrize("kind", ["smtplib", "tls"])
def test_a_server_that_resets_every_connection_is_answered_at_once(tmp_path, kind):
    from resilientsock._machine import POISON_CAP

    script = tmp_path / "reset_client.py"
    script.write_text(RESET_CLIENT)
    seen: dict[str, tuple[int, list[str]]] = {}
    for mode in MODES:
        with ResetServer() as server:
            out = run_as(mode, script, server.server_address[1], kind, timeout=45)
        assert out.returncode == 0, out.stderr
        seen[mode] = (server.accepted, out.stdout.splitlines())
    accepted, lines = seen["resilientsock"]
    # Which error a reset at once gives depends on where it meets the client (the connect,
    # the first read, the handshake): plain clients get either as well.
    errors = {"smtplib": {"error SMTPServerDisconnected", "error ConnectionResetError"},
              "tls": {"error ConnectionResetError", "error SSLEOFError", "error SSLError"}}
    assert seen["plain"][0] == 1 and seen["plain"][1][0] in errors[kind], seen
    assert lines[0] in errors[kind], seen
    assert "ran out" not in lines[1], seen  # not "the socket's timeout of 20 s ran out"
    # the first connection and POISON_CAP reconnects (a TLS wrap is a socket of its own after
    # the plain connect's recovery: twice that at most), not as many as 20 s allow
    assert accepted <= 2 * (1 + POISON_CAP), seen
    if kind == "smtplib":
        assert accepted <= 1 + POISON_CAP, seen


# -- poplib APOP: the login digest covers the banner's timestamp ---------------------------------
#
# RFC 1939's APOP sends md5(timestamp + secret), the timestamp taken from the greeting; every
# connection gets a new one. Was (wave 5): a drop before APOP's answer (no command answered
# yet, so no session by the banner rule) reconnected, skipped the new greeting and re-sent the
# old digest: a failed login on the server (an account lockout counts those) and
# "-ERR authentication failed" for the caller, where plain poplib got ConnectionResetError.
# Now a new banner that differs from the one the application read refuses the replay.

APOP_CLIENT = '''\
import poplib, sys
try:
    pop = poplib.POP3("127.0.0.1", int(sys.argv[1]), timeout=10)
    pop.apop("robot", "secret")
    print("ok", pop.stat())
    pop.quit()
except Exception as e:
    print("error", type(e).__name__)
'''


class ApopServer(CountingServer):
    """A POP3 server with an APOP timestamp in each greeting; counts logins."""

    def __init__(self) -> None:
        super().__init__(_ApopHandler)
        self.serial = 0


class _ApopHandler(socketserver.StreamRequestHandler):
    server: ApopServer

    def handle(self) -> None:
        import hashlib

        with self.server.lock:
            self.server.serial += 1
            stamp = f"<{self.server.serial}.{id(self)}@pop.test>"
        self.wfile.write(f"+OK POP3 ready {stamp}\r\n".encode())
        for line in self.rfile:
            words = line.split()
            cmd = words[0].upper() if words else b""
            if cmd == b"APOP" and len(words) == 3:
                good = hashlib.md5(f"{stamp}secret".encode()).hexdigest().encode()
                ok = words[2] == good
                with self.server.lock:
                    self.server.counts["logins" if ok else "failed logins"] += 1
                self.wfile.write(b"+OK maildrop locked\r\n" if ok
                                 else b"-ERR authentication failed\r\n")
            elif cmd == b"STAT":
                self.wfile.write(b"+OK 0 0\r\n")
            elif cmd == b"QUIT":
                self.wfile.write(b"+OK bye\r\n")
                return
            else:
                self.wfile.write(b"-ERR unknown\r\n")


@pytest.mark.parametrize("direction,pattern,action", [
    ("up", b"APOP", "reset"),  # the login never reaches the server
    ("up", b"APOP", "close"),
    ("down", b"+OK maildrop", "reset"),  # the login ran, its answer is lost
], ids=["apop-lost-rst", "apop-lost-fin", "answer-lost"])
def test_poplib_apop_is_never_re_sent_after_a_new_greeting(tmp_path, direction, pattern,
                                                           action):
    from resilientsock.testing import FaultProxy

    script = tmp_path / "apop_client.py"
    script.write_text(APOP_CLIENT)
    seen: dict[str, tuple[Counter[str], str]] = {}
    for mode in MODES:
        with ApopServer() as server:
            with FaultProxy(server.server_address[:2]) as proxy:
                proxy.plan.on_pattern(pattern, direction, nth=1, action=action)
                out = run_as(mode, script, proxy.address[1], timeout=45)
                assert len(proxy.plan.fired) == 1, (mode, proxy.plan.fired)
        assert out.returncode == 0, out.stderr
        seen[mode] = (server.counts, out.stdout.strip())
    assert seen["resilientsock"][0]["failed logins"] == 0, seen  # never a wrong digest sent
    assert seen["resilientsock"][0] == seen["plain"][0], seen
    assert seen["resilientsock"][1] == seen["plain"][1], seen  # the plain client's error


def test_which_banner_changes_refuse_the_replay():
    """docs/design.md §5a: a changed banner refuses the re-send only where the re-sent bytes
    may depend on it; a clock or a counter in it (Exim's and Sendmail's date) does not."""
    from resilientsock._machine import banner_refusal

    ehlo = b"EHLO robot\r\n"
    assert banner_refusal(b"+OK POP3 ready <1.9@pop.test>\r\n",
                          b"+OK POP3 ready <2.9@pop.test>\r\n", b"APOP robot 0f3c\r\n")
    assert banner_refusal(b"220 mx ESMTP Exim 4.96 Mon, 07 Dec 2026 02:50:07 +0000\r\n",
                          b"220 mx ESMTP Exim 4.96 Mon, 07 Dec 2026 02:50:08 +0000\r\n",
                          ehlo) is None
    assert banner_refusal(b"200 ready, connection 17\n", b"200 ready, connection 18\n",
                          b"MSG 1 hello\n") is None
    assert banner_refusal(b"READY nonce=9f2c4e1a7b3d5f60\n", b"READY nonce=0a1b2c3d4e5f6a7b\n",
                          b"AUTH 5e1d\n")  # a nonce: the answer may be computed from it
    assert banner_refusal(b"WELCOME session 17\n", b"WELCOME session 18\n",
                          b"JOIN 17 lobby\n")  # the old session's number, echoed


class _DatedBanner(socketserver.StreamRequestHandler):
    """An SMTP-like greeting with the time in it (a new second each connection here), then
    ``250 ok`` for each line; counts the commands it ran."""

    server: DatedServer

    def handle(self) -> None:
        server = self.server
        with server.lock:
            server.serial += 1
            second = server.serial
        self.wfile.write(b"220 mx.test ESMTP Mon, 07 Dec 2026 02:50:%02d +0000\r\n" % second)
        for line in self.rfile:
            with server.lock:
                server.ran.append(line)
            self.wfile.write(b"250 ok " + line)


class DatedServer(CountingServer):
    def __init__(self) -> None:
        super().__init__(_DatedBanner)
        self.serial = 0
        self.ran: list[bytes] = []


def test_a_dated_banner_is_skipped_and_the_first_command_re_sent():
    """Was (wave 5, before the merge review): any new banner unlike the old one refused the
    re-send, so a drop before the first answer surfaced against every server that dates its
    greeting (Exim, Sendmail); now the command is re-sent after the new greeting."""
    from resilientsock import ResilientSocket, RetryPolicy
    from resilientsock.testing import FaultProxy

    with DatedServer() as server:
        with FaultProxy(server.server_address[:2]) as proxy:
            policy = RetryPolicy(deadline=5, backoff_initial=0.01, backoff_max=0.1)
            with ResilientSocket.connect(proxy.address, policy, timeout=10) as s, \
                    s.makefile("rb") as reader:
                assert reader.readline().startswith(b"220 mx.test ESMTP")
                proxy.cut_after(0, "up")  # the first command is cut on its way
                s.sendall(b"EHLO robot\r\n")
                assert reader.readline() == b"250 ok EHLO robot\r\n"
                assert s.reconnects == 1
    assert server.ran == [b"EHLO robot\r\n"]  # once: the cut one never reached the server


# -- an unknown client-first protocol that logs in first ----------------------------------------
#
# Was (wave 5): the byte rules re-sent a command whose answer was lost alone on a new
# connection that never logged in; the caller read the server's "ERR login first" (3 times
# here) where plain got ConnectionResetError. Now a first record that is a login line
# (rule client-login in _machine.RULES) makes a drop after its answer surface, as plain;
# RetryPolicy(prelude=1) redoes and checks the login instead, and recovers.

LOGIN_CLIENT = '''\
import socket, sys
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
answers = sock.makefile("rb")
try:
    sock.sendall(b"LOGIN robot secret\\n")
    print(answers.readline().decode().strip())
    for i in range(4):
        sock.sendall(b"SEND m%d\\n" % i)
        print(answers.readline().decode().strip())
except OSError as e:
    print("error", type(e).__name__)
'''


class LoginServer(CountingServer):
    """A line protocol whose commands need a LOGIN first on each connection."""

    def __init__(self) -> None:
        super().__init__(_LoginHandler)


class _LoginHandler(socketserver.StreamRequestHandler):
    server: LoginServer

    def handle(self) -> None:
        logged_in = False
        for line in self.rfile:
            word = line.split(b" ", 1)[0]
            if word == b"LOGIN":
                logged_in = True
                self.wfile.write(b"OK welcome\n")
                continue
            with self.server.lock:
                self.server.counts["ran" if logged_in else "not logged in"] += 1
            self.wfile.write(b"OK " + line.split()[-1] + b"\n" if logged_in
                             else b"ERR login first\n")


def test_an_unknown_protocol_that_logs_in_first_never_runs_a_command_logged_out(tmp_path):
    from resilientsock.testing import FaultProxy

    script = tmp_path / "login_client.py"
    script.write_text(LOGIN_CLIENT)
    seen: dict[str, tuple[Counter[str], list[str]]] = {}
    for mode in MODES:
        with LoginServer() as server:
            with FaultProxy(server.server_address[:2]) as proxy:
                proxy.plan.on_pattern(b"OK m1", "down", nth=1, action="reset")
                out = run_as(mode, script, proxy.address[1], timeout=45)
                assert len(proxy.plan.fired) == 1, (mode, proxy.plan.fired)
        assert out.returncode == 0, out.stderr
        seen[mode] = (server.counts, out.stdout.splitlines())
    assert seen["resilientsock"][0]["not logged in"] == 0, seen
    assert "ERR login first" not in seen["resilientsock"][1], seen
    assert seen["resilientsock"] == seen["plain"], seen  # the plain client's error, at once


def test_a_declared_prelude_recovers_the_login_first_protocol(tmp_path):
    """prelude=1: the login is redone (and its answer checked) on the new connection."""
    from resilientsock.testing import FaultProxy

    script = tmp_path / "login_client.py"
    script.write_text(LOGIN_CLIENT)
    with LoginServer() as server:
        with FaultProxy(server.server_address[:2]) as proxy:
            proxy.plan.on_pattern(b"OK m1", "down", nth=1, action="reset")
            cmd = [sys.executable, "-m", "resilientsock", "--prelude", "1", str(script),
                   str(proxy.address[1])]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=45)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["OK", "welcome", "OK", "m0", "OK", "m1", "OK", "m2",
                                  "OK", "m3"], out
    assert server.counts["not logged in"] == 0, server.counts


# -- IPv6 loopback: the test tools listen on ::1 too ----------------------------------------------


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no ::1 on this machine")
def test_a_client_on_ipv6_loopback_recovers_through_a_fault_proxy_on_ipv6():
    """Was (wave 5): FaultProxy(host="::1") and MessageServer(host="::1") raised gaierror
    (the listener was always AF_INET), so no fault could be put on an IPv6 path."""
    from resilientsock import ResilientSocket, RetryPolicy
    from resilientsock.testing import FaultProxy, MessageServer

    with MessageServer(host="::1") as server, FaultProxy(server.address, host="::1") as proxy:
        proxy.plan.on_pattern(b"ACK 2", "down", nth=1, action="reset")
        policy = RetryPolicy(deadline=5, backoff_initial=0.01, backoff_max=0.1)
        with ResilientSocket.connect(proxy.address, policy, timeout=5) as sock:
            assert sock.family == socket.AF_INET6
            answers = sock.makefile("rb")
            for n in range(1, 5):
                sock.sendall(b"MSG %d x\n" % n)
                assert answers.readline() == b"ACK %d\n" % n
            answers.close()
            assert sock.reconnects == 1
        assert len(proxy.plan.fired) == 1
    assert server.unique() == {1, 2, 3, 4}


def test_the_machine_surfaces_a_drop_after_an_answered_login_line():
    from resilientsock import RetryPolicy
    from resilientsock._errors import classify
    from resilientsock._machine import RECOVER, SURFACE, Drop, Machine

    info = classify(ConnectionResetError(), phase="read")
    assert info is not None

    def verdict(first: bytes, policy: Any = None, answered: bool = True) -> Any:
        m = Machine(policy or RetryPolicy())
        m.wrote_data(first)
        if answered:
            m.read_data(b"OK\n", m.journal.mark())
        m.wrote_data(b"SEND m1\n")
        return m.drop(Drop(info, "read"))

    for first in (b"LOGIN robot secret\n", b"logon robot-7 secret\r\n", b"AUTH robot-7 k\n"):
        v = verdict(first)
        assert v.kind == SURFACE and v.rule == "client-login" and v.discard, first
        assert "prelude=1" in v.note
    assert verdict(b"LOGIN robot secret\n", answered=False).kind == RECOVER  # nothing yet
    assert verdict(b"MSG 1 hello\n").kind == RECOVER  # the robot: at-least-once, as before
    assert verdict(b"HELLO robot-7\n").kind == RECOVER  # a greeting keeps the byte rules
    assert verdict(b"LOGINS are counted\n").kind == RECOVER  # a word, not a prefix
    hook = RetryPolicy(on_reconnect=lambda sock, attempt: None)
    assert verdict(b"LOGIN robot secret\n", hook).kind == RECOVER  # the hook restores it
    assert verdict(b"LOGIN robot secret\n", RetryPolicy(prelude=1)).kind == RECOVER
