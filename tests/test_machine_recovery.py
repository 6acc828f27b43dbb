"""The recovery loop of the sans-IO machine (resilientsock/_machine.py, rule 7), driven without
sockets: the machine says what to do (actions), the test answers as the socket would (a
connect that worked or failed, a step done), an injected clock moves only when the machine
says Wait. Each test runs in microseconds."""

from __future__ import annotations

import errno
import socket
import ssl

import pytest

from resilientsock import RetryPolicy, classify
from resilientsock._answer import _AnswerChanged, _CutNotResumed
from resilientsock._errors import UnansweredEOFError
from resilientsock._machine import (
    BROKEN,
    CLOSED,
    CONNECTED,
    CUT_RETRY,
    FINAL_MARGIN,
    RECOVERING,
    Abandon,
    AnswerCheck,
    AskPeer,
    Connect,
    Connected,
    CountAcked,
    Done,
    Failed,
    FindFacts,
    GiveUp,
    HandOver,
    Handshake,
    Machine,
    PassEOF,
    Raise,
    ReadAgain,
    Recover,
    Replay,
    Resume,
    Retry,
    RunHook,
    SkipBanner,
    Stop,
    Surface,
    TokenBucket,
    Wait,
)

START = 100.0


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


def machine(clock: Clock | None = None, detect: bool = False, **fields: object) -> Machine:
    m = Machine(RetryPolicy(**fields), clock or Clock())  # type: ignore[arg-type]
    m.detected = not detect  # detect=False: no dialect, the byte rules
    return m


def refused() -> Failed:
    exc = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    return Failed(exc, classify(exc, phase="connect"))


def reset() -> ConnectionResetError:
    return ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")


ENDS = (Done, GiveUp, Stop)


def drive(m: Machine, steps, answer=lambda action: None) -> list:
    """Run a recovery as the socket would: Wait moves the clock; every other step is answered
    by ``answer`` (default: a connect works, every other step is done). Returns the actions."""
    clock = m.clock
    assert isinstance(clock, Clock)
    trace = []
    result = None
    while True:
        action = steps.send(result)
        trace.append(action)
        if isinstance(action, ENDS):
            return trace
        if isinstance(action, Wait):
            assert action.seconds >= 0
            clock.now += action.seconds
            result = None
            continue
        result = answer(action)
        if result is None and isinstance(action, Connect):
            result = Connected(fresh=True)


def kinds(trace: list) -> list[str]:
    return [type(a).__name__ for a in trace]


def write_error(m: Machine, exc: BaseException, **facts: bool):
    """What ``error`` and ``judge`` decide for a write that raised ``exc`` (no facts found)."""
    step = m.error(exc, "write", m.gen, True, closed=False, nonblocking=False,
                   reader_waiting=False)
    assert isinstance(step, FindFacts)
    from dataclasses import replace

    return m.judge(replace(step.drop, **facts), m.gen)


# -- an error, then a recovery ------------------------------------------------------------------

def test_a_write_error_then_a_connect_replays_exactly_the_unanswered_records():
    m = machine()
    m.wrote_data(b"A 1\n")
    m.read_data(b"ok 1\n", m.journal.mark())  # answered: confirmed, never re-sent
    m.wrote_data(b"B 2\n")
    m.wrote_data(b"C 3\n")
    gen = m.gen
    exc = reset()
    step = m.error(exc, "write", gen, True, closed=False, nonblocking=False,
                   reader_waiting=False)
    # A reset on a write: the socket is asked whether the peer's bytes wait (early answer).
    assert isinstance(step, FindFacts) and step.early and not step.not_reading
    verdict = m.judge(step.drop, gen)
    assert isinstance(verdict, Recover) and verdict.resume == 0
    steps = m.recover(exc, None, None, bucket=TokenBucket(m.clock))
    assert m.state is RECOVERING
    trace = drive(m, steps)
    assert kinds(trace) == ["Abandon", "Connect", "Handshake", "Replay", "Done"]
    connect, replay, done = trace[1], trace[3], trace[4]
    assert connect.limit == 10.0 and not connect.in_place and connect.counted
    assert bytes(replay.payload) == b"B 2\nC 3\n" and replay.records == 2
    assert done.reconnected and done.attempts == 1
    assert m.state is CONNECTED and m.gen == gen + 1 and not m.dead
    assert m.journal.pending  # still unconfirmed on the new connection, until answered


def test_an_early_answer_is_delivered_and_nothing_is_resent():
    m = machine()
    m.wrote_data(b"PUT /big\n")
    step = write_error(m, reset(), early_answer=True)
    assert isinstance(step, Surface) and step.verdict.rule == "early-answer"
    assert not step.verdict.discard and m.state is CONNECTED  # the answer is read there


def test_refused_connects_until_the_deadline_give_up_with_a_note_naming_the_attempts():
    m = machine(deadline=2.0)
    m.wrote_data(b"GET 1\n")
    exc = reset()
    steps = m.recover(exc, None, None, bucket=TokenBucket(m.clock), rand=lambda: 1.0)
    connects: list[float] = []

    def answer(action):
        if isinstance(action, Connect):
            connects.append(m.clock())
            return refused()
        return None

    trace = drive(m, steps, answer)
    end = trace[-1]
    assert isinstance(end, GiveUp) and not end.cut
    assert end.error is exc  # the original drop's type, as the plain socket raised it
    assert isinstance(end.cause, ConnectionRefusedError)  # the last attempt's error
    assert end.attempts == len(connects) >= 5
    assert end.note.startswith(f"gave up after {len(connects)} attempts in 2.0 s (last: ")
    assert "refused" in end.note
    # The last attempt was made just before the budget ended, then the rest slept out.
    assert connects[-1] == pytest.approx(START + 2.0 - FINAL_MARGIN)
    assert m.clock() == pytest.approx(START + 2.0)
    assert m.state is BROKEN and m.dead and not m.journal.pending


def test_the_applications_timeout_bounds_the_attempts_and_names_itself():
    m = machine()
    m.wrote_data(b"GET 1\n")
    steps = m.recover(reset(), START + 0.5, 0.5, bucket=TokenBucket(m.clock), rand=lambda: 1.0)
    trace = drive(m, steps, lambda a: refused() if isinstance(a, Connect) else None)
    end = trace[-1]
    assert isinstance(end, GiveUp)
    assert "the socket's timeout of 0.5 s ran out" in end.note
    assert m.clock() == pytest.approx(START + 0.5)
    # every connect got at most what was left of the call
    assert all(a.limit <= 0.5 for a in trace if isinstance(a, Connect))


def test_a_final_margin_near_the_deadline_gives_up_instead_of_starting_an_attempt():
    m = machine(deadline=1.0)
    m.wrote_data(b"GET 1\n")
    steps = m.recover(reset(), None, None, bucket=TokenBucket(m.clock), rand=lambda: 1.0)

    def answer(action):
        if isinstance(action, Connect):
            m.clock.now = START + 1.0 - FINAL_MARGIN / 2  # the attempt took almost all of it
            return refused()
        return None

    trace = drive(m, steps, answer)
    assert kinds(trace) == ["Abandon", "Connect", "Wait", "GiveUp"]
    assert trace[2].seconds == pytest.approx(FINAL_MARGIN / 2)  # slept out, no attempt


def test_a_wait_that_outlasts_the_budget_makes_one_last_attempt_before_it_ends():
    m = machine(deadline=1.0, backoff_initial=5.0)
    m.wrote_data(b"GET 1\n")
    steps = m.recover(reset(), None, None, bucket=TokenBucket(m.clock), rand=lambda: 1.0)
    trace = drive(m, steps, lambda a: refused() if isinstance(a, Connect) else None)
    assert kinds(trace) == ["Abandon", "Connect", "Wait", "Connect", "Wait", "GiveUp"]
    assert trace[2].seconds == pytest.approx(1.0 - FINAL_MARGIN)  # not the 5 s backoff
    assert trace[4].seconds == pytest.approx(FINAL_MARGIN)
    assert trace[-1].attempts == 2


def test_a_connect_that_works_after_refusals_is_published_and_replays():
    m = machine()
    m.wrote_data(b"GET 1\n")
    answers = iter([refused(), refused(), None])

    def answer(action):
        return next(answers) if isinstance(action, Connect) else None

    trace = drive(m, m.recover(reset(), None, None, bucket=TokenBucket(m.clock),
                               rand=lambda: 0.5), answer)
    assert kinds(trace) == ["Abandon", "Connect", "Wait", "Connect", "Wait", "Connect",
                            "Handshake", "Replay", "Done"]
    assert trace[-1].attempts == 3 and m.state is CONNECTED


# -- what is not recovered -------------------------------------------------------------------------

INCR = b"*2\r\n$4\r\nINCR\r\n$1\r\nk\r\n"


def test_a_non_idempotent_request_is_surfaced_and_the_socket_is_dead():
    m = machine(detect=True)
    m.wrote_data(INCR)
    assert m.dialect is not None and m.dialect.name == "resp"
    step = m.error(reset(), "read", m.gen, False, closed=False, nonblocking=False,
                   reader_waiting=False)
    assert isinstance(step, FindFacts)
    verdict = m.judge(step.drop, m.gen)
    assert isinstance(verdict, Surface) and verdict.verdict.rule == "not-idempotent"
    assert "INCR" in verdict.verdict.note and verdict.verdict.discard
    assert m.state is BROKEN and m.dead and not m.journal.pending  # nothing re-sent, ever


def test_a_non_idempotent_request_cut_by_an_eof_passes_the_eof_on_and_warns():
    m = machine(detect=True)
    m.wrote_data(INCR)
    step = m.eof_seen(m.gen, 65536, closed=False, nonblocking=False)
    assert isinstance(step, PassEOF) and step.verdict.rule == "not-idempotent"
    assert step.discard and step.report == "surfaced" and step.warn
    assert m.state is BROKEN and not m.journal.pending


def test_permanent_errors_are_surfaced_at_once():
    m = machine()
    m.wrote_data(b"GET 1\n")
    cert = ssl.SSLCertVerificationError("certificate verify failed")
    step = write_error(m, cert)
    assert isinstance(step, Surface) and step.verdict.rule == "not-retryable"
    assert m.state is BROKEN
    # An error that is no connection problem is raised as it is, the connection kept.
    m = machine()
    m.wrote_data(b"GET 1\n")
    assert m.error(ValueError("bad"), "write", m.gen, True, closed=False, nonblocking=False,
                   reader_waiting=False) == Raise()
    assert m.state is CONNECTED and m.journal.pending
    # A reconnect that meets a permanent error gives up after that one attempt.
    m = machine()
    m.wrote_data(b"GET 1\n")
    gone = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    trace = drive(m, m.recover(reset(), None, None, bucket=TokenBucket(m.clock)),
                  lambda a: Failed(gone, classify(gone, phase="connect"))
                  if isinstance(a, Connect) else None)
    assert kinds(trace) == ["Abandon", "Connect", "GiveUp"]
    assert trace[-1].note.endswith("; that error is not retried")


def test_a_nonblocking_or_closed_socket_raises_and_another_greenlets_recovery_is_joined():
    m = machine()
    m.wrote_data(b"GET 1\n")
    args = dict(closed=False, nonblocking=False, reader_waiting=False)
    assert m.error(reset(), "read", m.gen, False, **{**args, "nonblocking": True}) == Raise()
    assert m.error(reset(), "read", m.gen, False, **{**args, "closed": True}) == Raise()
    assert m.error(reset(), "read", m.gen - 1, False, **args) == Retry()  # moved on
    m.move("recover")
    assert m.error(reset(), "read", m.gen, False, **args) == Retry()  # being recovered
    m.move("gave-up")
    assert m.error(reset(), "read", m.gen, False, **args) == Raise()  # broken: so is this


def test_an_interrupted_write_discards_unless_another_greenlet_reads():
    class Interrupt(BaseException):
        pass

    m = machine()
    m.wrote_data(b"GET 1\n")
    args = dict(closed=False, nonblocking=False)
    assert m.error(Interrupt(), "read", m.gen, False, reader_waiting=False, **args) == Raise()
    assert m.state is CONNECTED  # a read interrupted: everything kept, as plain keeps it
    assert m.error(Interrupt(), "write", m.gen, True, reader_waiting=True,
                   **args) == HandOver()
    assert m.state is CONNECTED
    assert m.error(Interrupt(), "write", m.gen, True, reader_waiting=False,
                   **args) == Raise(discard=True)
    assert m.state is BROKEN and not m.journal.pending


def test_a_write_timeout_asks_whether_the_peer_reads():
    m = machine()
    m.wrote_data(b"GET 1\n")
    step = m.error(TimeoutError("timed out"), "write", m.gen, True, closed=False,
                   nonblocking=False, reader_waiting=False)
    assert isinstance(step, FindFacts) and step.not_reading and not step.early
    from dataclasses import replace

    verdict = m.judge(replace(step.drop, peer_not_reading=True), m.gen)
    assert isinstance(verdict, Surface) and verdict.verdict.rule == "peer-not-reading"
    assert m.state is CONNECTED  # kept: a new connection would not help


# -- EOF -------------------------------------------------------------------------------------------

def test_an_eof_after_the_answer_is_passed_on():
    m = machine()
    m.wrote_data(b"GET 1\n")
    m.read_data(b"ANSWER\n", m.journal.mark())
    step = m.eof_seen(m.gen, 100, closed=False, nonblocking=False)
    assert isinstance(step, PassEOF) and step.verdict.rule == "end" and not step.discard
    assert m.state is CONNECTED


def test_an_unanswered_eof_is_recovered_and_a_repeat_is_the_servers_answer():
    m = machine()
    m.wrote_data(b"GET 1\n")
    step = m.eof_seen(m.gen, 100, closed=False, nonblocking=False)
    assert isinstance(step, Recover) and isinstance(step.error, UnansweredEOFError)
    assert not step.cut
    drive(m, m.recover(step.error, None, None, bucket=TokenBucket(m.clock)))
    assert m.state is CONNECTED
    again = m.eof_seen(m.gen, 100, closed=False, nonblocking=False)
    assert isinstance(again, PassEOF) and again.verdict.rule == "eof-repeat"
    assert again.discard and again.report == "eof-repeat" and m.state is BROKEN


def test_an_eof_under_a_writer_asks_the_peer_and_a_half_close_is_passed_on():
    m = machine()
    m.wrote_data(b"PUT /big\n")
    m.writing = 1  # another greenlet is inside a write
    step = m.eof_seen(m.gen, 100, closed=False, nonblocking=False)
    assert step == AskPeer(idle=False, others=True, wait=1.0)
    half = m.eof_judge(m.gen, 100, step.others, alive=True)
    assert isinstance(half, PassEOF) and half.verdict.rule == "half-close"
    assert m.state is CONNECTED and m.journal.pending  # the writer goes on
    # ... and the writer's later error is the plain one, nothing re-sent
    verdict = write_error(m, BrokenPipeError(errno.EPIPE, "Broken pipe"))
    assert isinstance(verdict, Surface) and verdict.verdict.rule == "half-closed"
    assert m.state is BROKEN


def test_a_request_written_after_the_peers_fin_asks_the_peer_in_one_greenlet():
    """§5, a half-close in one greenlet: the socket saw the peer's FIN before the request's
    write (``fin_before``, with what the peer's TCP had acknowledged then). The EOF asks the
    peer: acknowledged (it still reads) → the EOF is passed on, nothing re-sent; reset → a
    drop, recovered. Without the FIN before the write, the EOF is a drop as before."""
    m = machine()
    m.fin_before = (m.gen, 7)
    m.wrote_data(b"MSG 2\n")
    step = m.eof_seen(m.gen, 100, closed=False, nonblocking=False)
    assert step == AskPeer(idle=False, others=False, wait=1.0, acked=7)
    half = m.eof_judge(m.gen, 100, step.others, alive=True)
    assert isinstance(half, PassEOF) and half.verdict.rule == "half-close"
    assert m.state is CONNECTED and m.half_closed
    reset = machine()
    reset.fin_before = (reset.gen, 7)
    reset.wrote_data(b"MSG 2\n")
    assert isinstance(reset.eof_seen(reset.gen, 100, closed=False, nonblocking=False), AskPeer)
    assert isinstance(reset.eof_judge(reset.gen, 100, False, alive=False), Recover)
    older = machine()
    older.fin_before = (older.gen - 1, 7)  # seen on an earlier connection: not this one's
    older.wrote_data(b"MSG 2\n")
    assert isinstance(older.eof_seen(older.gen, 100, closed=False, nonblocking=False), Recover)


def test_an_eof_under_a_writer_whose_connection_was_reset_is_a_drop():
    m = machine()
    m.wrote_data(b"PUT /big\n")
    m.writing = 1
    step = m.eof_seen(m.gen, 100, closed=False, nonblocking=False)
    assert isinstance(step, AskPeer)
    dropped = m.eof_judge(m.gen, 100, step.others, alive=False)
    assert isinstance(dropped, Recover)
    # The writer recovered while the peer was asked: read again on the new connection.
    m2 = machine()
    m2.wrote_data(b"PUT /big\n")
    m2.writing = 1
    gen = m2.gen
    drive(m2, m2.recover(reset(), None, None, bucket=TokenBucket(m2.clock)))
    assert m2.eof_judge(gen, 100, True, alive=None) == ReadAgain()


def test_an_eof_on_a_closed_or_nonblocking_socket_is_passed_on():
    m = machine()
    m.wrote_data(b"GET 1\n")
    assert m.eof_seen(m.gen, 100, closed=True, nonblocking=False).verdict.rule == "closed"
    assert m.eof_seen(m.gen, 100, closed=False,
                      nonblocking=True).verdict.rule == "non-blocking"
    assert m.eof_seen(m.gen - 1, 100, closed=False, nonblocking=False) == ReadAgain()


GET = b"GET /blob HTTP/1.1\r\nHost: x\r\n\r\n"
HEAD_100 = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"


def cut_answer() -> tuple[Machine, Recover]:
    m = machine(detect=True)
    m.wrote_data(GET)
    m.read_data(HEAD_100 + b"x" * 40, m.journal.mark())
    step = m.eof_seen(m.gen, 65536, closed=False, nonblocking=False)
    assert isinstance(step, Recover) and step.cut and step.resume == len(HEAD_100) + 40
    return m, step


def test_an_eof_cut_answer_is_resumed_softly_and_checked():
    m, step = cut_answer()
    steps = m.recover(step.error, None, None, resume=step.resume, soft=True,
                      bucket=TokenBucket(m.clock))
    old = HEAD_100 + b"x" * 40

    def answer(action):
        if isinstance(action, Resume):
            assert action.check.need == len(old)
            assert action.first_until == pytest.approx(START + 1.0)  # CUT_WAIT to its byte
            action.check.feed(old)  # the same answer again
        return None

    trace = drive(m, steps, answer)
    assert kinds(trace) == ["Abandon", "Connect", "Handshake", "Replay", "Resume", "Done"]
    assert bytes(trace[3].payload) == GET and m.state is CONNECTED
    assert m.answered == len(old)  # the caller reads on from where it was


def test_a_changed_answer_is_an_attempt_failure_and_a_soft_one_gives_the_eof_back():
    m, step = cut_answer()
    steps = m.recover(step.error, None, None, resume=step.resume, soft=True,
                      bucket=TokenBucket(m.clock))

    def answer(action):
        if isinstance(action, Resume):
            action.check.feed(HEAD_100 + b"y" * 40)  # another answer
        return None

    end = drive(m, steps, answer)[-1]
    assert isinstance(end, GiveUp) and end.cut and isinstance(end.error, _AnswerChanged)
    assert m.state is BROKEN


def test_a_soft_recovery_retries_refusals_for_cut_retry_only():
    m, step = cut_answer()
    steps = m.recover(step.error, None, None, resume=step.resume, soft=True,
                      bucket=TokenBucket(m.clock), rand=lambda: 1.0)
    end = drive(m, steps, lambda a: refused() if isinstance(a, Connect) else None)[-1]
    assert isinstance(end, GiveUp) and end.cut and isinstance(end.error, _CutNotResumed)
    assert m.clock() <= START + CUT_RETRY + 1e-9


def test_an_answer_check_compares_through_the_digest():
    from resilientsock._machine import new_digest

    d = new_digest()
    d.update(b"hello")
    check = AnswerCheck(5, d.intdigest())
    check.feed(b"hel")
    assert check.need == 2 and not check.matches()
    check.feed(b"lo")
    assert check.matches()


# -- hooks, first connects, close ---------------------------------------------------------------

def test_a_failing_on_reconnect_hook_fails_the_attempt_and_on_disconnect_is_advisory():
    seen = []
    m = machine(on_disconnect=lambda s, info: seen.append(info),
                on_reconnect=lambda s, n: None)
    m.wrote_data(b"GET 1\n")
    steps = m.recover(reset(), None, None, bucket=TokenBucket(m.clock))

    def answer(action):
        if isinstance(action, RunHook) and action.fatal:
            exc = ValueError("the hook broke")
            return Failed(exc, classify(exc, phase="connect"))
        return None

    trace = drive(m, steps, answer)
    assert kinds(trace) == ["RunHook", "Abandon", "Connect", "Handshake", "RunHook", "GiveUp"]
    assert not trace[0].fatal and trace[0].arg.category.value == "connection_lost"
    assert trace[4].fatal and trace[4].arg == 1  # on_reconnect(sock, attempts)
    assert trace[-1].note.endswith("; that error is not retried")
    assert m.state is BROKEN


def test_a_first_connect_in_place_is_no_episode_and_no_reconnect():
    m = machine()
    m.state = BROKEN  # not connected yet
    trace = drive(m, m.recover(None, None, None, first=True, in_place=True,
                               bucket=TokenBucket(m.clock)),
                  lambda a: Connected(fresh=False) if isinstance(a, Connect) else None)
    assert kinds(trace) == ["Connect", "Done"]  # no Abandon, no handshake: it did it all
    assert trace[0].in_place and not trace[0].counted
    assert not trace[-1].reconnected and m.episode is None and m.state is CONNECTED


def test_a_first_connect_refused_without_retry_connect_gives_up_at_once():
    m = machine(retry_connect=False)
    m.state = BROKEN
    trace = drive(m, m.recover(None, None, None, first=True, bucket=TokenBucket(m.clock)),
                  lambda a: refused() if isinstance(a, Connect) else None)
    assert kinds(trace) == ["Abandon", "Connect", "GiveUp"]
    assert isinstance(trace[-1].error, ConnectionRefusedError)  # its first error is the one


def test_close_during_a_wait_stops_the_recovery():
    m = machine()
    m.wrote_data(b"GET 1\n")
    steps = m.recover(reset(), None, None, bucket=TokenBucket(m.clock), rand=lambda: 1.0)
    assert isinstance(next(steps), Abandon)
    assert isinstance(steps.send(None), Connect)
    assert isinstance(steps.send(refused()), Wait)
    m.move("close")
    assert isinstance(steps.send(None), Stop)


def test_tcp_ack_confirms_first_and_a_banner_is_skipped_on_the_new_connection():
    m = machine(confirm="tcp-ack")
    m.read_data(b"220 hello\r\n", m.journal.mark())  # a banner before the first write
    m.wrote_data(b"NOOP\r\n")
    trace = drive(m, m.recover(reset(), None, None, bucket=TokenBucket(m.clock)))
    assert isinstance(trace[0], CountAcked)
    assert isinstance(trace[3], Handshake)
    assert isinstance(trace[4], SkipBanner) and trace[4].first == b"220 hello\r\n"
    assert isinstance(trace[5], Replay)


def test_a_reset_while_replaying_counts_as_a_poison_strike():
    m = machine()
    m.wrote_data(b"CRASH\n")

    def answer(action):
        if isinstance(action, Replay):
            exc = reset()
            return Failed(exc, classify(exc, phase="connect"))
        return None

    trace = drive(m, m.recover(reset(), None, None, bucket=TokenBucket(m.clock),
                               rand=lambda: 0.0), answer)
    end = trace[-1]
    assert isinstance(end, GiveUp) and "that is its answer" in end.note
    assert sum(isinstance(a, Replay) for a in trace) == 4  # POISON_CAP + 1 strikes


def test_an_interruption_inside_a_recovery_lets_the_connection_go():
    m = machine()
    m.wrote_data(b"GET 1\n")
    steps = m.recover(reset(), None, None, bucket=TokenBucket(m.clock))
    next(steps)
    assert m.abandon(exception=False)  # e.g. the application's gevent.Timeout
    assert m.state is BROKEN and not m.abandon(exception=True)
    m.move("close")
    assert m.state is CLOSED


# -- an early answer taken by a reader greenlet (the race the faster reconnect exposed) --------

def upload_answered_mid_write() -> Machine:
    """A reader greenlet blocked in recv before anything was written (its mark is 0); the
    writer sends a request line and a body; the server answers while the writer is inside
    its next write, and the reader takes the answer."""
    m = machine()
    m.wrote_data(b"PUT /big\n")
    m.wrote_data(b"A" * 65536)  # not a line protocol (line counting stops here)
    m.writing = 1  # the writer is inside its next sendall
    m.read_data(b"ERR 413 upload too large\n", 0)
    assert m.duplex and m.journal.pending  # the answer rule confirms nothing: read began first
    return m


def test_a_reset_met_by_the_reader_after_it_took_an_early_answer_resends_nothing():
    """The reader meets the server's reset first: before the fix it was judged a plain drop
    and the whole upload re-sent (the request ran 5 times: 1 + POISON_CAP + 1)."""
    m = upload_answered_mid_write()
    step = m.error(reset(), "read", m.gen, False, closed=False, nonblocking=False,
                   reader_waiting=False)
    assert isinstance(step, FindFacts)
    from dataclasses import replace

    verdict = m.judge(replace(step.drop, duplex=True), m.gen)
    assert isinstance(verdict, Surface), verdict
    assert verdict.verdict.rule == "answered-then-dropped"
    # Kept for the writer still inside its write on it (it gets its own error from it) ...
    assert not verdict.verdict.discard and m.state is CONNECTED
    # ... which is the same early answer: surfaced, nothing re-sent
    verdict = write_error(m, BrokenPipeError(errno.EPIPE, "Broken pipe"), duplex=True)
    assert isinstance(verdict, Surface) and verdict.verdict.rule == "early-answer"
    # and every later drop of that connection too, as long as it is the same write's
    for _ in range(3):
        step = m.error(reset(), "read", m.gen, False, closed=False, nonblocking=False,
                       reader_waiting=False)
        assert isinstance(m.judge(replace(step.drop, duplex=True), m.gen), Surface)


def test_a_write_error_after_the_reader_took_the_early_answer_is_that_early_answer():
    """The writer meets the error first, but the reader already took the answer, so nothing
    is left to peek at: still the early answer (before the fix: recovered, upload re-sent)."""
    m = upload_answered_mid_write()
    m.writing = 0  # the write call failed
    verdict = write_error(m, reset(), early_answer=False, duplex=True)
    assert isinstance(verdict, Surface) and verdict.verdict.rule == "early-answer"
    assert m.state is CONNECTED  # the reader's next read meets the connection's end ...
    step = m.error(reset(), "read", m.gen, False, closed=False, nonblocking=False,
                   reader_waiting=False)
    from dataclasses import replace

    assert isinstance(m.judge(replace(step.drop, duplex=True), m.gen), Surface)  # ... as is


def test_an_eof_met_by_the_reader_after_it_took_an_early_answer_is_passed_on():
    m = upload_answered_mid_write()
    step = m.eof_seen(m.gen, 100, closed=False, nonblocking=False)
    assert isinstance(step, AskPeer)
    verdict = m.eof_judge(m.gen, 100, step.others, alive=False)  # the reset behind the FIN
    assert isinstance(verdict, PassEOF) and verdict.verdict.rule == "answered-then-dropped"
    assert not verdict.discard and m.state is CONNECTED  # the writer is still on it


def test_an_answer_read_mid_write_stops_counting_once_that_write_completes():
    """Not an early answer once the write it arrived during is done: a later drop of a
    streaming (not line-shaped) duplex connection is recovered as before."""
    m = upload_answered_mid_write()
    m.writing = 0
    m.wrote_data(b"B" * 65536)  # that write completed; the stream goes on
    step = m.error(reset(), "read", m.gen, False, closed=False, nonblocking=False,
                   reader_waiting=False)
    from dataclasses import replace

    assert isinstance(m.judge(replace(step.drop, duplex=True), m.gen), Recover)
