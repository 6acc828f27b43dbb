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

pytestmark = pytest.mark.timeout(60)

MODES = ("plain", "resilientsock")


def _run(mode: str, script: Path, *args: Any) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable]
    if mode == "resilientsock":
        cmd += ["-m", "resilientsock"]
    cmd += [str(script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=45)


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


class FtpServer(socketserver.ThreadingTCPServer):
    """A minimal FTP server (passive mode): the first transfer's data connection is reset
    mid-way (RETR: after 100 kB sent; STOR: after 50 kB read). ``keep_listener`` leaves the
    passive listener accepting after its first connection (and counts the extra ones)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, keep_listener: bool) -> None:
        super().__init__(("127.0.0.1", 0), _FtpHandler)
        self.keep_listener = keep_listener
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.open: list[socket.socket] = []

    def count(self, key: str) -> int:
        with self.lock:
            self.counts[key] += 1
            return self.counts[key]

    def keep(self, sock: socket.socket) -> None:
        with self.lock:
            self.open.append(sock)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the client's resets are the point

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
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
        server = FtpServer(keep_listener)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                  daemon=True)
        thread.start()
        try:
            out = _run(mode, ftp_script, server.server_address[1], op)
        finally:
            server.stop()
            thread.join(5)
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
