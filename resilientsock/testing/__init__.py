"""Test helpers for code that uses resilientsock (public).

``FaultProxy`` injects real faults between a client and a server on loopback;
``MessageServer`` is a small acknowledging server; ``LoopThread`` runs them on their own
gevent hub. The pytest plugin (``resilientsock.testing.plugin``, registered as a ``pytest11``
entry point) provides the ``fault_proxy`` and ``message_server`` fixtures.
"""

from ._loop import LoopThread as LoopThread
from ._proxy import FaultProxy as FaultProxy
from ._servers import MessageServer as MessageServer

__all__ = ["FaultProxy", "LoopThread", "MessageServer"]
