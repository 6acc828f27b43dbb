"""The session protocol sans-IO (resilientsock.session.protocol): no sockets, microseconds a test.

Both ends are the same two classes; these tests wire a client Link to a relay Link by hand and
check the handshake, cumulative acks, resume arithmetic, and every rejection design.md §11 names.
"""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest

from resilientsock.session import protocol as sp


def events(link: sp.Link, data: bytes = b"") -> list[object]:
    if data:
        link.receive_data(data)
    out = []
    while True:
        ev = link.next_event()
        if ev is sp.NEED_DATA:
            return out
        out.append(ev)
        if ev is sp.NOT_SESSION:
            return out


class Pair:
    """A client and a relay end of one session, with their streams."""

    def __init__(self, limit: int = 1 << 20) -> None:
        self.c_stream = sp.Stream(limit)
        self.r_stream = sp.Stream(limit)
        self.client = sp.Link(sp.CLIENT)
        self.relay = sp.Link(sp.RELAY)
        hello = self.client.send_hello_new(self.c_stream)
        assert events(self.relay, hello) == [sp.HelloNew(sp.VERSION)]
        self.sid, self.secret = sp.new_credentials()
        created = self.relay.send_created(self.sid, self.secret, self.r_stream)
        assert events(self.client, created) == [sp.Created(self.sid, self.secret)]
        assert self.client.state == self.relay.state == sp.OPEN

    def resume(self) -> tuple[bytes, bytes]:
        """A new link pair, resumed; returns (relay's re-sent frames after RESUMED, client's)."""
        self.client = sp.Link(sp.CLIENT)
        self.relay = sp.Link(sp.RELAY)
        hello = self.client.send_hello_resume(self.sid, self.c_stream)
        assert events(self.relay, hello) == [sp.HelloResume(sp.VERSION, self.sid)]
        assert events(self.client, self.relay.send_challenge()) == [sp.Challenged()]
        (proof,) = events(self.relay, self.client.send_proof(self.secret))
        assert isinstance(proof, sp.ProofReceived)
        assert self.relay.check_proof(self.secret)
        assert self.r_stream.check_peer_counts(proof.received, proof.sent) is None
        resumed = self.relay.send_resumed(self.secret, self.r_stream)
        self.client.receive_data(resumed)
        ev = self.client.next_event()
        assert isinstance(ev, sp.Resumed)
        relay_resent = self.client.unconsumed()
        client_resent = self.client.finish_resume(self.secret)
        return relay_resent, client_resent


def payloads(evs: list[object]) -> bytes:
    return b"".join(e.payload for e in evs if isinstance(e, sp.Data))


def test_new_session_and_data_both_ways() -> None:
    p = Pair()
    up = p.c_stream.data(b"hello relay")
    assert payloads(events(p.relay, up)) == b"hello relay"
    down = p.r_stream.data(b"hello client")
    assert payloads(events(p.client, down)) == b"hello client"
    # The relay's DATA header acknowledged the client's 11 bytes: the client dropped them.
    assert p.c_stream.acked == 11 and p.c_stream.unacked == b""
    assert p.r_stream.unacked == b"hello client"
    events(p.relay, p.c_stream.ack())
    assert p.r_stream.unacked == b""


def test_resume_resends_exactly_what_the_peer_missed() -> None:
    p = Pair()
    events(p.relay, p.c_stream.data(b"A" * 100))
    lost_up = p.c_stream.data(b"B" * 50)  # never arrives
    events(p.client, p.r_stream.data(b"x" * 30))
    p.r_stream.data(b"y" * 20)  # never arrives
    del lost_up
    relay_resent, client_resent = p.resume()
    assert payloads(events(p.client, b"")) == b"y" * 20  # from the buffer after RESUMED
    assert relay_resent.startswith(sp.HEADER.pack(sp.DATA, 20, 100))
    assert payloads(events(p.relay, client_resent)) == b"B" * 50
    assert p.c_stream.received == p.r_stream.sent == 50
    assert p.r_stream.received == p.c_stream.sent == 150


def test_resume_after_everything_arrived_resends_nothing() -> None:
    p = Pair()
    events(p.relay, p.c_stream.data(b"abc"))
    events(p.client, p.r_stream.data(b"def"))
    _, client_resent = p.resume()
    assert events(p.relay, client_resent) == []  # a bare ACK
    assert p.c_stream.unacked == b"" and p.r_stream.unacked == b""


def test_end_markers_are_units_acknowledged_and_resent() -> None:
    p = Pair()
    events(p.relay, p.c_stream.data(b"bye"))
    p.c_stream.end()  # the client's EOF is lost in a drop
    assert p.c_stream.sent == 4
    _, client_resent = p.resume()
    assert events(p.relay, client_resent) == [sp.Ended(False, "")]
    assert p.r_stream.received == 4
    end = p.r_stream.end()
    assert events(p.client, end) == [sp.Ended(False, "")]
    events(p.relay, p.c_stream.ack())
    assert p.c_stream.done and p.r_stream.done


def test_reset_ends_the_session_once_delivered() -> None:
    p = Pair()
    evs = events(p.client, p.r_stream.data(b"last") + p.r_stream.end(True, "upstream reset"))
    assert evs[-1] == sp.Ended(True, "upstream reset")
    assert not p.c_stream.done  # not before its ack is on the way
    events(p.relay, p.c_stream.ack())
    assert p.c_stream.done  # a reset received ends both directions
    assert p.r_stream.done


def test_abort_frame() -> None:
    p = Pair()
    assert events(p.relay, p.c_stream.abort("application closed")) == [
        sp.Aborted("application closed")]


def test_a_wrong_secret_fails_the_proof_and_the_stream_is_untouched() -> None:
    p = Pair()
    events(p.client, p.r_stream.data(b"z" * 10))
    before = (p.r_stream.acked, bytes(p.r_stream.unacked), p.r_stream.received)
    client, relay = sp.Link(sp.CLIENT), sp.Link(sp.RELAY)
    events(relay, client.send_hello_resume(p.sid, p.c_stream))
    events(client, relay.send_challenge())
    events(relay, client.send_proof(b"\x00" * 32))
    assert not relay.check_proof(p.secret)
    assert (p.r_stream.acked, bytes(p.r_stream.unacked), p.r_stream.received) == before


def test_a_recorded_resume_handshake_replayed_later_fails() -> None:
    p = Pair()
    client, relay = sp.Link(sp.CLIENT), sp.Link(sp.RELAY)
    hello = client.send_hello_resume(p.sid, p.c_stream)
    events(relay, hello)
    events(client, relay.send_challenge())
    proof = client.send_proof(p.secret)
    events(relay, proof)
    assert relay.check_proof(p.secret)
    # The attacker replays hello + proof to a new connection: it gets a fresh challenge.
    replay = sp.Link(sp.RELAY)
    events(replay, hello)
    replay.send_challenge()
    events(replay, proof)
    assert not replay.check_proof(p.secret)


def test_the_client_rejects_a_relay_that_cannot_prove_the_secret() -> None:
    p = Pair()
    client, relay = sp.Link(sp.CLIENT), sp.Link(sp.RELAY)
    events(relay, client.send_hello_resume(p.sid, p.c_stream))
    events(client, relay.send_challenge())
    events(relay, client.send_proof(p.secret))
    client.receive_data(relay.send_resumed(b"\x01" * 32, p.r_stream))
    assert isinstance(client.next_event(), sp.Resumed)
    with pytest.raises(sp.ProtocolError, match="proof"):
        client.finish_resume(p.secret)
    with pytest.raises(sp.ProtocolError):  # sticky
        client.next_event()


@pytest.mark.parametrize("received, sent, why", [
    (5, 0, "only 0 were sent"),  # claims more than the relay ever sent
    (0, 0, None),
])
def test_impossible_counts_are_named(received: int, sent: int, why: str | None) -> None:
    stream = sp.Stream()
    result = stream.check_peer_counts(received, sent)
    assert (result is None) if why is None else (why in (result or ""))


def test_counts_before_what_was_acknowledged_or_received_are_impossible() -> None:
    p = Pair()
    events(p.client, p.r_stream.data(b"q" * 10))
    events(p.relay, p.c_stream.data(b"w" * 5))  # acks the relay's 10
    assert p.r_stream.acked == 10
    assert "already acknowledged" in (p.r_stream.check_peer_counts(3, 5) or "")
    assert "were received" in (p.r_stream.check_peer_counts(10, 2) or "")
    assert p.r_stream.check_peer_counts(10, 5) is None
    assert p.r_stream.check_peer_counts(10, 9) is None  # 4 sent, not yet arrived


def test_an_ack_beyond_what_was_sent_is_a_protocol_error() -> None:
    p = Pair()
    with pytest.raises(sp.ProtocolError) as info:
        events(p.client, sp.HEADER.pack(sp.ACK, 0, 999))
    assert info.value.code == sp.E_IMPOSSIBLE_COUNTS


def test_a_long_run_of_ack_frames_is_consumed_without_recursion() -> None:
    """A peer that was not read for a while (a bulk writer) finds thousands of ACK frames
    buffered: they are consumed in a loop. Before: one recursion level per frame, and a
    RecursionError past ~1,000 (found by bench_session.py's raw bulk client)."""
    p = Pair()
    p.c_stream.data(b"x" * 5000)  # sent; the relay's acks below count it up byte by byte
    acks = b"".join(sp.HEADER.pack(sp.ACK, 0, n) for n in range(1, 5001))
    p.client.receive_data(acks + p.r_stream.data(b"after"))
    evs = []
    while (ev := p.client.next_event()) is not sp.NEED_DATA:
        evs.append(ev)
    assert evs == [sp.Data(b"after")]
    assert p.c_stream.acked == 5000


def test_a_stale_ack_is_ignored() -> None:
    p = Pair()
    stale = p.r_stream.ack()  # acks 0
    events(p.relay, p.c_stream.data(b"12345") + p.c_stream.data(b"6"))
    events(p.client, p.r_stream.ack())  # acks 6
    events(p.client, stale)
    assert p.c_stream.acked == 6


def test_garbage_is_not_a_session() -> None:
    relay = sp.Link(sp.RELAY)
    assert events(relay, b"GET / HTTP/1.1\r\n") == [sp.NOT_SESSION]
    assert relay.unconsumed() == b"GET / HTTP/1.1\r\n"
    partial = sp.Link(sp.RELAY)
    assert events(partial, sp.PREAMBLE[:3]) == []  # could still be a session


def test_an_oversized_handshake_frame_is_rejected() -> None:
    relay = sp.Link(sp.RELAY)
    with pytest.raises(sp.ProtocolError, match="limit"):
        events(relay, sp.PREAMBLE + sp.HEADER.pack(sp.HELLO, 5000, 0))


def test_an_unexpected_frame_in_the_handshake_is_rejected() -> None:
    relay = sp.Link(sp.RELAY)
    with pytest.raises(sp.ProtocolError, match="not allowed"):
        events(relay, sp.PREAMBLE + sp.HEADER.pack(sp.DATA, 1, 0) + b"x")


def test_no_common_version() -> None:
    relay = sp.Link(sp.RELAY)
    body = struct.pack("!BBB16s", 7, 9, 0, b"n" * 16)
    with pytest.raises(sp.ProtocolError) as info:
        events(relay, sp.PREAMBLE + sp.HEADER.pack(sp.HELLO, len(body), 0) + body)
    assert info.value.code == sp.E_VERSION
    assert relay.state == sp.ERROR
    # The relay may still tell the client why.
    assert relay.send_error(info.value.code, "versions 1..1").startswith(
        bytes([sp.ERROR_FRAME]))


def test_an_error_frame_refuses_the_client() -> None:
    client = sp.Link(sp.CLIENT)
    relay = sp.Link(sp.RELAY)
    events(relay, client.send_hello_resume(b"i" * 16, sp.Stream()))
    with pytest.raises(sp.Refused) as info:
        events(client, relay.send_error(sp.E_UNKNOWN_SESSION, "restarted"))
    assert info.value.code == sp.E_UNKNOWN_SESSION and "restarted" in str(info.value)


def test_sends_out_of_order_are_refused_locally() -> None:
    client = sp.Link(sp.CLIENT)
    with pytest.raises(RuntimeError):
        client.send_proof(b"s" * 32)


def test_byte_at_a_time_equals_all_at_once() -> None:
    p = Pair()
    wire = p.r_stream.data(b"abc") + p.r_stream.data(b"defg") + p.r_stream.end()
    got = []
    for i in range(len(wire)):
        got += events(p.client, wire[i:i + 1])
    assert payloads(got) == b"abcdefg" and got[-1] == sp.Ended(False, "")


def test_large_writes_are_split_into_frames_within_the_limit() -> None:
    p = Pair(limit=8 << 20)
    blob = bytes(range(256)) * (3 * sp.MAX_DATA // 256 + 7)
    evs = events(p.relay, p.c_stream.data(blob))
    assert len(evs) == 4 and payloads(evs) == blob


def test_room_is_the_backpressure_signal() -> None:
    p = Pair(limit=10)
    first = p.c_stream.data(b"0123456789")
    assert p.c_stream.room() == 0
    events(p.relay, first + p.c_stream.data(b"x"))  # beyond the limit is the caller's choice
    events(p.client, p.r_stream.ack())
    assert p.c_stream.room() == 10


def test_random_bytes_never_crash_the_relay_link() -> None:
    rng = random.Random(15)
    for _ in range(2000):
        relay = sp.Link(sp.RELAY)
        blob = sp.PREAMBLE + rng.randbytes(rng.randrange(0, 64))
        try:
            events(relay, blob)
        except sp.ProtocolError:
            assert relay.state == sp.ERROR


def test_every_table_state_is_named() -> None:
    known = sp.HANDSHAKE_STATES | {sp.OPEN, sp.ERROR, sp.CLOSED}
    for role, state in list(sp.EXPECT) + list(sp.SENDS):
        assert role in (sp.CLIENT, sp.RELAY) and state in known
    for table in (sp.EXPECT, sp.SENDS):
        for moves in table.values():
            for nxt in moves.values():
                assert nxt in known


@pytest.mark.parametrize("drain", [True, False])
def test_any_chunking_yields_the_same_stream(drain: bool) -> None:
    rng = random.Random(7)
    p = Pair(limit=64 << 20)
    blob = rng.randbytes(3 << 20)
    wire = b""
    i = 0
    while i < len(blob):
        n = rng.choice((1, 13, 100, 70000, 300000))
        wire += p.r_stream.data(blob[i:i + n])
        if rng.random() < 0.1:
            wire += p.r_stream.ack() + p.r_stream.ping()
        i += n
    got = bytearray()
    pos = 0
    while pos < len(wire):
        n = rng.choice((1, 5, 13, 4096, 65536, 262144))
        p.client.receive_data(wire[pos:pos + n])
        pos += n
        if drain or pos >= len(wire) or rng.random() < 0.3:
            got += payloads(events(p.client))
    assert bytes(got) == blob


def _ticket_resume(p: Pair, ticket: bytes) -> tuple[sp.Link, sp.Link, bytes]:
    client, relay = sp.Link(sp.CLIENT), sp.Link(sp.RELAY)
    hello = client.send_hello_ticket(p.sid, p.c_stream, ticket, p.secret)
    (ev,) = events(relay, hello)
    assert isinstance(ev, sp.HelloTicket) and ev.session_id == p.sid
    return client, relay, hello


def test_a_ticket_resumes_in_one_round_trip_and_is_used_once() -> None:
    p = Pair()
    ticket = p.relay.next_ticket
    assert p.client.next_ticket == ticket and len(ticket) == 16  # from CREATED
    events(p.relay, p.c_stream.data(b"up"))
    p.r_stream.data(b"lost down")
    client, relay, hello = _ticket_resume(p, ticket)
    assert relay.check_ticket_proof(ticket, p.secret)
    client.receive_data(relay.send_resumed(p.secret, p.r_stream))
    assert isinstance(client.next_event(), sp.Resumed)
    assert client.finish_resume(p.secret) is not None
    assert payloads(events(client)) == b"lost down"
    assert client.next_ticket == relay.next_ticket != ticket  # the next one, proved
    # The same HELLO replayed later: the relay holds the new ticket now, so the proof fails
    # and the replayer gets a fresh challenge it cannot answer.
    replay = sp.Link(sp.RELAY)
    events(replay, hello)
    assert not replay.check_ticket_proof(relay.next_ticket, p.secret)
    assert replay.send_challenge()[:1] == bytes([sp.CHALLENGE])


def test_a_stale_ticket_falls_back_to_the_challenge() -> None:
    p = Pair()
    client, relay, _ = _ticket_resume(p, b"s" * 16)
    assert not relay.check_ticket_proof(p.relay.next_ticket, p.secret)
    assert events(client, relay.send_challenge()) == [sp.Challenged()]
    (proof,) = events(relay, client.send_proof(p.secret))
    assert isinstance(proof, sp.ProofReceived) and relay.check_proof(p.secret)
    client.receive_data(relay.send_resumed(p.secret, p.r_stream))
    assert isinstance(client.next_event(), sp.Resumed)
    client.finish_resume(p.secret)
    assert client.state == sp.OPEN


def test_unacked_keeps_big_immutable_writes_by_reference_and_drops_acked_bytes_in_order():
    from resilientsock.session.protocol import Unacked

    big = bytes(range(256)) * 64  # 16 KiB, bytes: kept by reference
    u = Unacked()
    u.append(b"ab")
    u.append(bytearray(b"cd"))  # small: coalesced with the previous copy
    u.append(memoryview(big))
    u.append(memoryview(bytearray(b"x" * 5000)))  # mutable: copied
    assert len(u) == 4 + len(big) + 5000
    assert len(u._chunks) == 3
    assert u._chunks[1].obj is big  # no copy of the big write
    want = b"abcd" + big + b"x" * 5000
    for n in (1, 3, 100, len(big), 4000, 500):
        u.drop(n)
        want = want[n:]
        assert bytes(u) == want and len(u) == len(want)
    u.drop(len(want))
    assert not u and u == b"" and u._chunks is None


def test_a_frame_split_across_reads_is_handed_on_as_it_arrives_and_resumed_mid_frame() -> None:
    """No gathering of a straddling DATA frame: its bytes are Data at once, counted per byte;
    a drop mid-frame resumes from the byte received, so nothing is delivered twice."""
    p = Pair()
    blob = bytes(range(256)) * 400  # 102,400 bytes: one DATA frame
    wire = p.r_stream.data(blob)
    assert len(wire) == sp.HEADER_LEN + len(blob)
    first = events(p.client, wire[:30_000])
    assert payloads(first) == blob[:30_000 - sp.HEADER_LEN]
    assert all(type(e.payload) is memoryview for e in first)  # views of the read, no copy
    assert p.c_stream.received == 30_000 - sp.HEADER_LEN
    second = events(p.client, wire[30_000:60_000])
    assert payloads(second) == blob[30_000 - sp.HEADER_LEN:60_000 - sp.HEADER_LEN]
    # The link drops here; the relay re-sends what the client had not received, mid-frame.
    relay_resent, _ = p.resume()
    rest = payloads(events(p.client, b""))
    assert relay_resent.startswith(sp.HEADER.pack(sp.DATA, len(blob) - (60_000 - sp.HEADER_LEN),
                                                  0))
    assert payloads(first) + payloads(second) + rest == blob
    assert p.c_stream.received == p.r_stream.sent == len(blob)


def test_a_header_at_the_very_end_of_a_read_then_its_payload() -> None:
    p = Pair()
    wire = p.r_stream.data(b"z" * 5000) + p.r_stream.data(b"after")
    assert events(p.client, wire[:sp.HEADER_LEN]) == []
    assert payloads(events(p.client, wire[sp.HEADER_LEN:])) == b"z" * 5000 + b"after"


def _early_resume(p: Pair, version: int = 2) -> tuple[sp.Link, sp.Link, Any]:
    client, relay = sp.Link(sp.CLIENT), sp.Link(sp.RELAY)
    hello = client.send_hello_ticket(p.sid, p.c_stream, p.relay.next_ticket, p.secret,
                                     version=version)
    (ev,) = events(relay, hello)
    assert isinstance(ev, sp.HelloTicket)
    return client, relay, ev


def test_early_data_rides_the_ticket_hello_and_is_not_resent() -> None:
    """Version 2: a small unacknowledged request goes with the resume's HELLO; the relay
    counts it before answering, so RESUMED covers it and the client re-sends nothing."""
    p = Pair()
    events(p.relay, p.c_stream.data(b"seen "))  # arrived; not acknowledged yet
    p.c_stream.data(b"lost request")  # never arrived
    client, relay, ev = _early_resume(p)
    assert (ev.early_from, ev.early) == (0, b"seen lost request")  # all that is unacked
    assert relay.check_ticket_proof(p.relay.next_ticket, p.secret)
    taken = p.r_stream.take_early(ev.early_from, ev.early)
    assert taken == b"lost request"  # the part the relay had not received
    assert p.r_stream.received == p.c_stream.sent == 17
    client.receive_data(relay.send_resumed(p.secret, p.r_stream))
    assert isinstance(client.next_event(), sp.Resumed)
    resent = client.finish_resume(p.secret)
    assert payloads(events(relay, resent)) == b""  # nothing twice
    assert p.c_stream.unacked == b""


def test_early_data_is_dropped_with_a_stale_ticket_and_resent_after_resumed() -> None:
    p = Pair()
    p.c_stream.data(b"request")
    client, relay, ev = _early_resume(p)
    assert ev.early == b"request"
    assert not relay.check_ticket_proof(b"s" * 16, p.secret)  # the relay holds another
    assert events(client, relay.send_challenge()) == [sp.Challenged()]
    (proof,) = events(relay, client.send_proof(p.secret))
    assert relay.check_proof(p.secret)  # the PROOF's own mac, not the early one
    client.receive_data(relay.send_resumed(p.secret, p.r_stream))
    assert isinstance(client.next_event(), sp.Resumed)
    assert payloads(events(relay, client.finish_resume(p.secret))) == b"request"


def test_early_data_is_proved_with_the_hello() -> None:
    p = Pair()
    p.c_stream.data(b"transfer 10")
    client = sp.Link(sp.CLIENT)
    hello = bytearray(client.send_hello_ticket(p.sid, p.c_stream, p.relay.next_ticket,
                                               p.secret, version=2))
    hello[-2:] = b"99"  # tampered in flight
    relay = sp.Link(sp.RELAY)
    (ev,) = events(relay, bytes(hello))
    assert ev.early == b"transfer 99"
    assert not relay.check_ticket_proof(p.relay.next_ticket, p.secret)


def test_impossible_early_offsets_are_refused() -> None:
    p = Pair()
    p.c_stream.data(b"abc")
    assert p.r_stream.take_early(5, b"xyz") is None  # a gap before it
    assert p.r_stream.received == 0
    relay = sp.Link(sp.RELAY)
    body = (struct.pack("!BBB16s", 1, 2, 3, b"n" * 16) + p.sid
            + struct.pack("!QQ32s", 0, 2, b"m" * 32) + struct.pack("!Q", 0) + b"abc")
    with pytest.raises(sp.ProtocolError) as info:  # 3 bytes of early data, 2 sent
        events(relay, sp.PREAMBLE + sp.HEADER.pack(sp.HELLO, len(body), 0) + body)
    assert info.value.code == sp.E_IMPOSSIBLE_COUNTS


def test_version_1_sessions_and_big_requests_resume_without_early_data() -> None:
    p = Pair()
    p.c_stream.data(b"r")
    _, _, ev = _early_resume(p, version=1)  # a relay that speaks version 1 only
    assert ev.early == b""
    p.c_stream.data(b"x" * sp.EARLY_MAX)
    _, _, ev = _early_resume(p)
    assert ev.early == b""  # more than EARLY_MAX unacknowledged: the two-step re-send
    relay = sp.Link(sp.RELAY)
    body = (struct.pack("!BBB16s", 1, 1, 3, b"n" * 16) + p.sid
            + struct.pack("!QQ32s", 0, 2, b"m" * 32) + struct.pack("!Q", 0) + b"a")
    with pytest.raises(sp.ProtocolError, match="needs version 2"):
        events(relay, sp.PREAMBLE + sp.HEADER.pack(sp.HELLO, len(body), 0) + body)


# -- held units: acknowledged only once handed on (carrier rule 9, as code) -------------------

def _ack_of(frame: bytes) -> int:
    return int(sp.HEADER.unpack(frame[:sp.HEADER_LEN])[2])


def _acks(frames: bytes) -> list[int]:
    """The ack of every frame in ``frames``, in order."""
    out, at = [], 0
    while at < len(frames):
        _, size, ack = sp.HEADER.unpack(frames[at:at + sp.HEADER_LEN])
        out.append(int(ack))
        at += sp.HEADER_LEN + size
    return out


def test_held_units_are_acknowledged_only_once_handed_on() -> None:
    p = Pair()
    assert payloads(events(p.relay, p.c_stream.data(b"0123456789"))) == b"0123456789"
    p.r_stream.hold(10)  # waiting for the plain end
    assert p.r_stream.ack_point == 0 and p.r_stream.ack_due() == 0
    assert _ack_of(p.r_stream.ack()) == 0
    assert _ack_of(p.r_stream.data(b"answer")) == 0  # nor does an ack riding on data
    p.r_stream.handed_on(4)
    assert p.r_stream.ack_due() == 4 and _ack_of(p.r_stream.ping()) == 4
    p.r_stream.handed_on(6)
    assert _ack_of(p.r_stream.ack()) == 10 and p.r_stream.ack_due() == 0
    events(p.client, p.r_stream.ack())
    assert p.c_stream.unacked == b""


def test_held_stays_within_what_was_received_and_is_changed_only_by_hold_and_handed_on() -> None:
    p = Pair()
    events(p.relay, p.c_stream.data(b"abc"))
    with pytest.raises(AssertionError):
        p.r_stream.hold(4)  # more than was received
    p.r_stream.hold(3)
    with pytest.raises(AssertionError):
        p.r_stream.handed_on(4)  # more than is held
    with pytest.raises(AssertionError):
        p.r_stream.hold(-1)
    with pytest.raises(AttributeError):
        p.r_stream.held = 0  # type: ignore[misc]  # read-only: no way around the checks
    assert p.r_stream.held == 3


def test_early_data_is_held_from_the_moment_it_is_counted() -> None:
    """The relay counts a ticket HELLO's early data at the handshake and delivers it once the
    session has its new link: the frames built in between (RESUMED's re-sent units and their
    ack) must not acknowledge it, or the client drops bytes the relay has not handed on."""
    p = Pair()
    p.r_stream.data(b"old answer")  # the relay has something to re-send
    p.c_stream.data(b"lost request")
    client, relay, ev = _early_resume(p)
    assert relay.check_ticket_proof(p.relay.next_ticket, p.secret)
    taken = p.r_stream.take_early(ev.early_from, ev.early)
    assert taken == b"lost request"
    assert p.r_stream.received == 12 and p.r_stream.held == 12
    client.receive_data(relay.send_resumed(p.secret, p.r_stream))
    assert isinstance(client.next_event(), sp.Resumed)
    resent = client.unconsumed()
    assert payloads(events(p.client, resent)) == b"old answer"
    assert _acks(resent) == [0]  # the re-sent DATA acknowledges nothing held
    client.finish_resume(p.secret)
    assert p.c_stream.unacked == b""  # RESUMED's count (12) covers it: not re-sent
    p.r_stream.handed_on(len(taken))  # delivered upstream
    assert _ack_of(p.r_stream.ack()) == 12


def test_the_protocol_module_does_no_io() -> None:
    """Rule 1 of the protocol: no sockets, no clock, no gevent; only these imports."""
    import ast
    import pathlib

    tree = ast.parse(pathlib.Path(sp.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "hashlib", "hmac", "os", "struct", "collections",
                        "dataclasses", "typing"}, imported


def test_the_one_frame_hot_path_equals_the_event_path_and_declines_anything_else() -> None:
    """``Link.data_frame``: a chunk that is exactly one whole DATA frame (the usual request
    or answer) is taken in one call, with the same counts and acknowledgements as through
    ``receive_data``/``next_event``; anything else is declined untouched; an impossible ack
    is the same sticky ProtocolError."""
    p = Pair()
    view = p.relay.data_frame(p.c_stream.data(b"request"))
    assert view is not None and bytes(view) == b"request"
    assert p.r_stream.received == 7 and p.r_stream.ack_point == 7
    answer = p.r_stream.data(b"answer")
    view = p.client.data_frame(answer)  # its header acknowledged the client's 7 bytes
    assert view is not None and bytes(view) == b"answer"
    assert p.c_stream.acked == 7 and p.c_stream.unacked == b""
    # Declined, nothing consumed: two frames, half a frame, a control frame, a bytearray;
    # and a whole frame while part of another is buffered. Each then goes the event path.
    two = p.c_stream.data(b"a") + p.c_stream.data(b"b")
    assert p.relay.data_frame(two) is None and p.relay.data_frame(two[:15]) is None
    assert p.relay.data_frame(bytearray(two)) is None  # type: ignore[arg-type]
    assert p.relay.data_frame(p.c_stream.ping()) is None
    assert p.r_stream.received == 7
    assert payloads(events(p.relay, two[:20])) == b"a"
    last = p.c_stream.data(b"c")
    assert p.relay.data_frame(last) is None
    assert payloads(events(p.relay, two[20:] + last)) == b"bc"
    assert p.relay.data_frame(p.c_stream.data(b"d")) is not None
    assert p.r_stream.received == 11
    bad = sp.HEADER.pack(sp.DATA, 1, 999) + b"x"
    with pytest.raises(sp.ProtocolError) as info:
        p.client.data_frame(bad)
    assert info.value.code == sp.E_IMPOSSIBLE_COUNTS
    with pytest.raises(sp.ProtocolError):
        p.client.next_event()  # sticky
