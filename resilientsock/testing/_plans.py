"""Fault plans: deterministic faults at exact points of a conversation (sans-IO).

A plan is a list of rules. Each rule names a trigger and an action; the proxy feeds the plan
what happens (``new_connection`` and ``refuse_after`` at each accept; ``on_data`` for every
chunk it receives, in order) and gets back what to do. No socket, clock or randomness in
here: the same traffic gives the same faults, so a test can say exactly which exchange
breaks. Rules of this module:

1. Counting starts when the rule is added. "Connection 1" is the first connection accepted
   after ``on_connection(...)`` / ``after_bytes(...)``; occurrence 1 of a pattern, and
   exchange 1 of ``on_response``, are the first seen after the rule was added, over all
   connections in accept order.
2. Bytes are counted as the proxy receives them from the sender (before any fault or toxic),
   so ``after_bytes(100, "up")`` means "after the client's 100th byte", whatever else drops.
3. An action that cuts ("reset": RST, "close": FIN) forwards the bytes before the trigger and
   nothing from the trigger on. "delay" holds the stream at the trigger for ``seconds``, then
   goes on. "drop" discards from the trigger through the next ``until`` bytes (default a
   newline), across chunks if needed, and keeps the connection.
4. A pattern that straddles two reads is found when its last byte arrives; its first part has
   then already been forwarded (a proxy cannot hold bytes back waiting for more without
   stalling a protocol whose message ends there). Writes made by one ``sendall`` of a small
   message arrive in one read on loopback, which is what the tests rely on.
5. Every firing is recorded in ``fired`` as ``(rule description, connection serial)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ._toxics import parse_stream

_CUTS = ("reset", "close")
_DIR = {"upstream": "up", "downstream": "down"}

# What on_data returns: a list of steps, applied in order.
#   ("send", bytes)   forward these bytes
#   ("delay", float)  pause this direction for that many seconds
#   ("cut", "reset"|"close", description)  cut the connection; nothing more is forwarded
Step = tuple[Any, ...]


def _nth_set(nth: int | Iterable[int]) -> frozenset[int]:
    values = frozenset([nth]) if isinstance(nth, int) else frozenset(nth)
    if not values or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                         for n in values):
        raise ValueError(f"nth must be an int >= 1 or a non-empty set of them, got {nth!r}")
    return values


def _direction(direction: str) -> str:
    return _DIR[parse_stream(direction)]


@dataclass
class _Rule:
    kind: str  # "connection", "bytes", "response", "pattern"
    action: str
    nth: frozenset[int]
    first_serial: int  # the serial of "connection 1" for this rule
    direction: str = "up"
    nbytes: int = 0
    pattern: bytes = b""
    seconds: float = 0.0
    until: bytes = b"\n"
    count: int = 0  # exchanges / occurrences seen so far
    done: set[int] = field(default_factory=set)  # connection numbers already failed

    def describe(self) -> str:
        nth = ",".join(str(n) for n in sorted(self.nth))
        if self.kind == "connection":
            return f"connection #{nth}: {self.action}"
        if self.kind == "bytes":
            return f"after {self.nbytes} B {self.direction} on connection #{nth}: {self.action}"
        if self.kind == "response":
            return f"response #{nth}: {self.action}"
        return f"pattern {self.pattern!r} {self.direction} #{nth}: {self.action}"


@dataclass
class ConnPlanState:
    """What a plan remembers about one connection (created by ``FaultPlan.new_connection``)."""

    serial: int
    received: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})
    last_direction: str = ""  # the direction of the last data seen (for exchanges)
    tails: dict[int, bytes] = field(default_factory=dict)  # id(rule) -> last len(pattern)-1 B
    dropping: dict[int, bytes] = field(default_factory=dict)  # id(rule) -> until
    cut_bytes_done: set[int] = field(default_factory=set)  # id(rule) of fired byte rules


class FaultPlan:
    """The rules of one FaultProxy (``proxy.plan``). Methods that add rules are called from
    any thread: they hand over to the proxy's loop. Raises ValueError on a bad argument,
    before anything changes."""

    def __init__(self, call: Any = None, changed: Any = None, serial: Any = None) -> None:
        self._call = call or (lambda f, *a: f(*a))  # runs f in the proxy's loop
        self._changed = changed or (lambda: None)  # tells the proxy to recompute fast paths
        self._serial = serial or (lambda: 0)  # the serial of the latest accepted connection
        self.rules: list[_Rule] = []
        self.fired: list[tuple[str, int]] = []

    # -- adding rules (public) ------------------------------------------------------------------

    def on_connection(self, nth: int | Iterable[int], action: str = "reset",
                      seconds: float = 0.5) -> None:
        """Fail connection ``nth`` (counted from now; an int or a set): "reset" sends RST
        right after the accept and "close" a FIN (the server is never contacted; the client
        sees the RST on its first read or write, or even from ``connect()`` itself);
        "refuse" closes the listener once connection ``nth - 1`` is accepted, for
        ``seconds``, so that attempt (and any other in that window) gets ECONNREFUSED."""
        if action not in ("reset", "close", "refuse"):
            raise ValueError(f"action must be 'reset', 'close' or 'refuse', got {action!r}")
        if seconds <= 0:
            raise ValueError(f"seconds must be > 0, got {seconds!r}")
        self._add("connection", action, nth, seconds=seconds)

    def after_bytes(self, nbytes: int, direction: str = "down", action: str = "reset",
                    connection: int | Iterable[int] = 1) -> None:
        """Cut connection ``connection`` (counted from now) right after its ``nbytes``-th
        byte in ``direction``: exactly ``nbytes`` are forwarded, then RST ("reset") or FIN
        ("close")."""
        if action not in _CUTS:
            raise ValueError(f"action must be 'reset' or 'close', got {action!r}")
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"nbytes must be an int >= 0, got {nbytes!r}")
        self._add("bytes", action, connection, direction=_direction(direction), nbytes=nbytes)

    def on_response(self, nth: int | Iterable[int], action: str = "close") -> None:
        """Cut the connection between a request and its response: exchange ``nth`` (the
        nth time, counted from now over all connections, that the server answers after the
        client sent something) is cut at the answer's first byte. The server got and handled
        the request; the client gets none of the answer."""
        if action not in _CUTS:
            raise ValueError(f"action must be 'reset' or 'close', got {action!r}")
        self._add("response", action, nth)

    def on_pattern(self, pattern: bytes, direction: str = "up",
                   nth: int | Iterable[int] = 1, action: str = "reset",
                   seconds: float = 0.0, until: bytes = b"\n") -> None:
        """On occurrence ``nth`` of ``pattern`` in ``direction`` (counted from now over all
        connections): "reset" / "close" cut the connection there, "delay" holds the stream
        there for ``seconds``, "drop" discards from the pattern through the next ``until``."""
        if not isinstance(pattern, bytes) or not pattern:
            raise ValueError(f"pattern must be non-empty bytes, got {pattern!r}")
        if action not in (*_CUTS, "delay", "drop"):
            raise ValueError(f"action must be 'reset', 'close', 'delay' or 'drop', "
                             f"got {action!r}")
        if action == "delay" and seconds <= 0:
            raise ValueError("action 'delay' needs seconds > 0")
        if action == "drop" and (not isinstance(until, bytes) or not until):
            raise ValueError(f"until must be non-empty bytes, got {until!r}")
        self._add("pattern", action, nth, direction=_direction(direction), pattern=pattern,
                  seconds=seconds, until=until)

    def clear(self) -> None:
        """Remove every rule (``fired`` is kept)."""
        def clear() -> None:
            self.rules.clear()
            self._changed()
        self._call(clear)

    def _add(self, kind: str, action: str, nth: int | Iterable[int], **kw: Any) -> None:
        nths = _nth_set(nth)

        def add() -> None:
            rule = _Rule(kind, action, nths, self._serial() + 1, **kw)
            self.rules.append(rule)
            self._changed()
        self._call(add)

    # -- feeding events (inside the proxy's loop) ----------------------------------------------

    @property
    def active(self) -> bool:
        return bool(self.rules)

    def refuse_after(self, serial: int) -> float | None:
        """Connection ``serial`` was just accepted (0: none yet). Must the listener close now,
        so that the next attempt is refused? Returns for how many seconds (else None)."""
        for rule in self.rules:
            number = serial + 1 - rule.first_serial + 1
            if rule.kind == "connection" and rule.action == "refuse" and \
                    number in rule.nth and number not in rule.done:
                rule.done.add(number)
                self.fired.append((rule.describe(), serial + 1))
                return rule.seconds
        return None

    def new_connection(self, serial: int) -> tuple[ConnPlanState, str | None]:
        """Connection ``serial`` is being set up: returns its state, and "reset" / "close"
        if a rule fails it at once (else None)."""
        verdict = None
        for rule in self.rules:
            number = serial - rule.first_serial + 1
            if rule.kind == "connection" and rule.action != "refuse" and \
                    number in rule.nth and number not in rule.done:
                rule.done.add(number)
                self.fired.append((rule.describe(), serial))
                verdict = verdict or rule.action
        return ConnPlanState(serial), verdict

    def on_data(self, state: ConnPlanState, direction: str, data: bytes) -> list[Step]:
        """What to do with ``data`` just received in ``direction`` ("up"/"down")."""
        steps: list[Step] = []
        pos = 0
        # Continue a "drop" that did not find its end in an earlier chunk.
        for key, until in list(state.dropping.items()):
            end = data.find(until)
            if end < 0:
                return self._finish(state, direction, data, steps)
            del state.dropping[key]
            pos = max(pos, end + len(until))

        events: list[tuple[int, int, _Rule]] = []  # (offset, order, rule)
        turn = direction == "down" and state.last_direction == "up"
        for order, rule in enumerate(self.rules):
            if rule.kind == "response" and turn:
                events.append((0, order, rule))
            elif rule.kind == "bytes" and rule.direction == direction and \
                    id(rule) not in state.cut_bytes_done and \
                    state.serial - rule.first_serial + 1 in rule.nth:
                offset = rule.nbytes - state.received[direction]
                if 0 <= offset <= len(data) and data:
                    events.append((offset, order, rule))
            elif rule.kind == "pattern" and rule.direction == direction:
                tail = state.tails.get(id(rule), b"")
                buf = tail + data
                at = buf.find(rule.pattern)
                while at >= 0:
                    events.append((max(0, at - len(tail)), order, rule))
                    at = buf.find(rule.pattern, at + 1)
                keep = len(rule.pattern) - 1
                state.tails[id(rule)] = buf[-keep:] if keep else b""
        events.sort(key=lambda e: (e[0], e[1]))

        for offset, _, rule in events:
            if offset < pos:
                continue  # inside bytes a "drop" already discarded
            if rule.kind == "bytes":
                state.cut_bytes_done.add(id(rule))
                fire = True
            else:
                rule.count += 1
                fire = rule.count in rule.nth
            if not fire:
                continue
            self.fired.append((rule.describe(), state.serial))
            if offset > pos:
                steps.append(("send", data[pos:offset]))
            pos = offset
            if rule.action in _CUTS:
                steps.append(("cut", rule.action, rule.describe()))
                return self._finish(state, direction, data, steps, cut=True)
            if rule.action == "delay":
                steps.append(("delay", rule.seconds))
            else:  # drop
                end = data.find(rule.until, offset)
                if end < 0:
                    state.dropping[id(rule)] = rule.until
                    pos = len(data)
                else:
                    pos = end + len(rule.until)
        if pos < len(data):
            steps.append(("send", data[pos:] if pos else data))
        return self._finish(state, direction, data, steps)

    def _finish(self, state: ConnPlanState, direction: str, data: bytes, steps: list[Step],
                cut: bool = False) -> list[Step]:
        state.received[direction] += len(data)
        if data:
            state.last_direction = direction
        return steps
