"""``python -m resilientsock relay``: run a session relay in front of one server (design.md §11).

Rules of this module:

1. Bad input (an unknown option, a malformed address or number, an address that cannot be
   bound, a certificate that cannot be loaded) is one line on stderr and exit status 2, never a
   traceback.
2. Once listening, the relay prints one line on stdout, ``relay: listening on HOST:PORT ->
   upstream HOST:PORT``, so a supervisor or a test can learn a port picked by the kernel.
3. SIGTERM and SIGINT stop it cleanly (exit status 0): every upstream connection is closed
   and, with ``--stats``, the counters are printed on stderr as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from typing import NoReturn

__all__ = ["main"]

_DESCRIPTION = """\
Run a session relay next to an unmodified TCP server. Clients started with
`python -m resilientsock --session HOST:PORT ...` (or RESILIENTSOCK_SESSION, or
patch(session=[...])) open sessions through it: their byte stream is carried exactly once,
in order, both ways, across any number of drops between client and relay, and the server
sees one TCP connection per session. Any other client is proxied plainly.

Move the server to a private port and give the relay the public one:
  python -m resilientsock relay --listen 0.0.0.0:9000 --upstream 127.0.0.1:9001
"""

_EPILOG = """\
Without --tls-cert/--tls-key, the link between client and relay is plain TCP: an on-path
attacker who saw a session being created could resume it (no worse than the plain TCP it
replaces); see docs/threat-model.md. Without --creation-key-file anyone who can reach
the relay may create sessions, within the caps above. Sizes accept KiB/MiB/GiB suffixes.
Stop with SIGTERM or Ctrl-C.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        _fail(message)


def _fail(message: str) -> NoReturn:
    print(f"resilientsock relay: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds: {text!r}")
    return value


def _bytes(text: str) -> int:
    from .._policy import _size

    try:
        value = _size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 16MiB)") from None
    if value < 1024:
        raise argparse.ArgumentTypeError(f"must be at least 1024 bytes: {text!r}")
    return value


def _count(text: str, floor: int = 1) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < floor:
        raise argparse.ArgumentTypeError(f"must be at least {floor}: {text!r}")
    return value


def _count0(text: str) -> int:
    return _count(text, 0)


def _address(text: str) -> tuple[str, int]:
    from .targets import parse_address

    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m resilientsock relay", description=_DESCRIPTION,
                     epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True, type=_address, metavar="HOST:PORT",
                        help="where clients connect (IPv6 as [::]:9000); port 0 picks one")
    parser.add_argument("--upstream", required=True, type=_address, metavar="HOST:PORT",
                        help="the server the relay connects to, once per session")
    parser.add_argument("--session-timeout", type=_seconds, default=300.0, metavar="S",
                        help="seconds a session is held while its client is away; then its "
                             "upstream connection is reset (default 300)")
    parser.add_argument("--link-timeout", type=_seconds, default=30.0, metavar="S",
                        help="a client link silent this long (PINGed at half of it) is a "
                             "drop: a client stopped or cut off without FIN or RST is "
                             "detached within it, then held --session-timeout (default 30)")
    parser.add_argument("--buffer-limit", type=_bytes, default=16 * 1024 * 1024,
                        metavar="BYTES",
                        help="unacknowledged bytes kept per direction per session; when full, "
                             "writers block (nothing is dropped) (default 16MiB)")
    parser.add_argument("--plain-after", type=_seconds, default=0.05, metavar="S",
                        help="a client silent this long after connecting is proxied plainly "
                             "(server-first protocols: SMTP, FTP, SSH) (default 0.05)")
    parser.add_argument("--tls-cert", metavar="FILE",
                        help="TLS between clients and the relay: certificate chain (PEM)")
    parser.add_argument("--tls-key", metavar="FILE", help="... and its private key (PEM)")
    parser.add_argument("--upstream-timeout", type=_seconds, default=5.0, metavar="S",
                        help="bound on connecting to the upstream, below the 10 s handshake "
                             "bound: the client is told which failed (default 5)")
    parser.add_argument("--creation-key-file", metavar="FILE",
                        help="only clients holding this key (its first line; at least 16 "
                             "bytes) may create sessions: RESILIENTSOCK_SESSION_KEY or "
                             "RetryPolicy(session_key=...) on the client")
    parser.add_argument("--max-sessions", type=_count, default=10_000, metavar="N",
                        help="sessions held at once, attached or not; then new ones get "
                             "ERROR busy (default 10000)")
    parser.add_argument("--max-sessions-per-source", type=_count, default=1_000, metavar="N",
                        help="sessions per client address (default 1000)")
    parser.add_argument("--max-new-per-source", type=_count, default=32, metavar="N",
                        help="sessions per client address whose client has not yet shown "
                             "it received CREATED (default 32)")
    parser.add_argument("--creation-hold", type=_seconds, default=5.0, metavar="S",
                        help="how long such a session is held once its client is gone "
                             "(default 5)")
    parser.add_argument("--max-buffered", type=_bytes, default=256 * 1024 * 1024,
                        metavar="BYTES",
                        help="unacknowledged bytes across all sessions, detached ones "
                             "included; beyond it upstream reads pause; as much again for "
                             "bytes from clients waiting for their upstreams: beyond it "
                             "client links with over 64 KiB waiting are not read "
                             "(default 256MiB)")
    parser.add_argument("--fd-reserve", type=_count0, default=32, metavar="N",
                        help="file descriptors kept free to accept and refuse cleanly "
                             "(default 32)")
    parser.add_argument("--log-level", default="WARNING", metavar="LEVEL",
                        help="DEBUG, INFO (every session created, resumed, expired), WARNING "
                             "(rejected handshakes, expiries) or ERROR (default WARNING)")
    parser.add_argument("--stats", action="store_true",
                        help="print the relay's counters on stderr (JSON) when it stops")
    return parser


def main(argv: list[str]) -> int:
    """Run the relay until SIGTERM/SIGINT; 0 on a clean stop, 2 on bad input (rule 1)."""
    args = build_parser().parse_args(argv)
    level = args.log_level.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        _fail(f"--log-level: unknown level {args.log_level!r}")
    if (args.tls_cert is None) != (args.tls_key is None):
        _fail("--tls-cert and --tls-key go together")
    if args.tls_cert is not None:  # said as such, not as "cannot listen" (an OSError too)
        import ssl

        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(args.tls_cert, args.tls_key)
        except OSError as exc:
            _fail(f"--tls-cert {args.tls_cert} / --tls-key {args.tls_key}: cannot load a PEM "
                  f"certificate and its key from them ({exc.strerror or exc})")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    from .relay import Relay

    key = None
    if args.creation_key_file:
        try:
            with open(args.creation_key_file, "rb") as f:
                key = f.readline().strip()
        except OSError as exc:
            _fail(f"--creation-key-file: {exc.strerror or exc}")
        if len(key) < 16:
            _fail("--creation-key-file: the key (its first line) must be at least 16 bytes")
    try:
        relay = Relay(args.listen, args.upstream, session_timeout=args.session_timeout,
                      buffer_limit=args.buffer_limit, plain_after=args.plain_after,
                      tls_cert=args.tls_cert, tls_key=args.tls_key, log_level=level,
                      upstream_timeout=args.upstream_timeout, creation_key=key,
                      max_sessions=args.max_sessions,
                      max_sessions_per_source=args.max_sessions_per_source,
                      max_fresh_per_source=args.max_new_per_source,
                      creation_hold=args.creation_hold, max_buffered=args.max_buffered,
                      fd_reserve=args.fd_reserve, link_timeout=args.link_timeout)
    except ValueError as exc:
        _fail(str(exc))
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    # Blocked before the relay's thread starts (it inherits the mask), so sigwait gets them.
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        relay.start()
    except OSError as exc:
        _fail(f"cannot listen on {args.listen[0]}:{args.listen[1]}: {exc.strerror or exc}")
    except Exception as exc:  # noqa: BLE001 - a certificate that does not load, etc.
        _fail(f"cannot start: {exc}")
    from .targets import format_address

    up = args.upstream
    shown = format_address(*relay.address[:2])
    print(f"relay: listening on {shown} -> upstream {up[0]}:{up[1]}", flush=True)
    try:
        signal.sigwait(stop_signals)
    finally:
        stats = relay.stats()
        relay.stop()
        if args.stats:
            print(json.dumps(stats, sort_keys=True), file=sys.stderr)
    return 0
