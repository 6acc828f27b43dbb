"""FaultProxy: a loopback TCP proxy that injects real network faults on command.

Faults are real at the socket level: ``reset_all`` sends RST (SO_LINGER 0), ``close_all`` a
FIN, ``refuse`` closes the listening socket so connects get ECONNREFUSED, ``blackhole``
accepts and forwards nothing, ``cut_after`` resets a connection after N more bytes in one
direction, ``latency`` delays every chunk, ``switch_upstream`` points new connections
elsewhere. It runs in its own thread (see ``_loop``), so it works whether the code under test
is gevent-based, plainly blocking, or another process.
"""

from __future__ import annotations

import struct
import time
from collections import Counter
from typing import Any

import gevent
import gevent.socket as gsocket

from ._loop import ListenerService, LoopThread

_LINGER_RST = struct.pack("ii", 1, 0)


class _Conn:
    __slots__ = ("client", "upstream", "greenlets", "closed", "eofs", "serial")

    def __init__(self, client: Any, upstream: Any, serial: int) -> None:
        self.serial = serial  # 1 for the proxy's first accepted connection
        self.client = client
        self.upstream = upstream
        self.greenlets: list[Any] = []
        self.closed = False
        self.eofs = 0


class FaultProxy(ListenerService):
    """A TCP proxy on 127.0.0.1 in front of ``upstream``, with faults on command.

    Use as a context manager (``with FaultProxy(("127.0.0.1", port)) as proxy:``) and connect
    to ``proxy.address``. Counters: ``connections`` (accepted), ``active``, ``faults`` (by
    kind), ``bytes_up`` (client to server) and ``bytes_down``.
    """

    _backlog = 512

    def __init__(self, upstream: tuple[str, int], host: str = "127.0.0.1", port: int = 0,
                 loop: LoopThread | None = None) -> None:
        super().__init__("fault-proxy", host, port, loop)
        self.upstream = upstream
        self._conns: set[_Conn] = set()
        self._blackhole = False
        self._latency = 0.0
        self._cut: dict[str, int | None] = {"up": None, "down": None}
        self._cut_how = "reset"
        self._cut_from = 0  # connections with a smaller serial are spared by cut_after
        self.faults: Counter[str] = Counter()
        self.last_fault_at = 0.0  # time.monotonic() of the latest fault that fired
        self.record_accepts = False  # True: time.monotonic() of each accept in accept_times
        self.accept_times: list[float] = []
        self.bytes_up = 0
        self.bytes_down = 0

    # -- lifecycle ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Close the listener and every connection (FIN); end the proxy's own loop."""
        self.shutdown()

    @property
    def active(self) -> int:
        return len(self._conns)

    # -- faults ---------------------------------------------------------------------------------

    def reset_all(self) -> int:
        """RST every open connection (client side and upstream). Returns how many."""
        return self._loop.call(self._kill_all, True)

    def close_all(self) -> int:
        """Close every open connection gracefully (FIN to the client). Returns how many."""
        return self._loop.call(self._kill_all, False)

    def refuse(self, seconds: float) -> None:
        """Close the listening socket: new connects get ECONNREFUSED for ``seconds``."""
        self._loop.call(self._refuse, seconds)

    def refuse_now(self) -> None:
        """Close the listening socket until ``accept_again()``."""
        self._loop.call(self._refuse, None)

    def accept_again(self) -> None:
        self._loop.call(self._listen)

    def blackhole(self, on: bool = True) -> None:
        """While on, connections are accepted but nothing is forwarded either way."""
        def set_flag() -> None:
            self._blackhole = on
            if on:
                self.faults["blackhole"] += 1
        self._loop.call(set_flag)

    def latency(self, seconds: float) -> None:
        """Delay every forwarded chunk by ``seconds``."""
        def set_latency() -> None:
            self._latency = seconds
        self._loop.call(set_latency)

    def cut_after(self, nbytes: int, direction: str = "down", how: str = "reset",
                  new_only: bool = False) -> None:
        """Cut the connection once ``nbytes`` more bytes have gone ``direction``
        ("up": client to server, "down": server to client): ``how="reset"`` sends RST,
        ``how="close"`` a FIN. Applies once, to whichever connection gets there first;
        with ``new_only=True``, only to a connection accepted after this call (so a cut
        lands at a known point of a fresh conversation, such as its banner or first command).
        """
        if direction not in ("up", "down"):
            raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
        if how not in ("reset", "close"):
            raise ValueError(f"how must be 'reset' or 'close', got {how!r}")
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes!r}")

        def set_cut() -> None:
            self._cut[direction] = nbytes
            self._cut_how = how
            self._cut_from = self.connections + 1 if new_only else 0
        self._loop.call(set_cut)

    def switch_upstream(self, upstream: tuple[str, int]) -> None:
        """New connections go to ``upstream`` from now on."""
        def switch() -> None:
            self.upstream = upstream
        self._loop.call(switch)

    # -- inside the loop thread ---------------------------------------------------------------

    def _refuse(self, seconds: float | None) -> None:
        self.faults["refuse"] += 1
        self._close_listener()
        if seconds is not None:
            gevent.spawn_later(seconds, self._listen)

    def _teardown(self) -> None:
        self._close_listener()
        for conn in list(self._conns):
            self._close_conn(conn, rst=False)

    def _kill_all(self, rst: bool) -> int:
        conns = list(self._conns)
        for conn in conns:
            self._close_conn(conn, rst=rst)
        self.faults["reset" if rst else "close"] += 1
        self.last_fault_at = time.monotonic()
        return len(conns)

    def _close_conn(self, conn: _Conn, rst: bool) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.discard(conn)
        for sock in (conn.client, conn.upstream):
            if sock is None:
                continue
            try:
                if rst:
                    sock.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_LINGER, _LINGER_RST)
                else:
                    sock.shutdown(gsocket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        current = gevent.getcurrent()
        for g in conn.greenlets:
            if g is not current:
                g.kill(block=False)

    def _handle(self, client: Any) -> None:
        if self.record_accepts:
            self.accept_times.append(time.monotonic())
        serial = self.connections
        try:
            upstream = gsocket.create_connection(self.upstream, timeout=5)
        except OSError:
            client.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_LINGER, _LINGER_RST)
            client.close()
            return
        client.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
        upstream.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
        conn = _Conn(client, upstream, serial)
        self._conns.add(conn)
        conn.greenlets = [gevent.spawn(self._pump, conn, client, upstream, "up"),
                          gevent.spawn(self._pump, conn, upstream, client, "down")]

    def _pump(self, conn: _Conn, src: Any, dst: Any, direction: str) -> None:
        while not conn.closed:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                # Half-close: pass the FIN on, the other direction keeps going.
                conn.eofs += 1
                try:
                    dst.shutdown(gsocket.SHUT_WR)
                except OSError:
                    conn.eofs = 2
                if conn.eofs >= 2:
                    self._close_conn(conn, rst=False)
                return
            if self._blackhole:
                continue
            if self._latency:
                gevent.sleep(self._latency)
            cut = self._cut[direction]
            if cut is not None and conn.serial >= self._cut_from:
                if len(data) >= cut:
                    self._cut[direction] = None
                    try:
                        if cut:
                            dst.sendall(data[:cut])
                    except OSError:
                        pass
                    self.faults["cut"] += 1
                    self.last_fault_at = time.monotonic()
                    self._close_conn(conn, rst=self._cut_how == "reset")
                    return
                self._cut[direction] = cut - len(data)
            try:
                dst.sendall(data)
            except OSError:
                self._close_conn(conn, rst=True)
                return
            if direction == "up":
                self.bytes_up += len(data)
            else:
                self.bytes_down += len(data)
