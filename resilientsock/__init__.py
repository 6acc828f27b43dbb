"""resilientsock: make legacy blocking network code survive a flaky network.

A socket that notices a dropped connection, reconnects (a new DNS lookup, a new TLS
handshake), re-sends the writes that were never answered and carries on; when it cannot, the
caller gets the original exception type with a note saying what was tried. Three ways in::

    import resilientsock
    resilientsock.patch()                       # 1. at startup: every client socket
    sock = resilientsock.ResilientSocket.connect(("hub", 9000))   # 2. one socket
    # 3. python -m resilientsock script.py      (unchanged scripts; also `resilientsock ...`)

How hard it tries is a ``RetryPolicy`` (``patch(deadline=60)``, ``RetryPolicy(replay="safe")``);
``Relay`` and ``patch(session=[...])`` give exactly-once sessions through a relay next to the
server. ``resilientsock.testing`` has the fault proxy and pytest fixtures for your own tests.
Guides: docs/choosing-a-mode.md (which mode for which client), docs/api.md (every option),
docs/troubleshooting.md.

PYTEST_DONT_REWRITE (this marker keeps pytest's assertion rewriting away from the package).
"""

# Import rule (docs/design.md §7): this module imports none of ssl, asyncio or wrapt, and not
# gevent's socket module, so patch() can run gevent's monkey-patching first. Everything heavy
# is loaded on first use (PEP 562 __getattr__).

from __future__ import annotations

import logging as _logging
from typing import TYPE_CHECKING, Any

from ._errors import (
    ErrorCategory as ErrorCategory,
)
from ._errors import (
    ErrorInfo as ErrorInfo,
)
from ._errors import (
    UnansweredEOFError as UnansweredEOFError,
)
from ._errors import (
    classify as classify,
)
from ._errors import (
    is_connection_error as is_connection_error,
)
from ._errors import (
    register as register,
)
from ._patching import is_patched as is_patched
from ._patching import patch as patch
from ._patching import unpatch as unpatch
from ._policy import RetryPolicy as RetryPolicy
from ._stats import SocketStats as SocketStats
from ._stats import stats as stats

if TYPE_CHECKING:
    from ._socket import ResilientSocket as ResilientSocket
    from ._socket import create_connection as create_connection
    from ._tls import ResilientSSLSocket as ResilientSSLSocket
    from .session.relay import Relay as Relay

from ._version import __version__ as __version__  # the one source: _version.py

__all__ = [
    "patch",
    "unpatch",
    "is_patched",
    "ResilientSocket",
    "ResilientSSLSocket",
    "RetryPolicy",
    "classify",
    "is_connection_error",
    "register",
    "ErrorCategory",
    "ErrorInfo",
    "UnansweredEOFError",
    "create_connection",
    "stats",
    "SocketStats",
    "Relay",
]

_LAZY = {
    "ResilientSocket": "._socket",
    "create_connection": "._socket",
    "ResilientSSLSocket": "._tls",
    "Relay": ".session.relay",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'resilientsock' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

# A library's logger (logging HOWTO): the application decides what is shown; the runner
# shows our warnings on stderr (rate-limited per target, _events).
_logging.getLogger("resilientsock").addHandler(_logging.NullHandler())
