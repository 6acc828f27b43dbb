"""The sans-IO recovery machine (resilientsock/_machine.py): events in, verdicts out, no
sockets, an injected clock. Each test runs in microseconds."""

from __future__ import annotations

import pytest

from resilientsock import RetryPolicy, classify
from resilientsock._machine import (
    BROKEN,
    CLOSED,
    CONNECTED,
    EARLY_ANSWER,
    PASS_EOF,
    RECOVER,
    RECOVERING,
    RULES,
    SURFACE,
    TRANSITIONS,
    Drop,
    Episode,
    Machine,
    TokenBucket,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def drop(exc: BaseException, phase: str = "read", **facts: bool) -> Drop:
    info = classify(exc, phase=phase)
    assert info is not None
    return Drop(info, phase, **facts)


def machine(**fields: object) -> Machine:
    m = Machine(RetryPolicy(**fields), Clock())  # type: ignore[arg-type]
    m.detected = True  # no dialect: the byte rules
    return m


def test_the_transition_table_is_the_one_in_the_docstring():
    from resilientsock import _machine

    doc = _machine.__doc__ or ""
    for (state, event), target in TRANSITIONS.items():
        if state == BROKEN and event in ("interrupted", "gave-up"):
            continue  # the same state again, not worth a row
        assert f"{state:<11} {event:<24} {target}" in doc, (state, event, target)


def test_an_unknown_transition_is_a_bug():
    m = machine()
    m.move("close")
    assert m.state is CLOSED
    with pytest.raises(RuntimeError):
        m.move("recover")  # closed is sticky
    m.move("close")


def test_rules_are_named_and_ordered():
    names = [name for name, *_ in RULES]
    assert names[:3] == ["read-timeout", "peer-not-reading", "early-answer"]
    assert len(set(names)) == len(names)


def test_an_unanswered_record_is_recovered():
    m = machine()
    m.wrote_data(b"MSG 1\n")
    verdict = m.drop(drop(ConnectionResetError(104, "reset")))
    assert verdict.kind == RECOVER and verdict.resume == 0


def test_a_read_timeout_is_surfaced_quietly_and_keeps_everything():
    m = machine()
    m.wrote_data(b"REQ\n")
    verdict = m.drop(drop(TimeoutError("timed out")))
    assert verdict.kind == SURFACE and verdict.quiet and not verdict.discard
    assert m.journal.size == 4


def test_retry_read_timeouts_recovers_them():
    m = machine(retry_read_timeouts=True)
    m.wrote_data(b"REQ\n")
    assert m.drop(drop(TimeoutError("timed out"))).kind == RECOVER


def test_a_write_timeout_recovers_unless_the_peer_is_merely_not_reading():
    m = machine()
    assert m.drop(drop(TimeoutError("timed out"), "write", writing=True)).kind == RECOVER
    verdict = m.drop(drop(TimeoutError("timed out"), "write", writing=True,
                          peer_not_reading=True))
    assert verdict.kind == SURFACE and not verdict.discard


def test_an_early_answer_is_delivered_not_replayed():
    m = machine()
    verdict = m.drop(drop(BrokenPipeError(32, "broken pipe"), "write", writing=True,
                          early_answer=True))
    assert verdict.kind == EARLY_ANSWER


def test_mid_answer_resumes_with_k_or_is_surfaced_when_resume_is_off():
    m = machine()
    m.wrote_data(b"GET\n")
    m.read_data(b"ACK ", m.journal.mark())
    verdict = m.drop(drop(ConnectionResetError(104, "reset")))
    assert verdict.kind == RECOVER and verdict.resume == 4
    assert m.journal.kept_bytes == 4  # the request is kept to be re-sent

    off = machine(resume_answers=False)
    off.wrote_data(b"GET\n")
    off.read_data(b"ACK ", off.journal.mark())
    verdict = off.drop(drop(ConnectionResetError(104, "reset")))
    assert verdict.kind == SURFACE and verdict.discard and "mid-answer" in verdict.note


def test_the_next_write_ends_the_answer():
    m = machine()
    m.wrote_data(b"A\n")
    m.read_data(b"ok\n", m.journal.mark())
    m.wrote_data(b"B\n")
    assert m.answered == 0 and m.journal.kept_bytes == 0 and len(m.journal) == 1


@pytest.mark.parametrize("mode,expect", [("none", SURFACE), ("safe", SURFACE),
                                         ("unanswered", RECOVER)])
def test_replay_modes(mode, expect):
    m = machine(replay=mode)
    m.wrote_data(b"A\n")
    m.wrote_data(b"B\n")
    assert m.drop(drop(ConnectionResetError(104, "reset"))).kind == expect


def test_replay_safe_resends_the_first_write_on_a_reused_connection():
    m = machine(replay="safe")
    m.wrote_data(b"A\n")
    m.read_data(b"ok\n", m.journal.mark())
    m.wrote_data(b"B\n")
    assert m.drop(drop(ConnectionResetError(104, "reset"))).kind == RECOVER


def test_eof_rules():
    m = machine()
    assert m.eof(100, others_active=False).kind == PASS_EOF  # nothing unanswered: the end
    m.wrote_data(b"BYE\n")
    outcome = m.eof(100, others_active=False)
    assert isinstance(outcome, Drop)
    assert m.drop(outcome).kind == RECOVER
    again = m.eof(100, others_active=False)  # the same record met EOF again: an answer
    assert again.kind == PASS_EOF and again.rule == "eof-repeat" and not m.journal.pending
    m.wrote_data(b"X\n")
    assert isinstance(m.eof(100, others_active=False), Drop)
    assert m.eof(0, others_active=False).kind == PASS_EOF  # recv(0) asks for nothing


def test_an_unrecoverable_unanswered_eof_is_passed_on():
    m = machine(replay="none")
    m.wrote_data(b"A\n")
    outcome = m.eof(10, others_active=False)
    assert isinstance(outcome, Drop)
    assert m.drop(outcome).kind == PASS_EOF


def test_not_retryable_errors_are_surfaced_and_discard():
    import ssl

    m = machine()
    exc = ssl.SSLCertVerificationError("bad cert")
    info = classify(exc, phase="read")
    assert info is not None
    verdict = m.drop(Drop(info, "read"))
    assert verdict.kind == SURFACE and verdict.discard


def test_a_server_session_is_surfaced_without_a_hook():
    m = machine()
    m.read_data(b"220 ready\r\n", m.journal.mark())  # a banner: server-first
    m.wrote_data(b"EHLO x\r\n")
    m.read_data(b"250 ok\r\n", m.journal.mark())  # ...answered: a session exists
    m.wrote_data(b"MAIL FROM:<a>\r\n")
    assert m.drop(drop(ConnectionResetError(104, "reset"))).rule == "server-session"
    hooked = machine(on_reconnect=lambda s, a: None)
    hooked.read_data(b"220 ready\r\n", 0)
    hooked.wrote_data(b"EHLO x\r\n")
    hooked.read_data(b"250 ok\r\n", hooked.journal.mark())
    hooked.wrote_data(b"MAIL\r\n")
    assert hooked.drop(drop(ConnectionResetError(104, "reset"))).kind == RECOVER


def test_an_episode_spends_attempts_and_time_and_names_the_app_timeout():
    clock = Clock()
    ep = Episode(RetryPolicy(deadline=10, max_attempts=3), clock, None)
    assert not ep.spent(None, None)
    ep.attempts = 3
    assert ep.spent(None, None)
    ep = Episode(RetryPolicy(deadline=10), clock, ConnectionResetError())
    clock.now += 2
    assert ep.spent(call_end=101.5, app_timeout=1.5)
    assert "socket's timeout of 1.5 s ran out" in ep.describe()
    clock.now += 20
    assert ep.spent(None, None)


def test_a_long_healthy_connection_starts_a_fresh_episode():
    m = machine(deadline=2)
    clock = m.clock
    first = m.begin_episode(ConnectionResetError())
    first.up_since = clock()
    assert m.begin_episode(ConnectionResetError()) is first  # a poison record: same budget
    clock.now += 3  # type: ignore[attr-defined]
    assert m.begin_episode(ConnectionResetError()) is not first


def test_an_answer_ends_the_episode():
    m = machine()
    m.begin_episode(ConnectionResetError())
    m.wrote_data(b"A\n")
    m.read_data(b"ok\n", m.journal.mark())
    assert m.episode is None


def test_the_token_bucket_lets_a_lone_drop_through_and_spreads_a_herd():
    clock = Clock()
    bucket = TokenBucket(clock)
    assert bucket.delay(100.0) == 0.0
    delays = [bucket.delay(100.0) for _ in range(30)]
    assert delays[:9] == [0.0] * 9  # burst of rate/10
    assert delays[-1] == pytest.approx(0.21)
    clock.now += 10
    assert bucket.delay(100.0) == 0.0  # refilled


def test_states_after_recovery_events():
    m = machine()
    m.move("recover")
    assert m.state is RECOVERING
    m.reconnected(resumed=False)
    assert m.state is CONNECTED and m.gen == 1
    m.move("surface-discard")
    assert m.state is BROKEN


def test_a_reset_that_meets_the_same_resent_records_again_is_the_servers_answer():
    from resilientsock._machine import POISON_CAP

    m = machine()
    m.wrote_data(b"REQ\n")
    m.begin_episode(ConnectionResetError())
    verdicts = []
    for _ in range(POISON_CAP + 1):  # each drop on a fresh connection before any answer
        verdicts.append(m.drop(drop(ConnectionResetError(104, "reset"))))
        m.move("recover")
        m.reconnected(resumed=False)
    assert [v.kind for v in verdicts[:POISON_CAP]] == [RECOVER] * POISON_CAP
    assert verdicts[-1].kind == SURFACE and verdicts[-1].rule == "poison"


def test_a_poison_request_is_remembered_so_a_clients_own_retry_is_not_resent_again():
    """redis-py's own Retry sends the same bytes on a new socket after we surfaced a poison
    reset: that drop surfaces at once (layered retries do not multiply, docs/design.md §9), for the
    same peer and bytes only, for one deadline."""
    from resilientsock._machine import POISON_CAP, PoisonMemory

    clock = Clock()
    memory = PoisonMemory(clock)

    def fresh(target: object, data: bytes) -> Machine:
        m = Machine(RetryPolicy(deadline=8), clock, memory)
        m.detected = True
        m.target = target
        m.wrote_data(data)
        return m

    first = fresh(("db", 6379), b"PING\r\n")
    first.begin_episode(ConnectionResetError())
    for _ in range(POISON_CAP + 1):
        verdict = first.drop(drop(ConnectionResetError(104, "reset")))
        first.move("recover")
        first.reconnected(resumed=False)
    assert verdict.rule == "poison"

    retry = fresh(("db", 6379), b"PING\r\n")  # the library's retry: a new socket
    verdict = retry.drop(drop(ConnectionResetError(104, "reset")))
    assert (verdict.kind, verdict.rule, verdict.discard) == (SURFACE, "poison", True)
    assert "earlier connection" in verdict.note
    # Other bytes, another peer, or an answer byte on the connection: recovered as before.
    assert fresh(("db", 6379), b"GET k\r\n").drop(drop(ConnectionResetError())).kind == RECOVER
    assert fresh(("db", 6380), b"PING\r\n").drop(drop(ConnectionResetError())).kind == RECOVER
    answered = fresh(("db", 6379), b"PING\r\n")
    answered.read_data(b"+PONG\r\n", answered.journal.mark())
    answered.wrote_data(b"PING\r\n")
    assert answered.drop(drop(ConnectionResetError())).kind == RECOVER
    clock.now += 8.0  # one deadline later the server may have been fixed
    assert fresh(("db", 6379), b"PING\r\n").drop(drop(ConnectionResetError())).kind == RECOVER


def test_the_poison_memory_is_bounded():
    from resilientsock._machine import PoisonMemory

    memory = PoisonMemory(Clock(), size=4)
    for i in range(10):
        memory.remember(("h", i), 30.0)
    assert len(memory.seen) == 4
    assert not memory.recalls(("h", 0)) and memory.recalls(("h", 9))


def http_machine(**fields: object) -> Machine:
    """A machine whose dialect is HTTP (detected from the first write)."""
    m = Machine(RetryPolicy(**fields), Clock())  # type: ignore[arg-type]
    return m


GET = b"GET /blob HTTP/1.1\r\nHost: x\r\n\r\n"
HEAD_100 = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"


def test_an_eof_that_cuts_a_framed_answer_is_resumed_once_per_cut_point():
    """§5b for an EOF: the dialect's framing says the answer is longer, so the EOF cut it."""
    m = http_machine()
    m.wrote_data(GET)
    assert m.dialect is not None and m.dialect.name == "http"
    m.read_data(HEAD_100 + b"x" * 40, m.journal.mark())
    outcome = m.eof(65536, others_active=False)
    assert isinstance(outcome, Drop) and outcome.cut
    verdict = m.drop(outcome)
    assert verdict.kind == RECOVER and verdict.resume == len(HEAD_100) + 40
    # the same cut again with no byte more is the server's answer: the EOF is passed on
    again = m.eof(65536, others_active=False)
    assert again.kind == PASS_EOF and again.rule == "end"
    # a byte more, then a cut: resumed again
    m.read_data(b"y", m.journal.mark())
    assert isinstance(m.eof(65536, others_active=False), Drop)


def test_an_eof_after_a_complete_or_close_delimited_answer_ends_it():
    m = http_machine()
    m.wrote_data(GET)
    m.read_data(HEAD_100 + b"x" * 100, m.journal.mark())
    assert m.eof(65536, others_active=False).kind == PASS_EOF  # complete: the normal end
    m = http_machine()
    m.wrote_data(GET)
    m.read_data(b"HTTP/1.0 200 OK\r\n\r\nbody until close", m.journal.mark())
    assert m.eof(65536, others_active=False).kind == PASS_EOF  # RFC 9112 §6.3 rule 8


@pytest.mark.parametrize("fields, write", [
    ({"resume_answers": False}, GET),
    ({"replay": "safe"}, GET),
    ({"eof": "pass"}, GET),
    ({}, b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"),
])
def test_a_cut_answer_that_may_not_be_resumed_ends_with_the_eof_as_before(fields, write):
    m = http_machine(**fields)
    m.wrote_data(write)
    m.read_data(HEAD_100 + b"x" * 40, m.journal.mark())
    outcome = m.eof(65536, others_active=False)
    if isinstance(outcome, Drop):
        outcome = m.drop(outcome)
    assert outcome.kind == PASS_EOF and outcome.rule == "end"


def test_unknown_protocols_keep_the_eof_after_an_answer_byte():
    m = machine()
    m.wrote_data(b"GET 1\n")
    m.read_data(b"ANS", m.journal.mark())
    assert m.eof(100, others_active=False).kind == PASS_EOF


def test_the_backoff_restarts_when_the_server_is_back_after_an_outage():
    """A 1 s refusal grew the schedule to uniform(0, 3.2 s); the server is back (the next
    attempt connected, then met a reset): the next wait is the schedule's first again, not
    up to backoff_max (found by the http.server row: 5 s app timeout spent asleep)."""
    ep = Episode(RetryPolicy(), Clock(), ConnectionResetError())

    class Bucket:
        def delay(self, rate: float) -> float:
            return 0.0

    ep.attempts = 7
    for _ in range(7):
        ep.attempted(reached=False, gone=True)
    assert ep.delay(Bucket(), rand=lambda: 1.0) == pytest.approx(3.2)  # attempt 7's ceiling
    ep.attempted(reached=True, gone=False)
    # restarted: the schedule's first jittered wait (every wait after a failure is jittered)
    assert ep.delay(Bucket(), rand=lambda: 1.0) == pytest.approx(0.05)
    ep.attempts += 1
    ep.attempted(reached=True, gone=False)  # reached again: no second restart for that
    assert ep.delay(Bucket(), rand=lambda: 1.0) == pytest.approx(0.1)
    for _ in range(5):  # a server flapping: at most POISON_CAP restarts an episode
        ep.attempted(reached=False, gone=True)
        ep.attempted(reached=True, gone=False)
    assert ep.restarts == 3


def test_a_half_close_under_a_writer_is_passed_on_and_its_later_write_error_surfaced():
    """docs/design.md §5: a half-close is not a drop (w7). The socket found the peer alive after its
    FIN: the EOF goes to the reader, and the writer's error when the peer stops reading is
    the plain one (the connection discarded, nothing re-sent)."""
    m = machine()
    m.wrote_data(b"PUT /big\n")
    assert isinstance(m.eof(100, others_active=True), Drop)  # not asked: a drop, as before
    assert isinstance(m.eof(100, others_active=True, peer_alive=False), Drop)  # a reset
    verdict = m.eof(100, others_active=True, peer_alive=True)
    assert verdict.kind == PASS_EOF and verdict.rule == "half-close"
    assert m.eof(100, others_active=False).rule == "half-close"  # every later read too
    v = m.drop(drop(BrokenPipeError(32, "Broken pipe"), "write", writing=True))
    assert v.kind == SURFACE and v.rule == "half-closed" and v.discard
    m.discarded()  # the connection goes; the next one starts afresh
    assert not m.half_closed


def test_full_duplex_on_a_line_protocol_confirms_by_answer_lines():
    """Issue 24: a writer streams lines while another greenlet reads per-line answers. A read
    that returns answer line k confirms the first k request lines only (not every record
    written before the read began: those may still be in flight), and a drop resumes the
    answer line the reader has begun."""
    m = machine()
    m.reading = 1  # a reader waits while the writer writes: full duplex
    m.wrote_data(b"L 1\n")
    m.wrote_data(b"L 2\n")
    m.wrote_data(b"L 3\n")
    assert m.duplex and m.lines is not None
    m.reading = 0
    mark = m.journal.mark()  # this read began after all three writes
    m.read_data(b"A 1\n", mark)
    assert len(m.journal) == 2  # lines 2 and 3 are unanswered
    m.read_data(b"A ", m.journal.mark())  # half of answer line 2
    v = m.drop(drop(ConnectionResetError(104, "reset"), "read"))
    assert v.kind == RECOVER and v.resume == 2  # its first 2 bytes are checked, not re-read
    assert m.journal.unconfirmed() == b"L 2\nL 3\n"
    outcome = m.eof(100, others_active=False)  # duplex: an EOF with records unanswered
    assert isinstance(outcome, Drop)  # is a drop even after answer bytes


def test_more_answer_lines_than_request_lines_stops_line_counting():
    m = machine()
    m.reading = 1
    m.wrote_data(b"GET\n")
    m.reading = 0
    m.read_data(b"line 1\nline 2\n", m.journal.mark())
    assert m.lines is None and m.lines_off  # not one answer line per request line
    assert not m.journal.pending  # the answer rule confirmed it


def test_a_writer_started_first_has_its_lines_counted_before_duplex_is_seen():
    """The writer hands lines to the kernel before the reader runs; the reader's first read
    (the writer blocked in a write) shows full duplex. The answer rule would confirm all
    five lines there (the read began after them): line counting, on from the first write,
    confirms the one answered."""
    m = machine()
    for n in range(1, 6):
        m.wrote_data(b"L %d\n" % n)
    assert not m.duplex and m.lines is not None
    m.writing = 1  # the writer is blocked in its next write
    m.read_data(b"A 1\n", m.journal.mark())
    assert m.duplex
    assert len(m.journal) == 4  # lines 2-5 are still unanswered


def test_lines_are_not_counted_for_a_binary_stream():
    m = machine()
    m.wrote_data(b"\x00\x01binary")
    assert m.lines is None and m.lines_off
