"""Test helpers for code that uses resilientsock (public).

``FaultProxy`` injects real faults between a client and a server on loopback;
``MessageServer`` is a small acknowledging server; ``LoopThread`` runs them on their own
gevent hub. ``NetnsPair`` (Linux, root) builds two network namespaces joined by a veth pair for
kernel faults a proxy cannot make: ENETUNREACH, a link going down, a silent black hole, a
server changing address. ``python -m resilientsock.testing`` runs MessageServers driven over
stdin (for a server in another process or namespace). The pytest plugin
(``resilientsock.testing.plugin``, registered as a ``pytest11`` entry point) provides the
``fault_proxy`` and ``message_server`` fixtures.
"""

from ._loop import LoopThread as LoopThread
from ._netns import NetnsPair as NetnsPair
from ._proxy import FaultProxy as FaultProxy
from ._servers import MessageServer as MessageServer

__all__ = ["FaultProxy", "LoopThread", "MessageServer", "NetnsPair"]
