"""The journal: what a resilient socket wrote and has not yet seen confirmed.

Rules of this module (docs/design.md §5, §5b, §12):

1. One record per successful write call (``send``, ``sendall``, ``sendmsg``); the record is
   what the kernel took, so a short ``send`` journals only its prefix.
2. Records leave the journal only by confirmation: an answer (a read that returned >= 1 byte
   confirms every record written before that read began, ``confirm_before``), TCP's ACK
   (``confirm_acked``, in connection-stream byte offsets) or ``sock.confirm()``.
3. Records an answer confirmed are *kept* (``kept_bytes``) until the next write ends that
   answer (``end_answer``): if the connection drops in the middle of the answer, they are
   the request(s) to re-send for answer resume (§5b). They do not count against ``limit``;
   when they alone exceed it, they are let go and resume is off for that answer.
4. Over ``limit`` unconfirmed bytes the journal stops promising: it drops the records and
   reports ``overflowed`` until a confirmation covers everything written so far. A drop while
   overflowed is surfaced, never silently half-replayed.
5. ``clear`` is for when an error was surfaced and the connection discarded: the caller owns
   recovery from then on.
6. Memory and speed (docs/design.md §12): the payload lives in a deque of chunks. A ``bytes``
   record of at least ``_BIG`` bytes is held by reference (immutable: no copy on the write
   path, and the heap it adds is a slot and nothing else), as is a ``bytes`` record written
   to an empty journal (a request/answer exchange's request); other small records and mutable
   buffers (``bytearray``, ``memoryview``: the caller may reuse them) are copied into the
   tail ``bytearray``. Record boundaries are an ``array('q')`` of end offsets (8 bytes a
   record), so the heap stays within ~1.2x of the payload whatever the record size (a deque
   of per-record lists held 5.1x for 63-byte records: review r13; a chunk adds <= ~100 bytes
   per ``_BIG``-byte record). Trimming happens at record ends only, so a referenced record
   is let go whole or kept whole.

Offsets are absolute: byte ``i`` is the i-th byte ever appended. ``_keep`` <= ``_done`` <=
``_total``: ``[_keep, _done)`` is kept for resume, ``[_done, _total)`` is unconfirmed, and the
buffer holds ``[_keep, _total)``.
"""

from __future__ import annotations

from array import array
from collections import deque

__all__ = ["Journal"]

# A ``bytes`` record at least this long is held by reference instead of copied.
_BIG = 1024


class Journal:
    """Unconfirmed write records, in order. Not thread-safe: the socket serialises writers."""

    __slots__ = ("_chunks", "_tail", "_ends", "_head", "_base", "_total", "_done", "_keep", "limit",
                 "keep_data", "overflowed", "_overflow_until", "_origin", "keeping", "seq")

    def __init__(self, limit: int, keep_data: bool = True) -> None:
        self._chunks: deque[bytes | bytearray] = deque()  # the bytes [_keep, _total)
        self._tail: bytearray | None = None  # the last chunk, when small records go there
        self._ends = array("q")  # absolute end offset of each record still known
        self._head = 0  # index in _ends of the first unconfirmed record
        self._base = 0  # sequence number of _ends[0]
        self._total = 0  # bytes ever appended
        self._done = 0  # absolute offset of the first unconfirmed byte
        self._keep = 0  # absolute offset of the first byte still in _chunks
        self.limit = limit
        self.keep_data = keep_data
        self.overflowed = False
        self._overflow_until = 0
        self._origin = 0  # absolute offset of stream byte 0 on the current connection
        self.keeping = True  # False: confirmed records are let go at once (no resume)
        self.seq = 0  # records ever appended: ``mark()``, read in one attribute by the hot paths

    # -- reading the state -----------------------------------------------------------------

    def __len__(self) -> int:
        """Unconfirmed records."""
        return len(self._ends) - self._head

    @property
    def size(self) -> int:
        """Unconfirmed bytes (what ``journal_limit`` counts)."""
        return 0 if self.overflowed else self._total - self._done

    @property
    def kept_bytes(self) -> int:
        """Bytes of answered records kept for answer resume."""
        return self._done - self._keep

    @property
    def pending(self) -> bool:
        """True when some written bytes are neither confirmed nor cleared."""
        return self._head < len(self._ends) or self.overflowed

    @property
    def stream_offset(self) -> int:
        """Bytes written on the current connection, replay included (for tcp-ack)."""
        return self._total - self._origin

    def mark(self) -> int:
        """A position: records appended from now on are 'after' it (``seq``, which is
        ``_base + len(_ends)``: compaction moves both)."""
        return self.seq

    # -- writing ------------------------------------------------------------------------------

    def append(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        total = self._total = self._total + n
        self.seq += 1
        if self.overflowed:
            self._ends.append(total)
            self._head = len(self._ends)
            self._done = self._keep = total
            self._overflow_until = self.seq
            return
        if total - self._done > self.limit:
            self._overflow()
            return
        if self.keep_data:
            chunks = self._chunks
            if type(data) is bytes and (n >= _BIG or not chunks):
                # Immutable: held, not copied. A small one only as the first chunk (the
                # request/answer case: the socket ends the previous answer before it appends
                # the next request), so small records never cost an object each.
                chunks.append(data)
                self._tail = None
            else:
                tail = self._tail
                if tail is None:
                    tail = self._tail = bytearray()
                    chunks.append(tail)
                tail += data
        self._ends.append(total)

    def end_answer(self) -> None:
        """A write after an answer: the answer is complete, its requests need not be kept."""
        done = self._done
        if self._keep != done:  # _trim(done), inlined: this runs once per exchange
            if done == self._total:  # everything answered (the request/answer case)
                self._chunks.clear()
                self._tail = None
            elif self.keep_data:
                self._drop_front(done - self._keep)
            self._keep = done
            head = self._head
            if head > 64 and head * 2 > len(self._ends):
                self._compact()

    def _overflow(self) -> None:
        self.overflowed = True
        self._ends.append(self._total)  # the record that overflowed it, as appended
        self._overflow_until = self.seq
        self._head = len(self._ends)
        self._done = self._keep = self._total
        self._chunks.clear()
        self._tail = None
        self._compact()

    def _drop_front(self, count: int) -> None:
        """Let go of the first ``count`` buffered bytes (``count`` ends at a record end)."""
        chunks = self._chunks
        while count > 0 and chunks:
            chunk = chunks[0]
            n = len(chunk)
            if n <= count:
                chunks.popleft()
                if chunk is self._tail:
                    self._tail = None
                count -= n
            elif type(chunk) is bytearray:
                del chunk[:count]
                count = 0
            else:  # not at a record end: cannot happen (records are trimmed whole); be safe
                chunks[0] = chunk[count:]
                count = 0

    def _trim(self, upto: int) -> None:
        """Let go of buffered bytes before absolute offset ``upto``."""
        if self.keep_data:
            self._drop_front(upto - self._keep)
        self._keep = upto
        self._compact()

    def _compact(self) -> None:
        head = self._head
        if head > 64 and head * 2 > len(self._ends):
            del self._ends[:head]
            self._base += head
            self._head = 0

    # -- confirming ---------------------------------------------------------------------------

    def confirm_before(self, mark: int) -> int:
        """Confirm every record written before ``mark``. Returns how many were confirmed.

        The confirmed records stay buffered (``kept_bytes``) until ``end_answer``.
        """
        index = mark - self._base
        count = index - self._head
        if self.overflowed and mark >= self._overflow_until:
            self.overflowed = False
        if count <= 0:
            return 0
        self._head = index
        self._done = self._ends[index - 1]
        if not self.keeping or self._done - self._keep > self.limit:
            self._trim(self._done)
        return count

    def confirm_all(self) -> int:
        count = self.confirm_before(self.mark())
        self.end_answer()
        return count

    def confirm_acked(self, acked: int) -> int:
        """Confirm records whose every byte is at or below stream offset ``acked``."""
        limit = self._origin + acked
        ends = self._ends
        index = self._head
        while index < len(ends) and ends[index] <= limit:
            index += 1
        if self.overflowed and limit >= self._total:
            self.overflowed = False
        count = index - self._head
        if count:
            self._head = index
            self._done = ends[index - 1]
            self._trim(self._done)  # acknowledged bytes are never an answer to resume
        return count

    def clear(self) -> None:
        """Forget everything written so far (an error was surfaced; the caller owns it)."""
        self._head = len(self._ends)
        self._done = self._keep = self._total
        self._chunks.clear()
        self._tail = None
        self.overflowed = False
        self._compact()

    def drop_kept(self) -> None:
        """Stop keeping answered records (resume is not possible for this answer)."""
        self._trim(self._done)

    # -- replaying ----------------------------------------------------------------------------

    def unconfirmed(self) -> bytes:
        """The unconfirmed bytes, oldest first (empty where data is not kept). A copy: a
        view would pin the buffer, and the next confirmation could not trim it."""
        skip = self._done - self._keep
        if not skip:
            return self.with_kept()
        out = []
        for chunk in self._chunks:
            n = len(chunk)
            if skip >= n:
                skip -= n
                continue
            out.append(chunk[skip:] if skip else chunk)
            skip = 0
        return b"".join(out)

    def with_kept(self) -> bytes:
        """The kept (answered) records followed by the unconfirmed ones: what answer resume
        re-sends (a copy)."""
        chunks = self._chunks
        if len(chunks) == 1 and type(chunks[0]) is bytes:
            return chunks[0]
        return b"".join(chunks)

    def last_byte(self) -> bytes:
        """The last byte buffered (``b""`` when nothing is)."""
        for chunk in reversed(self._chunks):
            if chunk:
                return bytes(chunk[-1:])
        return b""

    def records(self) -> list[bytes]:
        """The unconfirmed records, oldest first, one ``bytes`` each (for tests and tools)."""
        out = []
        data = self.with_kept() if self.keep_data else b""
        start = self._done
        for end in self._ends[self._head:]:
            if self.keep_data:
                out.append(data[start - self._keep:end - self._keep])
            else:
                out.append(b"")
            start = end
        return out

    def restart_stream(self, resent: int) -> None:
        """A new connection on which ``resent`` bytes (the replay) were just written: stream
        offsets count from the first of them."""
        self._origin = self._total - resent
