"""RetryPolicy validation and the backoff schedule (pure: no sleeping), and the Journal."""

from __future__ import annotations

import pytest

from resilientsock import RetryPolicy
from resilientsock._journal import Journal


def test_defaults_and_repr():
    p = RetryPolicy()
    assert (p.deadline, p.max_attempts, p.backoff_initial, p.backoff_multiplier,
            p.backoff_max) == (30.0, None, 0.05, 2.0, 5.0)
    assert (p.replay, p.confirm, p.journal_limit, p.dead_peer_timeout, p.eof) == (
        "idempotent", "answer", 16 * 1024 * 1024, 30.0, "unanswered-is-drop")
    assert p.retry_connect is True and p.retry_read_timeouts is False
    assert "deadline=30.0" in repr(p)
    with pytest.raises(AttributeError):
        p.deadline = 1  # type: ignore[misc]


@pytest.mark.parametrize("field,value", [
    ("deadline", -1), ("deadline", 0), ("backoff_multiplier", 0), ("backoff_multiplier", 0.5),
    ("backoff_initial", -0.1), ("backoff_max", 0.01), ("max_attempts", 0),
    ("max_attempts", 1.5), ("replay", "always"), ("confirm", "maybe"), ("eof", "ignore"),
    ("journal_limit", -1), ("reconnect_rate", 0), ("retry_connect", "yes"),
    ("on_reconnect", 42), ("dead_peer_timeout", float("nan")),
])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"RetryPolicy.{field}"):
        RetryPolicy(**{field: value})


def test_deadline_none_needs_max_attempts():
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(deadline=None)
    assert RetryPolicy(deadline=None, max_attempts=3).max_attempts == 3


def test_replace_rejects_unknown_fields():
    with pytest.raises(TypeError, match="no field.*dedline"):
        RetryPolicy().replace(dedline=3)  # type: ignore[call-arg]


def test_first_reconnect_is_immediate_then_full_jitter_capped():
    p = RetryPolicy(backoff_initial=0.1, backoff_multiplier=2, backoff_max=1.0)
    assert p.backoff(0, rand=lambda: 1.0) == 0.0
    assert [p.backoff(n, rand=lambda: 1.0) for n in range(1, 7)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert p.backoff(3, rand=lambda: 0.5) == pytest.approx(0.2)
    assert p.backoff(5000, rand=lambda: 1.0) == 1.0  # no overflow
    assert p.backoff(4, rand=lambda: 0.0) == 0.0  # jitter reaches down to zero


def test_from_env_and_its_errors():
    p = RetryPolicy.from_env({"RESILIENTSOCK_DEADLINE": "2", "RESILIENTSOCK_REPLAY": "safe",
                              "RESILIENTSOCK_JOURNAL_LIMIT": "1MiB",
                              "RESILIENTSOCK_DEAD_PEER_TIMEOUT": "none",
                              "RESILIENTSOCK_RETRY_READ_TIMEOUTS": "yes"})
    assert (p.deadline, p.replay, p.journal_limit, p.dead_peer_timeout,
            p.retry_read_timeouts) == (2.0, "safe", 1 << 20, None, True)
    with pytest.raises(ValueError, match="RESILIENTSOCK_DEADLINE"):
        RetryPolicy.from_env({"RESILIENTSOCK_DEADLINE": "soon"})
    with pytest.raises(ValueError, match="deadline"):
        RetryPolicy.from_env({"RESILIENTSOCK_DEADLINE": "-5"})


def test_journal_confirm_by_answer_mark():
    j = Journal(limit=100)
    j.append(b"aa")
    mark = j.mark()
    j.append(b"bbb")
    assert j.confirm_before(mark) == 1
    assert j.records() == [b"bbb"] and j.size == 3 and j.pending
    j.confirm_all()
    assert not j.pending and j.size == 0


def test_journal_copies_mutable_buffers():
    j = Journal(limit=100)
    buf = bytearray(b"abc")
    j.append(memoryview(buf))
    buf[0] = ord("X")
    assert j.records() == [b"abc"]


def test_journal_holds_a_large_bytes_record_by_reference_and_copies_mutable_ones():
    # docs/design.md §12 (issue 28): an immutable record is not copied on the write path.
    big = b"q" * 65536
    j = Journal(limit=1 << 20)
    j.append(big)
    assert j.with_kept() is big and j.unconfirmed() is big
    buf = bytearray(b"m" * 65536)  # a mutable buffer the caller reuses: copied
    j.append(buf)
    j.append(memoryview(buf)[:3000])
    buf[:] = b"Z" * 65536
    j.append(b"small\n")
    assert j.records() == [big, b"m" * 65536, b"m" * 3000, b"small\n"]
    assert j.last_byte() == b"\n"
    mark = j.mark()
    j.append(big)
    j.confirm_before(mark - 1)  # the first three answered: kept for resume
    assert j.kept_bytes == 2 * 65536 + 3000
    assert j.with_kept() == big + b"m" * 65536 + b"m" * 3000 + b"small\n" + big
    assert j.unconfirmed() == b"small\n" + big
    j.end_answer()  # trimmed at a record end: referenced records go whole
    assert j.with_kept() == b"small\n" + big and j.records() == [b"small\n", big]
    j.confirm_all()
    assert not j.pending and j.with_kept() == b"" and j.last_byte() == b""


def test_journal_heap_with_large_mutable_records_stays_near_the_payload():
    import tracemalloc

    j = Journal(limit=8 << 20)
    buf = bytearray(b"r" * 4000)
    tracemalloc.start()
    for _ in range(1000):
        j.append(buf)  # copied (mutable), 4 MB in all
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert j.size == 4_000_000
    assert held <= 1.5 * j.size


def test_journal_overflow_stops_promising_until_everything_is_confirmed():
    j = Journal(limit=10)
    j.append(b"12345")
    j.append(b"678901")  # 11 > 10
    assert j.overflowed and j.pending and j.records() == []
    j.append(b"x")
    mark_before_last = j.mark() - 1
    j.confirm_before(mark_before_last)
    assert j.overflowed  # the last unstored write is still unconfirmed
    j.confirm_all()
    assert not j.overflowed and not j.pending



def test_a_read_begun_before_the_overflowing_write_does_not_clear_the_overflow():
    """A read that began before the write that overflowed the journal (another greenlet's, in
    full duplex) answers what was written before it, not that write, whose bytes the overflow
    already let go: the journal must keep saying it cannot promise a replay (issue 28: the
    overflowing record was left out of ``mark()``, so this read cleared the overflow)."""
    j = Journal(limit=10)
    j.append(b"12345")
    read_began = j.mark()
    j.append(b"678901")  # 11 > 10: overflows
    assert j.overflowed
    j.confirm_before(read_began)  # the read returns: the first record is answered
    assert j.overflowed and j.pending
    j.confirm_before(j.mark())
    assert not j.overflowed and not j.pending

def test_journal_tcp_ack_offsets_and_restart():
    j = Journal(limit=100)
    j.append(b"aaaa")
    j.append(b"bbbb")
    assert j.confirm_acked(5) == 1  # only the first record is wholly acknowledged
    j.restart_stream(len(j.unconfirmed()))  # the new connection: the replay re-sent "bbbb"
    assert j.stream_offset == 4
    assert j.confirm_acked(4) == 1 and not j.pending


def test_journal_without_data_counts_lengths():
    j = Journal(limit=100, keep_data=False)
    j.append(b"abcd")
    assert j.size == 4 and j.pending and j.records() == [b""]
    j.confirm_all()
    assert j.size == 0


def test_every_retrypolicy_field_has_an_entry_in_the_docs():
    """docs/api.md: one entry per field, with its type, default and an example."""
    import dataclasses
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()
    for field in dataclasses.fields(RetryPolicy):
        head = f"### `{field.name}`\n"
        assert head in text, field.name
        entry = text.split(head, 1)[1].split("\n### ", 1)[0]
        assert f"- **Default:** `{field.default!r}`" in entry, field.name
        assert "- **Type:** " in entry and "- **Example:** " in entry, field.name
