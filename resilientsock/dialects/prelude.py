"""``RetryPolicy(prelude=N)``: the first N exchanges of every connection are its setup.

Rules of this module (docs/design.md §5a):

1. An exchange is the records written until the first answer byte, plus the answer bytes read
   until the next write. Exchange k is complete when the first write after its answer begins.
2. ``restore()`` re-sends the complete prelude exchanges' requests (at most N), in order, in
   one payload, and checks that the new connection answers each with exactly the original
   bytes (it reads exactly the original answers' length). Any difference: ``SetupMismatch``.
3. The exchange in progress is not setup yet: it is the current answer, which the core's byte
   rules replay or resume (§5, §5b). So is everything after the prelude.
4. Only what the prelude needs is kept: N requests and N answers, each at most
   ``PRELUDE_LIMIT`` bytes; a larger prelude exchange makes every later drop a refusal (the
   setup can no longer be redone).
5. Server-first protocols (a banner before the first write) are left to the core's banner
   rule: ``detect`` does not make a prelude for them.
"""

from __future__ import annotations

from ._base import Dialect, Restore, SetupMismatch

PRELUDE_LIMIT = 65536


class _PreludeRestore(Restore):
    __slots__ = ("_answers", "_k", "_at")

    def __init__(self, exchanges: list[tuple[bytes, bytes]]) -> None:
        super().__init__(b"".join(req for req, _ in exchanges))
        self._answers = [ans for _, ans in exchanges]
        self._k = 0   # the exchange whose answer is being read
        self._at = 0  # bytes of it read so far

    def feed(self, data: bytes) -> int | None:
        i = 0
        while self._k < len(self._answers):
            want = self._answers[self._k]
            take = min(len(want) - self._at, len(data) - i)
            if take <= 0 and self._at < len(want):
                return None
            got = data[i:i + take]
            if got != want[self._at:self._at + take]:
                raise SetupMismatch(
                    f"prelude: exchange {self._k + 1}'s answer differs from the original "
                    f"({len(want)} bytes; first difference near byte "
                    f"{self._at + _first_diff(got, want[self._at:])})")
            self._at += take
            i += take
            if self._at == len(want):
                self._k += 1
                self._at = 0
        return i


def _first_diff(a: bytes, b: bytes) -> int:
    for k, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return k
    return min(len(a), len(b))


class PreludeDialect(Dialect):
    """An unknown protocol whose first ``n`` exchanges the user declared to be setup."""

    name = "prelude"

    def __init__(self, n: int) -> None:
        self.n = n
        self._done: list[tuple[bytes, bytes]] = []  # complete prelude exchanges
        self._req = bytearray()
        self._ans = bytearray()
        self._reading = False  # the current exchange's answer has begun
        self._too_big = False
        self._counting = True  # still inside the prelude

    def wrote(self, data: bytes) -> None:
        if not self._counting:
            return
        if self._reading:  # the exchange in progress is complete (rule 1)
            self._done.append((bytes(self._req), bytes(self._ans)))
            self._req = bytearray()
            self._ans = bytearray()
            self._reading = False
            if len(self._done) >= self.n:
                self._counting = False
                return
        self._keep(self._req, data)

    def read(self, data: bytes) -> None:
        if not self._counting or not data:
            return
        self._reading = True
        self._keep(self._ans, data)

    def _keep(self, buf: bytearray, data: bytes) -> None:
        if self._too_big:
            return
        if len(buf) + len(data) > PRELUDE_LIMIT:
            self._too_big = True
            self._counting = False
            buf.clear()
        else:
            buf += data

    def refusal(self) -> str | None:
        if self._too_big:
            return (f"prelude: an exchange of the first {self.n} was larger than "
                    f"{PRELUDE_LIMIT} bytes, so the setup cannot be redone on a new connection")
        return None

    def restore(self) -> Restore | None:
        if not self._done or self._too_big:
            return None
        return _PreludeRestore(self._done)

    def resumable(self) -> bool:
        return True  # an unknown protocol: the bytes decide (§5b)

    def fresh_ok(self) -> bool:
        # The user declared the setup: restore() redoes it on any new connection.
        return not self._too_big

    def discard(self) -> None:
        # In-flight bytes are gone; the recorded prelude stays (it is every connection's).
        if self._counting:
            self._req = bytearray()
            self._ans = bytearray()
            self._reading = False
