"""Test helpers for code that uses resilientsock (public).

``FaultProxy`` injects real faults between a client and a server on loopback;
``MessageServer`` is a small acknowledging server; ``LoopThread`` runs them on their own
gevent hub. ``NetnsPair`` (Linux, root) builds two network namespaces joined by a veth pair for
kernel faults a proxy cannot make: ENETUNREACH, a link going down, a silent black hole, a
server changing address. ``FaultProxy.add_toxic`` has Toxiproxy's toxics and ``proxy.plan``
(a ``FaultPlan``) fails exact points of a conversation; ``ToxiproxyAPI`` serves Toxiproxy's HTTP
API over FaultProxies. ``python -m resilientsock.testing proxy`` is the standalone proxy, and
``python -m resilientsock.testing [servers]`` runs MessageServers driven over stdin (for a
server in another process or namespace). The pytest plugin
(``resilientsock.testing.plugin``, registered as a ``pytest11`` entry point) provides the
``fault_proxy`` and ``message_server`` fixtures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._api import ToxiproxyAPI as ToxiproxyAPI
    from ._loop import LoopThread as LoopThread
    from ._netns import NetnsPair as NetnsPair
    from ._plans import FaultPlan as FaultPlan
    from ._proxy import FaultProxy as FaultProxy
    from ._servers import MessageServer as MessageServer
    from ._toxics import Toxic as Toxic
    from ._toxics import ToxicError as ToxicError

__all__ = ["FaultPlan", "FaultProxy", "LoopThread", "MessageServer", "NetnsPair", "Toxic",
           "ToxicError", "ToxiproxyAPI"]

# Loaded on first use (PEP 562): the pytest plugin (``.plugin``) is imported into every pytest
# session of an environment where resilientsock is installed, and must not import gevent there.
_LAZY = {
    "FaultProxy": "._proxy",
    "LoopThread": "._loop",
    "MessageServer": "._servers",
    "NetnsPair": "._netns",
    "FaultPlan": "._plans",
    "Toxic": "._toxics",
    "ToxicError": "._toxics",
    "ToxiproxyAPI": "._api",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'resilientsock.testing' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
