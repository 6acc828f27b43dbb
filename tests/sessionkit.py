"""Helpers for the session tests on real paths (test_session_paths.py, test_session_storms.py).

``Recorder``: a TCP forwarder that, like many middleboxes (socat without ``nodelay``, home-made
forwarders), does NOT set TCP_NODELAY on either side, and records every chunk it reads with its
time, split into session frames, so a test can count what one application write became on
the wire.
"""

from __future__ import annotations

import time

from forwarder import Forwarder, Tap

from resilientsock.session import protocol as sp


class _Parser:
    """Splits one direction's bytes into session frames (types), across chunks."""

    def __init__(self, preamble: bool) -> None:
        self.buf = bytearray()
        self.skip = len(sp.PREAMBLE) if preamble else 0

    def feed(self, data: bytes) -> list[int]:
        self.buf += data
        if self.skip:
            take = min(self.skip, len(self.buf))
            del self.buf[:take]
            self.skip -= take
        types = []
        while len(self.buf) >= sp.HEADER_LEN:
            ftype, length, _ = sp.HEADER.unpack_from(self.buf, 0)
            if len(self.buf) < sp.HEADER_LEN + length:
                break
            del self.buf[:sp.HEADER_LEN + length]
            types.append(ftype)
        return types


class Recorder(Forwarder):
    """A forwarder without TCP_NODELAY (``forwarder.Forwarder``, started: its own hub and
    thread; ``close()`` it). ``chunks``: one entry per ``recv``: (monotonic time, "up" or
    "down", size, frame types completed by it, bytes of a frame still incomplete after it)."""

    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__(target, name="recorder")
        self.chunks: list[tuple[float, str, int, list[int], int]] = []
        self.start()

    def _taps(self) -> tuple[Tap, Tap]:
        return self._tap("up"), self._tap("down")

    def _tap(self, direction: str) -> Tap:
        parser = _Parser(preamble=direction == "up")

        def see(data: bytes) -> None:
            types = parser.feed(data)
            self.chunks.append((time.monotonic(), direction, len(data), types, len(parser.buf)))

        return see
