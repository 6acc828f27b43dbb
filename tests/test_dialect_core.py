"""The dialects (resilientsock/dialects) obeyed by the core, against a real redis-server:
setup restored before the replay, MULTI...EXEC re-sent whole (docs/design.md §5a)."""

from __future__ import annotations

import socket

import pytest

from resilientsock import ResilientSocket, RetryPolicy
from resilientsock.testing import FaultProxy

FAST = RetryPolicy(deadline=5, backoff_initial=0.01, backoff_max=0.1)


def cmd(*parts: bytes) -> bytes:
    out = b"*%d\r\n" % len(parts)
    for p in parts:
        out += b"$%d\r\n%s\r\n" % (len(p), p)
    return out


def reply(sock: socket.socket) -> bytes:
    """One simple RESP reply line (+OK, +QUEUED, :1, -ERR) or a small array, read exactly."""
    line = b""
    while not line.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionResetError("EOF")
        line += chunk
    if line.startswith(b"*"):
        return line + b"".join(reply(sock) for _ in range(int(line[1:-2])))
    return line


@pytest.fixture
def redis_port(redis_server) -> int:  # type: ignore[no-untyped-def]
    return int(redis_server[1])


def test_select_is_restored_before_the_replay(redis_port):
    import redis

    with FaultProxy(("127.0.0.1", redis_port)) as proxy:
        with ResilientSocket.connect(proxy.address, FAST, timeout=5) as s:
            s.sendall(cmd(b"SELECT", b"2"))
            assert reply(s) == b"+OK\r\n"
            assert s.dialect == "resp"
            proxy.cut_after(0, "down")  # the answer to SET is cut: the SET is re-sent
            s.sendall(cmd(b"SET", b"k", b"v"))
            assert reply(s) == b"+OK\r\n"
            assert s.reconnects == 1
    assert redis.Redis(port=redis_port, db=2).get("k") == b"v"
    assert redis.Redis(port=redis_port, db=0).get("k") is None


def test_multi_exec_is_resent_whole(redis_port):
    import redis

    with FaultProxy(("127.0.0.1", redis_port)) as proxy:
        with ResilientSocket.connect(proxy.address, FAST, timeout=5) as s:
            s.sendall(cmd(b"SELECT", b"2"))
            assert reply(s) == b"+OK\r\n"
            s.sendall(cmd(b"MULTI"))
            assert reply(s) == b"+OK\r\n"
            s.sendall(cmd(b"INCR", b"n"))
            assert reply(s) == b"+QUEUED\r\n"
            proxy.cut_after(0, "up")  # the next command never reaches the server: RST
            s.sendall(cmd(b"INCR", b"m"))
            assert reply(s) == b"+QUEUED\r\n"
            s.sendall(cmd(b"EXEC"))
            assert reply(s) == b"*2\r\n:1\r\n:1\r\n"
            assert s.reconnects == 1
    db2 = redis.Redis(port=redis_port, db=2)
    assert db2.get("n") == b"1" and db2.get("m") == b"1"  # once each, in one transaction
    assert redis.Redis(port=redis_port, db=0).dbsize() == 0


def test_a_fin_mid_reply_is_resumed_after_the_setup(redis_port):
    """§5b for an EOF: a GET's bulk reply cut by a FIN is re-requested on a new connection
    (SELECT first) and the caller reads one reply, whole; an INCR's is not re-sent."""
    import redis

    value = bytes(range(256)) * 256  # 64 KiB
    redis.Redis(port=redis_port, db=2).set("big", value)
    want = b"$%d\r\n%s\r\n" % (len(value), value)
    with FaultProxy(("127.0.0.1", redis_port)) as proxy:
        with ResilientSocket.connect(proxy.address, FAST, timeout=5) as s:
            s.sendall(cmd(b"SELECT", b"2"))
            assert reply(s) == b"+OK\r\n"
            proxy.cut_after(10_000, "down", how="close")
            s.sendall(cmd(b"GET", b"big"))
            got = b""
            while len(got) < len(want):
                chunk = s.recv(65536)
                assert chunk, "EOF mid-reply was passed on"
                got += chunk
            assert got == want
            assert s.reconnects == 1 and s.stats().answers_resumed == 1
            s.sendall(cmd(b"SET", b"k", b"v"))  # still db 2 on the new connection
            assert reply(s) == b"+OK\r\n"
    assert redis.Redis(port=redis_port, db=2).get("k") == b"v"
    assert redis.Redis(port=redis_port, db=0).dbsize() == 0
