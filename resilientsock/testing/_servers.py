"""Small real servers for tests, examples and the demo (each in a LoopThread).

``MessageServer`` speaks the robot protocol: the client sends ``MSG <n> <text>\\n`` lines and
the server answers ``ACK <n>\\n`` for each, recording every ``n`` in arrival order (so a test
can count duplicates and losses). ``mode="echo"`` echoes bytes; ``mode="sink"`` reads and
never answers (telemetry). Every complete line is kept in ``lines``.

Deterministic triggers for tests: ``HALF <n>`` records n, answers ``ACK `` without the rest
and waits (a drop then lands mid-answer); ``POISON`` resets the connection (SO_LINGER 0)
every time it arrives; ``PING`` answers ``PONG``.

``banner=b"220 ready\\n"`` makes it a server-first protocol (as SMTP, FTP, POP3 and IMAP are):
every new connection is greeted with those bytes before anything is read.
"""

from __future__ import annotations

import struct
from typing import Any

import gevent.socket as gsocket

from ._loop import ListenerService, LoopThread


class MessageServer(ListenerService):
    """A line server (see module docstring). ``received``: every n, in order."""

    def __init__(self, mode: str = "ack", loop: LoopThread | None = None, port: int = 0,
                 banner: bytes | None = None, host: str = "127.0.0.1") -> None:
        if mode not in ("ack", "echo", "sink"):
            raise ValueError(f"mode must be 'ack', 'echo' or 'sink', got {mode!r}")
        if banner is not None and not isinstance(banner, bytes):
            raise TypeError(f"banner must be bytes, got {type(banner).__name__}")
        super().__init__("message-server", host, port, loop)
        self.mode = mode
        self.banner = banner
        self._clients: set[Any] = set()
        self.received: list[int] = []
        self.lines: list[bytes] = []
        self.bytes_received = 0

    def stop(self) -> None:
        """Close the listener and every client connection (the server 'goes down')."""
        self._loop.call(self._shutdown_here)

    def restart(self) -> None:
        """Listen again on the same port after ``stop()``."""
        self._loop.call(self._listen)

    def unique(self) -> set[int]:
        return set(self.received)

    def duplicates(self) -> int:
        return len(self.received) - len(set(self.received))

    def _teardown(self) -> None:
        self._close_listener()
        for client in list(self._clients):
            client.close()
        self._clients.clear()

    def _handle(self, client: Any) -> None:
        self._clients.add(client)
        if self.banner:
            try:
                client.sendall(self.banner)
            except OSError:
                self._clients.discard(client)
                client.close()
                return
        self._serve(client)

    def _serve(self, client: Any) -> None:
        buf = b""
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    return
                self.bytes_received += len(data)
                if self.mode == "echo":
                    client.sendall(data)
                    continue
                buf += data
                *lines, buf = buf.split(b"\n")
                replies = []
                for line in lines:
                    self.lines.append(line)
                    parts = line.split(b" ", 2)
                    if len(parts) >= 2 and parts[0] in (b"MSG", b"HALF") and parts[1].isdigit():
                        n = int(parts[1])
                        self.received.append(n)
                        replies.append(b"ACK %d\n" % n if parts[0] == b"MSG" else b"ACK ")
                    elif parts[0] == b"PING":
                        replies.append(b"PONG\n")
                    elif parts[0] == b"POISON":
                        client.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_LINGER,
                                          struct.pack("ii", 1, 0))
                        return
                if replies and self.mode == "ack":
                    client.sendall(b"".join(replies))
        except OSError:
            return
        finally:
            self._clients.discard(client)
            client.close()
