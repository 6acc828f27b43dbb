"""pytest fixtures: ``fault_proxy`` and ``message_server`` (registered via ``pytest11``).

``fault_proxy(upstream)`` starts a FaultProxy in front of ``upstream`` and stops it at the end
of the test; ``message_server`` is a started MessageServer in "ack" mode.

Rule of this module: it imports nothing heavy. The ``pytest11`` entry point loads it into every
pytest session of an environment where resilientsock is installed, so gevent, the servers and
the proxy are imported inside the fixtures, when a test asks for one (``tests/test_plugin.py``
proves it in a fresh process).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from ._proxy import FaultProxy
    from ._servers import MessageServer


@pytest.fixture
def message_server() -> Iterator[MessageServer]:
    """A started MessageServer ("ack" mode) on loopback, shut down after the test."""
    from ._servers import MessageServer

    server = MessageServer().start()
    try:
        yield server
    finally:
        server.shutdown()


@pytest.fixture
def fault_proxy() -> Iterator[Callable[[tuple[str, int]], FaultProxy]]:
    """A factory: ``fault_proxy(upstream)`` starts a FaultProxy in front of ``upstream``;
    every proxy it made is stopped after the test, even when the test failed."""
    from ._proxy import FaultProxy

    proxies: list[FaultProxy] = []

    def make(upstream: tuple[str, int]) -> FaultProxy:
        proxy = FaultProxy(upstream).start()
        proxies.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for proxy in proxies:
            proxy.stop()
