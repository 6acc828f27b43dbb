"""Session mode on real paths (docs/design.md §11 "Real paths (wave 3)", issue 25): what one
application write becomes on the wire through a forwarder without TCP_NODELAY, backpressure
that is not taken for death, vanished clients and clean ends.

Topology: the client (``open_session``, gevent, the pytest process's hub) -> a forwarder
(``sessionkit.Recorder``, no TCP_NODELAY, or the FaultProxy) -> Relay (its own hub and
thread) -> an upstream server; counts are taken on the server's side. The stalled-upstream
test is ../shared/repro/wave3/w3_stalled_upstream_resets_session.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import gevent
import gevent.event
import gevent.socket as gsocket
import pytest
from conftest import Lines, run_py, wait_until
from sessionkit import Recorder

from resilientsock import RetryPolicy
from resilientsock.session import Relay, carrier, open_session
from resilientsock.session import protocol as sp
from resilientsock.testing import LoopThread, MessageServer

POLICY = RetryPolicy(deadline=20, backoff_initial=0.01, backoff_max=0.1)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def upstream() -> Iterator[MessageServer]:
    server = MessageServer().start()
    yield server
    server.shutdown()



# -- Nagle-safe framing ----------------------------------------------------------------------


def test_one_application_write_is_one_frame_in_one_segment_through_a_nagle_forwarder(
        upstream: MessageServer) -> None:
    """Request/answer through a forwarder without TCP_NODELAY: each request and each answer
    crosses it as one whole DATA frame in one read, and no standalone ACK goes out sooner than
    the delayed-ACK time after the data it acknowledges (an ACK there, followed by the next
    DATA, holds that DATA behind Nagle's algorithm for the path's delayed ACK: 40 ms)."""
    with Relay(("127.0.0.1", 0), upstream.address, plain_after=2.0) as relay:
        fwd = Recorder(relay.address)
        try:
            app = open_session(fwd.address, timeout=10, policy=POLICY)
            lines = Lines(app)
            # Several delayed-ACK intervals (the timer must not fire behind fresh data),
            # bounded in count.
            start = time.monotonic()
            count = 0
            while count < 5000 and (count < 200 or time.monotonic() - start < 1.2):
                count += 1
                app.sendall(b"MSG %d\n" % count)
                assert lines.readline() == b"ACK %d" % count
            stop = time.monotonic()
            chunks = [c for c in fwd.chunks if start <= c[0] <= stop]
            assert upstream.received == list(range(1, count + 1))
            assert upstream.connections == 1
            last = {"up": 0.0, "down": 0.0}
            early_acks = []
            data_chunks = {"up": 0, "down": 0}
            for at, direction, size, types, partial in chunks:
                if sp.DATA in types:
                    data_chunks[direction] += 1
                    # One write, one frame, one read: never a frame split in two writes
                    # (the second would wait for the first's TCP ACK) nor two frames.
                    assert types == [sp.DATA] and not partial, (direction, size, types)
                    last[direction] = at
                elif sp.ACK in types:
                    other = "down" if direction == "up" else "up"
                    if at - last[other] < carrier.ACK_DELAY * 0.9:
                        early_acks.append((direction, round(at - last[other], 4)))
            assert not early_acks, f"standalone ACKs right behind data: {early_acks[:5]}"
            assert data_chunks == {"up": count, "down": count}
            app.close()
        finally:
            fwd.close()


# -- backpressure is not death ------------------------------------------------------------------


class StallServer:
    """An upstream that reads nothing until ``release()`` (a GC pause, a slow disk), then
    reads to EOF and answers ``done <bytes>``."""

    def __init__(self) -> None:
        self.loop = LoopThread("stall").start()
        self.connections = 0
        self.got = 0
        self.address = self.loop.call(self._listen)

    def _listen(self) -> tuple[str, int]:
        self.released = gevent.event.Event()
        sock = gsocket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        self.listener = sock
        gevent.spawn(self._accept, sock)
        return sock.getsockname()  # type: ignore[no-any-return]

    def _accept(self, sock: Any) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            self.connections += 1
            gevent.spawn(self._serve, conn)

    def _serve(self, conn: Any) -> None:
        try:
            conn.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_RCVBUF, 65536)
            self.released.wait()
            while data := conn.recv(262144):
                self.got += len(data)
            conn.sendall(b"done %d\n" % self.got)
        except OSError:
            return
        finally:
            conn.close()

    def release(self) -> None:
        self.loop.call(self.released.set)

    def stop(self) -> None:
        self.loop.call(self.listener.close)
        self.loop.stop()


def test_a_stalled_upstream_is_backpressure_not_a_dead_link() -> None:
    """w3: the upstream stops reading for several heartbeats while the client uploads. The
    relay goes on reading the link (the bytes wait in its delivery queue, unacknowledged, so
    the client's own limit bounds them) and answers PINGs: no drop, no resume, and the upload
    completes as a plain one does. At c94b32e the PINGs waited behind the blocked delivery,
    the client declared the link dead, and every resume had to re-send the backlog inside one
    attempt: the session was reset."""
    heartbeat = 0.3
    policy = RetryPolicy(deadline=1.0, backoff_initial=0.01, backoff_max=0.1)
    server = StallServer()
    try:
        with Relay(("127.0.0.1", 0), server.address, plain_after=2.0) as relay:
            app = open_session(relay.address, timeout=30, policy=policy, heartbeat=heartbeat)
            total = 4 << 20
            app.sendall(b"u" * total)
            app.shutdown(gsocket.SHUT_WR)
            # Stalled for well over two heartbeats plus the policy's deadline after the relay
            # has it all (a scenario's duration, not a synchronisation).
            wait_until(lambda: sum(s.stream.received for s in list(relay.sessions.values()))
                       >= total + 1, what="the upload and its END in the relay's queue")
            gevent.sleep(3 * heartbeat + policy.deadline)
            assert relay.stats()["sessions_resumed"] == 0, "a stall was taken for a drop"
            server.release()
            answer = Lines(app).readline()
            assert answer == b"done %d" % total
            assert server.connections == 1
            assert relay.stats()["sessions_resumed"] == 0
            app.close()
    finally:
        server.stop()


# -- vanished clients, clean ends -------------------------------------------------------------


def test_a_client_that_goes_silent_is_detached_within_the_link_timeout_then_expires(
        upstream: MessageServer) -> None:
    """A client that completes the handshake and then neither reads nor answers (a process
    stopped, a cable pulled: no FIN, no RST) is found by the relay's own PINGs: detached
    within ``link_timeout``, expired ``session_timeout`` later, its upstream connection
    closed. A live idle client next to it answers the PINGs and keeps its link. At c94b32e
    the relay never noticed: the session and its buffers were held for good."""
    link_timeout, session_timeout = 1.0, 1.0
    with Relay(("127.0.0.1", 0), upstream.address, plain_after=2.0,
               link_timeout=link_timeout, session_timeout=session_timeout) as relay:
        live = open_session(relay.address, timeout=10, policy=POLICY)  # heartbeat 15 s
        live.sendall(b"MSG 1\n")
        assert Lines(live).readline() == b"ACK 1"
        silent = socket.create_connection(relay.address, timeout=10)
        link = sp.Link(sp.CLIENT)
        silent.sendall(link.send_hello_new(sp.Stream()))
        while (ev := link.next_event()) is sp.NEED_DATA:
            link.receive_data(silent.recv(4096))
        assert isinstance(ev, sp.Created)
        wait_until(lambda: relay.stats()["sessions_active"] == 2, what="two sessions")
        start = time.monotonic()
        wait_until(lambda: relay.stats()["sessions_detached"] == 1,
                   timeout=link_timeout + 5, what="the silent client detached")
        detached_after = time.monotonic() - start
        # It never showed it got CREATED (no byte, no ack after it): an unproven session is
        # let go after min(creation_hold, session_timeout) and counted as abandoned (#26);
        # a proven one expires after session_timeout.
        wait_until(lambda: relay.stats()["sessions_expired"]
                   + relay.stats()["creations_abandoned"] == 1,
                   timeout=session_timeout + 5, what="its session expired")
        assert detached_after <= link_timeout + 2  # the documented bound, with load's slack
        stats = relay.stats()
        assert stats["sessions_active"] == 1 and stats["sessions_detached"] == 0
        assert stats["sessions_resumed"] == 0  # the live client's link was never dropped
        live.sendall(b"MSG 2\n")
        assert Lines(live).readline() == b"ACK 2"
        live.close()
        silent.close()


_CLOSE_AND_EXIT = """
import sys
from resilientsock import RetryPolicy
from resilientsock.session import open_session
app = open_session(("127.0.0.1", int(sys.argv[1])), timeout=10,
                   policy=RetryPolicy(deadline=5))
app.sendall(b"MSG 1\\n")
got = b""
while not got.endswith(b"\\n"):
    got += app.recv(100)
assert got == b"ACK 1\\n", got
if sys.argv[2] == "close":
    app.close()
print("done", flush=True)
"""


@pytest.mark.parametrize("how", ["close", "exit"])
def test_a_session_closed_by_its_client_is_gone_from_the_relay_at_once_and_quietly(
        upstream: MessageServer, how: str, caplog: pytest.LogCaptureFixture) -> None:
    """A client process that calls close() and exits, or just exits with the session open,
    ends its session on the relay within a second of its exit, with no WARNING: the exit
    waits (bounded) for the relay's END. At c94b32e the exit returned once its own END was
    sent; the relay held the session for the whole session timeout and then logged it as
    expired without its client."""
    caplog.set_level(logging.INFO, logger="resilientsock")
    with Relay(("127.0.0.1", 0), upstream.address, plain_after=2.0) as relay:
        proc = run_py(["-c", _CLOSE_AND_EXIT, str(relay.address[1]), how], timeout=30)
        assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr
        wait_until(lambda: relay.stats()["sessions_active"] == 0, timeout=1.0,
                   what="the session gone from the relay")
        stats = relay.stats()
        assert stats["sessions_ended"] == 1 and stats["sessions_expired"] == 0
        assert upstream.received == [1] and upstream.connections == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not warnings, warnings


class _Source:
    """An upstream that writes ``total`` bytes at once, then waits for the client's EOF."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.connections = 0
        self.loop = LoopThread("source").start()
        self.address = self.loop.call(self._listen)

    def _listen(self) -> tuple[str, int]:
        sock = gsocket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        self.listener = sock

        def serve(conn: Any) -> None:
            try:
                conn.sendall(b"d" * self.total)
                while conn.recv(65536):
                    pass
            except OSError:
                return
            finally:
                conn.close()

        def accept() -> None:
            while True:
                try:
                    conn, _ = sock.accept()
                except OSError:
                    return
                self.connections += 1
                gevent.spawn(serve, conn)

        gevent.spawn(accept)
        return sock.getsockname()  # type: ignore[no-any-return]

    def stop(self) -> None:
        self.loop.call(self.listener.close)
        self.loop.stop()


def test_an_application_that_stops_reading_still_answers_the_relays_pings() -> None:
    """The other direction of w3: the upstream sends megabytes the application does not read
    for several of the relay's link timeouts. The client keeps reading its link (the bytes
    wait in its delivery queue, unacknowledged), so the relay's PINGs are answered: no drop,
    no resume, every byte delivered once the application reads."""
    total = 6 << 20
    source = _Source(total)
    try:
        with Relay(("127.0.0.1", 0), source.address, plain_after=2.0, link_timeout=0.6) as relay:
            app = open_session(relay.address, timeout=30, policy=POLICY, heartbeat=0.3)
            carrier = app.__dict__["_rs_direct"]
            wait_until(lambda: carrier.stream.received >= total, timeout=20,
                       what="the download in the client's queue")
            gevent.sleep(3 * 0.6)  # the application busy for three link timeouts
            assert relay.stats()["sessions_resumed"] == 0, "a stalled reader was taken as dead"
            assert relay.stats()["sessions_detached"] == 0
            got = 0
            while got < total:
                data = app.recv(1 << 20)
                assert data and set(data) == {ord("d")}
                got += len(data)
            assert got == total
            assert relay.stats()["sessions_resumed"] == 0 and source.connections == 1
            app.close()
    finally:
        source.stop()


_HOLD = """
import sys
import gevent
from resilientsock import RetryPolicy
from resilientsock.session import open_session
app = open_session(("127.0.0.1", int(sys.argv[1])), timeout=10,
                   policy=RetryPolicy(deadline=5))
app.sendall(b"MSG 1\\n")
got = b""
while not got.endswith(b"\\n"):
    got += app.recv(100)
print("ready", flush=True)
gevent.sleep(600)  # cooperative: the session answers the relay's heartbeats until stopped
"""


def test_a_stopped_client_process_is_detached_and_its_session_expires(
        upstream: MessageServer) -> None:
    """The issue's case: client processes stopped (SIGSTOP: sockets open, nothing read,
    nothing answered). Their sessions are detached within the relay's link timeout and
    expire after the session timeout; the upstream connections are closed."""
    import signal
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs: list[subprocess.Popen[str]] = []
    with Relay(("127.0.0.1", 0), upstream.address, plain_after=2.0, link_timeout=1.0,
               session_timeout=1.0) as relay:
        try:
            for _ in range(3):
                proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(relay.address[1])],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, env=env)
                procs.append(proc)
                assert proc.stdout is not None
                assert proc.stdout.readline().strip() == "ready"
            assert relay.stats()["sessions_active"] == 3
            for proc in procs:
                proc.send_signal(signal.SIGSTOP)
            # Detached within the link timeout; a session may expire (1 s later) before a
            # poll on a loaded machine sees it detached: expired ones were detached first.
            wait_until(lambda: relay.stats()["sessions_detached"]
                       + relay.stats()["sessions_expired"] == 3, timeout=1.0 + 5,
                       what="the stopped clients detached")
            wait_until(lambda: relay.stats()["sessions_expired"] == 3, timeout=1.0 + 5,
                       what="their sessions expired")
            assert relay.stats()["sessions_active"] == 0
            assert upstream.received == [1, 1, 1] and upstream.connections == 3
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.communicate(timeout=10)


_STREAMS = r"""
import sys, gevent
from resilientsock.session import open_session
socks = [open_session(("127.0.0.1", int(sys.argv[1])), timeout=5) for _ in range(4)]
for sock in socks:  # a byte each: the relay knows its client got CREATED (else a session
    sock.sendall(b"x")  # is an abandoned creation: closed quietly, without "expired")
print("ready", flush=True)
gevent.sleep(600)  # reads nothing: the relay fills each session's buffer (16 MiB)
"""


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_a_relay_gives_back_the_memory_of_vanished_clients_sessions() -> None:
    """Four clients read nothing while the upstream streams: the relay (its own process, as
    `python -m resilientsock relay` runs) holds 16 MiB per session; then the client process
    is stopped (no FIN, no RST). Within the link timeout the sessions are detached, a
    session timeout later they expire, and the relay's memory goes back near where it
    started. Was: the expired sessions' buffers lived on in reference cycles until a full
    garbage collection (never, in a quiet relay), and freed memory stayed in the relay
    thread's allocator arena: the relay stayed at 92 MiB (from 27), and grew each time."""
    import signal
    import subprocess
    import sys
    import threading

    from conftest import ROOT

    loop = LoopThread("streamer").start()

    def stream(client: Any) -> None:
        chunk = b"x" * 65536
        try:
            while True:
                client.sendall(chunk)
        except OSError:
            client.close()

    def listen() -> Any:
        sock = gsocket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)

        def accept() -> None:
            while True:
                try:
                    client, _ = sock.accept()
                except OSError:
                    return
                gevent.spawn(stream, client)
        gevent.spawn(accept)
        return sock

    listener = loop.call(listen)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    relay = subprocess.Popen(
        [sys.executable, "-m", "resilientsock", "relay", "--listen", "127.0.0.1:0",
         "--upstream", "%s:%d" % listener.getsockname(), "--link-timeout", "1",
         "--session-timeout", "1", "--plain-after", "2", "--log-level", "INFO"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    client = None
    lines: list[str] = []

    def read_log() -> None:
        assert relay.stderr is not None
        for line in relay.stderr:
            lines.append(line)
    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        assert relay.stdout is not None
        banner = relay.stdout.readline()  # relay: listening on HOST:PORT -> upstream ...
        port = int(banner.split()[3].rsplit(":", 1)[1])
        base = _rss_mib(relay.pid)
        client = subprocess.Popen([sys.executable, "-c", _STREAMS, str(port)],
                                  stdout=subprocess.PIPE, text=True, env=env)
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "ready"
        wait_until(lambda: _rss_mib(relay.pid) > base + 48, 20, "the relay's buffers full")
        client.send_signal(signal.SIGSTOP)
        try:
            wait_until(lambda: sum("expired" in x for x in lines) == 4, 10,
                       "the four sessions expired")
        except AssertionError:
            raise AssertionError("".join(lines)) from None
        # Given back within a second of their end (TRIM_AFTER); 16 MiB of slack for the
        # allocator and the interpreter.
        deadline = time.monotonic() + 5
        while _rss_mib(relay.pid) > base + 16 and time.monotonic() < deadline:
            time.sleep(0.1)  # polling a gauge, bounded
        assert _rss_mib(relay.pid) <= base + 16, (base, _rss_mib(relay.pid))
    finally:
        if client is not None:
            client.send_signal(signal.SIGCONT)
            client.kill()
            client.communicate(timeout=10)
        relay.terminate()
        relay.wait(timeout=10)
        reader.join(timeout=10)
        for pipe in (relay.stdout, relay.stderr):
            if pipe is not None:
                pipe.close()
        loop.call(listener.close)
        loop.stop()
