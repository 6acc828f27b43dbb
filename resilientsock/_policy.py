"""RetryPolicy: how hard a resilient socket tries, as an immutable value object.

Rules of this module:

1. A policy is frozen and validated at construction: a bad value is a ``ValueError`` that names
   the field, never a failure deep inside a reconnect.
2. Backoff is a pure function of the attempt number and a random source (``backoff``), so the
   schedule is tested without sleeping. Attempt 0 (the first reconnect) is immediate: a lone
   drop costs one round trip.
3. Full jitter, applied *after* the cap: delay = uniform(0, min(max, initial * mult**(n-1))).
   (AWS Architecture Blog, "Exponential Backoff And Jitter", 2015. urllib3 and stamina jitter
   before capping, which re-synchronises a fleet once everyone reaches the cap.)
4. Every knob is also an environment variable ``RESILIENTSOCK_<FIELD>`` and a runner option
   ``--<field-with-dashes>`` (``from_env``; the runner builds its options from ``FIELDS``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypedDict, get_args

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["RetryPolicy", "FIELDS", "ReplayMode", "ConfirmMode", "EofMode", "PolicyFields",
           "PatchFields", "FieldError", "env_texts", "apply_texts"]

# The mode options as types: ``mypy --strict`` flags a misspelled mode in a user's script.
ReplayMode = Literal["idempotent", "unanswered", "safe", "none"]
ConfirmMode = Literal["answer", "tcp-ack", "explicit"]
EofMode = Literal["unanswered-is-drop", "pass"]
REPLAY_MODES: tuple[str, ...] = get_args(ReplayMode)
CONFIRM_MODES: tuple[str, ...] = get_args(ConfirmMode)
EOF_MODES: tuple[str, ...] = get_args(EofMode)


class PatchFields(TypedDict, total=False):
    """The policy keywords of ``patch()`` (for type checkers; ``session`` is patch's own)."""

    deadline: float | None
    max_attempts: int | None
    backoff_initial: float
    backoff_multiplier: float
    backoff_max: float
    connect_timeout: float | None
    retry_connect: bool
    replay: ReplayMode
    confirm: ConfirmMode
    journal_limit: int
    dead_peer_timeout: float | None
    eof: EofMode
    retry_read_timeouts: bool
    reconnect_rate: float
    resume_answers: bool
    prelude: int
    on_disconnect: Callable[..., Any] | None
    on_reconnect: Callable[..., Any] | None


class PolicyFields(PatchFields, total=False):
    """The keywords of ``RetryPolicy.replace`` (for type checkers)."""

    session: bool
    session_key: str | bytes | None


@dataclass(frozen=True)
class RetryPolicy:
    """How a resilient socket recovers: an immutable value, validated at construction (a
    bad value is a ValueError naming the field, an unknown keyword a TypeError). Each field
    below says its type, default and effect, with an example; ``replace(**changes)`` makes a
    modified copy. Every field is also a runner option ``--field-name`` and an environment
    variable ``RESILIENTSOCK_FIELD_NAME`` (``from_env``).
    """

    deadline: float | None = 30.0
    """Seconds one call may spend recovering from a drop (one recovery episode). Long enough
    for a server restart or a DHCP renewal, short enough that a script does not hang
    silently. ``None``: no limit (then ``max_attempts`` must be set). A socket's own timeout
    still wins: a call never takes longer than ``settimeout()`` allows.
    Example: ``RetryPolicy(deadline=120)`` for a server that takes two minutes to restart."""
    max_attempts: int | None = None
    """Reconnect attempts per recovery episode; ``None``: until the deadline.
    Example: ``RetryPolicy(max_attempts=3)`` to give up after three attempts."""
    backoff_initial: float = 0.05
    """Seconds: the ceiling of the wait before the second reconnect attempt (the first is
    immediate). Each later ceiling is ``backoff_multiplier`` times larger, capped at
    ``backoff_max``; the wait is uniform between 0 and the ceiling (full jitter). The schedule
    restarts once an attempt reaches the server after attempts that found nobody.
    Example: ``RetryPolicy(backoff_initial=0.5)`` for a server that dislikes quick retries."""
    backoff_multiplier: float = 2.0
    """The growth of the backoff ceiling per attempt (>= 1). 0.05 s doubling reaches the 5 s
    cap after about 7 attempts. Example: ``RetryPolicy(backoff_multiplier=1.5)``."""
    backoff_max: float = 5.0
    """Seconds: the cap of the backoff ceiling (>= ``backoff_initial``).
    Example: ``RetryPolicy(backoff_max=30)`` for a fleet that must not hammer a server."""
    connect_timeout: float | None = 10.0
    """Seconds per reconnect attempt and per address (TCP connect + TLS handshake), also
    bounded by what is left of the deadline. Example: ``RetryPolicy(connect_timeout=2)``."""
    retry_connect: bool = True
    """Retry the application's own first connect too (a server that is restarting when the
    script starts). ``False``: a failed first connect raises at once, as without us.
    Example: ``RetryPolicy(retry_connect=False)``."""
    replay: ReplayMode = "idempotent"
    """What is re-sent after a reconnect. ``"idempotent"`` (default): every write whose answer
    never came, except a request that may have reached the server and that the protocol's
    dialect knows is not idempotent (HTTP POST / PATCH without ``Idempotency-Key``, RESP
    INCR, memcached incr, ...): that drop is surfaced with a note naming the request, as the
    plain client sees it; unknown protocols get at-least-once. ``"unanswered"``: opt in to
    at-least-once for every request, idempotent or not (a request whose answer was lost
    arrives twice). ``"safe"``: only the first write on an idle reused connection (a request
    the server cannot have seen). ``"none"``: nothing (the error is surfaced instead).
    docs/choosing-a-mode.md compares them.
    Example: ``RetryPolicy(replay="unanswered")`` for a queue whose consumers dedupe."""
    confirm: ConfirmMode = "answer"
    """When a written record counts as delivered (and leaves the journal). ``"answer"``: when
    the peer answers after it. ``"tcp-ack"``: when the peer's TCP acknowledged it (for
    write-only streams: logs, metrics). ``"explicit"``: only when the application calls
    ``sock.confirm()``. Example: ``RetryPolicy(confirm="tcp-ack")`` for a log shipper."""
    journal_limit: int = 16 * 1024 * 1024
    """Bytes of unconfirmed writes kept for re-sending (16 MiB); beyond it, a drop is surfaced
    instead of recovered. ``0``: keep nothing. Example: ``RetryPolicy(journal_limit=1 << 20)``."""
    dead_peer_timeout: float | None = 30.0
    """Seconds: kernel keepalive and ``TCP_USER_TIMEOUT`` set on every connection, so a
    silently dead link surfaces as a drop (ETIMEDOUT); ``None`` leaves the kernel's defaults
    (hours). Example: ``RetryPolicy(dead_peer_timeout=10)`` on a roaming robot."""
    eof: EofMode = "unanswered-is-drop"
    """An EOF while writes are unanswered: ``"unanswered-is-drop"`` treats it as a drop
    (reconnect, re-send), and an EOF that the protocol's framing says cut an answer is
    resumed; ``"pass"`` returns ``b""`` to the application in both cases, as without us.
    Example: ``RetryPolicy(eof="pass")`` for a protocol where the server closes to answer."""
    retry_read_timeouts: bool = False
    """``True``: a read that times out is treated as a drop (reconnect, re-send). Off by
    default: a read timeout usually means a busy peer, not a dead link.
    Example: ``RetryPolicy(retry_read_timeouts=True)`` behind a link that black-holes."""
    reconnect_rate: float = 200.0
    """Reconnect attempts per second, process-wide (a token bucket with a burst of
    ``reconnect_rate / 10``), so a mass drop does not become a herd; a lone drop never waits.
    Example: ``RetryPolicy(reconnect_rate=20)`` for a server that accepts few connections."""
    resume_answers: bool = True
    """Resume an answer cut in the middle (docs/design.md §5b): the request is re-sent and the
    new answer's first bytes must equal what the caller already got, else the drop is
    surfaced. Only for requests a dialect calls idempotent (HTTP GET, read-only redis
    commands). Example: ``RetryPolicy(resume_answers=False)``."""
    prelude: int = 0
    """The first N exchanges of every connection of an unknown protocol are its setup (a login,
    a ``USE db``): re-sent first on each new connection, their answers checked byte for byte.
    Example: ``RetryPolicy(prelude=1)`` for a protocol that opens with an AUTH exchange."""
    session: bool = False
    """This socket speaks the session protocol to a ``Relay`` (exactly-once; docs/design.md
    §11). ``patch(session=["HOST:PORT"])`` or ``--session`` choose targets by address instead.
    Example: ``ResilientSocket.connect(relay, RetryPolicy(session=True))``."""
    session_key: str | bytes | None = dataclasses.field(default=None, repr=False, compare=False)
    """The relay's creation key, for a relay started with ``--creation-key-file`` (else the
    ``RESILIENTSOCK_SESSION_KEY`` environment variable): only clients that hold it may create
    sessions. A secret: never shown in ``repr`` and not a runner option.
    Example: ``RetryPolicy(session=True, session_key=open("relay.key", "rb").read())``."""
    on_disconnect: Callable[..., Any] | None = dataclasses.field(default=None, compare=False)
    """Hook ``on_disconnect(sock, info)``: called when a drop is noticed (``info`` is an
    ``ErrorInfo``). Example: ``RetryPolicy(on_disconnect=lambda s, i: print(i.category))``."""
    on_reconnect: Callable[..., Any] | None = dataclasses.field(default=None, compare=False)
    """Hook ``on_reconnect(sock, attempt)``: runs on the new connection before the re-send
    (re-authenticate, re-subscribe); its own I/O is not journaled, and an exception from it
    fails that attempt. Example: ``RetryPolicy(on_reconnect=login)``."""

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return FieldError(field, f"RetryPolicy.{field}: {why} (got {getattr(self, field)!r})")

        for field in ("deadline", "connect_timeout", "dead_peer_timeout"):
            value = getattr(self, field)
            if value is not None and not _positive_number(value):
                raise bad(field, "must be a positive number of seconds or None")
        if self.max_attempts is not None and (
            not isinstance(self.max_attempts, int)
            or isinstance(self.max_attempts, bool)
            or self.max_attempts < 1
        ):
            raise bad("max_attempts", "must be a whole number >= 1 or None")
        if self.deadline is None and self.max_attempts is None:
            raise bad("deadline", "deadline=None needs max_attempts, or recovery never ends")
        if not _number(self.backoff_initial) or self.backoff_initial < 0:
            raise bad("backoff_initial", "must be a number >= 0")
        if not _number(self.backoff_multiplier) or self.backoff_multiplier < 1:
            raise bad("backoff_multiplier", "must be a number >= 1")
        if not _number(self.backoff_max) or self.backoff_max < self.backoff_initial:
            raise bad("backoff_max", "must be a number >= backoff_initial")
        if self.replay not in REPLAY_MODES:
            raise bad("replay", f"must be one of {', '.join(REPLAY_MODES)}")
        if self.confirm not in CONFIRM_MODES:
            raise bad("confirm", f"must be one of {', '.join(CONFIRM_MODES)}")
        if self.eof not in EOF_MODES:
            raise bad("eof", f"must be one of {', '.join(EOF_MODES)}")
        if (
            not isinstance(self.journal_limit, int)
            or isinstance(self.journal_limit, bool)
            or self.journal_limit < 0
        ):
            raise bad("journal_limit", "must be a whole number of bytes >= 0")
        if not _positive_number(self.reconnect_rate):
            raise bad("reconnect_rate", "must be a positive number of attempts per second")
        if (not isinstance(self.prelude, int) or isinstance(self.prelude, bool)
                or self.prelude < 0):
            raise bad("prelude", "must be a whole number of exchanges >= 0")
        for field in ("retry_connect", "retry_read_timeouts", "resume_answers", "session"):
            if not isinstance(getattr(self, field), bool):
                raise bad(field, "must be True or False")
        if self.session_key is not None and (
                not isinstance(self.session_key, str | bytes) or not self.session_key):
            raise FieldError("session_key", "RetryPolicy.session_key: must be a non-empty str "
                             "or bytes, or None")
        for field in ("on_disconnect", "on_reconnect"):
            value = getattr(self, field)
            if value is not None and not callable(value):
                raise bad(field, "must be callable or None")

    def replace(self, **changes: Unpack[PolicyFields]) -> RetryPolicy:
        """A copy with ``changes`` applied, validated. An unknown name is a TypeError naming
        it (as for any Python call); a bad value a ValueError naming the field."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"RetryPolicy has no field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def backoff(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before reconnect attempt number ``attempt`` (0-based).

        Attempt 0 is immediate. Attempt n >= 1 waits uniform(0, min(max, initial*mult**(n-1))).
        """
        if attempt <= 0:
            return 0.0
        try:
            ceiling = self.backoff_initial * self.backoff_multiplier ** (attempt - 1)
        except OverflowError:
            ceiling = math.inf
        return rand() * min(self.backoff_max, ceiling)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, base: RetryPolicy | None = None
    ) -> RetryPolicy:
        """A policy from ``RESILIENTSOCK_*`` variables over ``base`` (default: the defaults).

        A malformed value is a ValueError naming the variable.
        """
        environ = os.environ if environ is None else environ
        return apply_texts(base or cls(), env_texts(environ))

    def summary(self) -> str:
        """A short description for logs and ``--stats``."""
        parts = [f"{f}={getattr(self, f)!r}" for f in FIELDS]
        return ", ".join(parts)


class FieldError(ValueError):
    """A bad policy value: a ValueError whose ``field`` says which field (so the runner and
    ``from_env`` can name the option or the variable the value came from)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return FieldError, (self.field, str(self))


def env_texts(environ: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """The ``RESILIENTSOCK_*`` variables set in ``environ``: field -> (how it is named in an
    error, its text). An empty variable counts as unset (a variable emptied in a shell or a
    compose file), as ``RESILIENTSOCK_SESSION=`` and ``RESILIENTSOCK_LOG_LEVEL=`` do."""
    texts = {}
    for name in FIELDS:
        var = "RESILIENTSOCK_" + name.upper()
        if environ.get(var, "").strip():
            texts[name] = (f"{var}={environ[var]!r}", environ[var])
    return texts


def apply_texts(policy: RetryPolicy, texts: Mapping[str, tuple[str, str]]) -> RetryPolicy:
    """``policy`` with each field's text parsed and applied (``texts``: field -> (source,
    text), as ``env_texts`` gives them), validated together. A ValueError names the source
    of the bad value (``RESILIENTSOCK_DEADLINE='-1': ...``, ``--deadline '-1': ...``), or
    every source involved when the values only clash with each other or with a default."""
    changes: dict[str, Any] = {}
    for name, (source, text) in texts.items():
        try:
            changes[name] = FIELDS[name].parse(text)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None
    try:
        return policy.replace(**changes)
    except FieldError as exc:
        if exc.field in texts:
            raise ValueError(f"{texts[exc.field][0]}: {exc}") from None
        raise ValueError(f"{', '.join(source for source, _ in texts.values())}: {exc}") from None


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _positive_number(value: object) -> bool:
    return _number(value) and value > 0  # type: ignore[operator]


@dataclass(frozen=True)
class FieldSpec:
    """How a policy field is spelled on the command line and in the environment."""

    help: str
    parse: Callable[[str], Any]
    metavar: str = "N"
    choices: tuple[str, ...] | None = None


def _seconds_or_none(text: str) -> float | None:
    if text.strip().lower() in ("none", "off", ""):
        return None
    return float(text)


def _int_or_none(text: str) -> int | None:
    if text.strip().lower() in ("none", "off", ""):
        return None
    return int(text)


def _size(text: str) -> int:
    text = text.strip().lower()
    for suffix, factor in (("kib", 1024), ("mib", 1024**2), ("gib", 1024**3),
                           ("k", 1024), ("m", 1024**2), ("g", 1024**3)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return text

    return parse


# Runner options and environment variables, one per policy knob (hooks excluded: not text).
FIELDS: dict[str, FieldSpec] = {
    "deadline": FieldSpec("seconds one call may spend recovering; 'none' = only max-attempts "
                          "(default 30)", _seconds_or_none, "SECONDS"),
    "max_attempts": FieldSpec("reconnect attempts per call; 'none' = until the deadline "
                              "(default none)", _int_or_none),
    "backoff_initial": FieldSpec("first backoff ceiling in seconds (default 0.05)", float,
                                 "SECONDS"),
    "backoff_multiplier": FieldSpec("backoff growth per attempt (default 2.0)", float, "X"),
    "backoff_max": FieldSpec("backoff cap in seconds, before full jitter (default 5.0)",
                             float, "SECONDS"),
    "connect_timeout": FieldSpec("timeout per reconnect attempt incl. TLS handshake "
                                 "(default 10)", _seconds_or_none, "SECONDS"),
    "retry_connect": FieldSpec("also retry the application's first connect (default 1)",
                               _bool, "BOOL"),
    "replay": FieldSpec("re-send unanswered writes after a reconnect: idempotent (not a "
                        "request a dialect knows is not idempotent) | unanswered "
                        "(at-least-once) | safe | none (default idempotent)",
                        _choice(REPLAY_MODES), "MODE", REPLAY_MODES),
    "confirm": FieldSpec("when a write counts as delivered: answer | tcp-ack | explicit "
                         "(default answer)", _choice(CONFIRM_MODES), "MODE", CONFIRM_MODES),
    "journal_limit": FieldSpec("unconfirmed bytes kept for replay, e.g. 16MiB (default 16MiB)",
                               _size, "BYTES"),
    "dead_peer_timeout": FieldSpec("detect a silently dead link after about this many seconds "
                                   "(keepalive + TCP_USER_TIMEOUT); 'none' = kernel defaults "
                                   "(default 30)", _seconds_or_none, "SECONDS"),
    "eof": FieldSpec("EOF while writes are unanswered: unanswered-is-drop | pass "
                     "(default unanswered-is-drop)", _choice(EOF_MODES), "MODE", EOF_MODES),
    "retry_read_timeouts": FieldSpec("also retry the application's read timeouts (default 0)",
                                     _bool, "BOOL"),
    "reconnect_rate": FieldSpec("process-wide reconnect attempts per second (default 200)",
                                float, "PER_S"),
    "resume_answers": FieldSpec("resume an answer cut in the middle by re-sending its "
                                "idempotent request and checking the new answer's prefix "
                                "(default 1)", _bool, "BOOL"),
    "prelude": FieldSpec("the first N exchanges of every connection are its setup, re-sent "
                         "first on each new connection (default 0)", int, "N"),
}
