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
from typing import Any

__all__ = ["RetryPolicy", "FIELDS"]

REPLAY_MODES = ("unanswered", "safe", "none")
CONFIRM_MODES = ("answer", "tcp-ack", "explicit")
EOF_MODES = ("unanswered-is-drop", "pass")


@dataclass(frozen=True)
class RetryPolicy:
    """How a resilient socket recovers. Defaults, and why:

    deadline (30 s): seconds one call may spend recovering. Long enough for a server restart
        or a DHCP renewal, short enough that a script does not hang silently. None: no limit
        (then ``max_attempts`` must be set).
    max_attempts (None): reconnect attempts per call; None means "until the deadline".
    backoff_initial (0.05 s), backoff_multiplier (2.0), backoff_max (5.0 s): the exponential
        schedule before full jitter. 0.05 s reaches the 5 s cap after ~7 attempts. The
        schedule restarts once an attempt reaches the server after attempts that found
        nobody, and a wait that would outlast the budget becomes one last attempt just
        before the budget ends.
    connect_timeout (10 s): per reconnect attempt (TCP connect + TLS handshake), also bounded
        by what is left of the deadline.
    retry_connect (True): the application's own first connect is retried too (a server that
        is restarting when the script starts).
    replay ("unanswered"): re-send unconfirmed records after a reconnect ("safe": only the
        first write on an idle reused connection; "none": never re-send).
    confirm ("answer"): when a record counts as delivered ("tcp-ack": once the peer's TCP
        acknowledged it, for write-only streams; "explicit": only ``sock.confirm()``).
    journal_limit (16 MiB): unconfirmed bytes kept for replay; beyond it, a drop is surfaced.
    dead_peer_timeout (30 s): kernel keepalive + TCP_USER_TIMEOUT so a silently dead link
        surfaces as ETIMEDOUT; None leaves the kernel defaults (hours).
    eof ("unanswered-is-drop"): EOF while writes are unanswered is a drop, and an EOF that the
        protocol's framing says cut an answer is resumed softly (docs/decisions.md); "pass"
        returns b"" in both cases.
    retry_read_timeouts (False): a read timeout is surfaced (the peer is probably busy).
    reconnect_rate (200/s): process-wide token bucket for reconnect attempts, burst of
        ``reconnect_rate / 10`` so a lone drop never waits. A loopback server accepts far more;
        a real one after a mass drop often cannot, and 200/s clears 2,000 clients in ~10 s.
        (Picked, not measured against a particular server.)
    resume_answers (True): a drop in the middle of an answer is resumed (DESIGN §5b): the
        request is re-sent on a new connection and the new answer's first K bytes (K = what
        the caller already got) are checked against a digest of what the caller got; equal,
        the caller continues at byte K; different, the drop is surfaced. Only for requests a
        dialect calls idempotent (HTTP methods of RFC 9110 §9.2.2, read-only RESP commands);
        for an unknown protocol the bytes decide (at-least-once, as for unanswered writes).
    prelude (0): the first N exchanges (requests up to the first answer byte, and that answer)
        of every connection of an unknown protocol are its setup: re-sent first on each new
        connection, and their answers must equal the originals byte for byte (DESIGN §5a).
    session (False): this socket speaks the session protocol to a relay (DESIGN §11);
        ``patch(session=[...])`` / ``--session`` choose targets by address instead.
    session_key (None): the relay's creation key, for a relay started with
        ``--creation-key-file`` (else the ``RESILIENTSOCK_SESSION_KEY`` variable); never shown.
    on_disconnect(sock, info) / on_reconnect(sock, attempt): hooks. ``on_reconnect`` runs on
        the new connection before the replay (re-authenticate, re-subscribe); its own I/O is
        not journaled, and an exception from it fails that attempt.
    """

    deadline: float | None = 30.0
    max_attempts: int | None = None
    backoff_initial: float = 0.05
    backoff_multiplier: float = 2.0
    backoff_max: float = 5.0
    connect_timeout: float | None = 10.0
    retry_connect: bool = True
    replay: str = "unanswered"
    confirm: str = "answer"
    journal_limit: int = 16 * 1024 * 1024
    dead_peer_timeout: float | None = 30.0
    eof: str = "unanswered-is-drop"
    retry_read_timeouts: bool = False
    reconnect_rate: float = 200.0
    resume_answers: bool = True
    prelude: int = 0
    session: bool = False
    # The relay's creation key (``relay --creation-key-file``; else RESILIENTSOCK_SESSION_KEY):
    # a secret, so never shown (repr=False) and not a runner option.
    session_key: str | bytes | None = dataclasses.field(default=None, repr=False, compare=False)
    on_disconnect: Callable[..., Any] | None = dataclasses.field(default=None, compare=False)
    on_reconnect: Callable[..., Any] | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(
                f"RetryPolicy.{field}: {why} (got {getattr(self, field)!r})"
            )

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
            raise ValueError("RetryPolicy.session_key: must be a non-empty str or bytes, or None")
        for field in ("on_disconnect", "on_reconnect"):
            value = getattr(self, field)
            if value is not None and not callable(value):
                raise bad(field, "must be callable or None")

    def replace(self, **changes: Any) -> RetryPolicy:
        """A copy with ``changes`` applied (validated; unknown names are a ValueError)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"RetryPolicy has no field(s): {', '.join(sorted(unknown))}")
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
        changes: dict[str, Any] = {}
        for name, spec in FIELDS.items():
            var = "RESILIENTSOCK_" + name.upper()
            if var in environ:
                try:
                    changes[name] = spec.parse(environ[var])
                except ValueError as exc:
                    raise ValueError(f"{var}={environ[var]!r}: {exc}") from None
        policy = base or cls()
        try:
            return policy.replace(**changes)
        except ValueError as exc:
            raise ValueError(f"from RESILIENTSOCK_* environment: {exc}") from None

    def summary(self) -> str:
        """A short description for logs and ``--stats``."""
        parts = [f"{f}={getattr(self, f)!r}" for f in FIELDS]
        return ", ".join(parts)


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
    "replay": FieldSpec("re-send unanswered writes after a reconnect: unanswered | safe | none "
                        "(default unanswered)", _choice(REPLAY_MODES), "MODE", REPLAY_MODES),
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
