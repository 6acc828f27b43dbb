"""FaultProxy: a loopback TCP proxy that injects real network faults on command.

Faults are real at the socket level: ``reset_all`` sends RST (SO_LINGER 0), ``close_all`` a
FIN, ``refuse`` closes the listening socket so connects get ECONNREFUSED, ``blackhole``
accepts and forwards nothing, ``cut_after`` resets a connection after N more bytes in one
direction, ``latency`` delays every chunk, ``switch_upstream`` points new connections
elsewhere. Toxiproxy's toxics (``add_toxic``: latency, bandwidth, slow_close, timeout,
reset_peer, slicer, limit_data; ``disable``/``enable``) apply per direction with a toxicity,
and ``plan`` (see ``_plans``) fails exact points of a conversation. It runs in its own thread
(see ``_loop``), so it works whether the code under test is gevent-based, plainly blocking,
or another process.

Rules of this module:

1. Everything runs in the proxy's loop thread; public methods hand over with ``_loop.call``
   and return once the change is in force (the next chunk read sees it).
2. The hot path costs nothing when no fault is set: each direction of a connection is one
   greenlet doing ``recv_into`` a buffer of its own and ``sendall`` of a memoryview, after
   one dict lookup (``_fast``). Any fault, toxic or plan rule switches that direction to a
   reader + writer pair joined by a bounded queue (so latency pipelines, as in Toxiproxy,
   and a slow writer pushes back on the sender). A direction goes back to the fast path
   once its queue is empty and nothing is set, so byte order is always kept.
3. A connection is never closed by the proxy unless a fault says so or a peer closed its
   side: the upstream socket's connect timeout is cleared once connected (r16: it used to
   stay on the socket, and 5 s of server silence became a spurious FIN).
4. Randomness (toxicity, jitter, slicer sizes) comes from ``seed`` and the connection's
   serial, never from the clock: a seeded run picks the same connections and sizes again.
"""

from __future__ import annotations

import logging
import random
import struct
import time
from collections import Counter
from typing import Any

import gevent
import gevent.queue
import gevent.socket as gsocket

from ._loop import ListenerService, LoopThread
from ._plans import ConnPlanState, FaultPlan
from ._toxics import Toxic, ToxicError, parse_stream, rolls, slice_offsets

log = logging.getLogger("resilientsock")

_LINGER_RST = struct.pack("ii", 1, 0)
_EOF = object()  # queued after the last chunk when the sender half-closes
_QUEUE_CHUNKS = 64  # chunks a slow direction holds before it stops reading (arbitrary)
_DIRS = {"upstream": "up", "downstream": "down"}


class _Flow:
    """One direction of one connection: ``src`` to ``dst``."""

    __slots__ = ("conn", "src", "dst", "direction", "queue", "writer", "queued", "rng",
                 "gen", "chain", "state")

    def __init__(self, conn: _Conn, src: Any, dst: Any, direction: str, seed: Any) -> None:
        self.conn = conn
        self.src = src
        self.dst = dst
        self.direction = direction  # "up": client to server, "down": server to client
        self.queue: Any = None  # created with the writer, on the first slow chunk
        self.writer: Any = None
        self.queued = 0  # chunks handed to the writer and not yet forwarded
        self.rng = random.Random(f"{seed}/{conn.serial}/{direction}")
        self.gen = -1  # the proxy's toxic generation ``chain`` was computed for
        self.chain: list[Toxic] = []  # the toxics that rolled "on" for this connection
        self.state: dict[Any, Any] = {}  # per-toxic state (limit_data count, deadlines...)


class _Conn:
    __slots__ = ("client", "upstream", "greenlets", "closed", "eofs", "serial", "flows",
                 "plan", "watchers", "holed")

    def __init__(self, client: Any, upstream: Any, serial: int,
                 plan: ConnPlanState | None = None) -> None:
        self.serial = serial  # 1 for the proxy's first accepted connection
        self.client = client
        self.upstream = upstream
        self.greenlets: list[Any] = []
        self.closed = False
        self.eofs = 0
        self.flows: list[_Flow] = []
        self.plan = plan or ConnPlanState(serial)
        self.watchers: list[Any] = []  # libev read watchers of the callback fast path
        # Bytes of this connection fell into a black hole: nothing of it is forwarded again,
        # either way. A TCP stream never goes on after a gap (the peer would retransmit the
        # lost bytes first); this one stays silent until an end times it out.
        self.holed = False


class FaultProxy(ListenerService):
    """A TCP proxy on 127.0.0.1 in front of ``upstream``, with faults on command.

    Use as a context manager (``with FaultProxy(("127.0.0.1", port)) as proxy:``) and connect
    to ``proxy.address``. Counters: ``connections`` (accepted), ``active``, ``faults`` (by
    kind), ``bytes_up`` (client to server) and ``bytes_down`` (bytes forwarded).

    ``connect_timeout`` bounds the connect to ``upstream`` only (a failed connect resets the
    client); ``seed`` makes toxicity, jitter and slicer sizes reproducible; ``name`` is the
    proxy's name in the Toxiproxy API; ``buffer_size`` is each direction's read size;
    ``nodelay=False`` leaves Nagle's algorithm on for both of its sockets (socat without its
    ``nodelay`` option, many appliance forwarders): small writes then wait for the path's
    delayed ACK.
    """

    _backlog = 512

    def __init__(self, upstream: tuple[str, int], host: str = "127.0.0.1", port: int = 0,
                 loop: LoopThread | None = None, *, connect_timeout: float = 5.0,
                 seed: int | str = 0, name: str = "fault-proxy",
                 buffer_size: int = 65536, nodelay: bool = True) -> None:
        if connect_timeout <= 0:
            raise ValueError(f"connect_timeout must be > 0, got {connect_timeout!r}")
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size!r}")
        super().__init__("fault-proxy", host, port, loop)
        self.name = name
        self.upstream = upstream
        self.connect_timeout = connect_timeout
        self.seed = seed
        self._bufsize = buffer_size
        self.nodelay = nodelay
        self._conns: set[_Conn] = set()
        self._blackhole = False
        self._latency = 0.0
        self._cut: dict[str, int | None] = {"up": None, "down": None}
        self._cut_how = "reset"
        self._cut_from = 0  # connections with a smaller serial are spared by cut_after
        self._toxics: dict[str, Toxic] = {}  # by name, in the order added
        self._gen = 0  # bumped on every toxic change: flows recompute their chain
        self._fast = {"up": True, "down": True}
        self.enabled = True
        self.plan = FaultPlan(self._loop.call, self._plan_changed, lambda: self.connections)
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
        """While on, connections are accepted but nothing is forwarded either way. A
        connection that lost bytes to the hole stays silent for good after it is off (its
        stream cannot go on after a gap, as TCP's would not); new connections work again."""
        def set_flag() -> None:
            self._blackhole = on
            if on:
                self.faults["blackhole"] += 1
            self._reconfigure()
        self._loop.call(set_flag)

    def latency(self, seconds: float) -> None:
        """Delay every forwarded chunk by ``seconds`` (both directions, one chunk after the
        other; the ``latency`` toxic is the pipelined, per-direction kind)."""
        def set_latency() -> None:
            self._latency = seconds
            self._reconfigure()
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
            self._reconfigure()
        self._loop.call(set_cut)

    def switch_upstream(self, upstream: tuple[str, int]) -> None:
        """New connections go to ``upstream`` from now on."""
        def switch() -> None:
            self.upstream = upstream
        self._loop.call(switch)

    # -- Toxiproxy's model: toxics, enabled, reset --------------------------------------------

    def add_toxic(self, type: str, *, name: str | None = None, stream: str = "downstream",
                  toxicity: float = 1.0, **attributes: int) -> Toxic:
        """Add a Toxiproxy toxic; it applies to open connections at once and to new ones.

        ``type`` and ``attributes`` as in Toxiproxy (milliseconds, KB/s, bytes; slicer's
        ``delay`` in µs): ``add_toxic("latency", latency=100, jitter=10)``. ``stream`` is
        "upstream" (client to server) or "downstream" (the default); ``toxicity`` the
        share of connections it applies to (rolled per connection, from ``seed``); ``name``
        defaults to ``{type}_{stream}``. Raises ToxicError (a ValueError; ``status`` 400 or
        409 for a name in use) and then nothing has changed.
        """
        toxic = Toxic.make(type, name=name, stream=stream, toxicity=toxicity,
                           attributes=attributes)
        return self._loop.call(self._add_toxic, toxic)

    def update_toxic(self, name: str, *, toxicity: float | None = None,
                     **attributes: int) -> Toxic:
        """Change some attributes and/or the toxicity of toxic ``name`` (the rest is kept);
        open connections re-roll its toxicity. Raises ToxicError (``status`` 404 if there is
        no such toxic, 400 for a bad value) and then nothing has changed."""
        return self._loop.call(self._update_toxic, name, toxicity, attributes)

    def remove_toxic(self, name: str) -> None:
        """Remove toxic ``name``. As in Toxiproxy, connections whose data a ``timeout`` toxic
        was dropping are closed (FIN): their stream has a hole. Raises ToxicError (404)."""
        self._loop.call(self._remove_toxic, name)

    def toxics(self) -> list[Toxic]:
        """The toxics, in the order they were added."""
        return self._loop.call(lambda: list(self._toxics.values()))

    def toxic(self, name: str) -> Toxic:
        """Toxic ``name``; raises ToxicError (404) if there is none."""
        def get() -> Toxic:
            if name not in self._toxics:
                raise ToxicError("toxic not found", 404)
            return self._toxics[name]
        return self._loop.call(get)

    def disable(self) -> None:
        """Toxiproxy's ``enabled: false``: stop listening (connects are refused) and close
        every open connection (FIN). ``enable()`` undoes it."""
        def disable() -> None:
            self.enabled = False
            self._close_listener()
            for conn in list(self._conns):
                self._close_conn(conn, rst=False)
            self._fault("down")
        self._loop.call(disable)

    def enable(self) -> None:
        """Listen again (on the same port) after ``disable()``."""
        def enable() -> None:
            self.enabled = True
            self._listen()
        self._loop.call(enable)

    def reset_state(self) -> None:
        """Toxiproxy's ``POST /reset`` for this proxy: enable it, remove every toxic and plan
        rule, and clear ``blackhole``, ``latency`` and pending ``cut_after`` (counters kept)."""
        def reset() -> None:
            for name in list(self._toxics):
                self._remove_toxic(name)
            self.plan.rules.clear()
            self._blackhole = False
            self._latency = 0.0
            self._cut = {"up": None, "down": None}
            self._reconfigure()
            if not self.enabled:
                self.enabled = True
                self._listen()
        self._loop.call(reset)

    def to_json(self) -> dict[str, Any]:
        """Toxiproxy's JSON shape of a proxy."""
        def dump() -> dict[str, Any]:
            return {"name": self.name, "listen": _join(self.address),
                    "upstream": _join(self.upstream), "enabled": self.enabled,
                    "toxics": [t.to_json() for t in self._toxics.values()]}
        return self._loop.call(dump)

    # -- inside the loop thread ---------------------------------------------------------------

    def _fault(self, kind: str) -> None:
        self.faults[kind] += 1
        self.last_fault_at = time.monotonic()
        log.debug("fault proxy %s: %s", self.name, kind)

    def _reconfigure(self) -> None:
        """Recompute which directions may take the fast path (rule 2)."""
        plan = self.plan.active
        streams = {_DIRS[t.stream] for t in self._toxics.values()}
        for d in ("up", "down"):
            self._fast[d] = not (self._blackhole or self._latency or plan or d in streams
                                 or self._cut[d] is not None)

    def _plan_changed(self) -> None:
        self._reconfigure()
        seconds = self.plan.refuse_after(self.connections)
        if seconds is not None:
            self._refuse(seconds)

    def _add_toxic(self, toxic: Toxic) -> Toxic:
        if toxic.name in self._toxics:
            raise ToxicError("toxic already exists", 409)
        self._toxics[toxic.name] = toxic
        self._toxics_changed()
        return toxic

    def _update_toxic(self, name: str, toxicity: float | None,
                      attributes: dict[str, Any]) -> Toxic:
        if name not in self._toxics:
            raise ToxicError("toxic not found", 404)
        toxic = self._toxics[name].changed(toxicity, attributes)
        self._toxics[name] = toxic
        self._toxics_changed()
        return toxic

    def _remove_toxic(self, name: str) -> None:
        if name not in self._toxics:
            raise ToxicError("toxic not found", 404)
        del self._toxics[name]
        self._toxics_changed()

    def _toxics_changed(self) -> None:
        self._gen += 1
        self._reconfigure()
        for conn in list(self._conns):
            for flow in conn.flows:
                self._chain(flow)

    def _chain(self, flow: _Flow) -> list[Toxic]:
        """The toxics that apply to ``flow`` now; starts the timers of new ``timeout``
        toxics and closes the connection when one that applied is removed."""
        if flow.gen == self._gen:
            return flow.chain
        flow.gen = self._gen
        stream = "upstream" if flow.direction == "up" else "downstream"
        old = flow.chain
        new = [t for t in self._toxics.values()
               if t.stream == stream and rolls(self.seed, flow.conn.serial, t)]
        flow.chain = new
        for toxic in new:
            if toxic.type == "timeout" and not any(t is toxic for t in old):
                if toxic.attributes["timeout"]:
                    g = gevent.spawn(self._timeout_watch, flow, toxic)
                    flow.conn.greenlets.append(g)
        for toxic in old:
            if toxic.type == "timeout" and toxic.name not in self._toxics:
                self._fault("timeout_removed")
                self._close_conn(flow.conn, rst=False)
                break
        return new

    def _timeout_watch(self, flow: _Flow, toxic: Toxic) -> None:
        key = ("deadline", toxic.name)
        flow.state[key] = time.monotonic() + toxic.attributes["timeout"] / 1000
        while not flow.conn.closed and any(t is toxic for t in flow.chain):
            left = flow.state[key] - time.monotonic()
            if left <= 0:
                self._fault("timeout")
                self._close_conn(flow.conn, rst=False)
                return
            gevent.sleep(left)

    def _refuse(self, seconds: float | None) -> None:
        self.faults["refuse"] += 1
        self.last_fault_at = time.monotonic()
        self._close_listener()
        if seconds is not None:
            gevent.spawn_later(seconds, self._relisten)

    def _relisten(self) -> None:
        if self.enabled:
            self._listen()

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
        for watcher in conn.watchers:
            watcher.stop()
            watcher.close()
        conn.watchers.clear()
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

    def _accept_loop(self, listener: Any) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            self.connections += 1
            serial = self.connections
            self._spawn_handler(self._serve, client, serial)
            if self.plan.rules:
                # A refusal planned for the next attempt: close the listener before it comes.
                seconds = self.plan.refuse_after(serial)
                if seconds is not None:
                    self._listener = None
                    listener.close()
                    self.faults["refuse"] += 1
                    self.last_fault_at = time.monotonic()
                    gevent.spawn_later(seconds, self._relisten)
                    return

    def _handle(self, client: Any) -> None:  # pragma: no cover - _accept_loop calls _serve
        self._serve(client, self.connections)

    def _serve(self, client: Any, serial: int) -> None:
        if self.record_accepts:
            self.accept_times.append(time.monotonic())
        plan_state, verdict = self.plan.new_connection(serial)
        if verdict is not None:
            self._fault(f"plan_{verdict}")
            if verdict == "reset":
                client.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_LINGER, _LINGER_RST)
            client.close()
            return
        try:
            upstream = gsocket.create_connection(self.upstream, timeout=self.connect_timeout)
        except OSError:
            client.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_LINGER, _LINGER_RST)
            client.close()
            return
        upstream.settimeout(None)  # rule 3 (r16): the connect timeout is for the connect only
        if self.nodelay:  # False: a middlebox with Nagle's algorithm on, as many are
            client.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
            upstream.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
        conn = _Conn(client, upstream, serial, plan_state)
        self._conns.add(conn)
        conn.flows = [_Flow(conn, client, upstream, "up", self.seed),
                      _Flow(conn, upstream, client, "down", self.seed)]
        for flow in conn.flows:
            self._chain(flow)
            if not (self._fast[flow.direction] and self._watch(flow)):
                conn.greenlets.append(gevent.spawn(self._reader, flow))

    # -- the pumps ----------------------------------------------------------------------------

    def _watch(self, flow: _Flow) -> bool:
        """The callback fast path (rule 2): a libev read watcher whose callback, run by the
        hub, does one ``recv_into`` and one non-blocking ``send`` on the raw sockets: no
        greenlet switch and no watcher start/stop per chunk (a greenlet pump costs about
        40 µs more per round trip, measured with benchmarks/bench_proxy.py). Anything else
        (a fault set, a send that would block, EOF with a fault set) hands the direction to
        ``_reader`` for good. False if the sockets do not expose their raw socket."""
        src, dst = getattr(flow.src, "_sock", None), getattr(flow.dst, "_sock", None)
        if src is None or dst is None:
            return False
        conn, direction = flow.conn, flow.direction
        buf = bytearray(self._bufsize)
        view = memoryview(buf)
        fast = self._fast
        up = direction == "up"
        watcher = self._loop_hub().loop.io(flow.src.fileno(), 1)  # 1: EV_READ

        def handover(sent: int = 0, n: int = 0) -> None:
            watcher.stop()
            if sent < n:  # the rest of this chunk first, in order, then the greenlet pump
                def rest() -> None:
                    try:
                        flow.dst.sendall(view[sent:n])
                    except OSError:
                        self._close_conn(conn, rst=True)
                        return
                    if up:
                        self.bytes_up += n - sent
                    else:
                        self.bytes_down += n - sent
                    self._reader(flow)
                conn.greenlets.append(gevent.spawn(rest))
            else:
                conn.greenlets.append(gevent.spawn(self._reader, flow))

        def readable() -> None:
            if conn.closed:
                watcher.stop()
                return
            if not fast[direction]:
                handover()
                return
            try:
                n = src.recv_into(buf)
            except BlockingIOError:
                return
            except OSError:
                n = 0
            if not n:
                watcher.stop()
                self._pass_eof(flow)
                return
            try:
                sent = dst.send(view[:n])
            except BlockingIOError:
                sent = 0
            except OSError:
                self._close_conn(conn, rst=True)
                return
            if up:
                self.bytes_up += sent
            else:
                self.bytes_down += sent
            if sent < n:
                handover(sent, n)

        conn.watchers.append(watcher)
        watcher.start(readable)
        return True

    def _loop_hub(self) -> Any:
        return gevent.get_hub()

    def _reader(self, flow: _Flow) -> None:
        conn, direction = flow.conn, flow.direction
        buf = bytearray(self._bufsize)
        view = memoryview(buf)
        recv_into, sendall = flow.src.recv_into, flow.dst.sendall
        fast = self._fast
        up = direction == "up"
        while True:
            try:
                n = recv_into(buf)
            except OSError:
                n = 0
            if conn.closed:
                return
            if not n:
                if flow.writer is None and fast[direction]:
                    self._pass_eof(flow)
                else:  # behind the data still queued, and through slow_close
                    self._queue(flow, _EOF)
                return
            if conn.holed:
                continue  # a stream with a gap is never forwarded again
            if fast[direction] and not flow.queued:
                try:
                    sendall(view[:n])
                except OSError:
                    self._close_conn(conn, rst=True)
                    return
                if up:
                    self.bytes_up += n
                else:
                    self.bytes_down += n
                continue
            self._queue(flow, (time.monotonic(), bytes(view[:n])))

    def _queue(self, flow: _Flow, item: Any) -> None:
        """Hand ``item`` to the flow's writer (started on first use); blocks while full."""
        if flow.writer is None:
            flow.queue = gevent.queue.Queue(_QUEUE_CHUNKS)
            flow.writer = gevent.spawn(self._writer, flow)
            flow.conn.greenlets.append(flow.writer)
        flow.queued += 1
        flow.queue.put(item)

    def _writer(self, flow: _Flow) -> None:
        while True:
            item = flow.queue.get()
            try:
                if item is _EOF:
                    self._eof(flow)
                    return
                ts, data = item
                if not self._forward(flow, ts, data):
                    return
            finally:
                flow.queued -= 1

    def _pass_eof(self, flow: _Flow) -> None:
        conn = flow.conn
        if flow.direction == "down":
            # The server's end of the stream closes the client's connection, as Toxiproxy's
            # link does when its upstream ends (and socat a moment later): a byte the client
            # writes after it meets a reset, as from a server that is gone — never a half-open
            # connection whose bytes go nowhere (docs/faultproxy.md).
            self._close_conn(conn, rst=False)
            return
        # The client's half-close: pass the FIN on, the answer keeps coming.
        conn.eofs += 1
        try:
            flow.dst.shutdown(gsocket.SHUT_WR)
        except OSError:
            conn.eofs = 2
        if conn.eofs >= 2:
            self._close_conn(conn, rst=False)

    def _eof(self, flow: _Flow) -> None:
        for toxic in self._chain(flow):
            if toxic.type == "slow_close" and toxic.attributes["delay"]:
                gevent.sleep(toxic.attributes["delay"] / 1000)
        if not flow.conn.closed:
            self._pass_eof(flow)

    def _forward(self, flow: _Flow, ts: float, data: bytes) -> bool:
        """Plan rules, then the older faults, then the toxics. False: connection gone."""
        if not self.plan.rules:
            return self._classic(flow, ts, data)
        for step in self.plan.on_data(flow.conn.plan, flow.direction, data):
            if step[0] == "send":
                if not self._classic(flow, ts, step[1]):
                    return False
            elif step[0] == "delay":
                gevent.sleep(step[1])
            else:
                self._fault("plan_" + step[1])
                self._close_conn(flow.conn, rst=step[1] == "reset")
                return False
        return True

    def _classic(self, flow: _Flow, ts: float, data: bytes) -> bool:
        conn, direction = flow.conn, flow.direction
        if self._blackhole or conn.holed:
            conn.holed = True
            return True
        if self._latency:
            gevent.sleep(self._latency)
        cut = self._cut[direction]
        if cut is not None and conn.serial >= self._cut_from:
            if len(data) >= cut:
                self._cut[direction] = None
                self._reconfigure()
                try:
                    if cut:
                        flow.dst.sendall(data[:cut])
                except OSError:
                    pass
                self.faults["cut"] += 1
                self.last_fault_at = time.monotonic()
                self._close_conn(conn, rst=self._cut_how == "reset")
                return False
            self._cut[direction] = cut - len(data)
        chain = self._chain(flow)
        if not chain:
            return self._send(flow, data)
        return self._toxic(flow, chain, 0, ts, data)

    def _send(self, flow: _Flow, data: bytes) -> bool:
        try:
            flow.dst.sendall(data)
        except OSError:
            self._close_conn(flow.conn, rst=True)
            return False
        if flow.direction == "up":
            self.bytes_up += len(data)
        else:
            self.bytes_down += len(data)
        return True

    def _toxic(self, flow: _Flow, chain: list[Toxic], i: int, ts: float, data: bytes) -> bool:
        """Pass ``data`` (received at ``ts``) through toxic ``i`` of ``chain`` and on."""
        if i == len(chain):
            return self._send(flow, data)
        toxic = chain[i]
        kind, attrs = toxic.type, toxic.attributes
        if kind == "latency":
            jitter = attrs["jitter"]
            delay = attrs["latency"] + (flow.rng.randrange(2 * jitter) - jitter if jitter else 0)
            ts += max(0, delay) / 1000
            wait = ts - time.monotonic()
            if wait > 0:
                gevent.sleep(wait)
            return self._toxic(flow, chain, i + 1, ts, data)
        if kind == "bandwidth":
            rate = attrs["rate"] * 1000  # bytes/s
            if rate <= 0:
                return self._toxic(flow, chain, i + 1, ts, data)
            piece = max(1, rate // 10)  # at most 100 ms worth at a time, as Toxiproxy does
            key = ("next", toxic.name)
            for at in range(0, len(data), piece):
                part = data[at:at + piece]
                due = max(flow.state.get(key, 0.0), time.monotonic()) + len(part) / rate
                flow.state[key] = due
                wait = due - time.monotonic()
                if wait > 0:
                    gevent.sleep(wait)
                if not self._toxic(flow, chain, i + 1, ts, part):
                    return False
            return True
        if kind == "timeout":  # drop; each chunk restarts the timer (Toxiproxy's loop does)
            if attrs["timeout"]:
                flow.state[("deadline", toxic.name)] = time.monotonic() + attrs["timeout"] / 1000
            return True
        if kind == "reset_peer":  # drop; the first chunk arms the reset
            if ("armed", toxic.name) not in flow.state:
                flow.state[("armed", toxic.name)] = True
                g = gevent.spawn_later(attrs["timeout"] / 1000, self._reset_peer, flow.conn)
                flow.conn.greenlets.append(g)
            return True
        if kind == "slicer":
            cuts = slice_offsets(0, len(data), attrs["average_size"], attrs["size_variation"],
                                 flow.rng)
            for a, b in zip(cuts, cuts[1:]):
                if not self._toxic(flow, chain, i + 1, ts, data[a:b]):
                    return False
                if attrs["delay"]:
                    gevent.sleep(attrs["delay"] / 1e6)
            return True
        if kind == "limit_data":
            key = ("sent", toxic.name)
            sent = flow.state.get(key, 0)
            part = data[:max(0, attrs["bytes"] - sent)]
            if part:
                if not self._toxic(flow, chain, i + 1, ts, part):
                    return False
                sent += len(part)
                flow.state[key] = sent
            if sent >= attrs["bytes"]:
                self._fault("limit_data")
                self._close_conn(flow.conn, rst=False)
                return False
            return True
        # slow_close acts on the EOF (_eof); its data passes.
        return self._toxic(flow, chain, i + 1, ts, data)

    def _reset_peer(self, conn: _Conn) -> None:
        if not conn.closed:
            self._fault("reset_peer")
            self._close_conn(conn, rst=True)


def _join(address: tuple[str, int]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """"HOST:PORT", "[V6]:PORT" or ":PORT" -> (host, port). Raises ValueError."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return (host or default_host, int(port))


__all__ = ["FaultProxy", "Toxic", "ToxicError", "parse_address", "parse_stream"]
