"""Session mode (docs/design.md §11): a byte stream carried exactly once through a relay in
front of an unmodified server, across any number of drops between client and relay.

One job a file: ``protocol`` (wire format and session state, sans-IO), ``carrier`` (a
session's bytes between a link and a plain end; the only file touching gevent internals),
``relay`` (the ``Relay`` server and the plain proxy), ``client`` (``open_session``),
``targets`` (which addresses are sessions), ``cli`` (``python -m resilientsock relay``).

The names below are loaded on first use: ``targets`` alone (what ``_socket`` and
``_patching`` ask) imports neither gevent nor the client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import SessionClosedError as SessionClosedError
    from .client import direct_methods as direct_methods
    from .client import open_session as open_session
    from .client import set_direct as set_direct
    from .relay import Relay as Relay
    from .targets import is_session_target as is_session_target
    from .targets import parse_address as parse_address
    from .targets import session_targets as session_targets
    from .targets import set_session_targets as set_session_targets
    from .targets import set_session_tls as set_session_tls

__all__ = ["Relay", "open_session", "set_session_targets", "session_targets",
           "is_session_target", "set_session_tls", "parse_address", "set_direct",
           "direct_methods", "SessionClosedError"]

_LAZY = {
    "Relay": ".relay",
    "open_session": ".client",
    "set_direct": ".client",
    "direct_methods": ".client",
    "SessionClosedError": ".client",
    "set_session_targets": ".targets",
    "session_targets": ".targets",
    "is_session_target": ".targets",
    "set_session_tls": ".targets",
    "parse_address": ".targets",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'resilientsock.session' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
