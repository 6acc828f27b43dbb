"""Session mode's read handoff (``session.carrier`` rule 8, issue #15): a read waiting in the
application's own ``recv``/``recv_into`` gets what the pump parsed without a trip through the
local pair, and the byte stream stays the stream — in order, exactly once — whatever mix of
reads, ``select()``, timeouts, kills and ``detach()`` the application uses.

A relay and an upstream server run on loopback (the relay on a hub of its own), the client in
this process; nothing of the socket layer is mocked. Races the pump cannot be made to lose on
loopback (a read killed between the handoff and its wake-up) are staged by holding the pump:
the test hands bytes over itself through the session's own ``_deliver``, as the pump would.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import gevent
import gevent.event
import gevent.select
import gevent.socket
import pytest

from resilientsock import RetryPolicy
from resilientsock.session import Relay, open_session
from resilientsock.session.client import HANDOFF_MAX
from resilientsock.testing import MessageServer

POLICY = RetryPolicy(deadline=20, backoff_initial=0.01, backoff_max=0.1)


@pytest.fixture
def echo() -> Iterator[MessageServer]:
    server = MessageServer(mode="echo").start()
    yield server
    server.shutdown()


@pytest.fixture
def relay(echo: MessageServer) -> Iterator[Relay]:
    with Relay(("127.0.0.1", 0), echo.address, handshake_timeout=1.0, plain_after=2.0) as r:
        yield r


def reader_of(sock: Any) -> Any:
    reader = sock.__dict__.get("_rs_reader")
    assert reader is not None, "a session socket reads with the handoff on"
    return reader


def recv_exact(sock: Any, n: int) -> bytes:
    out = b""
    while len(out) < n:
        data = sock.recv(n - len(out))
        assert data, f"EOF after {len(out)} of {n} bytes"
        out += data
    return out


def test_a_ping_pong_never_goes_through_the_pair(relay: Relay) -> None:
    """Every answer reaches a waiting recv by handoff: the pair carries nothing."""
    with gevent.Timeout(30):
        sock = open_session(relay.address, timeout=10, policy=POLICY)
        try:
            reader = reader_of(sock)
            for i in range(200):
                ping = b"%06d" % i * 10
                sock.sendall(ping)
                assert recv_exact(sock, len(ping)) == ping
            assert reader.pair_written == reader.pair_read == 0
            buf = bytearray(60)
            sock.sendall(b"x" * 60)
            got = 0
            while got < 60:  # recv_into, as makefile() reads
                got += sock.recv_into(memoryview(buf)[got:])
            assert bytes(buf) == b"x" * 60
            assert reader.pair_written == 0
        finally:
            sock.close()


def test_any_mix_of_reads_keeps_the_stream_in_order_exactly_once(relay: Relay) -> None:
    """Random writes echoed back, read by a random mix of recv, recv_into, makefile,
    select()+non-blocking recv, socket timeouts and gevent.Timeout kills: the bytes read are
    the bytes written, in order, none twice, none lost; some went by handoff, some by the pair."""
    rng = random.Random(1502)
    total = 2_000_000
    stream = bytes(rng.getrandbits(8) for _ in range(4096)) * (total // 4096 + 1)
    stream = stream[:total]
    with gevent.Timeout(60):
        sock = open_session(relay.address, timeout=10, policy=POLICY)
        reader = reader_of(sock)
        got = bytearray()

        caught_up = gevent.event.Event()
        written = [0]

        def write() -> None:
            wrng = random.Random(7)
            while written[0] < total:
                n = min(total - written[0], wrng.choice((1, 7, 64, 700, 5000, 20000, 70000)))
                sock.sendall(stream[written[0]:written[0] + n])
                written[0] += n
                if wrng.random() < 0.5:
                    # Wait for the reader to have it all: its next reads find nothing due
                    # (time-outs, kills) and the next answer meets a waiting read (handoffs).
                    caught_up.clear()
                    if len(got) < written[0]:
                        caught_up.wait(10)

        writer = gevent.spawn(write)
        timeouts = kills = 0
        try:
            while len(got) < total:
                how = rng.random()
                n = rng.choice((1, 10, 100, 1000, HANDOFF_MAX, 65536))
                if how < 0.3:
                    data = sock.recv(n)
                elif how < 0.5:
                    buf = bytearray(n)
                    k = sock.recv_into(buf)
                    data = bytes(buf[:k])
                elif how < 0.6:
                    readable, _, _ = gevent.select.select([sock], [], [], 5)
                    assert readable, "select() found nothing while bytes were due"
                    sock.setblocking(False)
                    try:
                        data = sock.recv(n)
                    except BlockingIOError:
                        data = None
                    finally:
                        sock.settimeout(10)
                elif how < 0.7:
                    sock.settimeout(rng.choice((0.0001, 0.0005, 0.002)))
                    try:
                        data = sock.recv(n)
                    except TimeoutError:
                        data, timeouts = None, timeouts + 1
                    finally:
                        sock.settimeout(10)
                elif how < 0.8:
                    data = None
                    with gevent.Timeout(rng.choice((0.0001, 0.0005, 0.002)), False):
                        data = sock.recv(n)
                    if data is None:
                        kills += 1
                else:
                    data = sock.recv(n)
                if data is not None:
                    assert data, f"EOF after {len(got)} bytes"
                    got += data
                    if len(got) >= written[0]:
                        caught_up.set()
            writer.get(timeout=10)
            # Whether the reads above met a time-out depends on the machine's timing (a fast
            # echo leaves none): one of each with nothing due, so both paths always run.
            sock.settimeout(0.002)
            with pytest.raises(TimeoutError):
                sock.recv(10)
            timeouts += 1
            sock.settimeout(10)
            with gevent.Timeout(0.002, False):
                sock.recv(10)
                raise AssertionError("a read with nothing due returned")
            kills += 1
        finally:
            sock.close()
        assert len(got) == total
        assert bytes(got) == stream  # in order, exactly once
        assert timeouts and kills  # both kinds of interrupted read happened
        assert reader.pair_written > 0  # some went through the pair (select, big answers)
        assert reader.pair_read == reader.pair_written


def waiting_read(sock: Any, n: int) -> Any:
    reader = reader_of(sock)
    g = gevent.spawn(sock.recv, n)
    gevent.sleep(0)  # let it block in its recv
    assert reader.waiting is not None and reader.waiting[0] is sock
    return g


def test_a_read_killed_after_the_handoff_leaves_its_bytes_for_the_next_read_and_select(
        relay: Relay) -> None:
    """The race: the handoff is made, then the read is killed before it wakes. Its bytes go
    to the pair first (select() sees them), before any later byte."""
    with gevent.Timeout(30):
        sock = open_session(relay.address, timeout=10, policy=POLICY)
        try:
            reader = reader_of(sock)
            g = waiting_read(sock, 100)
            g.kill(block=False)  # the kill is queued first ...
            reader._deliver(b"first ")  # ... the handoff after it: the read never takes it
            g.join(5)
            assert isinstance(g.value, gevent.GreenletExit)  # killed: the read took nothing
            sock.sendall(b"second")  # echoed behind it
            readable, _, _ = gevent.select.select([sock], [], [], 5)
            assert readable
            assert recv_exact(sock, 12) == b"first second"
            assert reader.pair_written >= 6  # the front went through the pair
        finally:
            sock.close()


def test_a_socket_timeout_racing_the_handoff_returns_the_bytes(relay: Relay) -> None:
    from resilientsock.session.carrier import _ReadTimedOut

    with gevent.Timeout(30):
        sock = open_session(relay.address, timeout=10, policy=POLICY)
        try:
            reader = reader_of(sock)
            g = waiting_read(sock, 100)
            g.kill(_ReadTimedOut, block=False)  # the socket's own timeout, in this turn
            reader._deliver(b"in time")
            assert g.get(timeout=5) == b"in time"
            assert reader.front is None
        finally:
            sock.close()


def test_the_applications_own_timeout_racing_the_handoff_is_raised_not_swallowed(
        relay: Relay) -> None:
    """A gevent.Timeout(t, TimeoutError) of the application's fires once: swallowing it
    (taking it for the socket's own) left the next read unbounded (review of 2026-12-01)."""
    with gevent.Timeout(30):
        sock = open_session(relay.address, timeout=None, policy=POLICY)
        try:
            reader = reader_of(sock)
            g = waiting_read(sock, 100)
            g.kill(TimeoutError("the application's deadline"), block=False)
            reader._deliver(b"handed")
            g.join(5)
            assert isinstance(g.exception, TimeoutError)
            assert str(g.exception) == "the application's deadline"
            assert sock.recv(100) == b"handed"  # kept for the next read, in order
        finally:
            sock.close()


def test_detach_puts_a_front_no_read_took_into_the_descriptor_first(relay: Relay) -> None:
    """TLS run by the application detaches the socket: what was handed and not read is in
    the descriptor before anything after it."""
    with gevent.Timeout(30):
        sock = open_session(relay.address, timeout=10, policy=POLICY)
        reader = reader_of(sock)
        assert reader.pair_written == reader.pair_read
        reader.front = b"handed "  # as a killed read leaves it, before its flush has run
        fd = sock.detach()
        assert sock.__dict__.get("_rs_reader") is None
        other = gevent.socket.socket(fileno=fd)
        try:
            other.settimeout(10)
            other.sendall(b"after")  # through the pair now: echoed behind the front
            assert recv_exact(other, 12) == b"handed after"
        finally:
            other.close()
