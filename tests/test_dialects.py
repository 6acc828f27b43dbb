"""The dialect layer (design.md §5a, §5b): sans-IO, so these tests feed bytes and ask questions.

No sockets: each rule is checked on the bytes a real client and server exchange, split at
every byte boundary where framing matters, and against garbage.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from resilientsock.dialects import Dialect, Restore, SetupMismatch, detect
from resilientsock.dialects.handshake import HandshakeDialect
from resilientsock.dialects.http import HttpDialect
from resilientsock.dialects.prelude import PreludeDialect
from resilientsock.dialects.resp import RespDialect, encode


def cmd(*args: bytes | str) -> bytes:
    return encode([a.encode() if isinstance(a, str) else a for a in args])


def splits(data: bytes):
    """Every way of cutting ``data`` in two, and byte by byte."""
    for k in range(len(data) + 1):
        yield [data[:k], data[k:]]
    yield [data[k:k + 1] for k in range(len(data))]


def feed_restore(r: Restore, chunks: list[bytes]) -> tuple[int, int]:
    """Feed chunks until the restore is done: (index of the chunk, bytes of it used)."""
    for k, c in enumerate(chunks):
        n = r.feed(c)
        if n is not None:
            return k, n
    raise AssertionError("restore never finished")


# -- detect -----------------------------------------------------------------------------------

@pytest.mark.parametrize("first_write, first_read, kind", [
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", None, HttpDialect),
    (b"POST /x HTTP/1.0\r\n", None, HttpDialect),
    (b"GET /partial", None, HttpDialect),
    (b"*1\r\n$4\r\nPING\r\n", None, RespDialect),
    (b"*3\r\n", None, RespDialect),
    (b"PING\r\n", None, RespDialect),
    (b"AUTH secret\r\n", None, RespDialect),
    (b"SSH-2.0-paramiko_3.4.0\r\n", None, HandshakeDialect),
    (None, b"SSH-2.0-OpenSSH_9.6\r\n", HandshakeDialect),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", None, HandshakeDialect),
    (None, b"\x4a\x00\x00\x00\x0a11.4.2-MariaDB\x00\x08\x00\x00\x00", HandshakeDialect),
    (None, b"\x4a\x00\x00\x00", HandshakeDialect),  # a client that reads the header alone
    (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", None, HandshakeDialect),  # SSLRequest
    (b"\x00\x00\x00\x29\x00\x03\x00\x00user\x00bob\x00database\x00db\x00\x00", None,
     HandshakeDialect),
    (b"AMQP\x00\x00\x09\x01", None, HandshakeDialect),
    (b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04abcd", None, HandshakeDialect),
    (b"\x10\x12\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x04abcd", None, HandshakeDialect),
])
def test_detect_recognises(first_write, first_read, kind) -> None:
    assert type(detect(first_write, first_read)) is kind


@pytest.mark.parametrize("first_write", [
    b"get foo\r\n",                 # memcached text protocol (pymemcache)
    b"set foo 0 0 3\r\nbar\r\n",
    b"incr hits 1 noreply\r\n",
    b"mg foo v\r\n",                # memcached meta protocol
    b"ms foo 3 T0\r\nbar\r\n",
])
def test_detect_knows_memcached(first_write) -> None:
    """Wave 3 (issue #23): memcached has a dialect now (it was left to the byte rules)."""
    from resilientsock.dialects.memcached import MemcachedDialect

    assert isinstance(detect(first_write, None), MemcachedDialect)


@pytest.mark.parametrize("first_write, first_read", [
    (b"AUTH robot-7 secret\n", None),       # the robot's line protocol (examples/)
    (b"MSG 1 hello\n", None),
    (b"get\r\n", None),                      # not a whole memcached command
    (b"set foo 0 0 x\r\nbar\r\n", None),
    (b"EHLO me\r\n", None),                  # SMTP without waiting for the banner
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", None),
    (b"GET / HTTP/2\r\n", None),
    (None, b"220 mail.example ESMTP Exim 4.97\r\n"),  # banners: the core's banner rule
    (None, b"+OK POP3 ready\r\n"),
    (None, b"* OK IMAP4rev1 ready\r\n"),
    (None, b"220 (vsFTPd 3.0.5)\r\n"),
    (None, b"220 "),
    (None, b"\x4a\x00\x00\x00\x09old"),  # protocol 9: not a v10 greeting
    (b"*0\r\n", None),
    (b"*x\r\n", None),
    (b"", None),
    (None, None),
])
def test_detect_leaves_others_to_the_byte_rules(first_write, first_read) -> None:
    assert detect(first_write, first_read) is None


def test_detect_prelude_only_for_unknown_client_first_protocols() -> None:
    d = detect(b"HELLO robot\n", None, prelude=2)
    assert isinstance(d, PreludeDialect) and d.n == 2
    assert isinstance(detect(b"GET / HTTP/1.1\r\n", None, prelude=2), HttpDialect)
    assert detect(None, b"220 banner\r\n", prelude=2) is None
    assert detect(b"HELLO robot\n", None, prelude=0) is None


def test_detect_never_raises_on_garbage() -> None:
    rng = random.Random(14)
    prefixes = [b"", b"*", b"$", b"GET ", b"\x16\x03", b"SSH-", b"AMQP", b"\x10", b"\x00\x00"]
    for _ in range(3000):
        data = rng.choice(prefixes) + rng.randbytes(rng.randrange(0, 40))
        for args in ((data, None), (None, data)):
            d = detect(*args, prelude=rng.randrange(0, 3))
            if d is not None:  # and whatever it became, garbage must not make it raise
                d.wrote(rng.randbytes(30))
                d.read(rng.randbytes(30))
                d.refusal(), d.restore(), d.hold(), d.resumable()
                assert len(d.mask(b"abc")) == 3


def test_the_base_dialect_is_the_byte_rules() -> None:
    d = Dialect()
    d.wrote(b"x")
    d.read(b"y")
    assert (d.refusal(), d.restore(), d.hold(), d.resumable()) == (None, None, False, False)
    assert d.mask(b"abc") == b"abc"


# -- RESP: setup ------------------------------------------------------------------------------

def resp_with_setup() -> RespDialect:
    """redis-py's on_connect with db=2 and a password (RESP2), then work."""
    d = RespDialect()
    d.wrote(cmd("AUTH", "pw"))
    d.read(b"+OK\r\n")
    d.wrote(cmd("CLIENT", "SETINFO", "LIB-NAME", "redis-py"))
    d.wrote(cmd("CLIENT", "SETINFO", "LIB-VER", "5.2.1"))
    d.read(b"+OK\r\n+OK\r\n")
    d.wrote(cmd("SELECT", "2"))
    d.read(b"+OK\r\n")
    d.wrote(cmd("SET", "k1", "v"))
    d.read(b"+OK\r\n")
    return d


def test_resp_restore_redoes_auth_and_the_selected_database() -> None:
    # issue 14's redis db=2 repro: keys replayed into database 0.
    d = resp_with_setup()
    assert d.refusal() is None
    r = d.restore()
    assert r is not None
    assert r.payload == (cmd("AUTH", "pw") + cmd("CLIENT", "SETINFO", "LIB-NAME", "redis-py")
                         + cmd("CLIENT", "SETINFO", "LIB-VER", "5.2.1") + cmd("SELECT", "2"))
    answers = b"+OK\r\n" * 4
    for chunks in splits(answers + b"$3\r\nfoo\r\n"):
        r = d.restore()
        assert r is not None
        k, n = feed_restore(r, chunks)
        assert sum(len(c) for c in chunks[:k]) + n == len(answers)


def test_resp_restore_is_a_fresh_object_each_time() -> None:
    d = resp_with_setup()
    r1, r2 = d.restore(), d.restore()
    assert r1 is not r2
    assert r1.feed(b"+OK\r\n" * 4) == 20 and r2.feed(b"+OK\r\n" * 4) == 20


@pytest.mark.parametrize("answer", [b"-WRONGPASS invalid username-password pair\r\n",
                                    b"-ERR DB index is out of range\r\n", b"+QUEUED\r\n"])
def test_resp_restore_checks_every_answer(answer: bytes) -> None:
    d = resp_with_setup()
    r = d.restore()
    assert r is not None
    with pytest.raises(SetupMismatch, match="original answer was '\\+OK'"):
        feed_restore(r, [answer + b"+OK\r\n" * 4])


def test_resp_restore_keeps_only_the_last_state_in_the_order_sent_auth_first() -> None:
    d = RespDialect()
    d.wrote(cmd("SELECT", "2"))
    d.wrote(cmd("CLIENT", "SETNAME", "a"))
    d.wrote(cmd("READONLY"))
    d.wrote(cmd("SELECT", "9"))          # fails: not recorded
    d.wrote(cmd("SELECT", "3"))
    d.wrote(cmd("AUTH", "user", "pw"))
    d.wrote(cmd("READWRITE"))
    d.read(b"+OK\r\n+OK\r\n+OK\r\n-ERR DB index is out of range\r\n+OK\r\n+OK\r\n+OK\r\n")
    r = d.restore()
    assert r is not None
    assert r.payload == (cmd("AUTH", "user", "pw") + cmd("CLIENT", "SETNAME", "a")
                         + cmd("SELECT", "3") + cmd("READWRITE"))


def test_resp_failed_auth_and_reset_record_nothing() -> None:
    d = RespDialect()
    d.wrote(cmd("AUTH", "bad"))
    d.read(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n")
    assert d.restore() is None
    d.wrote(cmd("AUTH", "pw") + cmd("SELECT", "2"))
    d.read(b"+OK\r\n+OK\r\n")
    assert d.restore() is not None
    d.wrote(cmd("RESET"))
    d.read(b"+RESET\r\n")
    assert d.restore() is None


def test_resp_inline_setup_is_restored_as_an_array() -> None:
    d = detect(b"AUTH pw\r\n", None)
    assert isinstance(d, RespDialect)
    d.wrote(b"AUTH pw\r\n")
    d.wrote(b"SELECT 2\r\nPING\r\n")
    d.read(b"+OK\r\n+OK\r\n+PONG\r\n")
    r = d.restore()
    assert r is not None and r.payload == cmd("AUTH", "pw") + cmd("SELECT", "2")


HELLO3 = (b"%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n$5\r\n7.2.4\r\n"
          b"$5\r\nproto\r\n:3\r\n$2\r\nid\r\n:{ID}\r\n$4\r\nmode\r\n$10\r\nstandalone\r\n"
          b"$4\r\nrole\r\n$6\r\nmaster\r\n$7\r\nmodules\r\n*0\r\n")
HELLO2 = (b"*6\r\n$6\r\nserver\r\n$5\r\nredis\r\n$2\r\nid\r\n:{ID}\r\n"
          b"$5\r\nproto\r\n:2\r\n")


def hello_id(hello: bytes, n: int) -> bytes:
    return hello.replace(b"{ID}", b"%d" % n)


@pytest.mark.parametrize("hello, proto", [(HELLO3, "3"), (HELLO2, "2")])
def test_resp_hello_answers_match_modulo_the_connection_id(hello: bytes, proto: str) -> None:
    d = RespDialect()
    d.wrote(cmd("HELLO", proto, "AUTH", "default", "pw", "SETNAME", "app"))
    d.read(hello_id(hello, 5))
    d.wrote(cmd("SELECT", "2"))
    d.read(b"+OK\r\n")
    r = d.restore()
    assert r is not None
    assert r.payload.startswith(cmd("HELLO", proto, "AUTH", "default", "pw", "SETNAME", "app"))
    assert r.feed(hello_id(hello, 123456) + b"+OK\r\n") == len(hello_id(hello, 123456)) + 5
    r = d.restore()
    assert r is not None
    changed = hello_id(hello, 5).replace(b"redis", b"valky")
    with pytest.raises(SetupMismatch, match="HELLO"):
        r.feed(changed + b"+OK\r\n")


def test_resp_hello_setname_supersedes_an_earlier_client_setname() -> None:
    d = RespDialect()
    d.wrote(cmd("CLIENT", "SETNAME", "old"))
    d.read(b"+OK\r\n")
    d.wrote(cmd("HELLO", "3", "SETNAME", "new"))
    d.read(hello_id(HELLO3, 1))
    r = d.restore()
    assert r is not None and r.payload == cmd("HELLO", "3", "SETNAME", "new")


def test_resp_setup_inside_multi_counts_when_exec_ran_it() -> None:
    d = RespDialect()
    d.wrote(cmd("MULTI") + cmd("SELECT", "4") + cmd("SET", "a", "1") + cmd("EXEC"))
    d.read(b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n+OK\r\n+OK\r\n")
    r = d.restore()
    assert r is not None and r.payload == cmd("SELECT", "4")
    assert r.feed(b"+OK\r\n") == 5
    # a WATCH that failed: EXEC answers a null array and nothing ran
    d = RespDialect()
    d.wrote(cmd("WATCH", "a") + cmd("MULTI") + cmd("SELECT", "4") + cmd("EXEC"))
    d.read(b"+OK\r\n+OK\r\n+QUEUED\r\n*-1\r\n")
    assert d.restore() is None


def test_resp_a_setup_command_too_large_to_record_is_refused() -> None:
    d = RespDialect()
    d.wrote(cmd("AUTH", b"p" * 5000))
    d.read(b"+OK\r\n")
    assert "too large" in (d.refusal() or "")


# -- RESP: transactions, modes ----------------------------------------------------------------

def test_resp_multi_exec_is_held_until_exec_answer_is_complete() -> None:
    d = RespDialect()
    d.wrote(cmd("MULTI"))
    assert d.hold() and d.resumable()
    d.read(b"+OK\r\n")
    d.wrote(cmd("INCR", "n"))
    d.read(b"+QUEUED\r\n")
    d.wrote(cmd("GET", "n"))
    d.read(b"+QUEUED\r\n")
    d.wrote(cmd("EXEC"))
    assert d.hold() and d.resumable()  # EXEC's answer has not begun: nothing ran
    d.read(b"*2\r\n:")
    assert d.hold() and not d.resumable()  # it ran, and INCR is not idempotent
    assert "INCR" in (d.refusal() or "")
    d.read(b"1\r\n$1\r\n1\r\n")
    assert not d.hold()
    assert d.refusal() is None


def test_resp_multi_of_reads_may_be_resumed_after_exec_began() -> None:
    d = RespDialect()
    d.wrote(cmd("MULTI") + cmd("GET", "a") + cmd("LRANGE", "l", "0", "-1") + cmd("EXEC"))
    d.read(b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n$3\r\nab")
    assert d.hold() and d.resumable()


def test_resp_discard_ends_the_hold() -> None:
    d = RespDialect()
    d.wrote(cmd("MULTI") + cmd("INCR", "n") + cmd("DISCARD"))
    assert d.hold()
    d.read(b"+OK\r\n+QUEUED\r\n+OK\r\n")
    assert not d.hold() and d.restore() is None


def test_resp_watch_is_refused_until_exec_discard_or_unwatch_answers() -> None:
    for end, answer in ((cmd("EXEC"), b"*0\r\n"), (cmd("DISCARD"), b"+OK\r\n")):
        d = RespDialect()
        d.wrote(cmd("WATCH", "k"))
        assert "WATCH" in (d.refusal() or "")
        d.read(b"+OK\r\n")
        d.wrote(cmd("MULTI") + end)
        d.read(b"+OK\r\n")
        assert "WATCH" in (d.refusal() or "")
        d.read(answer)
        assert d.refusal() is None
    d = RespDialect()
    d.wrote(cmd("WATCH", "k") + cmd("UNWATCH"))
    d.read(b"+OK\r\n+OK\r\n")
    assert d.refusal() is None


def test_resp2_subscribe_is_refused_until_every_subscription_is_gone() -> None:
    d = RespDialect()
    d.wrote(cmd("SUBSCRIBE", "a", "b"))
    assert "SUBSCRIBE" in (d.refusal() or "")
    d.read(b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n")
    d.wrote(cmd("PSUBSCRIBE", "c*"))
    d.read(b"*3\r\n$10\r\npsubscribe\r\n$2\r\nc*\r\n:3\r\n")
    d.read(b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$" + b"%d\r\n" % 10000 + b"x" * 10000 + b"\r\n")
    d.wrote(cmd("PING"))
    d.read(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n")
    d.wrote(cmd("UNSUBSCRIBE"))
    d.read(b"*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:2\r\n"
           b"*3\r\n$11\r\nunsubscribe\r\n$1\r\nb\r\n:1\r\n")
    assert d.refusal() is not None  # the pattern is still there
    d.wrote(cmd("PUNSUBSCRIBE"))
    d.read(b"*3\r\n$12\r\npunsubscribe\r\n$2\r\nc*\r\n:0\r\n")
    assert d.refusal() is None
    d.wrote(cmd("GET", "k"))
    d.read(b"$1\r\nv\r\n")
    assert d.lost is None and d.refusal() is None


def test_resp3_pushes_answer_no_command() -> None:
    d = RespDialect()
    d.wrote(cmd("HELLO", "3"))
    d.read(hello_id(HELLO3, 7))
    d.wrote(cmd("SSUBSCRIBE", "s"))
    d.read(b">3\r\n$10\r\nssubscribe\r\n$1\r\ns\r\n:1\r\n")
    assert d.refusal() is not None
    d.wrote(cmd("GET", "k"))
    d.read(b">3\r\n$8\r\nsmessage\r\n$1\r\ns\r\n$2\r\nhi\r\n$1\r\nv\r\n")
    d.wrote(cmd("SUNSUBSCRIBE"))
    d.read(b">3\r\n$12\r\nsunsubscribe\r\n$1\r\ns\r\n:0\r\n")
    assert d.refusal() is None and d.lost is None
    # client-side caching: invalidations are pushes, and tracking is refused
    d.wrote(cmd("CLIENT", "TRACKING", "ON"))
    d.read(b"+OK\r\n")
    assert "TRACKING" in (d.refusal() or "")
    d.wrote(cmd("GET", "k"))
    d.read(b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n$1\r\nv\r\n")
    assert d.lost is None
    d.wrote(cmd("CLIENT", "TRACKING", "OFF"))
    d.read(b"+OK\r\n")
    assert d.refusal() is None


def test_resp_monitor_is_refused() -> None:
    d = RespDialect()
    d.wrote(cmd("MONITOR"))
    d.read(b"+OK\r\n+1700000000.1 [0 127.0.0.1:1] \"get\" \"k\"\r\n")
    assert "MONITOR" in (d.refusal() or "")


def test_resp_client_reply_off_loses_the_pairing() -> None:
    d = RespDialect()
    d.wrote(cmd("CLIENT", "REPLY", "OFF"))
    assert d.lost is not None and d.refusal() is None and not d.resumable()
    d = resp_with_setup()
    d.wrote(cmd("CLIENT", "REPLY", "SKIP"))
    assert "could not be followed" in (d.refusal() or "")


# -- RESP: resume and framing -----------------------------------------------------------------

def test_resp_resumable_only_for_idempotent_commands_of_an_aligned_answer() -> None:
    d = RespDialect()
    d.wrote(cmd("GET", "k"))
    d.read(b"$10\r\n01234")
    assert d.resumable() and d.refusal() is None
    d.read(b"56789\r\n")
    d.wrote(cmd("MGET", "a", "b") + cmd("HGETALL", "h"))
    d.read(b"*2\r\n$1\r\na\r\n")
    assert d.resumable()
    d.read(b"$-1\r\n*0\r\n")
    d.wrote(cmd("GET", "a") + cmd("INCR", "n"))
    d.read(b"$1\r\na\r\n")
    assert not d.resumable()
    d.read(b":1\r\n")
    for name in ("LPUSH", "XADD", "INCRBY", "SPOP"):
        d.wrote(cmd(name, "k", "1"))
        d.read(b":")
        assert not d.resumable() and name in (d.refusal() or "")
        d.read(b"1\r\n")
    d.wrote(cmd("SET", "k", "v", "NX"))
    d.read(b"+")
    assert not d.resumable()
    d.read(b"OK\r\n")


def test_resp_an_answer_that_began_before_the_last_write_is_not_resumable() -> None:
    d = RespDialect()
    d.wrote(cmd("GET", "a"))
    d.read(b"$5\r\nab")
    d.wrote(cmd("GET", "b"))  # pipelined while a's reply is still coming
    d.read(b"c")
    assert not d.resumable()
    assert d.refusal() is not None


REPLIES = (b"+OK\r\n-ERR x\r\n:12\r\n$3\r\nabc\r\n$-1\r\n$0\r\n\r\n*2\r\n$1\r\na\r\n:1\r\n"
           b"*-1\r\n*0\r\n_\r\n#t\r\n,1.5\r\n(3492890328409238509324850943850943825024385\r\n"
           b"!21\r\nSYNTAX invalid syntax\r\n=15\r\ntxt:Some string\r\n"
           b"%2\r\n+first\r\n:1\r\n+second\r\n:2\r\n~2\r\n+a\r\n+b\r\n"
           b"|1\r\n+key-popularity\r\n%1\r\n$1\r\na\r\n,0.19\r\n*2\r\n:2039123\r\n:9543892\r\n"
           b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n"
           b"*2\r\n|1\r\n+ttl\r\n:3600\r\n:1\r\n:2\r\n")
N_REPLIES = 19  # the push answers no command; the attributes are not values


@pytest.mark.parametrize("k", range(0, len(REPLIES) + 1, 1))
def test_resp_every_type_paired_at_every_split(k: int) -> None:
    d = RespDialect()
    d.wrote(b"".join(cmd("ECHO", str(i)) for i in range(N_REPLIES)))
    d.read(REPLIES[:k])
    d.read(REPLIES[k:])
    assert d.lost is None and not d._fifo and not d._replies.in_value
    d.wrote(cmd("GET", "x"))
    d.read(b"$1\r\nx\r\n")
    assert d.lost is None and not d._fifo


def test_resp_commands_split_across_records_at_every_byte() -> None:
    data = cmd("AUTH", "pw") + cmd("SELECT", "2") + b"PING\r\n" + cmd("SET", "k", "v" * 100)
    for chunks in splits(data):
        d = RespDialect()
        for c in chunks:
            d.wrote(c)
        d.read(b"+OK\r\n+OK\r\n+PONG\r\n+OK\r\n")
        r = d.restore()
        assert d.lost is None and not d._fifo
        assert r is not None and r.payload == cmd("AUTH", "pw") + cmd("SELECT", "2")


def test_resp_garbage_replies_fall_back_to_the_byte_rules() -> None:
    d = RespDialect()
    d.wrote(cmd("GET", "k"))
    d.read(b"OK\r\n")  # not RESP
    assert d.lost is not None
    assert d.refusal() is None and not d.resumable() and d.restore() is None
    d.read(b"anything")  # and stays quiet
    d = resp_with_setup()
    d.wrote(cmd("GET", "k"))
    d.read(b"?garbage\r\n")
    assert "could not be followed" in (d.refusal() or "")


def test_resp_reply_with_no_command_is_lost() -> None:
    d = RespDialect()
    d.read(b"+OK\r\n")
    assert d.lost is not None


def test_resp_discard_keeps_the_setup_and_forgets_what_was_in_flight() -> None:
    d = resp_with_setup()
    d.wrote(cmd("SUBSCRIBE", "a") + cmd("GET", "x"))
    d.read(b"$100\r\nabc")
    d.discard()
    assert d.refusal() is None and d.restore() is not None
    d.wrote(cmd("GET", "x"))
    d.read(b"$1\r\nx\r\n")
    assert d.lost is None and not d._fifo


def _work(call: Callable[[], object]) -> tuple[int, int]:
    """(Python lines run, peak bytes allocated) by one call: a measure of the work that does
    not depend on how busy the machine is (a timed bound in a unit test does)."""
    import sys
    import tracemalloc

    lines = [0]

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            lines[0] += 1
        return tracer

    tracemalloc.start()
    sys.settrace(tracer)
    try:
        call()
    finally:
        sys.settrace(None)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return lines[0], peak


def _feed(call: Callable[[bytes], object], n: int) -> None:
    """``n`` bytes of a value, 64 KiB at a time."""
    chunk = b"x" * 65536
    while n >= len(chunk):
        call(chunk)
        n -= len(chunk)
    call(chunk[:n])


def test_resp_large_values_are_counted_not_copied() -> None:
    """A large value costs the same per chunk as a small one, read or written: counted, not
    scanned in Python nor copied (was a timed bound that a loaded machine could break)."""
    d = RespDialect()
    d.wrote(cmd("GET", "big"))
    size = 2000 * 65536
    d.read(b"$%d\r\n" % size)
    big, small = b"x" * 65536, b"x" * 64
    d.read(big)  # warm
    lines_big, peak_big = _work(lambda: d.read(big))
    lines_small, _ = _work(lambda: d.read(small))
    assert lines_big == lines_small and peak_big < 16384, (lines_big, lines_small, peak_big)
    _feed(d.read, size - 2 * 65536 - 64)
    d.read(b"\r\n")
    assert not d._fifo and d.lost is None
    # writes of a large value: redis-py sends the value as a record of its own
    d.wrote(b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$%d\r\n" % size)
    d.wrote(big)  # warm
    lines_big, peak_big = _work(lambda: d.wrote(big))
    lines_small, _ = _work(lambda: d.wrote(small))
    assert lines_big == lines_small and peak_big < 16384, (lines_big, lines_small, peak_big)
    _feed(d.wrote, size - 2 * 65536 - 64)
    d.wrote(b"\r\n")
    d.read(b"+OK\r\n")
    assert not d._fifo and d.lost is None


# -- HTTP -------------------------------------------------------------------------------------

DATE = b"Tue, 01 Dec 2026 10:00:00 GMT"
RESP_200 = b"HTTP/1.1 200 OK\r\nDate: " + DATE + b"\r\nContent-Length: 10\r\n\r\n0123456789"
GET = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
MASKED = b"\0" * (1 + len(DATE))  # what follows "Date:" to the line end


def http(first: bytes = GET) -> HttpDialect:
    d = detect(first, None)
    assert isinstance(d, HttpDialect)
    d.wrote(first)
    return d


def test_http_mask_blanks_the_date_value_and_nothing_else() -> None:
    d = http()
    masked = b""
    for c in (RESP_200[:40], RESP_200[40:]):
        d.read(c)  # the core's order: read() then mask() on each chunk
        masked += d.mask(c)
    assert masked == RESP_200.replace(b" " + DATE, MASKED)
    # the re-read answer on a new connection, with another Date, cut elsewhere
    new = RESP_200.replace(DATE, b"Tue, 01 Dec 2026 10:00:07 GMT")
    d.reset_answer()
    assert d.mask(new[:7]) + d.mask(new[7:]) == masked
    # then the caller carries on: the next answer is masked from its own start
    d.wrote(GET)
    d.read(RESP_200)
    assert d.mask(RESP_200) == masked


@pytest.mark.parametrize("k", range(len(RESP_200) + 1))
def test_http_pipelined_responses_framed_at_every_split(k: int) -> None:
    d = http()
    d.wrote(b"HEAD /h HTTP/1.1\r\nHost: a\r\n\r\nGET /c HTTP/1.1\r\nHost: a\r\n\r\n"
            b"DELETE /d HTTP/1.1\r\nHost: a\r\n\r\n")
    stream = (RESP_200
              + b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nDate: " + DATE + b"\r\n\r\n"
              + b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
              + b"3;ext=1\r\nabc\r\n10\r\n" + b"y" * 16 + b"\r\n0\r\nX-T: 1\r\n\r\n"
              + b"HTTP/1.1 204 No Content\r\nDate: " + DATE + b"\r\n\r\n")
    masked = b""
    for c in (stream[:k], stream[k:]):
        d.read(c)
        masked += d.mask(c)
    assert d.lost is None and not d._inflight and d.resumable()
    assert masked == stream.replace(b" " + DATE, MASKED)
    d.reset_answer()  # the re-read on a new connection, cut elsewhere, another Date
    other = stream.replace(DATE, b"Wed, 02 Dec 2026 11:11:11 GMT")
    assert d.mask(other[:3]) + d.mask(other[3:]) == masked


@pytest.mark.parametrize("k", range(20, len(RESP_200)))
def test_http_an_answer_cut_anywhere_compares_equal_to_its_re_read(k: int) -> None:
    d = http()
    d.read(RESP_200[:k])
    first = d.mask(RESP_200[:k])  # the caller got k bytes, then the connection dropped
    d.reset_answer()
    new = RESP_200.replace(DATE, b"Tue, 01 Dec 2026 10:00:09 GMT")
    again = b"".join(d.mask(new[j:j + 1]) for j in range(k))
    assert again == first
    d.read(new[k:])  # the caller carries on at byte k of the new answer
    assert not d._inflight and d.lost is None


def test_http_resumable_follows_rfc9110_idempotent_methods() -> None:
    for method, ok in ((b"GET", True), (b"HEAD", True), (b"PUT", True), (b"DELETE", True),
                       (b"OPTIONS", True), (b"TRACE", True), (b"POST", False),
                       (b"PATCH", False)):
        d = http(method + b" /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nab")
        d.read(b"HTTP/1.1 200 OK\r\nContent-Len")  # cut inside the head
        assert d.resumable() is ok, method
        assert (d.refusal() is None) is ok
        if not ok:
            assert method.decode() in (d.refusal() or "")


def test_http_a_pipelined_post_makes_the_answer_not_resumable() -> None:
    d = http()
    d.wrote(b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
    d.read(RESP_200[:50])
    assert not d.resumable()


def test_http_an_answer_that_began_before_the_last_write_is_not_resumable() -> None:
    d = http()
    d.read(RESP_200[:50])
    d.wrote(GET)  # pipelined while the first response is still coming
    d.read(RESP_200[50:55])
    assert not d.resumable() and d.refusal() is not None


def test_http_upgrade_101_makes_a_tunnel_for_good() -> None:
    d = http(b"GET /chat HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    assert d.refusal() is None  # not answered yet: the request may be re-sent
    d.read(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x05hello")
    why = d.refusal()
    assert why is not None and "tunnel" in why and "websocket" in why
    d.wrote(b"\x81\x85\x00\x00\x00\x00hello")
    d.read(b"\x88\x00")
    d.discard()
    d.new_connection()
    assert d.refusal() == why and not d.resumable()


def test_http_a_declined_upgrade_stays_http() -> None:
    d = http(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n")
    d.read(RESP_200)
    assert d.refusal() is None and d.lost is None
    d.wrote(GET)
    d.read(RESP_200[:30])
    assert d.resumable()


def test_http_connect_2xx_makes_a_tunnel_and_407_does_not() -> None:
    d = http(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    d.read(b"HTTP/1.1 200 Connection established\r\n\r\n\x16\x03\x03")
    assert "CONNECT" in (d.refusal() or "")
    d = http(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    d.read(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n"
           b"Content-Length: 0\r\n\r\n")
    assert d.refusal() is None and d.lost is None


def test_http_ntlm_and_negotiate_are_connection_state() -> None:
    d = http()
    d.read(b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Negotiate\r\n"
           b"WWW-Authenticate: NTLM\r\nContent-Length: 0\r\n\r\n")
    assert "NTLM" in (d.refusal() or "")
    d.discard()
    assert d.refusal() is None
    d = http(b"GET / HTTP/1.1\r\nHost: a\r\nAuthorization: NTLM TlRMTVNTUAABAAAAB4IIAAAAAAA=\r\n"
             b"\r\n")
    assert "bound to this connection" in (d.refusal() or "")
    d = http()
    d.read(b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=x\r\n"
           b"Content-Length: 0\r\n\r\n")
    assert d.refusal() is None


def test_http_100_continue_holds_the_request_until_its_final_response() -> None:
    d = http(b"PUT /f HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    assert not d.hold()
    d.read(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert d.hold()
    d.wrote(b"data")
    d.read(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\no")
    assert d.hold() and d.resumable()
    d.read(b"k")
    assert not d.hold()


def test_http_a_held_exchange_is_masked_as_one_answer() -> None:
    d = http(b"PUT /f HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    final = b"HTTP/1.1 201 Created\r\nDate: " + DATE + b"\r\nContent-Length: 2\r\n\r\no"
    d.read(interim)
    first = d.mask(interim)
    d.wrote(b"data")  # held: the answer goes on across this write
    d.read(final)
    masked = first + d.mask(final)
    assert masked == (interim + final).replace(b" " + DATE, MASKED)
    d.reset_answer()
    assert d.mask(interim + final) == masked


def test_http_head_204_304_and_close_delimited_bodies() -> None:
    d = http(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    d.read(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    assert not d._inflight
    d.wrote(b"GET / HTTP/1.1\r\nHost: a\r\nIf-None-Match: x\r\n\r\n")
    d.read(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1000\r\n\r\n")
    assert not d._inflight
    d.wrote(b"GET / HTTP/1.0\r\n\r\n")
    d.read(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
    d.read(b" of the connection")
    assert d.lost is None and d.resumable() and len(d._inflight) == 1


def test_http_garbage_falls_back_to_the_byte_rules_without_raising() -> None:
    d = http()
    d.read(b"SSH-2.0-not http at all\r\n\r\n")
    assert d.lost is not None
    assert d.refusal() is None and not d.resumable() and not d.hold()
    d.read(b"more")
    d.wrote(b"more")
    d = http(b"GET / HTTP/1.1\r\n\r\n")  # no Host: h11 refuses it
    assert d.lost is not None and d.refusal() is None
    rng = random.Random(9)
    for _ in range(300):
        d = http()
        d.read(b"HTTP/1.1 200 OK\r\n" + rng.randbytes(rng.randrange(1, 60)))
        d.wrote(rng.randbytes(20))
        d.refusal(), d.resumable(), d.hold(), d.mask(b"xyz")


def test_http_read_path_does_constant_work_per_body_chunk() -> None:
    """The HTTP dialect's look at an answer body costs the same for 64 KiB as for 64 B: no
    Python loop over its bytes and no copy of it (was a timed bound, < 20 us per chunk, that
    a loaded machine broke: 44 us). The figures live in make bench."""
    d = http(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
    d.read(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (1 << 40))
    big, small = b"x" * 65536, b"x" * 64
    d.read(big), d.mask(big)  # warm
    lines_big, peak_big = _work(lambda: (d.read(big), d.mask(big)))
    lines_small, _ = _work(lambda: (d.read(small), d.mask(small)))
    assert lines_big == lines_small, (lines_big, lines_small)
    assert peak_big < 16384, peak_big  # not a copy of the 64 KiB chunk
    d = http(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
    d.read(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    big = b"10000\r\n" + b"x" * 65536 + b"\r\n"
    small = b"40\r\n" + b"x" * 64 + b"\r\n"
    d.read(big)  # warm
    lines_big, peak_big = _work(lambda: d.read(big))
    lines_small, _ = _work(lambda: d.read(small))
    assert d.lost is None
    assert lines_big == lines_small, (lines_big, lines_small)
    assert peak_big < 16384, peak_big


# -- handshake protocols ----------------------------------------------------------------------

@pytest.mark.parametrize("first, answer, name", [
    (b"SSH-2.0-paramiko_3.4.0\r\n", b"SSH-2.0-OpenSSH_9.6\r\n", "SSH"),
    (b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00", b"\x16\x03\x03\x00\x02\x02\x00", "TLS"),
    (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", b"S", "PostgreSQL"),
    (b"AMQP\x00\x00\x09\x01", b"\x01\x00\x00\x00\x00\x01\xf6\x00\x0a", "AMQP"),
    (b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04abcd", b"\x20\x02\x00\x00", "MQTT"),
])
def test_handshake_protected_only_before_it_begins(first: bytes, answer: bytes,
                                                  name: str) -> None:
    d = detect(first, None)
    assert isinstance(d, HandshakeDialect)
    d.wrote(first)
    assert d.refusal() is None  # only the opening message: it may be re-sent
    assert not d.resumable() and d.restore() is None
    d.read(answer)
    why = d.refusal()
    assert why is not None and why.startswith(name)
    d2 = detect(first, None)
    assert d2 is not None
    d2.wrote(first)
    d2.wrote(b"more")  # a second record: the handshake went on (0-RTT, pipelined PUBLISH)
    assert d2.refusal() is not None
    d.discard()
    d.new_connection()
    assert d.refusal() == why  # sticky: later bytes belong to a session no new connection has


@pytest.mark.parametrize("greeting, name", [
    (b"SSH-2.0-OpenSSH_9.6\r\n", "SSH"),
    (b"\x4a\x00\x00\x00\x0a11.4.2-MariaDB-ubu2404\x00\x08\x00\x00\x00", "MySQL"),
])
def test_handshake_server_first_is_refused_from_the_greeting(greeting: bytes, name: str) -> None:
    d = detect(None, greeting)
    assert d is not None
    d.read(greeting)
    assert (d.refusal() or "").startswith(name + ":")
    assert "nonce" in (d.refusal() or "") or name == "SSH"


# -- prelude ----------------------------------------------------------------------------------

def prelude_dialect() -> PreludeDialect:
    d = detect(b"HELLO robot-7\n", None, prelude=2)
    assert isinstance(d, PreludeDialect)
    d.wrote(b"HELLO robot-7\n")
    d.read(b"WELCOME ")
    d.read(b"robot-7\n")
    d.wrote(b"AUTH ")
    d.wrote(b"secret\n")
    d.read(b"OK\n")
    d.wrote(b"MSG 1\n")  # the third write: the prelude is complete
    d.read(b"ACK 1\n")
    d.wrote(b"MSG 2\n")
    return d


def test_prelude_restores_the_first_n_exchanges_byte_for_byte() -> None:
    d = prelude_dialect()
    assert d.resumable() and d.refusal() is None
    answers = b"WELCOME robot-7\nOK\n"
    for chunks in splits(answers + b"ACK 2\n"):
        r = d.restore()
        assert r is not None and r.payload == b"HELLO robot-7\nAUTH secret\n"
        k, n = feed_restore(r, chunks)
        assert sum(len(c) for c in chunks[:k]) + n == len(answers)


def test_prelude_answer_that_differs_is_a_mismatch() -> None:
    d = prelude_dialect()
    r = d.restore()
    assert r is not None
    with pytest.raises(SetupMismatch, match="exchange 2"):
        r.feed(b"WELCOME robot-7\nNO\n")


def test_prelude_in_progress_exchange_is_not_setup_yet() -> None:
    d = detect(b"HELLO\n", None, prelude=2)
    assert d is not None
    d.wrote(b"HELLO\n")
    assert d.restore() is None
    d.read(b"HI\n")
    assert d.restore() is None  # its answer may not be complete: the core's byte rules
    d.wrote(b"AUTH\n")
    r = d.restore()
    assert r is not None and r.payload == b"HELLO\n" and r.feed(b"HI\nrest") == 3


def test_prelude_too_large_is_refused() -> None:
    d = detect(b"X", None, prelude=1)
    assert d is not None
    d.wrote(b"X" * 70000)
    assert "larger than" in (d.refusal() or "")


def test_mutated_streams_never_raise() -> None:
    rng = random.Random(1414)
    writes = [cmd("AUTH", "pw") + cmd("SELECT", "2") + cmd("MULTI") + cmd("GET", "k")
              + cmd("EXEC") + cmd("SUBSCRIBE", "a"),
              GET + b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"]
    reads = [b"+OK\r\n+OK\r\n+OK\r\n+QUEUED\r\n*1\r\n$1\r\nv\r\n"
             b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n" + REPLIES,
             RESP_200 + b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"5\r\nabcde\r\n0\r\n\r\n"]
    for _ in range(400):
        k = rng.randrange(2)
        w, r = bytearray(writes[k]), bytearray(reads[k])
        for buf in (w, r):
            for _ in range(rng.randrange(1, 4)):
                buf[rng.randrange(len(buf))] = rng.randrange(256)
        d = detect(bytes(w[:20]), None)
        if d is None:
            continue
        cut_w, cut_r = rng.randrange(len(w)), rng.randrange(len(r))
        d.wrote(bytes(w[:cut_w]))
        d.wrote(bytes(w[cut_w:]))
        for c in (bytes(r[:cut_r]), bytes(r[cut_r:])):
            d.read(c)
            assert len(d.mask(c)) == len(c)
        d.refusal(), d.resumable(), d.hold()
        restore = d.restore()
        if restore is not None:
            try:
                restore.feed(bytes(r))
            except SetupMismatch:
                pass
        d.discard()


def test_resp_follows_redis_py_packed_commands() -> None:
    # The records redis-py itself writes (its packer; a big value is a record of its own),
    # not a hand-made RESP stream.
    redis_connection = pytest.importorskip("redis.connection")
    conn = redis_connection.Connection(db=2, password="pw")
    d = None
    records = (conn.pack_command("AUTH", "pw") + conn.pack_command("SELECT", 2)
               + conn.pack_command("SET", "big", b"x" * 200_000)
               + conn.pack_commands([("MULTI",), ("INCR", "n"), ("GET", "n"), ("EXEC",)]))
    for rec in records:
        if d is None:
            d = detect(rec, None)
            assert isinstance(d, RespDialect)
        d.wrote(rec)
    assert d is not None
    d.read(b"+OK\r\n+OK\r\n+OK\r\n+OK\r\n+QUEUED\r\n+QUEUED\r\n")
    assert d.hold()
    d.read(b"*2\r\n:1\r\n$1\r\n1\r\n")
    assert not d.hold() and d.lost is None and not d._fifo
    r = d.restore()
    assert r is not None and r.payload == cmd("AUTH", "pw") + cmd("SELECT", "2")


def test_after_discard_a_refusal_says_the_lineage_cannot_continue() -> None:
    # The core's test for a lazy reconnect: refusal() still set after discard() -> none.
    tunnel = http(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    tunnel.read(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    ssh = detect(b"SSH-2.0-x\r\n", None)
    assert ssh is not None
    ssh.wrote(b"SSH-2.0-x\r\n")
    ssh.read(b"SSH-2.0-y\r\n")
    ntlm = http(b"GET / HTTP/1.1\r\nHost: a\r\nAuthorization: NTLM abc\r\n\r\n")
    sub = RespDialect()
    sub.wrote(cmd("SUBSCRIBE", "a"))
    for d in (tunnel, ssh, ntlm, sub):
        assert d.refusal() is not None
        d.discard()
    assert tunnel.refusal() is not None and ssh.refusal() is not None
    assert ntlm.refusal() is None and sub.refusal() is None  # a new connection starts clean


def test_h11_is_imported_only_for_http() -> None:
    import subprocess
    import sys

    code = ("import sys, resilientsock.dialects as d; "
            "d.detect(b'*1\\r\\n$4\\r\\nPING\\r\\n', None); d.detect(b'MSG 1\\n', None); "
            "assert 'h11' not in sys.modules; "
            "d.detect(b'GET / HTTP/1.1\\r\\n', None); assert 'h11' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
