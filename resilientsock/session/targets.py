"""Which addresses speak the session protocol (docs/design.md §11), and the TLS to use for
the link to the relay. No I/O and no gevent: ``_socket`` and ``_patching`` ask here cheaply;
the client reads what was set.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["parse_address", "set_session_targets", "session_targets", "set_session_tls",
           "is_session_target"]


def parse_address(text: str) -> tuple[str, int]:
    """``"HOST:PORT"`` or ``"[IPv6]:PORT"`` to ``(host, port)``; ValueError naming ``text``."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r}: expected a 'HOST:PORT' string")
    raw = text.strip()
    if raw.startswith("["):
        host, sep, port = raw[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r}: expected [IPv6]:PORT")
    else:
        host, sep, port = raw.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"{text!r}: expected HOST:PORT (IPv6 as [::1]:PORT)")
    if not host:
        raise ValueError(f"{text!r}: the host is empty")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 0 to 65535")
    return host, int(port)


def format_address(host: str, port: int) -> str:
    """``HOST:PORT`` as ``parse_address`` reads it (an IPv6 host in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _addr(value: str | tuple[str, int], listen: bool = False) -> tuple[str, int]:
    if isinstance(value, tuple):
        # (host, port), or IPv6's (host, port, flowinfo, scope_id): checked as the string
        # form is, so a bad one is a ValueError here, not an error at the first connection.
        # ``listen``: an empty host is every interface, as socket.bind(("", port)) has it.
        port = value[1] if len(value) in (2, 4) else None
        if isinstance(port, str) and port.isdigit():
            port = int(port)
        if not (isinstance(value[0], str) and (value[0] or listen) and isinstance(port, int)
                and not isinstance(port, bool) and 0 <= port <= 65535):
            raise ValueError(f"{value!r}: expected (host, port) with a port from 0 to 65535")
        return value[0], port
    return parse_address(value)


# =============================================================================================
# The client side

_targets: frozenset[tuple[str, int]] = frozenset()
_session_ssl: Any = None


def set_session_targets(targets: Iterable[str] | None) -> None:
    """Connections to these ``"HOST:PORT"`` targets (IPv6 as ``[::1]:PORT``) become sessions;
    None or [] turns session mode off. ValueError naming the bad entry, and then nothing
    changes."""
    global _targets
    if targets is None:
        _targets = frozenset()
        return
    if isinstance(targets, str):
        targets = [t for t in targets.split(",") if t.strip()]
    parsed = set()
    for entry in targets:
        try:
            host, port = parse_address(entry)
        except ValueError as exc:
            raise ValueError(f"session target {exc}") from None
        if port == 0:
            raise ValueError(f"session target {entry!r}: port 0 is not a server")
        parsed.add((host.lower(), port))
    _targets = frozenset(parsed)


def session_targets() -> list[str]:
    return sorted(format_address(h, p) for h, p in _targets)


def set_session_tls(context: Any) -> None:
    """An ``ssl.SSLContext`` for TLS between client and relay (None: plain TCP). The
    application's own TLS to its server rides inside the session either way."""
    global _session_ssl
    _session_ssl = context


def is_session_target(address: object) -> bool:
    """Is ``address`` (as given to connect(): ``(host, port[, ...])``) a session target?"""
    if not _targets or not isinstance(address, tuple) or len(address) < 2:
        return False
    host, port = address[0], address[1]
    if not isinstance(host, str) or not isinstance(port, int):
        return False
    return (host.lower().strip("[]"), port) in _targets


def session_tls() -> Any:
    """The context ``set_session_tls`` set (None: plain TCP, unless the environment names a CA)."""
    return _session_ssl
