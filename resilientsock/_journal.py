"""The journal: what a resilient socket wrote and has not yet seen confirmed.

Rules of this module (DESIGN §5):

1. One record per successful write call (``send``, ``sendall``, ``sendmsg``); the record is
   what the kernel took, so a short ``send`` journals only its prefix.
2. Records leave the journal only by confirmation: an answer (a read that returned >= 1 byte
   confirms every record written before that read began, ``confirm_before``), TCP's ACK
   (``confirm_acked``, in connection-stream byte offsets) or ``sock.confirm()``.
3. Over ``limit`` unconfirmed bytes the journal stops promising: it drops the records and
   reports ``overflowed`` until a confirmation covers everything written so far. A drop while
   overflowed is surfaced, never silently half-replayed.
4. ``clear`` is for when an error was surfaced: the caller owns recovery from then on.
"""

from __future__ import annotations

from collections import deque


class Journal:
    """Unconfirmed write records, in order. Not thread-safe: the socket serialises writers."""

    __slots__ = ("_records", "size", "_next", "limit", "keep_data", "overflowed",
                 "_overflow_until", "stream_offset")

    def __init__(self, limit: int, keep_data: bool = True) -> None:
        # Each record: [sequence number, bytes (or None when not kept), end offset on the
        # current connection's byte stream, length].
        self._records: deque[list] = deque()
        self.size = 0
        self._next = 0
        self.limit = limit
        self.keep_data = keep_data
        self.overflowed = False
        self._overflow_until = 0
        self.stream_offset = 0  # bytes written on the current connection (for tcp-ack)

    def __len__(self) -> int:
        return len(self._records)

    @property
    def pending(self) -> bool:
        """True when some written bytes are neither confirmed nor cleared."""
        return bool(self._records) or self.overflowed

    def mark(self) -> int:
        """A position: records appended from now on are 'after' it."""
        return self._next

    def append(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        seq = self._next
        self._next = seq + 1
        self.stream_offset += n
        if self.overflowed:
            self._overflow_until = self._next
            return
        if self.size + n > self.limit:
            self._overflow()
            return
        stored = (data if type(data) is bytes else bytes(data)) if self.keep_data else None
        self._records.append([seq, stored, self.stream_offset, n])
        self.size += n

    def _overflow(self) -> None:
        self._records.clear()
        self.size = 0
        self.overflowed = True
        self._overflow_until = self._next

    def confirm_before(self, mark: int) -> int:
        """Confirm every record written before ``mark``. Returns how many were confirmed."""
        records = self._records
        count = 0
        while records and records[0][0] < mark:
            self.size -= _length(records.popleft())
            count += 1
        if self.overflowed and mark >= self._overflow_until:
            self.overflowed = False
        return count

    def confirm_all(self) -> int:
        return self.confirm_before(self._next)

    def confirm_acked(self, acked: int) -> int:
        """Confirm records whose every byte is at or below stream offset ``acked``."""
        records = self._records
        count = 0
        while records and records[0][2] <= acked:
            self.size -= _length(records.popleft())
            count += 1
        if self.overflowed and acked >= self.stream_offset:
            self.overflowed = False
        return count

    def clear(self) -> None:
        self._records.clear()
        self.size = 0
        self.overflowed = False

    def records(self) -> list[bytes]:
        """The unconfirmed records, oldest first (empty bytes where data is not kept)."""
        return [r[1] if r[1] is not None else b"" for r in self._records]

    def restart_stream(self) -> None:
        """A new connection: re-number stream offsets as if the records were just re-sent."""
        offset = 0
        for record in self._records:
            offset += _length(record)
            record[2] = offset
        self.stream_offset = offset


def _length(record: list) -> int:
    return record[3]  # type: ignore[no-any-return]
